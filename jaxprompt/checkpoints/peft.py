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
T5 reads (see jaxprompt/methods/prefix_tuning.py), every size explicit in the config. A
`p_tuning` product exports as a P_TUNING adapter (its prompt is the encoder's output, which
PEFT loads in inference mode as it saves it). PEFT's P_TUNING, PREFIX_TUNING and
MULTITASK_PROMPT_TUNING adapters read back too (`read_peft_prompt`); `peft_encoder_params` reads
the encoder weights of a PEFT run saved beside its adapter, to continue it (`--init_from DIR`).
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
from jaxprompt.prompts.files import PEFT_ENCODER_NAME
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


def p_tuning_config(config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
  """A P_TUNING `adapter_config.json` (PEFT's PromptEncoderConfig fields) from a prompt-tuning
  one: `prompt_embeddings` is the encoder's output, which PEFT uses as is in inference mode."""
  config = {k: v for k, v in config.items() if not k.startswith('prompt_tuning_')
            and k != 'tokenizer_kwargs' and k != 'tokenizer_name_or_path'}
  config.update(peft_type='P_TUNING', encoder_dropout=0.0,
                encoder_reparameterization_type=str(meta.get('encoder_type') or 'mlp').upper(),
                encoder_hidden_size=int(meta.get('encoder_hidden_size') or config['token_dim']),
                encoder_num_layers=int(meta.get('encoder_num_layers') or 2))
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
  if pf.metadata.get('method') == 'p_tuning':
    config = p_tuning_config(config, pf.metadata)
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
      'num_layers': int(meta.get('num_layers') or max(int(meta['encoder_layers']),
                                                        int(meta['decoder_layers']))),
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
  layers = ('num_layers',) if 'num_layers' in meta else ('encoder_layers', 'decoder_layers')
  missing = [k for k in ('num_heads', 'head_dim') + layers if k not in meta]
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


# ---------------------------------------------------------------------------------------------
# Continuing a PEFT P-tuning / prefix-tuning run: its encoder weights.
#
# A PEFT adapter holds what the encoder produced (`prompt_embeddings`), not the encoder. To
# continue a run with the encoder, save its torch state dict beside the adapter:
#   model.save_pretrained(DIR)
#   safetensors.torch.save_file(model.prompt_encoder['default'].state_dict(),
#                               f'{DIR}/prompt_encoder.safetensors')
# and start a jaxprompt run of the same method with `--init_from DIR`.

ENCODER_NAME = PEFT_ENCODER_NAME


def _encoder_tensors(adapter_dir: str) -> dict[str, np.ndarray]:
  from jaxprompt.prompts.files import _read_tensors  # pylint: disable=g-import-not-at-top
  file = os.path.join(adapter_dir, ENCODER_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f'{file}: missing; a PEFT adapter holds the prompt its encoder produced, not the encoder: '
        f"save safetensors.torch.save_file(model.prompt_encoder['default'].state_dict(), "
        f"'{file}') to continue the run (see docs/methods.md)")
  tensors, _ = _read_tensors(file)
  prefix = 'prompt_encoder.default.'  # a state dict of the whole PeftModel works too
  return {k.split(prefix, 1)[-1]: v for k, v in tensors.items()
          if prefix in k or not k.startswith('base_model')}


def _linear(tensors: dict[str, np.ndarray], name: str, file: str) -> dict[str, np.ndarray]:
  try:
    return {'kernel': tensors[f'{name}.weight'].T, 'bias': tensors[f'{name}.bias']}
  except KeyError as e:
    raise ValueError(f'{file}: no tensor {e.args[0]}; not the state dict of PEFT\'s prompt '
                     'encoder') from None


def peft_encoder_params(adapter_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(adapter config, the encoder's parameters in jaxprompt's layout) of a PEFT P-tuning or
  prefix-tuning adapter directory that carries `prompt_encoder.safetensors`.

  P_TUNING: `jaxprompt.methods.p_tuning.PromptEncoder` params (torch Linear weights transposed,
  LSTM `weight_ih_l{k}[_reverse]` -> `lstm_{k}_{forward|backward}`); PREFIX_TUNING:
  `jaxprompt.methods.prefix_tuning.PrefixEncoder` params (`transform.0` / `.2` ->
  `transform_0` / `_2`).
  """
  from jaxprompt.prompts.files import read_peft_config  # pylint: disable=g-import-not-at-top
  config = read_peft_config(adapter_dir)
  where = os.path.join(adapter_dir, CONFIG_NAME)
  if config['peft_type'] not in ('P_TUNING', 'PREFIX_TUNING'):
    raise ValueError(f'{where}: a {config["peft_type"]} adapter has no encoder weights to continue '
                     'from; a P_TUNING or PREFIX_TUNING adapter has')
  if config['peft_type'] == 'P_TUNING' and config['num_transformer_submodules'] != 1:
    raise ValueError(f'{where}: num_transformer_submodules={config["num_transformer_submodules"]}'
                     ': the encoder reads 2P virtual tokens, half of them the decoder\'s, which '
                     'jaxprompt (encoder prompts only) has no place for; train the adapter with '
                     'num_transformer_submodules=1')
  tensors = _encoder_tensors(adapter_dir)
  file = os.path.join(adapter_dir, ENCODER_NAME)
  if 'embedding.weight' not in tensors:
    raise ValueError(f'{file}: no tensor embedding.weight (found {sorted(tensors)[:6]}); not the '
                     'state dict of PEFT\'s prompt encoder')
  params: dict[str, Any] = {'embedding': tensors['embedding.weight']}
  if config['peft_type'] == 'PREFIX_TUNING':
    if 'transform.0.weight' in tensors:
      params.update(transform_0=_linear(tensors, 'transform.0', file),
                    transform_2=_linear(tensors, 'transform.2', file))
    return config, params
  linears = sorted(int(k.split('.')[1]) for k in tensors
                   if k.startswith('mlp_head.') and k.endswith('.weight'))
  for i, index in enumerate(linears):
    params[f'mlp_{i}'] = _linear(tensors, f'mlp_head.{index}', file)
  layer = 0
  while f'lstm_head.weight_ih_l{layer}' in tensors:
    for direction, suffix in (('forward', ''), ('backward', '_reverse')):
      get = lambda name: tensors[f'lstm_head.{name}_l{layer}{suffix}']  # noqa: E731
      params[f'lstm_{layer}_{direction}'] = {'w_ih': get('weight_ih').T,
                                             'w_hh': get('weight_hh').T,
                                             'b_ih': get('bias_ih'), 'b_hh': get('bias_hh')}
    layer += 1
  return config, params


def check_encoder_shapes(params, expected, adapter_dir: str) -> None:
  """A one-line error when the encoder weights' shapes are not those of this run's encoder."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(np.shape(v))  # noqa: E731
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = shapes(params), shapes(expected)
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:3]
    raise ValueError(f'{os.path.join(adapter_dir, ENCODER_NAME)}: encoder weights do not fit this '
                     'run\'s encoder (' + ', '.join(f'{k}: {got.get(k)} vs {want.get(k)}'
                                                    for k in diff) + '); pass the options the '
                     'PEFT run used')
