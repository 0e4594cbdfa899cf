"""Self-describing prompt files: safetensors values + JSON metadata. Nothing here unpickles.

A prompt file holds the tensor `prompt` ([P, d], or [n, P, d] for a stack), optional
`token_mask` [P] / `piece_mask` [P, k] (XPrompt), and metadata: length, width, the
backbone it was trained for, task, step, metrics, init and the jaxprompt version.
`.npy` files in google-research/prompt-tuning's convention (a bare [P, d] array) are
read too, with `allow_pickle=False`, and so are Hugging Face PEFT prompt-tuning adapter
directories (`read_peft_prompt`; `jaxprompt.checkpoints.peft` writes them).
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

# Hugging Face PEFT adapter directories (written by `jaxprompt.checkpoints.peft`, read here).
PEFT_CONFIG_NAME = 'adapter_config.json'
PEFT_WEIGHTS_NAME = 'adapter_model.safetensors'
PEFT_PICKLE_NAME = 'adapter_model.bin'
PEFT_TENSOR_NAME = 'prompt_embeddings'  # the key PEFT saves prompt-learning adapters under
PEFT_TASK_TYPE = 'SEQ_2_SEQ_LM'
PEFT_METADATA_KEY = 'jaxprompt'  # extra safetensors metadata (PEFT ignores it): our metadata
PEFT_DERIVED = ('format', 'length', 'width')  # metadata recomputed from the tensor on reading


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
    if not is_peft_dir(path):
      raise ValueError(f'{path}: a directory without {PEFT_CONFIG_NAME}; pass a .safetensors or '
                       '.npy prompt file, or a PEFT prompt-tuning adapter directory')
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


# Hugging Face PEFT prompt-tuning adapters -> prompt files (written by jaxprompt.checkpoints.peft).


def is_peft_dir(path: str) -> bool:
  """A directory holding `adapter_config.json`."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME))


def _read_tensors(file: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of a safetensors file as float32 numpy (bfloat16 included) and its metadata."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(file, framework='numpy') as f:
      names, meta = list(f.keys()), dict(f.metadata() or {})
      dtypes = {n: f.get_slice(n).get_dtype() for n in names}
      tensors = {n: f.get_tensor(n) for n in names if dtypes[n] != 'BF16'}
    if len(tensors) < len(names):  # numpy has no bfloat16: read those through jax
      with safe_open(file, framework='flax') as f:
        tensors.update({n: f.get_tensor(n) for n in names if n not in tensors})
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError is a bare Exception
    raise ValueError(f'{file}: not a readable safetensors file ({e})') from None
  return {n: np.asarray(t, np.float32) for n, t in tensors.items()}, meta


def read_peft_prompt(adapter_dir: str) -> PromptFile:
  """Reads a PEFT prompt-tuning adapter directory into a `PromptFile`.

  The prompt is the first `num_virtual_tokens` rows of `prompt_embeddings` (the encoder prompt;
  with num_transformer_submodules=2 the decoder prompt after it is dropped, and the metadata
  says so). Metadata: backbone (base_model_name_or_path), task_type, init (prompt_tuning_init,
  or the original init of a prompt jaxprompt exported), peft_version, and the rest of the
  jaxprompt metadata of a prompt jaxprompt exported.
  """
  if not os.path.isdir(adapter_dir):
    raise FileNotFoundError(f'{adapter_dir}: no such PEFT adapter directory')
  config_file = os.path.join(adapter_dir, PEFT_CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'{config_file}: missing; a PEFT adapter directory holds '
                            f'{PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME} (save it with '
                            'save_pretrained)')
  try:
    with open(config_file) as f:
      config = json.load(f)
  except ValueError as e:
    raise ValueError(f'{config_file}: not valid JSON ({e})') from None
  if not isinstance(config, dict):
    raise ValueError(f'{config_file}: not a PEFT adapter config (a JSON object)')
  peft_type = config.get('peft_type')
  if peft_type != 'PROMPT_TUNING':
    raise ValueError(f'{config_file}: peft_type {peft_type} is not PROMPT_TUNING; only '
                     'prompt-tuning adapters convert to soft prompts (train one with '
                     'PromptTuningConfig, or tune a prompt with jaxprompt tune)')
  try:
    length = int(config['num_virtual_tokens'])
    submodules = int(config.get('num_transformer_submodules') or 1)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{config_file}: bad num_virtual_tokens / num_transformer_submodules '
                     f'({e!r})') from None
  if length < 1 or submodules not in (1, 2):
    raise ValueError(f'{config_file}: num_virtual_tokens={length}, num_transformer_submodules='
                     f'{submodules}; expected >= 1 and 1 or 2')

  weights = os.path.join(adapter_dir, PEFT_WEIGHTS_NAME)
  if not os.path.isfile(weights):
    if os.path.exists(os.path.join(adapter_dir, PEFT_PICKLE_NAME)):
      raise ValueError(f'{os.path.join(adapter_dir, PEFT_PICKLE_NAME)}: a pickle file (loading '
                       f'it can run code) and {PEFT_WEIGHTS_NAME} is missing; re-save the adapter '
                       'with save_pretrained(..., safe_serialization=True)')
    raise FileNotFoundError(f'{weights}: missing; a PEFT adapter directory holds '
                            f'{PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME} (save it with '
                            'save_pretrained)')
  tensors, file_meta = _read_tensors(weights)
  if PEFT_TENSOR_NAME not in tensors:
    raise ValueError(f'{weights}: holds no tensor named "{PEFT_TENSOR_NAME}" (found '
                     f'{sorted(tensors)}); not a PEFT prompt-tuning adapter')
  value = tensors[PEFT_TENSOR_NAME]
  width = config.get('token_dim')
  if value.ndim != 2 or value.shape[0] != length * submodules or (
      width is not None and value.shape[1] != int(width)):
    raise ValueError(f'{weights}: {PEFT_TENSOR_NAME} has shape {tuple(value.shape)}, but '
                     f'{PEFT_CONFIG_NAME} says [{length} x {submodules}, {width}] '
                     '(num_virtual_tokens x num_transformer_submodules, token_dim)')

  meta: dict[str, Any] = {}
  raw = file_meta.get(PEFT_METADATA_KEY)
  if raw:
    try:
      meta.update({k: v for k, v in json.loads(raw).items() if k not in PEFT_DERIVED})
    except (ValueError, AttributeError):
      pass  # foreign or damaged extra metadata: the adapter config below is what counts
  # A prompt jaxprompt exported keeps its own init; PEFT's 'RANDOM' there is a placeholder.
  meta.setdefault('init', config.get('prompt_tuning_init'))
  meta.update(format='peft', source=adapter_dir, task_type=config.get('task_type'),
              num_transformer_submodules=submodules)
  if config.get('base_model_name_or_path'):
    meta['backbone'] = config['base_model_name_or_path']
  for key in ('prompt_tuning_init_text', 'peft_version', 'revision'):
    if config.get(key):
      meta[key] = config[key]
  if config.get('task_type') not in (None, PEFT_TASK_TYPE):
    warnings.warn(f'{config_file}: a {config["task_type"]} adapter; jaxprompt prompts are '
                  f'encoder prompts of {PEFT_TASK_TYPE} (T5) models', stacklevel=2)
  if submodules == 2:
    meta['decoder_prompt_dropped'] = (
        f'num_transformer_submodules=2: kept the first {length} rows (the encoder prompt), '
        f'dropped the {length} decoder-prompt rows; jaxprompt prompts the encoder only')
    warnings.warn(f'{adapter_dir}: num_transformer_submodules=2; using the encoder prompt (first '
                  f'{length} rows) and dropping the decoder prompt', stacklevel=2)
    value = value[:length]
  value = np.ascontiguousarray(value)
  meta.update(length=int(value.shape[0]), width=int(value.shape[1]))
  return PromptFile(value, meta)
