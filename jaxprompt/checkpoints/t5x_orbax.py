"""Orbax T5X checkpoints: `checkpoint_N/state/` is an Orbax PyTree `{'target', 'state'}`.

T5X's Orbax checkpoint manager writes one item `state` (the train state: `target` = params,
`state` = `{'step', 'param_states'}`) and one item `dataset` per step. Only `target` is restored,
as numpy on the host, so the sharding the checkpoint was written with does not matter.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from jaxprompt.checkpoints import CheckpointError, flatten, join, unflatten

Path = tuple[str, ...]


def _state_dir(path: str) -> str:
  path = str(path).rstrip('/')
  return path if os.path.basename(path) == 'state' or not _has_state(path) else join(path, 'state')


def _has_state(path: str) -> bool:
  from jaxprompt.checkpoints import exists  # pylint: disable=g-import-not-at-top
  return exists(join(path, 'state'))


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp, ocp.PyTreeCheckpointer()


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


def read(path: str) -> tuple[dict[str, Any], dict[str, int]]:
  """Restores the `target` params of an Orbax T5X checkpoint as float32 numpy.

  Args:
    path: `checkpoint_N/` or `checkpoint_N/state/` (local or gs://).

  Returns:
    (params, dtypes): the T5X tree, and {stored dtype: leaf count}.
  """
  ocp, checkpointer = _checkpointer()
  state_dir = _state_dir(path)
  target_meta = _metadata_tree(state_dir)['target']
  flat_meta = flatten(target_meta)
  dtypes: dict[str, int] = {}
  for m in flat_meta.values():
    name = np.dtype(m.dtype).name
    dtypes[name] = dtypes.get(name, 0) + 1
  restore_args = unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in flat_meta})
  item = unflatten({p: np.zeros((), np.float32) for p in flat_meta})
  try:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={'target': item}, restore_args={'target': restore_args}, partial_restore=True))
  except (ValueError, OSError, RuntimeError, KeyError) as e:
    raise CheckpointError(f'{state_dir}: cannot restore the Orbax params ({_reason(e)}); if '
                          'files are missing, copy the whole checkpoint_N directory again') from None
  flat = {p: np.asarray(v).astype(np.float32, copy=False)
          for p, v in flatten(restored['target']).items()}
  return unflatten(flat), dtypes


def save_t5x_orbax(params: Mapping[str, Any], directory: str, step: int) -> str:
  """Writes params as T5X's Orbax checkpoint manager does: `directory/checkpoint_{step}/state/`.

  The `state` item is `{'target': params, 'state': {'step': step, 'param_states': {}}}`.

  Returns:
    The checkpoint directory `directory/checkpoint_{step}`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = {'target': unflatten({p: np.asarray(v) for p, v in flatten(params).items()}),
          'state': {'step': np.asarray(int(step), np.int32), 'param_states': {}}}
  options = ocp.CheckpointManagerOptions(step_prefix='checkpoint', create=True,
                                         enable_async_checkpointing=False)
  directory = str(directory) if '://' in str(directory) else os.path.abspath(directory)
  with ocp.CheckpointManager(directory, item_names=('state',), options=options) as manager:
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)), force=True)
    manager.wait_until_finished()
  return join(directory, f'checkpoint_{int(step)}')
