"""The soft prompt as a Flax module, and where it sits in a T5X parameter tree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

from jaxprompt.prompts import initializers

# google-research/prompt-tuning places the prompt inside the encoder at this path.
PROMPT_PATH = ('encoder', 'prompt', 'prompt', 'prompt')
PROMPT_AXES = ('prompt', 'prompt_embed')
# Where the prompt enters the embedded input (see `Transformer.encode`).
POSITIONS = {'prefix': 0, 'prefix_after_bos': 1, 'suffix': -1}


class Prompt(nn.Module):
  """A trainable [P, d] prompt (or a [n, P, d] stack of n task prompts)."""

  length: int
  embed_dim: int
  init_fn: initializers.Initializer = initializers.uniform()
  num_prompts: int | None = None

  @nn.compact
  def __call__(self) -> jax.Array:
    if self.num_prompts is None:
      shape, axes = (self.length, self.embed_dim), PROMPT_AXES
    else:
      shape, axes = (self.num_prompts, self.length, self.embed_dim), ('prompts',) + PROMPT_AXES
      base = self.init_fn

      def stacked(rng, shape, dtype=jnp.float32):
        keys = jax.random.split(rng, shape[0])
        return jnp.stack([base(k, shape[1:], dtype) for k in keys])

      return nn_partitioning.param_with_axes('prompt', stacked, shape, jnp.float32, axes=axes)
    return nn_partitioning.param_with_axes('prompt', self.init_fn, shape, jnp.float32, axes=axes)


def prompt_tree(value: jax.Array) -> dict[str, Any]:
  """The trainable pytree of prompt tuning: the prompt at `encoder/prompt/prompt/prompt`."""
  tree: Any = value
  for key in reversed(PROMPT_PATH):
    tree = {key: tree}
  return tree


def get_prompt(tree: dict[str, Any]) -> jax.Array:
  """The prompt array of a tree made by `prompt_tree` (or a T5X tree that holds one)."""
  node = tree
  for key in PROMPT_PATH:
    if not isinstance(node, dict) or key not in node:
      raise KeyError(f'no prompt at {"/".join(PROMPT_PATH)}')
    node = node[key]
  return node


def init_prompt(rng, length: int, embed_dim: int, init_fn=None,
                num_prompts: int | None = None) -> dict[str, Any]:
  """Initialises a prompt with `Prompt` and returns it as `prompt_tree`."""
  module = Prompt(length, embed_dim, init_fn or initializers.uniform(), num_prompts)
  return prompt_tree(module.init(rng)['params']['prompt'])


def select_prompts(stack: jax.Array, task_index: jax.Array) -> jax.Array:
  """[n, P, d] stack, [B] task ids -> [B, P, d]: each example takes its task's prompt."""
  return jnp.take(stack, task_index, axis=0)


def position_index(position: str | int) -> int:
  """'prefix' / 'prefix_after_bos' / 'suffix' (or an int) -> index for `Transformer.encode`."""
  if isinstance(position, int):
    return position
  if position not in POSITIONS:
    raise ValueError(f'unknown prompt position {position!r}; choose one of {sorted(POSITIONS)}')
  return POSITIONS[position]
