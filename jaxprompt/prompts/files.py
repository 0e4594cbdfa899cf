"""Self-describing prompt files: safetensors values + JSON metadata. Nothing here unpickles.

A prompt file holds the tensor `prompt` ([P, d], or [n, P, d] for a stack), optional
`token_mask` [P] / `piece_mask` [P, k] (XPrompt), and metadata: length, width, the
backbone it was trained for, task, step, metrics, init and the jaxprompt version.
`.npy` files in google-research/prompt-tuning's convention (a bare [P, d] array) are
read too, with `allow_pickle=False`, and so are that repository's `numpy_checkpoints` folders and
T5X checkpoints (`prompt_tuning_files`) and Hugging Face PEFT prompt-learning adapter
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
  """Reads a `.safetensors` prompt file, a `.npy` prompt, a Hugging Face PEFT prompt-learning
  adapter directory (`adapter_config.json` + `adapter_model.safetensors`), or a prompt-tuning
  repository's `numpy_checkpoints/checkpoint_N` folder or T5X checkpoint
  (`jaxprompt.prompts.prompt_tuning_files`); errors name the file and the fix."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such prompt file')
  from jaxprompt.prompts import prompt_tuning_files as ptf  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    if is_peft_dir(path):
      return read_peft_prompt(path)
    found = ptf.read_dir_prompt(path)
    if found is None:
      raise ValueError(f'{path}: a directory without {PEFT_CONFIG_NAME}, not a prompt-tuning '
                       f'{ptf.NUMPY_DIR}/checkpoint_N folder nor a T5X checkpoint; pass a '
                       '.safetensors or .npy prompt file, a PEFT adapter directory or such a '
                       'folder')
    value, meta = found
    return PromptFile(check_shape(meta.get('source', path), value), meta)
  if ptf.is_prompt_file_name(path):  # numpy_checkpoints/checkpoint_N/encoder.prompt.prompt.prompt
    value, meta = ptf.read_numpy_prompt(path)
    return PromptFile(check_shape(path, value), meta)
  if path.endswith('.npy'):
    try:
      value = np.load(path, allow_pickle=False)
    except ValueError as e:
      raise ValueError(f'{path}: not a plain numpy array ({e}); save it with allow_pickle=False')
    return PromptFile(check_shape(path, np.asarray(value, np.float32)), {'format': 'npy'})
  if path.endswith('.npz') or path.endswith('.bin') or path.endswith('.pt'):
    raise ValueError(f'{path}: unsupported prompt format; use a .safetensors prompt file or .npy')
  try:
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(path, 'numpy') as f:
      raw = (f.metadata() or {}).get('jaxprompt')
  except Exception as e:  # safetensors raises its own error types
    if not path.endswith('.safetensors'):  # README.md: not "header too large"
      raise ValueError(f'{path}: not a prompt file (expected .safetensors, .npy or a PEFT '
                       'adapter folder)') from None
    raise ValueError(f'{path}: not a readable safetensors prompt file ({e})') from None
  if 'prompt' not in tensors:
    raise ValueError(f'{path}: holds no tensor named "prompt" (found {sorted(tensors)})')
  meta = json.loads(raw) if raw else {}
  return PromptFile(check_shape(path, tensors['prompt']), meta, tensors.get('token_mask'),
                    tensors.get('piece_mask'))


def check_shape(path: str, value: np.ndarray) -> np.ndarray:
  """`value` when it is a [P, d] prompt or [n, P, d] stack; else a one-line error naming `path`."""
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


PEFT_PROMPT_TYPES = ('PROMPT_TUNING', 'P_TUNING', 'PREFIX_TUNING', 'MULTITASK_PROMPT_TUNING')
PEFT_ENCODER_NAME = 'prompt_encoder.safetensors'  # optional: the torch state dict of PEFT's
# prompt encoder (P-tuning) / prefix encoder, for continuing a PEFT run (`--init_from DIR`)


def read_peft_config(adapter_dir: str) -> dict[str, Any]:
  """The `adapter_config.json` of a PEFT prompt-learning adapter directory, checked."""
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
  if peft_type not in PEFT_PROMPT_TYPES:
    raise ValueError(f'{config_file}: peft_type {peft_type} is not a prompt-learning adapter; '
                     f'only prompt-tuning adapters convert to soft prompts '
                     f'({", ".join(PEFT_PROMPT_TYPES)})')
  try:
    length = int(config['num_virtual_tokens'])
    submodules = int(config.get('num_transformer_submodules') or 1)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{config_file}: bad num_virtual_tokens / num_transformer_submodules '
                     f'({e!r})') from None
  if length < 1 or submodules not in (1, 2):
    raise ValueError(f'{config_file}: num_virtual_tokens={length}, num_transformer_submodules='
                     f'{submodules}; expected >= 1 and 1 or 2')
  if peft_type == 'PREFIX_TUNING':
    if submodules != 2:  # PEFT's seq2seq layout doubles the rows; jaxprompt reads that layout
      raise ValueError(f'{config_file}: a prefix with num_transformer_submodules={submodules}; '
                       'jaxprompt reads PEFT\'s seq2seq prefix layout (num_transformer_'
                       'submodules=2, its T5 default): save the adapter with that setting')
    missing = [k for k in ('num_layers', 'num_attention_heads', 'token_dim') if not config.get(k)]
    if missing:
      raise ValueError(f'{config_file}: a prefix adapter without {", ".join(missing)}; save it '
                       'with PEFT (get_peft_model fills them from the base model)')
  config['num_virtual_tokens'], config['num_transformer_submodules'] = length, submodules
  return config


def read_peft_tensors(adapter_dir: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The tensors (float32) and safetensors metadata of a PEFT adapter's weights file."""
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
  return tensors, file_meta


def read_peft_prompt(adapter_dir: str, encoder_only: bool = False) -> PromptFile:
  """Reads a PEFT prompt-learning adapter directory into a `PromptFile`.

  * PROMPT_TUNING, P_TUNING: the [P, d] prompt (`prompt_embeddings`; a P-tuning adapter holds
    its encoder's output), metadata method `prompt_tuning` / `p_tuning`;
  * PREFIX_TUNING: the [P, 2 * num_layers * token_dim] prefix rows, a `prefix_tuning` product
    of layout 'peft' (`PrefixTuning.load_product` checks its layers and heads against the
    backbone);
  * MULTITASK_PROMPT_TUNING: the stack [n, P, d] of task prompts P* o (U_k V_k), a
    `multitask_prompt` product (tasks named by PEFT's task ids '0', '1', ...), which
    `--mpt_source` also takes.

  PEFT's seq2seq default num_transformer_submodules=2 gives the decoder P virtual tokens of its
  own (rows P..2P-1; a P-tuning LSTM reads all 2P). jaxprompt prompts the encoder only, so
  such an adapter is refused, unless `encoder_only` (the Python API's explicit choice) keeps
  the encoder rows of a PROMPT_TUNING adapter. A prefix adapter is the exception: its
  num_transformer_submodules=2 is PEFT's T5 prefix layout, which jaxprompt reads whole.
  Metadata: backbone (base_model_name_or_path), task_type, init, peft_type, peft_version, and
  the jaxprompt metadata of a prompt jaxprompt exported.
  """
  config = read_peft_config(adapter_dir)
  config_file = os.path.join(adapter_dir, PEFT_CONFIG_NAME)
  peft_type, length = config['peft_type'], config['num_virtual_tokens']
  submodules = config['num_transformer_submodules']
  if submodules == 2 and peft_type != 'PREFIX_TUNING' and not (
      encoder_only and peft_type == 'PROMPT_TUNING'):
    raise ValueError(f'{config_file}: num_transformer_submodules=2 (PEFT\'s seq2seq default) '
                     f'gives the decoder {length} virtual tokens of its own, which jaxprompt '
                     '(encoder prompts only) would drop; train the adapter with '
                     'num_transformer_submodules=1')
  tensors, file_meta = read_peft_tensors(adapter_dir)
  weights = os.path.join(adapter_dir, PEFT_WEIGHTS_NAME)
  value = tensors[PEFT_TENSOR_NAME]
  width = config.get('token_dim')
  if peft_type == 'PREFIX_TUNING':
    rows, submodules = 2 * int(config['num_layers']), 1  # one [P, R * t] matrix
    width = rows * int(config['token_dim'])
  if value.ndim != 2 or value.shape[0] != length * submodules or (
      width is not None and value.shape[1] != int(width)):
    raise ValueError(f'{weights}: {PEFT_TENSOR_NAME} has shape {tuple(value.shape)}, but '
                     f'{PEFT_CONFIG_NAME} says [{length} x {submodules}, {width}] '
                     '(num_virtual_tokens x num_transformer_submodules, token_dim'
                     f'{" x 2 num_layers" if peft_type == "PREFIX_TUNING" else ""})')

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
              peft_type=peft_type, num_transformer_submodules=config['num_transformer_submodules'])
  if config.get('base_model_name_or_path'):
    meta['backbone'] = config['base_model_name_or_path']
  for key in ('prompt_tuning_init_text', 'peft_version', 'revision'):
    if config.get(key):
      meta[key] = config[key]
  if config.get('task_type') not in (None, PEFT_TASK_TYPE):
    warnings.warn(f'{config_file}: a {config["task_type"]} adapter; jaxprompt prompts are '
                  f'encoder prompts of {PEFT_TASK_TYPE} (T5) models', stacklevel=2)
  if submodules == 2:  # encoder_only, asked for
    meta['decoder_prompt_dropped'] = (
        f'num_transformer_submodules=2: kept the first {length} rows (the encoder prompt), '
        f'dropped the {length} decoder-prompt rows; jaxprompt prompts the encoder only')
    value = value[:length]
  if peft_type == 'P_TUNING':
    meta.update(method='p_tuning', encoder_type=str(
        config.get('encoder_reparameterization_type') or 'MLP').lower())
  elif peft_type == 'PREFIX_TUNING':
    heads, token_dim = int(config['num_attention_heads']), int(config['token_dim'])
    if token_dim % heads:
      raise ValueError(f'{config_file}: token_dim {token_dim} is not a multiple of '
                       f'num_attention_heads {heads}')
    meta.update(method='prefix_tuning', prefix_layout='peft',
                prefix_projection=bool(config.get('prefix_projection')),
                num_layers=int(config['num_layers']), num_heads=heads,
                head_dim=token_dim // heads)
  elif peft_type == 'MULTITASK_PROMPT_TUNING':
    value = _mpt_stack(tensors, value, weights)
    meta.update(method='multitask_prompt', mpt_rank=int(tensors['prefix_task_cols'].shape[-1]))
    meta.setdefault('tasks', [str(i) for i in range(value.shape[0])])
  value = np.ascontiguousarray(value)
  meta.update(length=int(value.shape[-2]), width=int(value.shape[-1]))
  return PromptFile(value, meta)


def _mpt_stack(tensors: dict[str, np.ndarray], shared: np.ndarray, weights: str) -> np.ndarray:
  """[n, P, d]: the task prompts P* o (U_k V_k) of PEFT's MPT tensors."""
  cols, rows = tensors.get('prefix_task_cols'), tensors.get('prefix_task_rows')
  if cols is None or rows is None or cols.ndim != 3 or rows.ndim != 3 or (
      cols.shape[1:] != (shared.shape[0], rows.shape[1]) or rows.shape[0] != cols.shape[0]
      or rows.shape[2] != shared.shape[1]):
    raise ValueError(f'{weights}: a MULTITASK_PROMPT_TUNING adapter needs prefix_task_cols '
                     f'[n, P, r] and prefix_task_rows [n, r, d] beside {PEFT_TENSOR_NAME} '
                     f'{tuple(shared.shape)}; found {sorted(tensors)}')
  return shared[None] * np.einsum('npr,nrd->npd', cols, rows)
