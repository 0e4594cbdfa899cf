"""Soft prompts: the module, initialisers, placement and prompt files."""

from jaxprompt.prompts import initializers
from jaxprompt.prompts.files import PromptFile, check_compatible, read_prompt, write_prompt
from jaxprompt.prompts.prompt import (PROMPT_PATH, Prompt, get_prompt, init_prompt,
                                      position_index, prompt_tree, select_prompts)

__all__ = [
    'PROMPT_PATH', 'Prompt', 'PromptFile', 'check_compatible', 'get_prompt', 'init_prompt',
    'initializers', 'position_index', 'prompt_tree', 'read_prompt', 'select_prompts',
    'write_prompt',
]
