"""The frozen backbone of a run: module, params, where it came from, and its fingerprint.

The fingerprint identifies a backbone whether it was read from disk or built in memory: a
hash of its config and of a fixed sample of every weight (up to 4096 evenly spaced values
per leaf, plus the leaf's path and size), taken where the shards lie (no leaf is gathered). Run manifests and
prompt files record it; resuming a run or loading a prompt checks it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

from jaxprompt import registry


@dataclasses.dataclass
class Backbone:
  module: Any  # jaxprompt.model.Transformer
  params: Any  # as placed for the run (sharded jax arrays); never a second, host copy
  path: str | None  # None for a backbone built in memory
  fingerprint: str

  @property
  def name(self) -> str:
    return self.path or f'in-memory ({self.fingerprint})'


def fingerprint(config, params) -> str:
  """'sha256:<16 hex>' of the config and a deterministic sample of every weight.

  Sharded params are sampled shard by shard where they lie (no leaf is gathered); in a
  multi-process run every process must call it.
  """
  from jaxprompt.checkpoints import flatten
  from jaxprompt.checkpoints.leaves import LeafSample, complete, digest
  samples = {}
  for path, leaf in flatten(params).items():
    samples[path] = LeafSample(np.shape(leaf))
    samples[path].add_array(leaf)
  complete(samples)
  return digest(config, samples)


def resolve_backbone_path(path: str) -> str:
  """A registered name -> its checkpoint ('lab' or 'lab:PRESET': the lab backbone, built on
  first use, once `jaxprompt.lab` is imported; see `jaxprompt.registry`); relative local paths
  -> absolute; remote paths unchanged."""
  path = str(path)
  resolve = registry.backbone_resolver(path)
  if resolve is not None:
    return resolve(path)
  if path in ('lab',) or path.startswith('lab:'):
    raise ValueError(f"backbone {path!r}: the lab is not loaded; import jaxprompt.lab first (the "
                     "CLI and jaxprompt.tune do)")
  if '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def load_backbone(backbone, config=None, dropout_rate: float | None = None, shardings=None,
                  dtype: str | None = None, activation_dtype: str | None = None) -> Backbone:
  """A checkpoint path ('lab' for the lab's), a `(module, params)` pair or a Backbone ->
  Backbone, with the dropout rate and the activation dtype (`T5Config.dtype`, whatever the
  source says) replaced when one is given.

  `shardings` (a params-shaped tree of shardings, or a function of the T5Config returning
  one) and `dtype` ('float32' | 'bfloat16') say where and how the params are held: a
  checkpoint is read straight into them, one leaf and this process's slices at a time, and
  the Backbone keeps only the placed arrays. The fingerprint names the weights as stored (or
  as given), whatever dtype holds them.
  """
  if isinstance(backbone, (Backbone, tuple, list)):
    result = backbone if isinstance(backbone, Backbone) else Backbone(
        backbone[0], backbone[1], None, fingerprint(backbone[0].config, backbone[1]))
    if shardings is not None or dtype is not None:
      result = dataclasses.replace(result, params=_place(result, shardings, dtype))
  else:
    from jaxprompt.checkpoints import load_checkpoint
    path = resolve_backbone_path(backbone)
    module, params, info = load_checkpoint(path, config, shardings, dtype or 'float32')
    result = Backbone(module, params, path, info['fingerprint'])
  changes = {name: value for name, value in (('dropout_rate', dropout_rate),
                                               ('dtype', activation_dtype))
             if value is not None and value != getattr(result.module.config, name)}
  if changes:
    result = dataclasses.replace(result, module=result.module.clone(
        config=result.module.config.replace(**changes)))
  return result


def _place(backbone: Backbone, shardings, dtype):
  """An in-memory backbone's params on `shardings`, cast to `dtype` (a no-op for arrays
  already there)."""
  import jax
  from jaxprompt.checkpoints.leaves import numpy_dtype
  params = backbone.params
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    from jaxprompt.model.layout import cast_frozen  # abstract (`jaxprompt plan`): no placing
    return params if dtype is None else cast_frozen(params, dtype)
  if dtype is not None:
    target = numpy_dtype(dtype)
    params = jax.tree.map(lambda x: x if x.dtype == target else x.astype(target), params)
  if callable(shardings):
    shardings = shardings(backbone.module.config)
  return params if shardings is None else jax.device_put(params, shardings)


def warn(message: str) -> None:
  print(f'jaxprompt: warning: {message}', file=sys.stderr)
