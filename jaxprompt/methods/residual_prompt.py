"""Residual prompt tuning (Razdaibiedina et al., Findings of ACL 2023).

The prompt goes through a shallow bottleneck MLP with a skip connection:

    prompt' = prompt + LayerNorm(W_up ReLU(W_down prompt + b_down) + b_up)

applied to every prompt token. Choices, and where they come from:

* LayerNorm sits after the up-projection, *inside* the residual branch, and the skip adds the
  raw prompt: the authors' `ResMLP` (github.com/arazd/ResidualPrompts, prompt_tuner.py) is
  Linear - ReLU - Linear - LayerNorm, returning module(x) + x.
* `residual_mlp='shared'` (default): one MLP for all tokens, as the authors' code applies one
  `ResMLP` to the whole [P, d] prompt; 'per_token': a separate MLP (and LayerNorm) per token,
  the paper's other variant (P times the parameters).
* `bottleneck_size` m: 800 by default (the authors' code default).
* Linear layers start as torch's (U(+-1/sqrt(fan_in))), LayerNorm at scale 1, bias 0
  (eps 1e-5); the prompt from `--prompt_init` / `--init_from` as for prompt tuning.
* The optimizer is AdamW at lr 0.3, weight decay 1e-5 for prompt and MLP alike (the authors'
  defaults: `lr=0.3`, `mlp_lr=None` = lr, `weight_decay=1e-5`).

The MLP is for training only: the product is the plain [P, d] prompt' (`eval`, export and SPoT
read it like any prompt).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxprompt.config import ConfigError
from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.methods.p_tuning import ReparameterizedPrompt, torch_uniform
from jaxprompt.prompts import prompt as prompt_lib

RESIDUAL_MLPS = ('shared', 'per_token')
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's


def init_residual_mlp(rng, length: int, width: int, bottleneck: int, per_token: bool) -> dict:
  """{'down': {kernel, bias}, 'up': {kernel, bias}, 'norm': {scale, bias}}; per token: each
  with a leading [P] axis."""
  lead = (length,) if per_token else ()
  k = jax.random.split(rng, 4)
  down, up = torch_uniform(1 / math.sqrt(width)), torch_uniform(1 / math.sqrt(bottleneck))
  return {'down': {'kernel': down(k[0], lead + (width, bottleneck)),
                   'bias': down(k[1], lead + (bottleneck,))},
          'up': {'kernel': up(k[2], lead + (bottleneck, width)), 'bias': up(k[3], lead + (width,))},
          'norm': {'scale': jnp.ones(lead + (width,), jnp.float32),
                   'bias': jnp.zeros(lead + (width,), jnp.float32)}}


def layer_norm(x, scale, bias, eps: float = LAYER_NORM_EPS):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def residual_prompt(trainable) -> jax.Array:
  """prompt + LayerNorm(MLP(prompt)) of a residual-prompt trainable ([P, d])."""
  prompt, mlp = trainable['prompt'], trainable['mlp']
  per_token = mlp['down']['kernel'].ndim == 3
  down, up = ('pd,pdm->pm', 'pm,pmd->pd') if per_token else ('pd,dm->pm', 'pm,md->pd')
  h = jax.nn.relu(jnp.einsum(down, prompt, mlp['down']['kernel']) + mlp['down']['bias'])
  y = jnp.einsum(up, h, mlp['up']['kernel']) + mlp['up']['bias']
  return prompt + layer_norm(y, mlp['norm']['scale'], mlp['norm']['bias'])


@dataclasses.dataclass(frozen=True)
class ResidualOptions:
  bottleneck_size: int = 800
  residual_mlp: str = 'shared'  # or 'per_token'

  def __post_init__(self):
    if not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
      raise ConfigError(f'bottleneck_size (--bottleneck_size) must be a positive integer, got '
                        f'{self.bottleneck_size!r}')
    if self.residual_mlp not in RESIDUAL_MLPS:
      raise ConfigError(f'residual_mlp (--residual_mlp) must be one of {", ".join(RESIDUAL_MLPS)}'
                        f', got {self.residual_mlp!r}')


@register
class ResidualPrompt(ReparameterizedPrompt):
  """Residual prompt tuning: prompt + LayerNorm(bottleneck MLP(prompt)), trained jointly."""

  name = 'residual_prompt'
  Options = ResidualOptions
  learning_rate = 0.3
  weight_decay = 1e-5

  def init(self, rng, ctx: Context):
    prompt_rng, mlp_rng = jax.random.split(rng)
    prompt, extras = Method.init(self, prompt_rng, ctx)
    o = ctx.options
    mlp = init_residual_mlp(mlp_rng, ctx.config.prompt_length, ctx.width, o.bottleneck_size,
                            o.residual_mlp == 'per_token')
    return {'prompt': prompt_lib.get_prompt(prompt), 'mlp': mlp}, extras

  prompt_of = staticmethod(residual_prompt)

  def contract_options(self):
    return {'bottleneck_size': 5, 'residual_mlp': 'per_token'}


__all__ = ['RESIDUAL_MLPS', 'ResidualOptions', 'ResidualPrompt', 'init_residual_mlp',
           'layer_norm', 'residual_prompt']
