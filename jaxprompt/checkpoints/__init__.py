"""Reading T5 backbones: T5X legacy (msgpack + zarr), T5X Orbax and Hugging Face safetensors.

Every reader describes the T5X parameter tree (`token_embedder/embedding`,
`encoder/layers_{i}/attention/query/kernel`, ...; `expected_shapes` lists it) leaf by leaf, each
leaf readable slice by slice (`leaves.Leaf`). `load_t5` detects the format, infers (or checks)
the `T5Config`, places each leaf straight into its sharding (reading only this process's
slices) and builds the module; `read_params` reads the whole tree as float32 numpy.

Example:
  >>> module, params = load_t5('gs://t5-data/pretrained_models/t5x/t5_1_1_small/checkpoint_1000000')
  >>> logits = module.apply({'params': params}, enc, dec_in, dec_tgt, enable_dropout=False)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from jaxprompt.checkpoints.tree import (Path, RELPOS_BUCKETS, CheckpointError, flatten, unflatten,
                                        path_str, expected_shapes, is_prompt_path, _num_layers,
                                        infer_config, check_shapes, _brief,
                                        as_config)  # noqa: F401 - re-exported
from jaxprompt.checkpoints.storage import (is_remote, _gfile, exists, isdir, listdir, join,
                                           read_bytes, PICKLE_SUFFIXES,
                                           _refuse_pickle)  # noqa: F401 - re-exported
from jaxprompt.model.config import T5Config, get_config


def detect(path: str) -> tuple[str, str]:
  """Finds the checkpoint format: ('t5x_legacy' | 't5x_orbax' | 'hf', the path to read).

  Accepts a legacy `checkpoint_N/` directory or its `checkpoint` file, an Orbax `checkpoint_N/`
  or `checkpoint_N/state/`, a T5X model directory (the latest `checkpoint_N` is used), or a
  Hugging Face directory (or one of its `.safetensors` / `config.json` files).
  """
  path = str(path).rstrip('/') if len(str(path)) > 1 else str(path)
  if not is_remote(path):  # Orbax refuses relative paths; every reader gets an absolute one
    path = os.path.abspath(os.path.expanduser(path))
  if not exists(path):
    raise CheckpointError(f'{path}: no such file or directory; pass a T5X checkpoint_N '
                          'directory, a T5X model directory or a Hugging Face model directory')
  if not isdir(path):
    name = os.path.basename(path)
    if name == 'checkpoint':
      return 't5x_legacy', os.path.dirname(path)
    if name.endswith(PICKLE_SUFFIXES):
      raise _refuse_pickle(path)
    if name.endswith('.safetensors') or name in ('config.json', 'model.safetensors.index.json'):
      return 'hf', os.path.dirname(path)
    raise CheckpointError(f'{path}: unknown checkpoint file; expected a T5X `checkpoint` '
                          'msgpack file, a .safetensors file or a directory')
  names = set(listdir(path))
  if _is_orbax_tree(names):
    return 't5x_orbax', path
  if 'checkpoint' in names and not isdir(join(path, 'checkpoint')):
    return 't5x_legacy', path
  if 'state' in names and isdir(join(path, 'state')) and _is_orbax_tree(
      set(listdir(join(path, 'state')))):
    return 't5x_orbax', join(path, 'state')
  if any(n.endswith('.safetensors') for n in names):
    return 'hf', path
  pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
  if pickles:
    raise _refuse_pickle(join(path, pickles[0]))
  steps = [(int(m.group(1)), n) for n in names
           for m in [re.fullmatch(r'checkpoint_(\d+)', n)] if m]
  for _, name in sorted(steps, reverse=True):
    sub = join(path, name)
    if isdir(sub) and {'checkpoint', 'state'} & set(listdir(sub)):
      return detect(sub)
  if any(n.startswith('model.ckpt') for n in names):
    raise CheckpointError(f'{path}: a Mesh TensorFlow checkpoint (model.ckpt-*); convert it to '
                          'T5X first (t5x/scripts/convert_tf_checkpoint.py) or use the T5X or '
                          'Hugging Face release of the model')
  raise CheckpointError(
      f'{path}: unknown checkpoint layout; expected a T5X legacy `checkpoint` msgpack file, an '
      'Orbax `state/` directory, `checkpoint_N/` subdirectories, or Hugging Face '
      '`model.safetensors` + `config.json`')


def _is_orbax_tree(names: set[str]) -> bool:
  """Whether a directory listing is an Orbax PyTree (legacy T5X dirs have neither file)."""
  return '_METADATA' in names or 'manifest.ocdbt' in names


def step_of(path: str) -> int | None:
  """The N of the nearest `checkpoint_N` component of `path`, if any."""
  for part in reversed(str(path).rstrip('/').split('/')):
    m = re.fullmatch(r'checkpoint_(\d+)', part)
    if m:
      return int(m.group(1))
  return None


def find_t5x_config(checkpoint_dir: str) -> tuple[T5Config, str] | None:
  """A `config.json` holding `{"t5x_T5Config": {...}}` next to or above `checkpoint_dir`."""
  directory = str(checkpoint_dir).rstrip('/')
  if os.path.basename(directory) == 'state':  # Orbax: checkpoint_N/state
    directory = os.path.dirname(directory)
  for _ in range(3):
    candidate = join(directory, 'config.json')
    if exists(candidate):
      try:
        data = json.loads(read_bytes(candidate))
      except ValueError as e:
        raise CheckpointError(f'{candidate}: not valid JSON ({e})') from None
      if isinstance(data, dict) and 't5x_T5Config' in data:
        try:
          return T5Config.from_dict(data['t5x_T5Config']), candidate
        except (TypeError, ValueError) as e:
          raise CheckpointError(f'{candidate}: bad t5x_T5Config ({e})') from None
    parent = os.path.dirname(directory)
    if not parent or parent == directory:
      break
    directory = parent
  return None


# ----------------------------------------------------------------------------- public API


def read_shapes(path: str) -> tuple[dict[Path, tuple[tuple[int, ...], str]], dict[str, Any]]:
  """{param path: (shape, stored dtype)} and info, reading only headers and metadata.

  `info` has 'format', 'path' (what was read), 'step', 'config' (T5Config) and 'config_source'.
  """
  fmt, where = detect(path)
  if fmt == 'hf':
    shapes, config = hf.read_hf_shapes(where)
    source = join(where, 'config.json')
  else:
    reader = t5x_legacy if fmt == 't5x_legacy' else t5x_orbax
    shapes = reader.read_shapes(where)
    config, source = _t5x_config(where, {p: s for p, (s, _) in shapes.items()})
  info = dict(format=fmt, path=where, step=step_of(where), config=config, config_source=source)
  return shapes, info


def _t5x_config(where: str, shapes: Mapping[Path, tuple[int, ...]]) -> tuple[T5Config, str]:
  found = find_t5x_config(where)
  if found is not None:
    return found
  return infer_config(shapes, where), 'parameter shapes'


def open_leaves(path: str, config: T5Config | str | None = None):
  """The backbone leaves of a T5 checkpoint (`{path: leaves.Leaf}`, prompt params left out),
  checked against its config, and info; nothing but headers and metadata is read yet.

  Returns:
    (leaves, info): info has 'format', 'path', 'step', 'config' (the T5Config given, or else
    inferred), 'config_source', 'dtypes' ({stored dtype: leaf count}) and 'skipped' (prompt
    params left out).
  """
  fmt, where = detect(path)
  if fmt == 'hf':
    found, inferred = hf.leaves(where)
    source = join(where, 'config.json')
  else:
    found = (t5x_legacy if fmt == 't5x_legacy' else t5x_orbax).leaves(where)
    inferred, source = None, None
  skipped = sorted(path_str(p) for p in found if is_prompt_path(p))
  found = {p: leaf for p, leaf in found.items() if not is_prompt_path(p)}
  shapes = {p: leaf.shape for p, leaf in found.items()}
  if inferred is None:
    inferred, source = _t5x_config(where, shapes)
  check_shapes(shapes, inferred, f'{where} (config from {source})')
  if config is not None:
    config, source = as_config(config), 'given'
    check_shapes(shapes, config, f'{where} (config given)')
  dtypes: dict[str, int] = {}
  for leaf in found.values():
    dtypes[leaf.dtype] = dtypes.get(leaf.dtype, 0) + 1
  info = dict(format=fmt, path=where, step=step_of(where), config=config or inferred,
              config_source=source, dtypes=dtypes, skipped=skipped)
  return found, info


def read_params(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a T5 checkpoint's params (float32 numpy, T5X tree) without building a module.

  Returns:
    (params, info): info as `open_leaves` gives it (the config inferred from the checkpoint).
  """
  from jaxprompt.checkpoints.leaves import read_whole  # pylint: disable=g-import-not-at-top
  found, info = open_leaves(path)
  flat = {p: read_whole(leaf).astype(np.float32, copy=False) for p, leaf in found.items()}
  return unflatten(flat), info


def load_checkpoint(path: str, config: T5Config | str | None = None, shardings=None,
                    dtype: str = 'float32'):
  """Reads a T5 backbone straight onto devices, leaf by leaf: each process reads only the
  slices its devices hold (see `jaxprompt.checkpoints.leaves`).

  Args:
    path, config: as `load_t5`.
    shardings: a params-shaped tree of `jax.sharding.Sharding` (e.g. the engine's
      `backbone_shardings_for(config, mesh, rules)`), or a function of the T5Config returning
      one; None places every leaf on the default device.
    dtype: the dtype the params are held in ('float32' or 'bfloat16').

  Returns:
    (module, params, info): info as `open_leaves` gives it, plus 'fingerprint' (of the weights
    as stored, whatever `dtype` holds them; see `backbone.fingerprint`).
  """
  from jaxprompt.checkpoints import leaves as leaves_lib  # pylint: disable=g-import-not-at-top
  from jaxprompt.model import Transformer  # pylint: disable=g-import-not-at-top
  found, info = open_leaves(path, config)
  config = info['config']
  if callable(shardings):
    shardings = shardings(config)
  if shardings is not None:
    shardings = flatten(shardings)
  samples: dict[Path, Any] = {}
  params = leaves_lib.place(found, shardings, dtype, samples)
  leaves_lib.complete(samples)
  info['fingerprint'] = leaves_lib.digest(config, samples)
  return Transformer(config), unflatten(params), info


def load_t5(path: str, config: T5Config | str | None = None, shardings=None,
            dtype: str = 'float32'):
  """Reads a T5 backbone and builds its module.

  Args:
    path: a T5X legacy or Orbax checkpoint (`checkpoint_N/`, its `checkpoint` file or `state/`,
      or a model directory: the latest step is used) or a Hugging Face T5 directory with
      `config.json` and `model.safetensors` (or sharded `model-*-of-*.safetensors` + index).
    config: a T5Config or a name for `get_config` (e.g. 't5_1_1_base'); every parameter shape is
      checked against it. None infers it (HF `config.json`, a T5X `config.json` holding
      `t5x_T5Config`, or the parameter shapes).
    shardings: where the params go (see `load_checkpoint`); None: the default device.
    dtype: 'float32' (default) or 'bfloat16'.

  Returns:
    (module, params): a `jaxprompt.model.Transformer` and its params as jax arrays.

  Raises:
    CheckpointError: a one-line message naming the file and what to do.
  """
  module, params, _ = load_checkpoint(path, config, shardings, dtype)
  return module, params


# The format modules use the helpers above, so they are imported last (none of them imports
# tensorstore, orbax or safetensors before it is used).
from jaxprompt.checkpoints import hf, t5x_legacy, t5x_orbax  # noqa: E402
from jaxprompt.checkpoints.hf import save_hf  # noqa: E402
from jaxprompt.checkpoints.t5x_legacy import save_t5x_legacy  # noqa: E402
from jaxprompt.checkpoints.t5x_orbax import save_t5x_orbax  # noqa: E402

__all__ = [
    'CheckpointError', 'check_shapes', 'detect', 'expected_shapes', 'infer_config',
    'load_checkpoint', 'load_t5', 'open_leaves', 'read_params', 'read_shapes', 'save_hf', 'save_t5x_legacy', 'save_t5x_orbax',
]
