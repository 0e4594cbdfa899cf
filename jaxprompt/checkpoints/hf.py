"""Hugging Face T5 checkpoints (config.json + safetensors) <-> the T5X parameter tree.

Name map, HF -> T5X (torch Linear weights are (out, in), transposed to T5X's (in, out)):

  shared.weight (V, d)                 -> token_embedder/embedding (V, d)
  {S}.block.0.layer.0.SelfAttention.relative_attention_bias.weight (32, H)
                                       -> {S}/relpos_bias/rel_embedding (H, 32)
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}, .layer_norm
                                       -> encoder/layers_{i}/attention/{query,key,value,out},
                                          pre_attention_layer_norm
  encoder.block.{i}.layer.1.DenseReluDense.{wi | wi_0, wi_1; wo}, .layer_norm
                                       -> mlp/{wi | wi_0, wi_1; wo}, pre_mlp_layer_norm
  decoder.block.{i}.layer.0 SelfAttention, layer_norm
                                       -> self_attention, pre_self_attention_layer_norm
  decoder.block.{i}.layer.1 EncDecAttention, layer_norm
                                       -> encoder_decoder_attention, pre_cross_attention_layer_norm
  decoder.block.{i}.layer.2 DenseReluDense, layer_norm -> mlp, pre_mlp_layer_norm
  {S}.final_layer_norm.weight          -> encoder/encoder_norm, decoder/decoder_norm
  lm_head.weight (V, d)                -> decoder/logits_dense/kernel (d, V), untied models only

HF's q/k/v weights reshape their output rows head-major into (H, k), exactly as T5X splits its
joined_kv columns, and neither scales the query at run time. Tied models (T5 1.0) multiply the
decoder output by d**-0.5 before the shared embedding: that is T5X's `logits_via_embedding`.
Only safetensors are read (numpy backend; no torch import); pickle files are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping

import numpy as np

from jaxprompt.checkpoints.leaves import Leaf, full_index
from jaxprompt.checkpoints.storage import PICKLE_SUFFIXES, join, listdir
from jaxprompt.checkpoints.tree import (RELPOS_BUCKETS, CheckpointError, expected_shapes, flatten,
                                        path_str, unflatten)
from jaxprompt.model.config import T5Config

Path = tuple[str, ...]
_IGNORED = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight',
            'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight')
_SAFETENSORS_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16'}
INDEX = 'model.safetensors.index.json'

# feed_forward_proj <-> T5Config.mlp_activations. HF's "gated-gelu" is gelu_new, the tanh
# approximation, which is T5X's gelu; HF's plain "gelu" is the exact one and has no T5X twin.
_HF_TO_ACTIVATIONS = {
    'relu': ('relu',), 'gelu_new': ('gelu',), 'silu': ('silu',),
    'gated-gelu': ('gelu', 'linear'), 'gated-gelu_new': ('gelu', 'linear'),
    'gated-relu': ('relu', 'linear'), 'gated-silu': ('silu', 'linear'),
    'gated-swish': ('silu', 'linear'),
}
_ACTIVATIONS_TO_HF = {
    ('relu',): 'relu', ('gelu',): 'gelu_new', ('gelu_new',): 'gelu_new', ('silu',): 'silu',
    ('gelu', 'linear'): 'gated-gelu', ('gelu_new', 'linear'): 'gated-gelu',
    ('relu', 'linear'): 'gated-relu', ('silu', 'linear'): 'gated-silu',
}


# ----------------------------------------------------------------------------- config


def config_from_hf(cfg: Mapping[str, Any], where: str) -> tuple[T5Config, bool]:
  """(T5Config, scale_decoder_outputs) from a Hugging Face T5 `config.json` dict.

  `logits_via_embedding` is provisional: it becomes final once the weights show whether
  `lm_head.weight` is present and equal to the embedding (see `read_hf`).
  """
  model_type = cfg.get('model_type', 't5')
  if model_type not in ('t5', 'mt5'):
    raise CheckpointError(f'{where}: model_type {model_type!r} is not T5/mT5 (umT5 and LongT5 '
                          'have other layouts and are not supported)')
  buckets = cfg.get('relative_attention_num_buckets', 32)
  distance = cfg.get('relative_attention_max_distance', 128)
  if buckets != RELPOS_BUCKETS or distance != 128:
    raise CheckpointError(f'{where}: relative_attention_num_buckets={buckets}, '
                          f'relative_attention_max_distance={distance}; T5X uses 32 and 128')
  eps = cfg.get('layer_norm_epsilon', 1e-6)
  if abs(eps - 1e-6) > 1e-12:
    raise CheckpointError(f'{where}: layer_norm_epsilon={eps}; T5X uses 1e-6')
  proj = cfg.get('feed_forward_proj', 'relu')
  if proj not in _HF_TO_ACTIVATIONS:
    raise CheckpointError(f'{where}: feed_forward_proj {proj!r} has no T5X equivalent; '
                          f'supported: {", ".join(sorted(_HF_TO_ACTIVATIONS))}')
  scale = cfg.get('scale_decoder_outputs', cfg.get('tie_word_embeddings', True))
  try:
    num_layers = int(cfg.get('num_layers', 6))
    decoder_layers = cfg.get('num_decoder_layers')
    config = T5Config(
        vocab_size=int(cfg.get('vocab_size', 32128)), emb_dim=int(cfg.get('d_model', 512)),
        num_heads=int(cfg.get('num_heads', 8)), head_dim=int(cfg.get('d_kv', 64)),
        mlp_dim=int(cfg.get('d_ff', 2048)), num_encoder_layers=num_layers,
        num_decoder_layers=int(num_layers if decoder_layers is None else decoder_layers),
        mlp_activations=_HF_TO_ACTIVATIONS[proj], dropout_rate=float(cfg.get('dropout_rate', 0.1)),
        logits_via_embedding=bool(scale))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{where}: bad T5 config ({e})') from None
  return config, bool(scale)


def config_to_hf(config: T5Config) -> dict[str, Any]:
  """A Hugging Face `config.json` dict for `config` (transformers 4.x and 5.x read it)."""
  activations = tuple(config.mlp_activations)
  if activations not in _ACTIVATIONS_TO_HF:
    raise CheckpointError(f'mlp_activations {activations} have no Hugging Face T5 equivalent')
  return {
      'architectures': ['T5ForConditionalGeneration'], 'model_type': 't5',
      'vocab_size': config.vocab_size, 'd_model': config.emb_dim, 'd_kv': config.head_dim,
      'd_ff': config.mlp_dim, 'num_heads': config.num_heads,
      'num_layers': config.num_encoder_layers, 'num_decoder_layers': config.num_decoder_layers,
      'feed_forward_proj': _ACTIVATIONS_TO_HF[activations],
      'relative_attention_num_buckets': RELPOS_BUCKETS, 'relative_attention_max_distance': 128,
      'dropout_rate': config.dropout_rate, 'layer_norm_epsilon': 1e-6,
      'initializer_factor': 1.0, 'is_encoder_decoder': True, 'use_cache': True,
      'tie_word_embeddings': bool(config.logits_via_embedding),
      'pad_token_id': 0, 'eos_token_id': 1, 'decoder_start_token_id': 0,
  }


def read_hf_config(directory: str) -> tuple[T5Config, bool, dict[str, Any]]:
  file = join(directory, 'config.json')
  if not os.path.exists(file):
    raise CheckpointError(f'{file}: missing; a Hugging Face T5 directory needs config.json next '
                          'to its safetensors')
  try:
    with open(file) as f:
      raw = json.load(f)
  except ValueError as e:
    raise CheckpointError(f'{file}: not valid JSON ({e})') from None
  config, scale = config_from_hf(raw, file)
  return config, scale, raw


# ----------------------------------------------------------------------------- names


def name_map(config: T5Config) -> dict[Path, tuple[str, bool]]:
  """{T5X path: (HF tensor name, transposed)} for every param but `logits_dense`."""
  names: dict[Path, tuple[str, bool]] = {}
  qkvo = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}
  mlp = (['wi'] if len(config.mlp_activations) == 1
         else [f'wi_{i}' for i in range(len(config.mlp_activations))]) + ['wo']
  stacks = {
      'encoder': (config.num_encoder_layers,
                  [('attention', 'pre_attention_layer_norm', 'SelfAttention')],
                  'encoder_norm'),
      'decoder': (config.num_decoder_layers,
                  [('self_attention', 'pre_self_attention_layer_norm', 'SelfAttention'),
                   ('encoder_decoder_attention', 'pre_cross_attention_layer_norm',
                    'EncDecAttention')],
                  'decoder_norm'),
  }
  for stack, (depth, attentions, final_norm) in stacks.items():
    names[(stack, 'relpos_bias', 'rel_embedding')] = (
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', True)
    for i in range(depth):
      prefix = f'{stack}.block.{i}.layer'
      for j, (attention, norm, hf_attention) in enumerate(attentions):
        names[(stack, f'layers_{i}', norm, 'scale')] = (f'{prefix}.{j}.layer_norm.weight', False)
        for ours, theirs in qkvo.items():
          names[(stack, f'layers_{i}', attention, ours, 'kernel')] = (
              f'{prefix}.{j}.{hf_attention}.{theirs}.weight', True)
      j = len(attentions)
      names[(stack, f'layers_{i}', 'pre_mlp_layer_norm', 'scale')] = (
          f'{prefix}.{j}.layer_norm.weight', False)
      for name in mlp:
        names[(stack, f'layers_{i}', 'mlp', name, 'kernel')] = (
            f'{prefix}.{j}.DenseReluDense.{name}.weight', True)
    names[(stack, final_norm, 'scale')] = (f'{stack}.final_layer_norm.weight', False)
  names[('token_embedder', 'embedding')] = ('shared.weight', False)
  return names


# ----------------------------------------------------------------------------- files


def safetensors_files(directory: str) -> list[str]:
  """The safetensors files of a HF directory: the index's shards, or every *.safetensors."""
  index = join(directory, INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
    except (ValueError, KeyError) as e:
      raise CheckpointError(f'{index}: not a safetensors index ({e})') from None
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.exists(join(directory, name)):
        raise CheckpointError(f'{join(directory, name)}: missing shard listed in {INDEX}; '
                              'download every model-*-of-*.safetensors file')
    return [join(directory, n) for n in files]
  names = [n for n in listdir(directory) if n.endswith('.safetensors')]
  if not names:
    pickles = [n for n in listdir(directory) if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
      from jaxprompt.checkpoints.storage import _refuse_pickle  # pylint: disable=g-import-not-at-top
      raise _refuse_pickle(join(directory, pickles[0]))
    raise CheckpointError(f'{directory}: no model.safetensors (or sharded model-*-of-*.'
                          f'safetensors + {INDEX}); download the safetensors weights')
  return [join(directory, n) for n in names]


def _headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
  """{tensor name: (file, shape, numpy dtype name)} from the safetensors headers."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  for file in files:
    try:
      with safe_open(file, framework='numpy') as f:
        for name in f.keys():
          sl = f.get_slice(name)
          out[name] = (file, tuple(sl.get_shape()),
                       _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    except Exception as e:  # pylint: disable=broad-except  # SafetensorError is a bare Exception
      raise CheckpointError(f'{file}: not a safetensors file ({e})') from None
  return out


def _check_names(headers: Mapping[str, Any], names: Mapping[Path, tuple[str, bool]],
                 directory: str) -> None:
  known = {n for n, _ in names.values()} | {'lm_head.weight'} | set(_IGNORED)
  if 'shared.weight' not in headers and 'encoder.embed_tokens.weight' in headers:
    known.add('encoder.embed_tokens.weight')
  unknown = sorted(set(headers) - known)
  if unknown:
    raise CheckpointError(f'{directory}: unexpected tensor {unknown[0]} ({len(unknown)} in all); '
                          'config.json does not describe these weights (depth, activation?)')


def _hf_name(headers: Mapping[str, Any], name: str) -> str:
  if name == 'shared.weight' and name not in headers and 'encoder.embed_tokens.weight' in headers:
    return 'encoder.embed_tokens.weight'
  return name


def _plan(directory: str):
  """Config, headers and the name map, checked against each other (shapes included)."""
  config, scale, _ = read_hf_config(directory)
  headers = _headers(safetensors_files(directory))
  names = name_map(config)
  _check_names(headers, names, directory)
  shapes = expected_shapes(config.replace(logits_via_embedding=True))
  for path, (name, transposed) in names.items():
    name = _hf_name(headers, name)
    if name not in headers:
      raise CheckpointError(f'{directory}: missing tensor {name} (for {path_str(path)}); the '
                            'safetensors do not match config.json')
    found = headers[name][1][::-1] if transposed else headers[name][1]
    if tuple(found) != shapes[path]:
      raise CheckpointError(f'{directory}: shape mismatch for {name} ({path_str(path)}): '
                            f'expected {shapes[path]} in T5X layout, found {tuple(found)}; '
                            'config.json does not match the weights')
  if 'lm_head.weight' in headers:
    found = headers['lm_head.weight'][1]
    if tuple(found) != (config.vocab_size, config.emb_dim):
      raise CheckpointError(f'{directory}: shape mismatch for lm_head.weight: expected '
                            f'{(config.vocab_size, config.emb_dim)}, found {tuple(found)}')
  return config, scale, headers, names


def read_hf_shapes(directory: str) -> tuple[dict[Path, tuple[tuple[int, ...], str]], T5Config]:
  """{T5X path: (shape, stored dtype)} and the config, from config.json and headers alone.

  Assumes a present `lm_head.weight` of a scaled (tied) model equals the embedding.
  """
  config, scale, headers, names = _plan(directory)
  out = {}
  for path, (name, transposed) in names.items():
    _, shape, dtype = headers[_hf_name(headers, name)]
    out[path] = (shape[::-1] if transposed else shape, dtype)
  tied = scale
  if not tied:
    _, shape, dtype = headers.get('lm_head.weight', headers[_hf_name(headers, 'shared.weight')])
    out[('decoder', 'logits_dense', 'kernel')] = (shape[::-1], dtype)
  return out, config.replace(logits_via_embedding=tied)


def leaves(directory: str) -> tuple[dict[Path, Leaf], T5Config]:
  """The T5X tree of a Hugging Face T5 directory, leaf by leaf (see `leaves.Leaf`), and its
  config. Each leaf reads `safe_open` slices of its tensor (the transposed box of a transposed
  tensor), mapping the file for one box at a time.

  Tying: `scale_decoder_outputs` (transformers 5) or else `tie_word_embeddings` (default true)
  says whether the decoder output is scaled by d**-0.5. Scaled with no `lm_head.weight`, or
  with one equal to `shared.weight`, is T5X's `logits_via_embedding=True`. Otherwise the head
  is untied: `logits_dense = lm_head.T` (times d**-0.5 when scaled), or `shared.T` if absent.
  """
  config, scale, headers, names = _plan(directory)
  out = {path: _leaf(headers, _hf_name(headers, name), transposed)
         for path, (name, transposed) in names.items()}
  shared = _hf_name(headers, 'shared.weight')
  has_head = 'lm_head.weight' in headers
  tied = scale and (not has_head or _same_tensor(headers, 'lm_head.weight', shared))
  if not tied:
    out[('decoder', 'logits_dense', 'kernel')] = _leaf(
        headers, 'lm_head.weight' if has_head else shared, True,
        scale=config.emb_dim ** -0.5 if scale else None)
  return out, config.replace(logits_via_embedding=tied)


def _leaf(headers: Mapping[str, Any], name: str, transposed: bool,
          scale: float | None = None) -> Leaf:
  file, shape, dtype = headers[name]

  def read(index):
    # The file is mapped for one box only: its pages leave the process with the map.
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(file, framework='numpy') as f:
      tensor = f.get_slice(name)
      arr = tensor[tuple(index)[::-1]].T if transposed else tensor[tuple(index)]
      del tensor
    return arr if scale is None else arr.astype(np.float32) * np.float32(scale)

  @contextlib.contextmanager
  def open_leaf():
    yield read

  return Leaf(tuple(shape[::-1]) if transposed else tuple(shape), dtype, open_leaf)


def _same_tensor(headers: Mapping[str, Any], a: str, b: str, rows: int = 4096) -> bool:
  """Whether two tensors are equal, compared a block of rows at a time."""
  if headers[a][1] != headers[b][1]:
    return False
  left, right = _leaf(headers, a, False), _leaf(headers, b, False)
  shape = headers[a][1]
  with left.open() as read_a, right.open() as read_b:
    for start in range(0, shape[0], rows):
      box = (slice(start, min(start + rows, shape[0])),) + full_index(shape[1:])
      if not np.array_equal(np.asarray(read_a(box), np.float32),
                            np.asarray(read_b(box), np.float32)):
        return False
  return True


def save_hf(params: Mapping[str, Any], config: T5Config, directory: str, sharded: bool = False,
            max_shard_bytes: int = 2 * 2**30) -> str:
  """Writes a Hugging Face T5 directory: config.json + model.safetensors (float32).

  Tensors are written one at a time (the host holds one tensor beyond `params`).
  Tied models (`logits_via_embedding=True`) omit `lm_head.weight` and set
  `tie_word_embeddings: true`; untied ones write `lm_head.weight = logits_dense.T`.
  `transformers.T5ForConditionalGeneration.from_pretrained(directory)` loads the result.

  Args:
    params: the T5X tree (nested dict of arrays).
    config: its T5Config.
    directory: created if needed.
    sharded: write `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, with
      at most `max_shard_bytes` per shard and at least two shards.
    max_shard_bytes: the shard size limit when `sharded`.

  Returns:
    `directory`.
  """
  flat = flatten(params)
  expected = expected_shapes(config)
  for path, shape in expected.items():
    found = tuple(np.shape(flat[path])) if path in flat else 'nothing'
    if found != shape:
      raise CheckpointError(f'save_hf: {path_str(path)} expected {shape}, found {found}')
  tensors = {name: (path, transposed) for path, (name, transposed) in name_map(config).items()}
  if not config.logits_via_embedding:
    tensors['lm_head.weight'] = (('decoder', 'logits_dense', 'kernel'), True)

  def shape_of(name):
    shape = expected[tensors[name][0]]
    return shape[::-1] if tensors[name][1] else shape

  def value_of(name):  # one tensor on the host at a time, as torch lays it out
    path, transposed = tensors[name]
    arr = np.asarray(flat[path], np.float32)
    return np.ascontiguousarray(arr.T if transposed else arr)

  os.makedirs(directory, exist_ok=True)
  with open(join(directory, 'config.json'), 'w') as f:
    json.dump(config_to_hf(config), f, indent=2, sort_keys=True)
  nbytes = {name: 4 * int(np.prod(shape_of(name))) for name in tensors}
  if not sharded:
    _write_safetensors(join(directory, 'model.safetensors'), sorted(tensors), shape_of, value_of)
    return directory
  total = sum(nbytes.values())
  limit = min(max_shard_bytes, max(1, total // 2))
  shards: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    if shards[-1] and size + nbytes[name] > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes[name]
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    _write_safetensors(join(directory, file), shard, shape_of, value_of)
    weight_map.update({name: file for name in shard})
  with open(join(directory, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2,
              sort_keys=True)
  return directory


def _write_safetensors(file: str, names: list[str], shape_of, value_of) -> None:
  """A float32 safetensors file written tensor by tensor (the format: an 8-byte little-endian
  header size, a JSON header of dtypes, shapes and byte ranges padded to 8 bytes, the data)."""
  header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name in names:
    size = 4 * int(np.prod(shape_of(name)))
    header[name] = {'dtype': 'F32', 'shape': list(shape_of(name)),
                    'data_offsets': [offset, offset + size]}
    offset += size
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)
  tmp = file + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(len(encoded).to_bytes(8, 'little'))
    f.write(encoded)
    for name in names:
      value = value_of(name)
      if value.shape != tuple(shape_of(name)):
        raise CheckpointError(f'{file}: {name} has shape {value.shape}, expected '
                              f'{tuple(shape_of(name))}')
      value.tofile(f)
      del value
  os.replace(tmp, file)
