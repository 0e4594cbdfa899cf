"""Orbax T5X checkpoints: `checkpoint_N/state/` is an Orbax PyTree `{'target', 'state'}`.

T5X's Orbax checkpoint manager writes one item `state` (the train state: `target` = params,
`state` = `{'step', 'param_states'}`) and one item `dataset` per step. Only `target` is read,
array by array with tensorstore (OCDBT or one zarr directory per array, zarr v2 or v3, as
`_METADATA` says), so the sharding the checkpoint was written with does not matter. Writing
goes through Orbax's own handler, a bounded group of arrays at a time (see `save_t5x_orbax`).
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any, Mapping

import numpy as np

from jaxprompt.checkpoints.leaves import Leaf
from jaxprompt.checkpoints.storage import join
from jaxprompt.checkpoints.t5x_legacy import _kvstore, open_stores, store_leaf
from jaxprompt.checkpoints.tree import CheckpointError, flatten, unflatten

Path = tuple[str, ...]


def _state_dir(path: str) -> str:
  path = str(path).rstrip('/')
  return path if os.path.basename(path) == 'state' or not _has_state(path) else join(path, 'state')


def _has_state(path: str) -> bool:
  from jaxprompt.checkpoints.storage import exists  # pylint: disable=g-import-not-at-top
  return exists(join(path, 'state'))


def _metadata_tree(state_dir: str) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:  # the handler's metadata: T5X keeps _CHECKPOINT_METADATA one level up, not in state/
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  except (ValueError, OSError, RuntimeError, FileNotFoundError) as e:
    raise CheckpointError(f'{state_dir}: cannot read the Orbax metadata ({_reason(e)}); if '
                          'files are missing, copy the whole checkpoint_N directory again') from None
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, Mapping) or not isinstance(tree.get('target'), Mapping):
    keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise CheckpointError(f"{state_dir}: unknown layout, no 'target' params in the Orbax tree "
                          f'(top keys: {keys}); is this a T5X checkpoint_N/state directory?')
  return dict(tree)


def _reason(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_shapes(path: str) -> dict[Path, tuple[tuple[int, ...], str]]:
  """{param path: (shape, stored dtype name)} from the Orbax metadata alone."""
  state_dir = _state_dir(path)
  target = flatten(_metadata_tree(state_dir)['target'])
  return {p: (tuple(m.shape), np.dtype(m.dtype).name) for p, m in target.items()}


def _layout(state_dir: str) -> tuple[bool, bool]:
  """(use_ocdbt, use_zarr3) as `_METADATA` records them (older trees: OCDBT iff a manifest)."""
  from jaxprompt.checkpoints.storage import exists, read_bytes  # pylint: disable=g-import-not-at-top
  file = join(state_dir, '_METADATA')
  if exists(file):
    try:
      metadata = json.loads(read_bytes(file))
      return bool(metadata.get('use_ocdbt', True)), bool(metadata.get('use_zarr3', False))
    except ValueError:
      pass
  return exists(join(state_dir, 'manifest.ocdbt')), False


def array_spec(state_dir: str, name: str, use_ocdbt: bool, use_zarr3: bool) -> dict[str, Any]:
  """The tensorstore spec of the array `name` (`target.encoder.layers_0....`) of an Orbax tree:
  a key in the OCDBT database of `state_dir`, or (no OCDBT) its own directory there."""
  if not use_ocdbt:
    return {'driver': 'zarr3' if use_zarr3 else 'zarr', 'kvstore': _kvstore(state_dir, name)}
  base = state_dir if '://' in state_dir else 'file://' + os.path.abspath(state_dir)
  return {'driver': 'zarr3' if use_zarr3 else 'zarr',
          'kvstore': {'driver': 'ocdbt', 'base': base.rstrip('/') + '/', 'path': name}}


def leaves(path: str) -> dict[Path, Leaf]:
  """The `target` params of an Orbax T5X checkpoint, leaf by leaf (see `leaves.Leaf`), read
  with tensorstore: a box reads only the chunks it touches, whatever sharding wrote them.

  Args:
    path: `checkpoint_N/` or `checkpoint_N/state/` (local or gs://).
  """
  state_dir = _state_dir(path)
  target = flatten(_metadata_tree(state_dir)['target'])
  use_ocdbt, use_zarr3 = _layout(state_dir)
  specs = {p: array_spec(state_dir, '.'.join(('target',) + p), use_ocdbt, use_zarr3)
           for p in target}

  def fail(p, e):
    return CheckpointError(f'{state_dir}: cannot read the Orbax array of {"/".join(p)} '
                           f'({_reason(e)}); if files are missing, copy the whole '
                           'checkpoint_N directory again')

  stores = open_stores(specs, fail)
  return {p: store_leaf(store, lambda e, p=p: fail(p, e)) for p, store in stores.items()}


def _return_freed_memory() -> None:
  """Gives freed heap memory back to the system (glibc's `malloc_trim`; elsewhere nothing).

  Tensorstore compresses in worker threads, and each thread's malloc arena keeps the freed
  compressed buffer of the last array it wrote: without a trim the RSS grows by one array per
  arena touched, not by one array.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _groups(sizes: list[int]) -> list[list[int]]:
  """Consecutive indices in groups of at most the largest size's bytes (a larger one alone):
  each group is one OCDBT commit, so a few hundred arrays do not make a few hundred files."""
  limit, groups, total = max(sizes, default=0), [], 0
  for i, size in enumerate(sizes):
    if not groups or total + size > limit:
      groups.append([])
      total = 0
    groups[-1].append(i)
    total += size
  return groups


def _bounded_numpy_registry():
  """Orbax's standard type handlers, with numpy arrays written a bounded group at a time.

  Orbax's `NumpyHandler` deep-copies every array, then writes (copies into tensorstore,
  compresses) all of them concurrently; `save_concurrent_gb` does not bound that path. Here each
  group of arrays (`_groups`: at most the largest array's bytes) is written by the same handler
  (so the files, `_METADATA` and `value_type` are Orbax's own) once the previous group is on
  disk, and without the copy: the save is synchronous, so the caller's arrays cannot change
  meanwhile. At most one group's compressed form, the largest array's bytes, is alive.
  (`_background_serialize` is Orbax 0.12's; were it renamed, arrays would again go all at once:
  tests/test_orbax_write_memory.py measures the peak.)
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  class BoundedNumpyHandler(ocp.type_handlers.NumpyHandler):

    def __init__(self):
      super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
      args = list(args or [ocp.type_handlers.SaveArgs()] * len(values))
      for group in _groups([v.nbytes for v in values]):
        await super()._background_serialize(*([seq[i] for i in group]
                                               for seq in (values, infos, args)))
        _return_freed_memory()

  numpy_handler = BoundedNumpyHandler()
  return ocp.type_handlers.create_type_handler_registry(*[
      (ty, numpy_handler if ty is np.ndarray else ocp.type_handlers.get_type_handler(ty))
      for ty in ocp.type_handlers.supported_types()])


def _nbytes(value) -> int:
  return int(np.prod(np.shape(value))) * np.dtype(value.dtype).itemsize


def save_t5x_orbax(params: Mapping[str, Any], directory: str, step: int) -> str:
  """Writes params as T5X's Orbax checkpoint manager does: `directory/checkpoint_{step}/state/`.

  The `state` item is `{'target': params, 'state': {'step': step, 'param_states': {}}}`. Numpy
  arrays are written a group at a time (the peak is about twice the largest array above the
  params and runtime); jax arrays by Orbax's own handler, shard by shard from their devices
  (never gathered), at most the largest array's bytes in flight.

  Returns:
    The checkpoint directory `directory/checkpoint_{step}`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  flat = flatten(params)
  tree = {'target': unflatten(dict(flat)),
          'state': {'step': np.asarray(int(step), np.int32), 'param_states': {}}}
  # Jax arrays: Orbax's handler brings at most the largest array's bytes to the host at once
  # (its limiter refuses an array as large as the limit, hence the +1).
  in_flight_gb = (max((_nbytes(v) for v in flat.values()), default=0) + 1) / 1e9
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=in_flight_gb,
                                        save_device_host_concurrent_gb=in_flight_gb,
                                        type_handler_registry=_bounded_numpy_registry())
  options = ocp.CheckpointManagerOptions(step_prefix='checkpoint', create=True,
                                         enable_async_checkpointing=False)
  directory = str(directory) if '://' in str(directory) else os.path.abspath(directory)
  with ocp.CheckpointManager(directory, item_names=('state',), options=options,
                             item_handlers={'state': handler}) as manager:
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)), force=True)
    manager.wait_until_finished()
  return join(directory, f'checkpoint_{int(step)}')
