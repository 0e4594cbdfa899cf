"""Prompt initialisers: each returns a flax-style `init(rng, shape, dtype) -> [P, d]` array.

Those that read the frozen embedding table take it `[V, d]` at construction.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]
INIT_NAMES = ('uniform', 'uniform_positive', 'sampled_vocab', 'class_labels', 'text', 'array',
              'file')


def uniform(scale: float = 0.5, symmetric: bool = True) -> Initializer:
  """U[-scale, scale] (the paper) or, with `symmetric=False`, U[0, scale) (the reference repo)."""

  def init(rng, shape, dtype=jnp.float32):
    low = -scale if symmetric else 0.0
    return jax.random.uniform(rng, shape, jnp.float32, low, scale).astype(dtype)

  return init


def sampled_vocab(embedding, population: int = 5000) -> Initializer:
  """Rows of the embedding table drawn from the first `population` ids (T5's commonest tokens).

  Draws without replacement while the prompt is no longer than the population.
  """
  embedding = jnp.asarray(embedding)
  population = min(int(population), embedding.shape[0])

  def init(rng, shape, dtype=jnp.float32):
    length = shape[0]
    ids = jax.random.choice(rng, population, (length,), replace=length > population)
    return embedding[ids].astype(dtype).reshape(shape)

  return init


def _mean_rows(embedding, token_ids: Sequence[int]) -> jax.Array:
  if len(token_ids) == 0:
    raise ValueError('class_labels: a label tokenised to no pieces; give a non-empty label')
  return jnp.mean(embedding[jnp.asarray(list(token_ids))], axis=0)


def _rows_first(rows: jax.Array, fallback: Initializer) -> Initializer:
  """The given rows at the first positions (dropped beyond the prompt), `fallback` after."""

  def init(rng, shape, dtype=jnp.float32):
    out = fallback(rng, shape, dtype)
    n = min(shape[0], rows.shape[0])
    return out.at[:n].set(rows[:n].astype(dtype))

  return init


def class_labels(embedding, label_token_ids: Sequence[Sequence[int]],
                 fallback: Initializer | None = None) -> Initializer:
  """First positions hold the label embeddings (a multi-piece label is averaged); the rest
  come from `fallback` (sampled vocabulary by default). Labels beyond the prompt are dropped."""
  embedding = jnp.asarray(embedding)
  labels = jnp.stack([_mean_rows(embedding, ids) for ids in label_token_ids])
  return _rows_first(labels, fallback or sampled_vocab(embedding))


def text(embedding, token_ids: Sequence[int], fallback: Initializer | None = None) -> Initializer:
  """The embedded tokens of a string at the first positions; the rest from `fallback`."""
  embedding = jnp.asarray(embedding)
  rows = embedding[jnp.asarray(list(token_ids), jnp.int32)]
  return _rows_first(rows, fallback or sampled_vocab(embedding))


def from_array(value) -> Initializer:
  """A fixed prompt value (e.g. a SPoT source prompt); the requested shape must match."""
  value = np.asarray(value, np.float32)

  def init(rng, shape, dtype=jnp.float32):
    del rng
    if tuple(shape) != value.shape:
      if len(shape) == value.ndim and shape[-1] != value.shape[-1]:
        raise ValueError(f'prompt width {value.shape[-1]} does not match the model width '
                         f'{shape[-1]}; to move a prompt between models use cross-model '
                         'projection (jaxprompt.methods.projection)')
      raise ValueError(f'prompt of shape {value.shape} cannot initialise a prompt of shape '
                       f'{tuple(shape)}; set the prompt length to {value.shape[-2]}')
    return jnp.asarray(value, dtype)

  return init


def from_file(path: str) -> Initializer:
  """The prompt stored in a prompt file (.safetensors from jaxprompt, or .npy)."""
  from jaxprompt.prompts.files import read_prompt
  return from_array(read_prompt(path).value)
