"""Multi-task prompts: a [n, P, d] stack, one row per task of a mixture, trained in one run.

Because the backbone is frozen, one batch can hold examples of n tasks, each example using
its own task's prompt (Lester et al.'s serving argument; SPoT's many source prompts at once).
The data layer tags each training example with `task_index` (its task's position in the
mixture), the optimizer keeps separate statistics per row (a row gets the update it would
get alone), and each task is validated with its own row.
"""

from __future__ import annotations

import numpy as np

from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.train import steps
from jaxprompt.train.optimizers import per_row


@register
class PromptStack(Method):
  name = 'prompt_stack'
  uses_task_index = True

  def init(self, rng, ctx: Context):
    from jaxprompt.prompts.init import prompt_initializer
    return prompt_lib.init_prompt(rng, ctx.config.prompt_length, ctx.width,
                                  prompt_initializer(ctx), num_prompts=len(ctx.tasks)), {}

  model_inputs = staticmethod(steps.prompt_stack_inputs)

  def optimizer(self, ctx: Context):
    return per_row(super().optimizer(ctx))

  def identity(self, ctx: Context):
    return dict(super().identity(ctx), tasks=list(ctx.tasks))

  def from_prompt_file(self, pf, path):
    if pf.value.ndim != 3:
      raise ValueError(f'{path}: holds one prompt, not a stack; evaluate it with method '
                       'prompt_tuning')
    return prompt_lib.prompt_tree(np.asarray(pf.masked_value())), {}

  def eval_extras(self, task_index: int):
    return {'task_index': np.int32(task_index)}
