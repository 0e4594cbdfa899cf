"""Hugging Face PEFT prompt-tuning adapters <-> jaxprompt prompt files. Nothing here unpickles.

A PEFT prompt-tuning adapter is a directory with two files:

  adapter_config.json        a `PromptTuningConfig`: peft_type PROMPT_TUNING, task_type,
                             num_virtual_tokens (P), token_dim (d), num_transformer_submodules
                             (1: the prompt goes in front of the encoder input; 2, PEFT's
                             seq2seq default: a second P rows go in front of the decoder input),
                             base_model_name_or_path, ...
  adapter_model.safetensors  one tensor, `prompt_embeddings`, of shape
                             [P * num_transformer_submodules, d]

`export_peft` writes one from a jaxprompt prompt (an encoder prefix, so
num_transformer_submodules=1) that `peft.PeftModel.from_pretrained(t5, out_dir)` loads;
`read_peft_prompt` reads one, written by jaxprompt or by PEFT's `save_pretrained`, into a
`PromptFile`. `read_prompt(adapter_dir)` dispatches here, so an adapter directory works wherever
a prompt file does (`--prompt_init_file`, `jaxprompt eval --prompt`). Neither direction imports
torch or peft.

A `prefix_tuning` product exports as a PREFIX_TUNING adapter instead (`export_prefix_peft`):
the same two files, `prompt_embeddings` being the [P, 2n * heads * head_dim] prefix rows PEFT's
T5 reads (see jaxprompt/methods/prefix_tuning.py), every size explicit in the config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import numpy as np

from jaxprompt.prompts.files import PromptFile, read_prompt
from jaxprompt.prompts.files import jsonable as _jsonable

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
PICKLE_WEIGHTS_NAME = 'adapter_model.bin'
TENSOR_NAME = 'prompt_embeddings'  # the key PEFT saves prompt-learning adapters under
TASK_TYPE = 'SEQ_2_SEQ_LM'
_METADATA_KEY = 'jaxprompt'  # extra safetensors metadata (PEFT ignores it): the prompt's metadata
_DERIVED = ('format', 'length', 'width')


def _peft_version() -> str | None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version('peft')
  except metadata.PackageNotFoundError:
    return None


def _backbone_sizes(backbone: str | None) -> tuple[int | None, int | None, int | None]:
  """(num_layers, num_heads, emb_dim) of a local backbone checkpoint, read from its headers.

  Unknown (None) for names on the Hub, remote paths, or anything that cannot be read; PEFT
  then fills num_layers / num_attention_heads from the base model when it loads the adapter.
  """
  if not backbone or '://' in str(backbone) or not os.path.exists(str(backbone)):
    return None, None, None
  try:
    from jaxprompt.checkpoints import read_shapes  # pylint: disable=g-import-not-at-top
    _, info = read_shapes(str(backbone))
    config = info['config']
    return config.num_encoder_layers, config.num_heads, config.emb_dim
  except Exception:  # pylint: disable=broad-except  # optional fields: any failure -> unknown
    return None, None, None


def peft_config_dict(length: int, width: int, base_model_name_or_path: str | None,
                     num_layers: int | None = None,
                     num_attention_heads: int | None = None) -> dict[str, Any]:
  """The `adapter_config.json` of an encoder-prefix prompt (PEFT's PromptTuningConfig fields)."""
  config = {
      'auto_mapping': None,
      'base_model_name_or_path': base_model_name_or_path,
      'inference_mode': True,
      'modules_to_save': None,
      'num_attention_heads': num_attention_heads,
      'num_layers': num_layers,
      'num_transformer_submodules': 1,
      'num_virtual_tokens': int(length),
      'peft_type': 'PROMPT_TUNING',
      'prompt_tuning_init': 'RANDOM',  # how PEFT would initialise; the saved weights replace it
      'prompt_tuning_init_text': None,
      'revision': None,
      'task_type': TASK_TYPE,
      'token_dim': int(width),
      'tokenizer_kwargs': None,
      'tokenizer_name_or_path': None,
  }
  version = _peft_version()
  if version:
    config['peft_version'] = version
  return config


def _model_card(base: str | None, length: int, width: int) -> str:
  front = f'base_model: {base}\n' if base else ''
  return (f'---\n{front}library_name: peft\ntags:\n- prompt-tuning\n- jaxprompt\n---\n\n'
          f'# Soft prompt ({length} x {width})\n\nExported by jaxprompt. Load with\n'
          '`peft.PeftModel.from_pretrained(base_model, this_directory)`; the prompt goes in front '
          'of the encoder input (num_transformer_submodules=1).\n')


def export_peft(prompt: str | PromptFile, out_dir: str, *,
                base_model_name_or_path: str | None = None, overwrite: bool = False) -> str:
  """Writes a PEFT prompt-tuning adapter directory from a jaxprompt prompt.

  Args:
    prompt: a prompt file path (anything `read_prompt` reads) or a `PromptFile`; XPrompt masks
      are applied (PEFT has none), a [n, P, d] stack is refused.
    out_dir: the adapter directory: `adapter_config.json` + `adapter_model.safetensors`
      (+ a short README.md model card). Written to a temporary directory beside it, then
      renamed into place.
    base_model_name_or_path: what PEFT records as the base model; defaults to the prompt's
      metadata 'backbone'.
    overwrite: replace an existing non-empty `out_dir`.

  Returns:
    `out_dir`.
  """
  where = prompt if isinstance(prompt, str) else 'prompt'
  pf = read_prompt(prompt) if isinstance(prompt, str) else prompt
  if pf.metadata.get('method') == 'prefix_tuning':
    return export_prefix_peft(pf, out_dir, base_model_name_or_path=base_model_name_or_path,
                              overwrite=overwrite, where=where)
  if pf.value.ndim != 2:
    raise ValueError(f'{where}: holds a stack of {pf.value.shape[0]} prompts '
                     f'{tuple(pf.value.shape)}; a PEFT adapter holds one [P, d] prompt, export '
                     'each task prompt separately')
  _check_out_dir(out_dir, overwrite)
  position = pf.metadata.get('position', 'prefix')
  if position != 'prefix':
    warnings.warn(f'{where}: trained at position {position!r}, but PEFT puts the prompt in '
                  'front of the input (prefix); results will differ', stacklevel=2)
  value = np.ascontiguousarray(np.asarray(pf.masked_value(), np.float32))
  length, width = value.shape
  base = base_model_name_or_path or pf.metadata.get('backbone')
  base = None if base is None else str(base)
  num_layers, num_heads, emb_dim = _backbone_sizes(base)
  if emb_dim is not None and emb_dim != width:
    raise ValueError(f'{where}: prompt width {width} does not match the base model {base} '
                     f'(d_model {emb_dim}); pass the backbone it was trained for as '
                     'base_model_name_or_path')
  config = peft_config_dict(length, width, base, num_layers, num_heads)
  meta = {k: v for k, v in pf.metadata.items() if k not in _DERIVED}
  if pf.token_mask is not None or pf.piece_mask is not None:
    meta['masks_applied'] = True
  return _write_adapter(out_dir, config, value, meta, _model_card(base, length, width))


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and not overwrite and (
      not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise FileExistsError(f'{out_dir}: already exists and is not empty; choose another directory '
                          'or pass overwrite=True')


def _write_adapter(out_dir: str, config: dict[str, Any], value: np.ndarray, meta: dict[str, Any],
                   card: str) -> str:
  """Writes config + `prompt_embeddings` + model card to a temporary directory beside `out_dir`,
  then renames it into place (an old `out_dir` is replaced only once the new one is complete)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  out_dir = out_dir.rstrip(os.sep) or out_dir
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  old = None
  try:
    with open(os.path.join(tmp, CONFIG_NAME), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    save_file({TENSOR_NAME: value}, os.path.join(tmp, WEIGHTS_NAME),
              metadata={'format': 'pt', _METADATA_KEY: json.dumps(meta, default=_jsonable)})
    with open(os.path.join(tmp, 'README.md'), 'w') as f:
      f.write(card)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)
    elif os.path.lexists(out_dir):  # overwrite=True: move the old one aside, then drop it
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-', dir=parent)
      os.replace(out_dir, os.path.join(old, 'x'))
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.lexists(out_dir):
      os.replace(os.path.join(old, 'x'), out_dir)  # put the old one back
      shutil.rmtree(old, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return out_dir


def prefix_config_dict(length: int, meta: dict[str, Any],
                       base_model_name_or_path: str | None) -> dict[str, Any]:
  """The `adapter_config.json` of a prefix (PEFT's PrefixTuningConfig fields) with every size
  explicit: PEFT's defaults (token_dim = d_model, num_layers = encoder depth) do not fit every
  T5. The rows are the trained prefix itself, so no projection MLP (PEFT saves a projected
  prefix the same way) and num_transformer_submodules=2 (seq2seq: PEFT's T5 layout)."""
  config = {
      'auto_mapping': None,
      'base_model_name_or_path': base_model_name_or_path,
      'encoder_hidden_size': int(meta['num_heads'] * meta['head_dim']),
      'inference_mode': True,
      'init_weights': None,
      'modules_to_save': None,
      'num_attention_heads': int(meta['num_heads']),
      'num_layers': max(int(meta['encoder_layers']), int(meta['decoder_layers'])),
      'num_transformer_submodules': 2,
      'num_virtual_tokens': int(length),
      'peft_type': 'PREFIX_TUNING',
      'prefix_projection': False,
      'revision': None,
      'task_type': TASK_TYPE,
      'token_dim': int(meta['num_heads'] * meta['head_dim']),
  }
  version = _peft_version()
  if version:
    config['peft_version'] = version
  return config


def export_prefix_peft(pf: PromptFile, out_dir: str, *, base_model_name_or_path: str | None = None,
                       overwrite: bool = False, where: str = 'prefix') -> str:
  """Writes a PEFT PREFIX_TUNING adapter from a `prefix_tuning` product (layout 'peft': the
  [P, 2n * heads * head_dim] rows PEFT's T5 reads, see jaxprompt/methods/prefix_tuning.py)."""
  meta = dict(pf.metadata)
  if meta.get('prefix_layout') != 'peft':
    raise ValueError(f'{where}: a prefix of layout {meta.get("prefix_layout")!r}; PEFT\'s T5 '
                     'prefix tuning only reads layout peft (decoder self-attention): train with '
                     '--prefix_layout peft to export')
  missing = [k for k in ('num_heads', 'head_dim', 'encoder_layers', 'decoder_layers')
             if k not in meta]
  if missing:
    raise ValueError(f'{where}: prefix metadata lacks {", ".join(missing)}; not a jaxprompt '
                     'prefix_tuning product')
  _check_out_dir(out_dir, overwrite)
  length = int(pf.value.shape[0])
  base = base_model_name_or_path or meta.get('backbone')
  base = None if base is None else str(base)
  config = prefix_config_dict(length, meta, base)
  width = config['num_layers'] * 2 * config['token_dim']
  if pf.value.ndim != 2 or pf.value.shape[1] != width:
    raise ValueError(f'{where}: prefix rows of shape {tuple(pf.value.shape)}, but its metadata '
                     f'says [{length}, {width}]')
  _, num_heads, _ = _backbone_sizes(base)
  if num_heads is not None and num_heads != config['num_attention_heads']:
    raise ValueError(f'{where}: a prefix for {config["num_attention_heads"]} heads, but the '
                     f'base model {base} has {num_heads}; pass the backbone it was trained for '
                     'as base_model_name_or_path')
  meta = {k: v for k, v in meta.items() if k not in _DERIVED}
  return _write_adapter(out_dir, config, np.ascontiguousarray(pf.value, np.float32), meta,
                        _prefix_card(base, length))


def _prefix_card(base: str | None, length: int) -> str:
  front = f'base_model: {base}\n' if base else ''
  return (f'---\n{front}library_name: peft\ntags:\n- prefix-tuning\n- jaxprompt\n---\n\n'
          f'# Prefix ({length} virtual tokens)\n\nExported by jaxprompt. Load with\n'
          '`peft.PeftModel.from_pretrained(base_model, this_directory)`; the keys and values go '
          'in front of the decoder self-attention, as PEFT\'s prefix tuning does on T5.\n')




def is_peft_dir(path: str) -> bool:
  """A directory holding `adapter_config.json`."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


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
  config_file = os.path.join(adapter_dir, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'{config_file}: missing; a PEFT adapter directory holds '
                            f'{CONFIG_NAME} and {WEIGHTS_NAME} (save it with save_pretrained)')
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

  weights = os.path.join(adapter_dir, WEIGHTS_NAME)
  if not os.path.isfile(weights):
    if os.path.exists(os.path.join(adapter_dir, PICKLE_WEIGHTS_NAME)):
      raise ValueError(f'{os.path.join(adapter_dir, PICKLE_WEIGHTS_NAME)}: a pickle file (loading '
                       f'it can run code) and {WEIGHTS_NAME} is missing; re-save the adapter with '
                       'save_pretrained(..., safe_serialization=True)')
    raise FileNotFoundError(f'{weights}: missing; a PEFT adapter directory holds {CONFIG_NAME} '
                            f'and {WEIGHTS_NAME} (save it with save_pretrained)')
  tensors, file_meta = _read_tensors(weights)
  if TENSOR_NAME not in tensors:
    raise ValueError(f'{weights}: holds no tensor named "{TENSOR_NAME}" (found '
                     f'{sorted(tensors)}); not a PEFT prompt-tuning adapter')
  value = tensors[TENSOR_NAME]
  width = config.get('token_dim')
  if value.ndim != 2 or value.shape[0] != length * submodules or (
      width is not None and value.shape[1] != int(width)):
    raise ValueError(f'{weights}: {TENSOR_NAME} has shape {tuple(value.shape)}, but '
                     f'{CONFIG_NAME} says [{length} x {submodules}, {width}] '
                     '(num_virtual_tokens x num_transformer_submodules, token_dim)')

  meta: dict[str, Any] = {}
  raw = file_meta.get(_METADATA_KEY)
  if raw:
    try:
      meta.update({k: v for k, v in json.loads(raw).items() if k not in _DERIVED})
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
  if config.get('task_type') not in (None, TASK_TYPE):
    warnings.warn(f'{config_file}: a {config["task_type"]} adapter; jaxprompt prompts are '
                  f'encoder prompts of {TASK_TYPE} (T5) models', stacklevel=2)
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
