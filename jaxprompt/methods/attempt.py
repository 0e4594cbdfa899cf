"""ATTEMPT (Asai et al., EMNLP 2022): a target prompt plus an input-conditioned attention mixture
over frozen source prompts.

For an input x with embedded tokens X [L, d] (the frozen backbone's own token embedding):

    x^ = max-pool of X over x's tokens                          [d]
    H  = LayerNorm(W_up SiLU(W_down x^))                        [d]   W_down [d, r], W_up [r, d]
    a  = softmax_j(P^_j . H / T) over j in [sources; target]    P^_j: max-pool of prompt j
    P_x = P_target + sum_j a_j P_j                              [P, d]

as the paper describes it and the authors' code builds it (github.com/AkariAsai/ATTEMPT:
bias-free W_down / W_up with r = 300, SiLU, LayerNorm; their T5-base configs set T = 2087, about
e * d for d = 768, so the default here is T = e * d). Padding tokens are left out of the
max-pool (the authors' code pools over the padded sequence). The target prompt and the
attention module (W_down, W_up, the LayerNorm) are trained; the source prompts are frozen
entries of `frozen` (never in the trainable, no gradient or optimizer state), read from a SPoT
library (`--source_library DIR`, every entry or `--source_tasks`), prompt files
(`--source_prompts`: files, LIBRARY_DIR:TASK, or `random` for fixed N(0, 1) prompts of the
run's shape, the no-information baseline), all of the run's prompt length and width.

Each example gets its own prompt, so `model_inputs` returns [B, P, d] (the backbone's seam takes
per-example prompts). The product is a file with the target prompt (`prompt`, so `info` reads
it), the attention module and the sources; `jaxprompt eval` rebuilds the mixture from it.
The default optimizer is AdamW at lr 0.3, weight decay 1e-5 (the authors' single-task config
trains with lr 0.3).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.config import ConfigError
from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.methods.multitask_prompt import read_tensors, write_tensors
from jaxprompt.methods.p_tuning import adamw, torch_uniform
from jaxprompt.methods.residual_prompt import layer_norm
from jaxprompt.prompts import prompt as prompt_lib

ATTENTION_NAMES = ('w_down', 'w_up', 'norm_scale', 'norm_bias')


def init_attention(rng, width: int, rank: int) -> dict:
  """W_down [d, r], W_up [r, d] as torch's bias-free Linear layers; LayerNorm at 1, 0."""
  k_down, k_up = jax.random.split(rng)
  return {'w_down': torch_uniform(1 / math.sqrt(width))(k_down, (width, rank)),
          'w_up': torch_uniform(1 / math.sqrt(rank))(k_up, (rank, width)),
          'norm_scale': jnp.ones((width,), jnp.float32),
          'norm_bias': jnp.zeros((width,), jnp.float32)}


def pooled_inputs(embedding, tokens) -> jax.Array:
  """[B, d]: the max over each example's non-padding tokens of their embeddings."""
  x = jnp.take(embedding, tokens, axis=0).astype(jnp.float32)
  valid = (tokens > 0)[..., None]
  pooled = jnp.where(valid, x, -jnp.inf).max(axis=1)
  return jnp.where(valid.any(axis=1), pooled, 0.0)


def attention_weights(trainable, sources, tokens, embedding, temperature) -> jax.Array:
  """[B, t + 1]: each example's softmax weights over [sources; target]."""
  attention = trainable['attention']
  h = jax.nn.silu(pooled_inputs(embedding, tokens) @ attention['w_down']) @ attention['w_up']
  h = layer_norm(h, attention['norm_scale'], attention['norm_bias'])
  prompts = jnp.concatenate([sources, trainable['prompt'][None]], axis=0)
  keys = prompts.max(axis=1)  # [t + 1, d]
  return jax.nn.softmax(h @ keys.T / temperature, axis=-1)


def attempt_inputs(trainable, frozen, batch):
  """Frozen backbone; example b's prompt P_target + sum_j a_bj P_j ([B, P, d])."""
  backbone, sources = frozen['backbone'], frozen['source_prompts']
  weights = attention_weights(trainable, sources, batch['encoder_input_tokens'],
                              backbone['token_embedder']['embedding'], frozen['temperature'])
  prompts = jnp.concatenate([sources, trainable['prompt'][None]], axis=0)
  return backbone, trainable['prompt'] + jnp.einsum('bk,kpd->bpd', weights, prompts)


# ---------------------------------------------------------------------------------------------
# Sources.

def source_specs(options, tasks, width: int, length: int) -> list[str]:
  """The source prompts named by the options, as `projection.read_source_prompt` specs."""
  if options.source_library and options.source_prompts:
    raise ConfigError('attempt: give --source_library or --source_prompts, not both')
  if options.source_library:
    from jaxprompt.methods import library as lib
    held = lib.entries(options.source_library)
    names = list(options.source_tasks) or [t for t in sorted(held) if t not in tasks]
    missing = [t for t in names if t not in held]
    if missing:
      raise ConfigError(f'--source_tasks: {options.source_library} holds no prompt of '
                        f'{", ".join(missing)}; choose among {", ".join(sorted(held))}')
    specs = [f'{options.source_library}:{t}' for t in names]
  else:
    specs = [f'random:{width}:{length}' if s == 'random' else s for s in options.source_prompts]
  if not specs:
    raise ConfigError('attempt: no source prompts; pass --source_library DIR (a SPoT library) '
                      'or --source_prompts FILE,...')
  return specs


def load_source_prompts(specs, seed: int, width: int, length: int) -> np.ndarray:
  from jaxprompt.methods.projection import load_sources
  stack, fingerprint = load_sources(specs, seed)
  if stack.shape[1:] != (length, width):
    raise ConfigError(f'attempt: source prompts of length {stack.shape[1]} and width '
                      f'{stack.shape[2]}, but this run\'s prompt is ({length}, {width}); pass '
                      f'--prompt_length {stack.shape[1]} (sources must fit the backbone)')
  del fingerprint
  return stack


@dataclasses.dataclass(frozen=True)
class AttemptOptions:
  source_library: str | None = None  # a SPoT prompt library: its prompts are the sources
  source_tasks: tuple[str, ...] = ()  # which of its tasks (default: all but the run's own)
  source_prompts: tuple[str, ...] = ()  # or prompt files / LIBRARY_DIR:TASK / random
  attention_rank: int = 300  # r of W_down / W_up (the authors' 300)
  temperature: float | None = None  # T; None: e * d

  def __post_init__(self):
    for name in ('source_tasks', 'source_prompts'):
      value = getattr(self, name)
      if isinstance(value, str):
        object.__setattr__(self, name, tuple(s.strip() for s in value.split(',') if s.strip()))
    if not isinstance(self.attention_rank, int) or self.attention_rank < 1:
      raise ConfigError(f'attention_rank (--attention_rank) must be a positive integer, got '
                        f'{self.attention_rank!r}')
    if self.temperature is not None and not self.temperature > 0:
      raise ConfigError(f'temperature (--temperature) must be positive, got {self.temperature!r}')


@register
class Attempt(Method):
  """ATTEMPT: a target prompt plus an attention mixture of frozen source prompts per input."""

  name = 'attempt'
  Options = AttemptOptions
  learning_rate = 0.3
  weight_decay = 1e-5

  def init(self, rng, ctx: Context):
    o, c = ctx.options, ctx.config
    prompt_rng, attention_rng = jax.random.split(rng)
    specs = source_specs(o, ctx.tasks, ctx.width, c.prompt_length)
    sources = load_source_prompts(specs, c.seed, ctx.width, c.prompt_length)
    print(f'attempt: {len(specs)} frozen source prompts: {", ".join(specs)}', file=sys.stderr)
    target = prompt_lib.get_prompt(Method.init(self, prompt_rng, ctx)[0])
    temperature = o.temperature or math.e * ctx.width
    return ({'prompt': target, 'attention': init_attention(attention_rng, ctx.width,
                                                           o.attention_rank)},
            {'source_prompts': jnp.asarray(sources), 'temperature': jnp.float32(temperature)})

  model_inputs = staticmethod(attempt_inputs)

  def optimizer(self, ctx: Context):
    return adamw(self, ctx)

  def save_product(self, trainable, extras, path, metadata):
    path = path + '.safetensors'
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(trainable))
    tensors = {f'attempt/{k}': host['attention'][k] for k in ATTENTION_NAMES}
    tensors['source_prompts'] = np.asarray(jax.device_get(extras['source_prompts']))
    write_tensors(path, host['prompt'], tensors, method=self.name,
                  temperature=float(np.asarray(jax.device_get(extras['temperature']))),
                  **metadata)
    return path

  def load_product(self, path, ctx: Context):
    names = [f'attempt/{k}' for k in ATTENTION_NAMES] + ['source_prompts']
    t, meta = read_tensors(path, names, self.name)
    if t['prompt'].shape[-1] != ctx.width:
      raise ValueError(f'{path}: prompts of width {t["prompt"].shape[-1]}, but the model width '
                       f'is {ctx.width}')
    trainable = {'prompt': jnp.asarray(t['prompt']),
                 'attention': {k: jnp.asarray(t[f'attempt/{k}']) for k in ATTENTION_NAMES}}
    return trainable, {'source_prompts': jnp.asarray(t['source_prompts']),
                       'temperature': jnp.float32(meta['temperature'])}

  def contract_options(self):
    return {'source_prompts': ('random', 'random'), 'attention_rank': 4}


__all__ = ['ATTENTION_NAMES', 'Attempt', 'AttemptOptions', 'attempt_inputs',
           'attention_weights', 'init_attention', 'load_source_prompts', 'pooled_inputs',
           'source_specs']
