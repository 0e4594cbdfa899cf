"""A checkpoint read leaf by leaf and slice by slice, straight into the devices' shardings.

Every reader (Hugging Face safetensors, T5X legacy zarr, T5X Orbax) describes a checkpoint as
`{path: Leaf}`: the leaf's shape in the T5X layout, its stored dtype, and `open()`, a context
that yields `read(index)` for one box of the leaf (a tuple of slices in the T5X layout; a format
that stores the leaf transposed reads the transposed box). `place` puts one leaf at a time on
the devices of its sharding, reading only the boxes this process's devices hold (each distinct
box once) and casting each to the target dtype, so the host never holds a second copy of the
checkpoint: one box is in flight at a time.

The fingerprint sample (up to 4096 evenly spaced values per leaf, see `backbone.fingerprint`)
is taken from the boxes as they are read, before the cast: it names the checkpoint's weights
whatever dtype they are then held in, and never needs a leaf gathered in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Callable, ContextManager, Mapping

import numpy as np

Path = tuple[str, ...]
Index = tuple[slice, ...]
Reader = Callable[[Index], np.ndarray]
SAMPLES_PER_LEAF = 4096


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter of a checkpoint: shape (T5X layout), stored dtype, and a reader context."""

  shape: tuple[int, ...]
  dtype: str
  open: Callable[[], ContextManager[Reader]]


def full_index(shape) -> Index:
  return tuple(slice(0, n) for n in shape)


def read_whole(leaf: Leaf) -> np.ndarray:
  with leaf.open() as read:
    return np.asarray(read(full_index(leaf.shape)))


def _box(index: Index, shape) -> tuple[tuple[int, int], ...]:
  """(start, stop) per dimension of a jax shard index (slices with step 1, or None)."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


# ----------------------------------------------------------------------------- fingerprints


class LeafSample:
  """The fingerprint sample of one leaf, filled box by box: the values at flat positions
  0, s, 2s, ... (s = size // 4096, at most 4096 of them) as float32."""

  def __init__(self, shape):
    self.shape = tuple(int(n) for n in shape)
    size = math.prod(self.shape)
    flat = np.arange(0, size, max(1, size // SAMPLES_PER_LEAF))[:SAMPLES_PER_LEAF]
    self.coords = np.unravel_index(flat, self.shape) if self.shape else ()
    self.values = np.zeros(len(flat), np.float32)
    self.seen = np.zeros(len(flat), bool)

  def add(self, index: Index, take: Callable[[tuple[np.ndarray, ...]], Any]) -> None:
    """Takes the samples inside the box `index`; `take(local coordinates)` reads them."""
    box = _box(index, self.shape)
    inside = ~self.seen
    for coord, (start, stop) in zip(self.coords, box):
      inside &= (coord >= start) & (coord < stop)
    if inside.any():
      local = tuple(coord[inside] - start for coord, (start, _) in zip(self.coords, box))
      self.values[inside] = np.asarray(take(local), np.float32).reshape(-1)
      self.seen |= inside

  def add_array(self, array) -> None:
    """Samples a whole host array, or the shards of a jax.Array this process holds (one
    shard on the host at a time)."""
    if isinstance(array, np.ndarray) or not hasattr(array, 'addressable_shards'):
      array = np.asarray(array)
      self.values[:] = np.asarray(array.reshape(-1)[np.ravel_multi_index(
          self.coords, self.shape)] if self.shape else array.reshape(-1), np.float32)
      self.seen[:] = True
      return
    for shard in array.addressable_shards:
      if not self.seen.all():
        self.add(shard.index, lambda local, data=shard.data: np.asarray(data)[local])


def complete(samples: Mapping[Path, LeafSample]) -> None:
  """Fills the samples other processes hold (a collective: every process calls it)."""
  import jax  # pylint: disable=g-import-not-at-top
  paths = sorted(samples)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    values = np.concatenate([samples[p].values for p in paths])
    seen = np.concatenate([samples[p].seen for p in paths]).astype(np.int32)
    all_values, all_seen = multihost_utils.process_allgather((values, seen))
    first = np.argmax(np.asarray(all_seen), axis=0)
    values = np.asarray(all_values)[first, np.arange(values.size)]
    offset = 0
    for p in paths:
      n = samples[p].values.size
      samples[p].values[:] = values[offset:offset + n]
      samples[p].seen[:] = True
      offset += n
  missing = [p for p in paths if not samples[p].seen.all()]
  if missing:
    raise RuntimeError(f'fingerprint: no process holds every sample of {"/".join(missing[0])}')


def digest(config, samples: Mapping[Path, LeafSample]) -> str:
  """'sha256:<16 hex>' of the config and each leaf's path, flat shape and sample. The
  activation dtype is how a run computes, not what the weights are: it is left out (as
  float32, so the digests of float32 configs are what they always were)."""
  named = config.replace(dtype='float32').to_dict()
  h = hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode())
  for path in sorted(samples, key='/'.join):
    sample = samples[path]
    h.update('/'.join(path).encode())
    h.update(str((math.prod(sample.shape),)).encode())
    h.update(sample.values.tobytes())
  return 'sha256:' + h.hexdigest()[:16]


# ----------------------------------------------------------------------------- placement


def numpy_dtype(dtype) -> np.dtype:
  if str(dtype) == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def place_leaf(leaf: Leaf, sharding, dtype, sample: LeafSample | None = None):
  """The leaf as a jax.Array on `sharding` (None: the default device), cast to `dtype`.

  Device by device, only the boxes this process's devices hold are read, each distinct box
  once (a box another device holds too is copied from that device); each host box is gone
  once its device has it, so the host holds one box at a time.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = numpy_dtype(dtype)
  shape = tuple(leaf.shape)
  placed: dict[Any, Any] = {}
  shards = []
  with leaf.open() as read:
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      index = full_index(shape) if index is None else tuple(index)
      key = _box(index, shape)
      if key in placed:
        shards.append(jax.device_put(placed[key], device))
        continue
      raw = np.asarray(read(index))
      if sample is not None:
        sample.add(index, lambda local: raw[local])
      shard = jax.device_put(raw.astype(target, copy=False), device)
      shard.block_until_ready()
      del raw
      placed[key] = shard
      shards.append(shard)
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def place(leaves: Mapping[Path, Leaf], shardings: Mapping[Path, Any] | None, dtype,
          samples: dict[Path, LeafSample] | None = None) -> dict[Path, Any]:
  """{path: jax.Array} placed leaf by leaf (see `place_leaf`); fills `samples` if given."""
  from jaxprompt import host  # pylint: disable=g-import-not-at-top
  out = {}
  for path, leaf in leaves.items():
    sample = None
    if samples is not None:
      sample = samples[path] = LeafSample(leaf.shape)
    out[path] = place_leaf(leaf, None if shardings is None else shardings[path], dtype, sample)
  host.release_host_memory()
  return out
