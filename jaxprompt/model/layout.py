"""How the frozen backbone is held in memory: its dtype, and its scanned layout.

Pure functions over nested dicts of params.

Dtype: checkpoints are float32; `cast_frozen(params, 'bfloat16')` halves the frozen
weights' memory (every layer casts its params to the activation dtype where it uses them).
A trainable is never cast: prompts and their optimizer state stay float32.

Unrolled (every checkpoint format, T5X's `examples/t5` tree): `encoder/layers_{i}/...`.
Scanned (`Transformer(scan_layers=True)`): `encoder/layers/...`, each leaf the stack of the
layers' leaves on a new leading axis, whose logical axis name is 'layers'. T5X's scalable_t5
stacks on axis 1 (`param_scan_axis`) and puts a relative position table in every layer; our
T5 keeps the one shared table of `examples/t5` (the public T5.1.1 checkpoints' tree), so
checkpoints are always read and written unrolled, and the scanned tree exists only in memory.
The leading axis lets each scan step slice its layer in place (no transposed copy).

Leaves may be numpy or jax arrays (stacked with their own library) or `ShapeDtypeStruct`s.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import host
from jaxprompt.model.network import SCAN_AXIS

STACKS = ('encoder', 'decoder')
PARAM_DTYPES = ('float32', 'bfloat16')
_LAYER = re.compile(r'layers_(\d+)$')


def cast_leaf(x: Any, dtype: str | np.dtype) -> Any:
  """One floating leaf in `dtype` (numpy stays numpy, jax stays jax; others unchanged)."""
  dtype = jnp.dtype(dtype)
  if isinstance(x, jax.ShapeDtypeStruct):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, 'sharding', None))
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
    return x
  return x.astype(dtype)


def cast_frozen(params: Any, dtype: str) -> Any:
  """The frozen backbone's params held in `dtype` ('float32' or 'bfloat16'), leaf by leaf."""
  if str(dtype) not in PARAM_DTYPES:
    raise ValueError(f'param_dtype {dtype!r} is not one of {", ".join(PARAM_DTYPES)}')
  return jax.tree_util.tree_map(lambda x: cast_leaf(x, dtype), params)


def _stack(leaves: list) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _stack_releasing(leaves: list) -> jax.Array:
  """`_stack` of jax arrays written layer by layer into one donated buffer, each layer deleted
  once written: the stack and one layer are held, never the stack and all its layers."""
  first = leaves[0]
  sharding = first.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):  # the layer axis is not split
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        None, *sharding.spec))
  shape = (len(leaves),) + tuple(first.shape)
  out = jax.jit(lambda: jnp.zeros(shape, first.dtype), out_shardings=sharding)()
  for i, leaf in enumerate(leaves):
    out = _write_layer(out, leaf, i)
    out.block_until_ready()
    leaf.delete()
    host.release_host_memory(collect=False)  # the freed layer back to the system, not kept
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stack, layer, index):
  """The stack with `layer` at `index`, in place (the stack's buffer is donated)."""
  return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), index, 0)


def _unstack(stacked: Any, count: int) -> list:
  if isinstance(stacked, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(tuple(stacked.shape[1:]), stacked.dtype)] * count
  return [stacked[i] for i in range(count)]


def _layer_indices(stack: dict, where: str) -> list[int]:
  indices = sorted(int(m.group(1)) for m in map(_LAYER.match, stack) if m)
  if indices != list(range(len(indices))):
    raise ValueError(f'{where}: layers {indices} are not numbered 0..{len(indices) - 1}')
  return indices


def is_scanned(params: dict) -> bool:
  return any(SCAN_AXIS in params.get(name, {}) for name in STACKS)


def stack_layers(params: dict, release: bool = False) -> dict:
  """Unrolled tree -> scanned tree (`layers_0..n-1` -> `layers`, leaves stacked on axis 0).

  `release`: delete each unrolled jax array once its stacked leaf is built, so stacking holds
  the weights once plus one leaf, not twice (for arrays nothing else will read: a run's own
  copies, never a caller's)."""
  out = dict(params)

  def stacked(*xs):
    if release and all(isinstance(x, jax.Array) for x in xs):
      return _stack_releasing(list(xs))
    return _stack(list(xs))

  for name in STACKS:
    if name not in params:
      continue
    stack = params[name]
    if SCAN_AXIS in stack:
      raise ValueError(f'{name}: the params are scanned already ({name}/{SCAN_AXIS})')
    indices = _layer_indices(stack, name)
    if not indices:
      raise ValueError(f'{name}: no layers_0.. to stack')
    layers = [stack[f'layers_{i}'] for i in indices]
    structure = jax.tree_util.tree_structure(layers[0])
    for i, layer in enumerate(layers):
      if jax.tree_util.tree_structure(layer) != structure:
        raise ValueError(f'{name}/layers_{i} has other params than {name}/layers_0')
    rest = {k: v for k, v in stack.items() if not _LAYER.match(k)}
    out[name] = {**rest, SCAN_AXIS: jax.tree_util.tree_map(stacked, *layers)}
  return out


def unstack_layers(params: dict) -> dict:
  """Scanned tree -> unrolled tree, the inverse of `stack_layers` (checkpoints, products)."""
  out = dict(params)
  for name in STACKS:
    if name not in params or SCAN_AXIS not in params[name]:
      continue
    stack = params[name]
    counts = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(stack[SCAN_AXIS])}
    if len(counts) != 1:
      raise ValueError(f'{name}/{SCAN_AXIS}: leaves disagree on the layer count {sorted(counts)}')
    count = counts.pop()
    per_leaf = jax.tree_util.tree_map(lambda x: _unstack(x, count), stack[SCAN_AXIS])
    rest = {k: v for k, v in stack.items() if k != SCAN_AXIS}
    for i in range(count):
      rest[f'layers_{i}'] = jax.tree_util.tree_map(lambda xs: xs[i], per_leaf,
                                                   is_leaf=lambda x: isinstance(x, list))
    out[name] = rest
  return out
