"""Self-describing prompt files: safetensors values + JSON metadata. Nothing here unpickles.

A prompt file holds the tensor `prompt` ([P, d], or [n, P, d] for a stack), optional
`token_mask` [P] / `piece_mask` [P, k] (XPrompt), and metadata: length, width, the
backbone it was trained for, task, step, metrics, init and the jaxprompt version.
`.npy` files in google-research/prompt-tuning's convention (a bare [P, d] array) are
read too, with `allow_pickle=False`, and so are Hugging Face PEFT prompt-tuning adapter
directories (`jaxprompt.checkpoints.peft`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT = 'jaxprompt.prompt/1'


@dataclasses.dataclass
class PromptFile:
  """A prompt value and what it was made for."""

  value: np.ndarray
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  token_mask: np.ndarray | None = None
  piece_mask: np.ndarray | None = None

  @property
  def length(self) -> int:
    return int(self.value.shape[-2])

  @property
  def width(self) -> int:
    return int(self.value.shape[-1])

  def masked_value(self) -> np.ndarray:
    """The prompt with pruned tokens/pieces zeroed (what the model actually sees)."""
    v = self.value
    if self.piece_mask is not None:
      pieces = self.piece_mask.shape[-1]
      v = (v.reshape(v.shape[:-1] + (pieces, -1)) * self.piece_mask[..., None]).reshape(v.shape)
    if self.token_mask is not None:
      v = v * self.token_mask[..., None]
    return v


def write_prompt(path: str, value, *, overwrite: bool = False, token_mask=None, piece_mask=None,
                 **metadata: Any) -> str:
  """Writes a prompt file (`.safetensors`) or a bare `.npy`; refuses to overwrite by default."""
  from jaxprompt.version import __version__
  value = np.asarray(value, np.float32)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path}: already exists; choose another path or pass overwrite=True')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  if path.endswith('.npy'):
    with open(tmp, 'wb') as f:
      np.save(f, value, allow_pickle=False)
  else:
    meta = dict(metadata, format=FORMAT, jaxprompt_version=__version__,
                length=int(value.shape[-2]), width=int(value.shape[-1]))
    tensors = {'prompt': value}
    if token_mask is not None:
      tensors['token_mask'] = np.asarray(token_mask, np.float32)
    if piece_mask is not None:
      tensors['piece_mask'] = np.asarray(piece_mask, np.float32)
    save_file(tensors, tmp, metadata={'jaxprompt': json.dumps(meta, default=jsonable)})
  os.replace(tmp, path)
  return path


def jsonable(x):
  """`json.dumps(default=...)` for numpy scalars and arrays (anything else as text)."""
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def read_prompt(path: str) -> PromptFile:
  """Reads a `.safetensors` prompt file, a `.npy` prompt, or a Hugging Face PEFT prompt-tuning
  adapter directory (`adapter_config.json` + `adapter_model.safetensors`); errors name the file
  and the fix."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such prompt file')
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, 'adapter_config.json')):
      raise ValueError(f'{path}: a directory without adapter_config.json; pass a .safetensors or '
                       '.npy prompt file, or a PEFT prompt-tuning adapter directory')
    from jaxprompt.checkpoints.peft import read_peft_prompt  # pylint: disable=g-import-not-at-top
    return read_peft_prompt(path)
  if path.endswith('.npy'):
    try:
      value = np.load(path, allow_pickle=False)
    except ValueError as e:
      raise ValueError(f'{path}: not a plain numpy array ({e}); save it with allow_pickle=False')
    return PromptFile(_check_shape(path, np.asarray(value, np.float32)), {'format': 'npy'})
  if path.endswith('.npz') or path.endswith('.bin') or path.endswith('.pt'):
    raise ValueError(f'{path}: unsupported prompt format; use a .safetensors prompt file or .npy')
  try:
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(path, 'numpy') as f:
      raw = (f.metadata() or {}).get('jaxprompt')
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f'{path}: not a readable safetensors prompt file ({e})') from None
  if 'prompt' not in tensors:
    raise ValueError(f'{path}: holds no tensor named "prompt" (found {sorted(tensors)})')
  meta = json.loads(raw) if raw else {}
  return PromptFile(_check_shape(path, tensors['prompt']), meta, tensors.get('token_mask'),
                    tensors.get('piece_mask'))


def _check_shape(path: str, value: np.ndarray) -> np.ndarray:
  if value.ndim not in (2, 3):
    raise ValueError(f'{path}: a prompt is [P, d] or [n, P, d], found shape {value.shape}')
  return value


def check_compatible(prompt: PromptFile, embed_dim: int, backbone=None,
                     path: str = 'prompt') -> None:
  """Raises if the prompt's width is not the model's; warns if it was made for another backbone.

  `backbone` is a `jaxprompt.checkpoints.backbone.Backbone` (compared by fingerprint, else
  by path) or a path.
  """
  if prompt.width != embed_dim:
    raise ValueError(f'{path}: prompt width {prompt.width} does not match the model width '
                     f'{embed_dim}: a prompt only fits a backbone of its own width; move it with a '
                     'cross-model projector (jaxprompt project train / apply) or tune one for '
                     'this backbone')
  made_for = prompt.metadata.get('backbone_fingerprint')
  fingerprint = getattr(backbone, 'fingerprint', None)
  if made_for and fingerprint:
    if made_for != fingerprint:
      warnings.warn(f'{path}: prompt was trained for backbone {prompt.metadata.get("backbone")} '
                    f'({made_for}), now used with {getattr(backbone, "name", backbone)} '
                    f'({fingerprint})', stacklevel=2)
    return
  made_for = prompt.metadata.get('backbone')
  backbone = getattr(backbone, 'path', backbone)
  if (backbone and made_for and not str(made_for).startswith('in-memory') and
      os.path.abspath(str(made_for)) != os.path.abspath(str(backbone))):
    warnings.warn(f'{path}: prompt was trained for backbone {made_for}, now used with {backbone}',
                  stacklevel=2)


def describe_prompt(path: str) -> str:
  """A few lines for `jaxprompt info` on a prompt file."""
  p = read_prompt(path)
  lines = [f'prompt file: {path}', f'  shape: {tuple(p.value.shape)} (length {p.length}, '
           f'width {p.width})']
  if p.token_mask is not None:
    lines.append(f'  token mask: {int(p.token_mask.sum())}/{p.token_mask.size} tokens kept')
  if p.piece_mask is not None:
    lines.append(f'  piece mask: {int(p.piece_mask.sum())}/{p.piece_mask.size} pieces kept')
  for key in ('method', 'backbone', 'backbone_fingerprint', 'task', 'step', 'init', 'metrics',
              'jaxprompt_version'):
    if key in p.metadata:
      lines.append(f'  {key}: {p.metadata[key]}')
  return '\n'.join(lines)
