"""The frozen backbone of a run: module, params, where it came from, and its fingerprint.

The fingerprint identifies a backbone whether it was read from disk or built in memory: a
hash of its config and of a fixed sample of every weight (up to 4096 evenly spaced values
per leaf, plus the leaf's shape and sum), computed once in milliseconds. Run manifests and
prompt files record it; resuming a run or loading a prompt checks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import numpy as np

SAMPLES_PER_LEAF = 4096


@dataclasses.dataclass
class Backbone:
  module: Any  # jaxprompt.model.Transformer
  params: Any
  path: str | None  # None for a backbone built in memory
  fingerprint: str

  @property
  def name(self) -> str:
    return self.path or f'in-memory ({self.fingerprint})'


def fingerprint(config, params) -> str:
  """'sha256:<16 hex>' of the config and a deterministic sample of every weight."""
  import jax
  from jaxprompt.checkpoints import flatten, path_str
  digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
  flat = flatten(params)
  for path in sorted(flat, key=path_str):
    flat_leaf = np.ravel(np.asarray(jax.device_get(flat[path])))
    step = max(1, flat_leaf.size // SAMPLES_PER_LEAF)
    sample = np.asarray(flat_leaf[::step][:SAMPLES_PER_LEAF], np.float32)
    digest.update(path_str(path).encode())
    digest.update(str(flat_leaf.shape).encode())
    digest.update(sample.tobytes())
  return 'sha256:' + digest.hexdigest()[:16]


def resolve_backbone_path(path: str) -> str:
  """'lab' (or 'lab:PRESET') -> the lab backbone's checkpoint (built on first use); relative
  local paths -> absolute; remote paths unchanged."""
  path = str(path)
  if path == 'lab' or path.startswith('lab:'):
    from jaxprompt.lab import backbone as lab_backbone
    preset = path.partition(':')[2] or None
    kwargs = {'preset': preset} if preset else {}
    if os.environ.get('JAXPROMPT_LAB_STEPS'):  # a quicker, smaller build (tests, quick looks)
      kwargs['steps'] = int(os.environ['JAXPROMPT_LAB_STEPS'])
    return lab_backbone.build(**kwargs)
  if '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def load_backbone(backbone, config=None, dropout_rate: float | None = None) -> Backbone:
  """A checkpoint path ('lab' for the lab's), a `(module, params)` pair or a Backbone ->
  Backbone, with the dropout rate replaced when one is given."""
  from jaxprompt.model import Transformer
  if isinstance(backbone, Backbone):
    result = backbone
  elif isinstance(backbone, (tuple, list)):
    module, params = backbone
    result = Backbone(module, params, None, fingerprint(module.config, params))
  else:
    from jaxprompt.checkpoints import load_t5
    path = resolve_backbone_path(backbone)
    module, params = load_t5(path, config=config)
    result = Backbone(module, params, path, fingerprint(module.config, params))
  if dropout_rate is not None and dropout_rate != result.module.config.dropout_rate:
    result = dataclasses.replace(
        result, module=Transformer(result.module.config.replace(dropout_rate=dropout_rate)))
  return result


def warn(message: str) -> None:
  print(f'jaxprompt: warning: {message}', file=sys.stderr)
