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
`read_peft_prompt` (in `jaxprompt.prompts.files`, with the other prompt readers; importable from
here too) reads one, written by jaxprompt or by PEFT's `save_pretrained`, into a `PromptFile`.
`read_prompt(adapter_dir)` dispatches to it, so an adapter directory works wherever a prompt file
does (`--prompt_init_file`, `jaxprompt eval --prompt`). Neither direction imports
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

# The reader lives with the other prompt readers (`read_prompt` dispatches to it); the names
# an adapter directory uses are shared from there.
from jaxprompt.prompts.files import PEFT_CONFIG_NAME as CONFIG_NAME
from jaxprompt.prompts.files import PEFT_DERIVED as _DERIVED
from jaxprompt.prompts.files import PEFT_METADATA_KEY as _METADATA_KEY
from jaxprompt.prompts.files import PEFT_TASK_TYPE as TASK_TYPE
from jaxprompt.prompts.files import PEFT_TENSOR_NAME as TENSOR_NAME
from jaxprompt.prompts.files import PEFT_WEIGHTS_NAME as WEIGHTS_NAME
from jaxprompt.prompts.files import PromptFile, read_peft_prompt, read_prompt  # noqa: F401
from jaxprompt.prompts.files import jsonable as _jsonable


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
