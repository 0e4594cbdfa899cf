"""Prompt ensembling (Lester et al. 2021, section 7.2): n prompts for one task that vote.

The n prompts are a [n, P, d] stack trained in one run: example b of a batch trains row
b mod n (so each row sees its own share of the data, from its own initialisation), with
per-row optimizer statistics. At evaluation every example runs with every row in one batch
and the n predictions vote (ties go to the earlier row).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxprompt.config import ConfigError
from jaxprompt.methods import register
from jaxprompt.methods.prompt_stack import PromptStack
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.train import steps


@dataclasses.dataclass(frozen=True)
class EnsembleOptions:
  num_prompts: int = 5  # the paper's ensemble size

  def __post_init__(self):
    if not isinstance(self.num_prompts, int) or self.num_prompts < 1:
      raise ConfigError(f'num_prompts (--num_prompts) must be a positive integer, got '
                        f'{self.num_prompts!r}')


def ensemble_inputs(trainable, frozen, batch):
  """Example b uses row b mod n (training); see `select_prompts`."""
  stack = prompt_lib.get_prompt(trainable)
  rows = jnp.arange(batch['encoder_input_tokens'].shape[0]) % stack.shape[0]
  return frozen['backbone'], prompt_lib.select_prompts(stack, rows)


@register
class PromptEnsemble(PromptStack):
  name = 'prompt_ensemble'
  Options = EnsembleOptions
  ensemble = True
  uses_task_index = False

  def init(self, rng, ctx):
    from jaxprompt.prompts.init import prompt_initializer
    return prompt_lib.init_prompt(rng, ctx.config.prompt_length, ctx.width,
                                  prompt_initializer(ctx), num_prompts=ctx.options.num_prompts), {}

  model_inputs = staticmethod(ensemble_inputs)
  eval_inputs = staticmethod(steps.prompt_inputs)  # the whole stack: every row sees every example

  def identity(self, ctx):
    return dict(super().identity(ctx), tasks=None)

  def eval_extras(self, task_index):
    return {}
