"""Orbax T5X checkpoints: `checkpoint_N/state/` is an Orbax PyTree `{'target', 'state'}`.

T5X's Orbax checkpoint manager writes one item `state` (the train state: `target` = params,
`state` = `{'step', 'param_states'}`) and one item `dataset` per step. Only `target` is read,
array by array with tensorstore (OCDBT or one zarr directory per array, zarr v2 or v3, as
`_METADATA` says), so the sharding the checkpoint was written with does not matter.
"""

from __future__ import annotations

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


def save_t5x_orbax(params: Mapping[str, Any], directory: str, step: int) -> str:
  """Writes params as T5X's Orbax checkpoint manager does: `directory/checkpoint_{step}/state/`.

  The `state` item is `{'target': params, 'state': {'step': step, 'param_states': {}}}`.

  Returns:
    The checkpoint directory `directory/checkpoint_{step}`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Arrays go as they are: jax arrays are written shard by shard from their devices (never
  # gathered), and the handler keeps at most ~1 GB in flight between devices, host and disk.
  tree = {'target': unflatten(dict(flatten(params))),
          'state': {'step': np.asarray(int(step), np.int32), 'param_states': {}}}
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1)
  options = ocp.CheckpointManagerOptions(step_prefix='checkpoint', create=True,
                                         enable_async_checkpointing=False)
  directory = str(directory) if '://' in str(directory) else os.path.abspath(directory)
  with ocp.CheckpointManager(directory, item_names=('state',), options=options,
                             item_handlers={'state': handler}) as manager:
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)), force=True)
    manager.wait_until_finished()
  return join(directory, f'checkpoint_{int(step)}')
