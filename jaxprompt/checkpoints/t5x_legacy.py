"""Legacy T5X checkpoints: `checkpoint_N/checkpoint` (msgpack) plus one zarr array per leaf.

The msgpack file holds `{'version': 3, 'optimizer': {'target': params, 'state': {'step',
'param_states'}}}`. A leaf is either inline (flax's msgpack ext types: 1 = ndarray packed as
`(shape, dtype name, C-order bytes)`, 2 = complex, 3 = numpy scalar; arrays over 1 GiB are split
into `{'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}`) or a tensorstore
spec whose path is relative to the checkpoint directory (`target.<dotted path>`, zarr v2, gzip).
Old files put `path` at the top level of the spec with a `gcs` driver and the dummy bucket
`t5x-dummy-bucket`; the bucket is always taken from the directory being read. Nothing here
uses pickle, flax or T5X.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Any, Mapping

import msgpack
import numpy as np

from jaxprompt.checkpoints.leaves import Leaf
from jaxprompt.checkpoints.storage import is_remote, join, read_bytes
from jaxprompt.checkpoints.tree import CheckpointError, flatten, path_str, unflatten

Path = tuple[str, ...]
_NDARRAY, _COMPLEX, _SCALAR = 1, 2, 3
_CHUNKED = '__msgpack_chunked_array__'
_MAX_INLINE_BYTES = 2**30  # flax's MAX_CHUNK_SIZE: msgpack objects must stay below 2 GiB
_ZARR_CHUNK_BYTES = 64 * 2**20  # T5X's target chunk size
DUMMY_BUCKET = 't5x-dummy-bucket'


# ----------------------------------------------------------------------------- msgpack


def _np_dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _unpack_ndarray(data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  dtype = _np_dtype(dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name)
  return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
  if code == _NDARRAY:
    return _unpack_ndarray(data)
  if code == _SCALAR:
    return _unpack_ndarray(data)[()]
  if code == _COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def _pack_ndarray(arr: np.ndarray) -> bytes:
  return msgpack.packb((list(arr.shape), arr.dtype.name, arr.tobytes('C')), use_bin_type=True)


def _ext_default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    return msgpack.ExtType(_NDARRAY, _pack_ndarray(obj))
  if isinstance(obj, np.generic):
    return msgpack.ExtType(_SCALAR, _pack_ndarray(np.asarray(obj)))
  if isinstance(obj, complex):
    return msgpack.ExtType(_COMPLEX, msgpack.packb((obj.real, obj.imag)))
  if hasattr(obj, '__array__'):  # jax arrays
    return _ext_default(np.asarray(obj))
  raise TypeError(f'cannot serialise {type(obj).__name__} into a T5X checkpoint')


def _unchunk(tree: Any) -> Any:
  """Rebuilds arrays that flax split into chunks to fit msgpack's 2 GiB object limit."""
  if not isinstance(tree, dict):
    return tree
  if tree.get(_CHUNKED):
    shape = [tree['shape'][str(i)] for i in range(len(tree['shape']))]
    chunks = [np.asarray(tree['chunks'][str(i)]).reshape(-1) for i in range(len(tree['chunks']))]
    return np.concatenate(chunks).reshape(shape)
  return {k: _unchunk(v) for k, v in tree.items()}


def _chunk(arr: np.ndarray) -> Any:
  if arr.nbytes <= _MAX_INLINE_BYTES:
    return arr
  step = max(1, _MAX_INLINE_BYTES // arr.dtype.itemsize)
  flat = arr.reshape(-1)
  pieces = [flat[i:i + step] for i in range(0, flat.size, step)]
  return {_CHUNKED: True, 'shape': {str(i): n for i, n in enumerate(arr.shape)},
          'chunks': {str(i): p for i, p in enumerate(pieces)}}


def read_msgpack(file: str) -> dict[str, Any]:
  """The decoded contents of a T5X `checkpoint` msgpack file (zarr leaves stay spec dicts)."""
  try:
    contents = msgpack.unpackb(read_bytes(file), ext_hook=_ext_hook, raw=False,
                               strict_map_key=False)
  except (ValueError, msgpack.UnpackException) as e:
    raise CheckpointError(f'{file}: not a T5X msgpack checkpoint ({e})') from None
  if not isinstance(contents, dict):
    raise CheckpointError(f'{file}: not a T5X msgpack checkpoint (top level is not a map)')
  return _unchunk(contents)


def _target(contents: Mapping[str, Any], file: str) -> dict[str, Any]:
  optimizer = contents['optimizer'] if contents.get('version', 0) >= 1 else contents
  if not isinstance(optimizer, dict) or not isinstance(optimizer.get('target'), dict):
    raise CheckpointError(f"{file}: unknown layout, no 'optimizer/target' params (keys: "
                          f'{sorted(contents)}); is this a T5X checkpoint?')
  return optimizer['target']


# ----------------------------------------------------------------------------- zarr leaves


def _is_spec(leaf: Any) -> bool:
  return isinstance(leaf, dict) and 'driver' in leaf and ('kvstore' in leaf or 'path' in leaf)


def _flatten_leaves(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Like `flatten`, but a tensorstore spec dict is a leaf."""
  flat = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, dict) and not _is_spec(value) and not value.get(_CHUNKED):
      flat.update(_flatten_leaves(value, path))
    else:
      flat[path] = value
  return flat


def _kvstore(directory: str, relative: str) -> dict[str, Any]:
  """A kvstore for `relative` under `directory`: gcs for gs:// (real bucket), else local file."""
  m = re.fullmatch(r'gs://([^/]+)/?(.*)', str(directory))
  if m:
    return {'driver': 'gcs', 'bucket': m.group(1), 'path': join(m.group(2), relative)}
  if is_remote(directory):
    raise CheckpointError(f'{directory}: only local paths and gs:// are supported for zarr arrays')
  return {'driver': 'file', 'path': join(os.path.abspath(directory), relative)}


def _open_spec(spec: Mapping[str, Any], ckpt_dir: str, file: str) -> dict[str, Any]:
  """The spec to open: relative path made absolute, gcs/gfile drivers made local (or real gcs)."""
  kvstore = spec.get('kvstore')
  relative = kvstore.get('path') if isinstance(kvstore, dict) else None
  relative = relative or spec.get('path')
  if not relative:
    raise CheckpointError(f'{file}: tensorstore spec without a path: {dict(spec)}')
  driver = spec.get('driver', 'zarr')
  if driver != 'zarr':
    raise CheckpointError(f'{file}: unsupported tensorstore driver {driver!r} (expected zarr)')
  return {'driver': 'zarr', 'kvstore': _kvstore(ckpt_dir, relative)}


def _spec_shape(spec: Mapping[str, Any]) -> tuple[int, ...] | None:
  metadata = spec.get('metadata') or {}
  return tuple(metadata['shape']) if 'shape' in metadata else None


def _read_error(file: str, path: Path, spec: Mapping[str, Any], e: Exception) -> CheckpointError:
  where = spec['kvstore'].get('path')
  reason = str(e).splitlines()[0].split(' [tensorstore_spec=')[0]
  return CheckpointError(f'{file}: cannot read the array of {path_str(path)} at {where} '
                         f'({reason}); copy every target.* directory with the checkpoint file')


def open_stores(specs: Mapping[Path, dict[str, Any]], fail) -> dict[Path, Any]:
  """Opens tensorstore arrays concurrently (metadata only; no data is read or cached).
  `fail(path, exception)` makes the error to raise."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  context = ts.Context()
  opened = {path: ts.open(spec, open=True, read=True, context=context)
            for path, spec in specs.items()}
  stores = {}
  for path, future in opened.items():
    try:
      stores[path] = future.result()
    except (ValueError, RuntimeError) as e:
      raise fail(path, e) from None
  return stores


WHOLE_LEAF_BYTES = 256 * 2**20


def store_leaf(store, fail) -> Leaf:
  """A Leaf reading boxes of an open tensorstore array. A leaf of at most 256 MiB is read
  whole on its first box and its boxes sliced from that (a compressed chunk is the unit of
  reading, and a chunk often spans the boxes of several devices: it is decoded once); a
  bigger one reads only the chunks each box touches."""
  dtype = np.dtype(store.dtype.numpy_dtype)

  def read_box(index):
    try:
      return store[tuple(index)].read().result()
    except (ValueError, RuntimeError) as e:
      raise fail(e) from None

  @contextlib.contextmanager
  def open_leaf():
    if math.prod(store.shape) * dtype.itemsize > WHOLE_LEAF_BYTES:
      yield read_box
      return
    whole = []

    def read(index):
      if not whole:
        whole.append(read_box(tuple(slice(0, n) for n in store.shape)))
      return whole[0][tuple(index)]

    try:
      yield read
    finally:
      whole.clear()

  return Leaf(tuple(store.shape), dtype.name, open_leaf)


def array_leaf(arr: np.ndarray) -> Leaf:
  """A Leaf of an array already in memory (inline msgpack leaves)."""

  @contextlib.contextmanager
  def open_leaf():
    yield lambda index: arr[tuple(index)]

  return Leaf(tuple(arr.shape), arr.dtype.name, open_leaf)


# ----------------------------------------------------------------------------- public


def _checkpoint_file(path: str) -> tuple[str, str]:
  path = str(path).rstrip('/')
  if os.path.basename(path) == 'checkpoint':
    return os.path.dirname(path), path
  return path, join(path, 'checkpoint')


def read_shapes(path: str) -> dict[Path, tuple[tuple[int, ...], str]]:
  """{param path: (shape, stored dtype name)} from the msgpack file alone."""
  ckpt_dir, file = _checkpoint_file(path)
  target = _flatten_leaves(_target(read_msgpack(file), file))
  out = {}
  for path_, leaf in target.items():
    if _is_spec(leaf):
      shape = _spec_shape(leaf)
      if shape is None:
        import tensorstore as ts  # pylint: disable=g-import-not-at-top
        shape = tuple(ts.open(_open_spec(leaf, ckpt_dir, file)).result().shape)
      out[path_] = (shape, str(leaf.get('dtype', 'float32')))
    else:
      arr = np.asarray(leaf)
      out[path_] = (arr.shape, arr.dtype.name)
  return out


def leaves(path: str) -> dict[Path, Leaf]:
  """The `target` params of a legacy T5X checkpoint, leaf by leaf (see `leaves.Leaf`).

  Args:
    path: the `checkpoint_N` directory or its `checkpoint` msgpack file (local or gs://).
  """
  ckpt_dir, file = _checkpoint_file(path)
  target = _flatten_leaves(_target(read_msgpack(file), file))
  specs = {p: _open_spec(leaf, ckpt_dir, file) for p, leaf in target.items() if _is_spec(leaf)}
  stores = open_stores(specs, lambda p, e: _read_error(file, p, specs[p], e))
  out = {}
  for path_, leaf in target.items():
    if path_ not in stores:
      out[path_] = array_leaf(np.asarray(leaf))
      continue
    expected, found = _spec_shape(leaf), tuple(stores[path_].shape)
    if expected is not None and found != expected:
      raise CheckpointError(f'{file}: {path_str(path_)} has shape {found} on disk but '
                            f'{expected} in the spec; the checkpoint is corrupt')
    out[path_] = store_leaf(stores[path_], lambda e, p=path_: _read_error(file, p, specs[p], e))
  return out


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
  """Halves the largest dimension until a chunk is at most 64 MiB."""
  chunks = [max(1, n) for n in shape]
  while len(chunks) and math.prod(chunks) * itemsize > _ZARR_CHUNK_BYTES:
    i = int(np.argmax(chunks))
    chunks[i] = (chunks[i] + 1) // 2
  return chunks


def _write_zarr(arrays: Mapping[str, Any], ckpt_dir: str) -> dict[str, dict[str, Any]]:
  """Writes each array to `ckpt_dir/<name>/` (zarr v2, gzip), one at a time (a jax array is
  brought to the host only while it is written); returns the specs to store."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  remote = str(ckpt_dir).startswith('gs://')
  specs = {}
  for name, value in arrays.items():
    arr = np.asarray(value)
    dtype = arr.dtype.name
    metadata = {'chunks': _chunk_shape(arr.shape, arr.dtype.itemsize),
                'compressor': {'id': 'gzip', 'level': 1}, 'shape': list(arr.shape)}
    store = ts.open({'driver': 'zarr', 'kvstore': _kvstore(ckpt_dir, name + '/'),
                     'dtype': dtype, 'metadata': metadata},
                    create=True, delete_existing=True).result()
    store.write(arr).result()
    del arr
    kvstore = {'driver': 'gcs', 'bucket': DUMMY_BUCKET} if remote else {'driver': 'file'}
    kvstore['path'] = name + '/'
    specs[name] = {'driver': 'zarr', 'dtype': dtype, 'kvstore': kvstore,
                   'metadata': metadata}
  return specs


def save_t5x_legacy(params: Mapping[str, Any], directory: str, step: int,
                    inline: bool = False) -> str:
  """Writes params as a legacy T5X checkpoint `directory/checkpoint_{step}/`.

  The msgpack file holds `{'version': 3, 'optimizer': {'target': ..., 'state': {'step': step,
  'param_states': {}}}}`; T5X restores the target with `RestoreCheckpointConfig(strict=False)`
  (there are no optimizer slots). Arrays go to `target.<dotted path>/` zarr directories, or
  inline into the msgpack file when `inline=True`. Works for local paths and gs://.

  Args:
    params: the T5X tree (nested dict of arrays; dtypes are kept).
    directory: the model directory.
    step: the step N of `checkpoint_N`.
    inline: store every array inside the msgpack file.

  Returns:
    The checkpoint directory.
  """
  ckpt_dir = join(directory, f'checkpoint_{int(step)}')
  if is_remote(ckpt_dir):
    from jaxprompt.checkpoints.storage import _gfile  # pylint: disable=g-import-not-at-top
    _gfile().makedirs(ckpt_dir)
  else:
    os.makedirs(ckpt_dir, exist_ok=True)
  flat = flatten(params)
  if inline:
    target = {p: _chunk(np.ascontiguousarray(v)) for p, v in flat.items()}
  else:
    names = {p: 'target.' + '.'.join(p) for p in flat}
    specs = _write_zarr({names[p]: v for p, v in flat.items()}, ckpt_dir)
    target = {p: specs[names[p]] for p in flat}
  contents = {'version': 3, 'optimizer': {
      'target': unflatten(target),
      'state': {'step': np.asarray(int(step), np.int32), 'param_states': {}}}}
  data = msgpack.packb(contents, default=_ext_default, use_bin_type=True)
  file = join(ckpt_dir, 'checkpoint')
  if is_remote(file):
    from jaxprompt.checkpoints.storage import _gfile  # pylint: disable=g-import-not-at-top
    with _gfile().GFile(file, 'wb') as f:
      f.write(data)
  else:
    tmp = file + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, file)  # the msgpack file last: its presence marks a complete checkpoint
  return ckpt_dir
