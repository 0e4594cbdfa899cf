"""Reading T5 backbones: T5X legacy (msgpack + zarr), T5X Orbax and Hugging Face safetensors.

Every reader describes the T5X parameter tree (`token_embedder/embedding`,
`encoder/layers_{i}/attention/query/kernel`, ...; `expected_shapes` lists it) leaf by leaf, each
leaf readable slice by slice (`leaves.Leaf`). `load_t5` detects the format, infers (or checks)
the `T5Config`, places each leaf straight into its sharding (reading only this process's
slices) and builds the module; `read_params` reads the whole tree as float32 numpy.

Example:
  >>> module, params = load_t5('gs://t5-data/pretrained_models/t5x/t5_1_1_small/checkpoint_1000000')
  >>> logits = module.apply({'params': params}, enc, dec_in, dec_tgt, enable_dropout=False)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from jaxprompt.model.config import T5Config, get_config

Path = tuple[str, ...]
RELPOS_BUCKETS = 32


class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message names the file and what to do."""


# ----------------------------------------------------------------------------- tree helpers


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Nested dict -> {('encoder', 'layers_0', ..., 'kernel'): leaf}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (str(key),)))
    else:
      flat[prefix + (str(key),)] = value
  return flat


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
  """{path tuple: leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def path_str(path: Path) -> str:
  return '/'.join(path)


def expected_shapes(config: T5Config) -> dict[Path, tuple[int, ...]]:
  """The T5X parameter tree of `config`: {path: shape}, without allocating anything."""
  d, hk, f = config.emb_dim, config.num_heads * config.head_dim, config.mlp_dim
  shapes: dict[Path, tuple[int, ...]] = {('token_embedder', 'embedding'): (config.vocab_size, d)}
  if len(config.mlp_activations) == 1:
    mlp_in = ['wi']
  else:
    mlp_in = [f'wi_{i}' for i in range(len(config.mlp_activations))]

  def block(prefix: Path, attentions: list[tuple[str, str]]):
    for norm, attention in attentions:
      shapes[prefix + (norm, 'scale')] = (d,)
      for name in ('query', 'key', 'value'):
        shapes[prefix + (attention, name, 'kernel')] = (d, hk)
      shapes[prefix + (attention, 'out', 'kernel')] = (hk, d)
    shapes[prefix + ('pre_mlp_layer_norm', 'scale')] = (d,)
    for name in mlp_in:
      shapes[prefix + ('mlp', name, 'kernel')] = (d, f)
    shapes[prefix + ('mlp', 'wo', 'kernel')] = (f, d)

  shapes[('encoder', 'relpos_bias', 'rel_embedding')] = (config.num_heads, RELPOS_BUCKETS)
  for i in range(config.num_encoder_layers):
    block(('encoder', f'layers_{i}'), [('pre_attention_layer_norm', 'attention')])
  shapes[('encoder', 'encoder_norm', 'scale')] = (d,)
  shapes[('decoder', 'relpos_bias', 'rel_embedding')] = (config.num_heads, RELPOS_BUCKETS)
  for i in range(config.num_decoder_layers):
    block(('decoder', f'layers_{i}'), [('pre_self_attention_layer_norm', 'self_attention'),
                                       ('pre_cross_attention_layer_norm',
                                        'encoder_decoder_attention')])
  shapes[('decoder', 'decoder_norm', 'scale')] = (d,)
  if not config.logits_via_embedding:
    shapes[('decoder', 'logits_dense', 'kernel')] = (d, config.vocab_size)
  return shapes


def is_prompt_path(path: Path) -> bool:
  """Prompt params (`.*/prompt/.*`) are never part of a backbone: restoring skips them."""
  return 'prompt' in path[:-1]


def _num_layers(shapes: Mapping[Path, Any], stack: str) -> int:
  indices = [int(m.group(1)) for p in shapes if len(p) > 1 and p[0] == stack
             for m in [re.fullmatch(r'layers_(\d+)', p[1])] if m]
  return max(indices) + 1 if indices else 0


def infer_config(shapes: Mapping[Path, tuple[int, ...]], where: str) -> T5Config:
  """A T5Config from the parameter shapes alone (T5X trees have no config inside).

  Activations cannot be read off weights: a single `wi` means relu (T5 1.0), `wi_0`/`wi_1`
  mean gated-gelu (T5.1.1). Tied vs untied logits follows the presence of `logits_dense`.
  """
  def get(path: Path) -> tuple[int, ...]:
    if path not in shapes:
      raise CheckpointError(f'{where}: no parameter {path_str(path)}; this is not a T5X '
                            'encoder-decoder tree (pass config= to say what it is)')
    return tuple(shapes[path])

  vocab, emb = get(('token_embedder', 'embedding'))
  heads = get(('encoder', 'relpos_bias', 'rel_embedding'))[0]
  joined = get(('encoder', 'layers_0', 'attention', 'query', 'kernel'))[1]
  if joined % heads:
    raise CheckpointError(f'{where}: query width {joined} is not a multiple of {heads} heads')
  mlp = ('encoder', 'layers_0', 'mlp')
  gated = mlp + ('wi_0', 'kernel') in shapes
  mlp_dim = get(mlp + (('wi_0' if gated else 'wi'), 'kernel'))[1]
  return T5Config(
      vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined // heads, mlp_dim=mlp_dim,
      num_encoder_layers=_num_layers(shapes, 'encoder'),
      num_decoder_layers=_num_layers(shapes, 'decoder'),
      mlp_activations=('gelu', 'linear') if gated else ('relu',),
      logits_via_embedding=('decoder', 'logits_dense', 'kernel') not in shapes)


def check_shapes(shapes: Mapping[Path, tuple[int, ...]], config: T5Config, where: str) -> None:
  """Raises CheckpointError naming the first missing, extra or mis-shaped parameter."""
  expected = expected_shapes(config)
  hint = f'the checkpoint does not match the config {_brief(config)}; pass the matching config'
  for path, shape in expected.items():
    if path not in shapes:
      raise CheckpointError(f'{where}: missing parameter {path_str(path)} (expected shape '
                            f'{shape}); {hint}')
    found = tuple(shapes[path])
    if found != shape:
      raise CheckpointError(f'{where}: shape mismatch for {path_str(path)}: expected {shape}, '
                            f'found {found}; {hint}')
  extra = sorted(p for p in shapes if p not in expected and not is_prompt_path(p))
  if extra:
    raise CheckpointError(f'{where}: unexpected parameter {path_str(extra[0])} '
                          f'({len(extra)} in all); {hint}')


def _brief(config: T5Config) -> str:
  return (f'(vocab {config.vocab_size}, emb {config.emb_dim}, heads {config.num_heads}x'
          f'{config.head_dim}, mlp {config.mlp_dim} {"-".join(config.mlp_activations)}, layers '
          f'{config.num_encoder_layers}/{config.num_decoder_layers}, '
          f'{"tied" if config.logits_via_embedding else "untied"} logits)')


def as_config(config: T5Config | str | Mapping[str, Any]) -> T5Config:
  if isinstance(config, T5Config):
    return config
  if isinstance(config, str):
    return get_config(config)
  return T5Config.from_dict(dict(config))


# ----------------------------------------------------------------------------- files


def is_remote(path: str) -> bool:
  return '://' in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
  return sorted(n.rstrip('/') for n in names)


def join(*parts: str) -> str:
  return os.path.join(*[str(p) for p in parts])


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _gfile().GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')


def _refuse_pickle(path: str) -> CheckpointError:
  return CheckpointError(
      f'{path}: refusing a PyTorch pickle file (loading pickle can run code); convert it to '
      'safetensors first, e.g. transformers `model.save_pretrained(dir, safe_serialization=True)`')


def detect(path: str) -> tuple[str, str]:
  """Finds the checkpoint format: ('t5x_legacy' | 't5x_orbax' | 'hf', the path to read).

  Accepts a legacy `checkpoint_N/` directory or its `checkpoint` file, an Orbax `checkpoint_N/`
  or `checkpoint_N/state/`, a T5X model directory (the latest `checkpoint_N` is used), or a
  Hugging Face directory (or one of its `.safetensors` / `config.json` files).
  """
  path = str(path).rstrip('/') if len(str(path)) > 1 else str(path)
  if not is_remote(path):  # Orbax refuses relative paths; every reader gets an absolute one
    path = os.path.abspath(os.path.expanduser(path))
  if not exists(path):
    raise CheckpointError(f'{path}: no such file or directory; pass a T5X checkpoint_N '
                          'directory, a T5X model directory or a Hugging Face model directory')
  if not isdir(path):
    name = os.path.basename(path)
    if name == 'checkpoint':
      return 't5x_legacy', os.path.dirname(path)
    if name.endswith(PICKLE_SUFFIXES):
      raise _refuse_pickle(path)
    if name.endswith('.safetensors') or name in ('config.json', 'model.safetensors.index.json'):
      return 'hf', os.path.dirname(path)
    raise CheckpointError(f'{path}: unknown checkpoint file; expected a T5X `checkpoint` '
                          'msgpack file, a .safetensors file or a directory')
  names = set(listdir(path))
  if _is_orbax_tree(names):
    return 't5x_orbax', path
  if 'checkpoint' in names and not isdir(join(path, 'checkpoint')):
    return 't5x_legacy', path
  if 'state' in names and isdir(join(path, 'state')) and _is_orbax_tree(
      set(listdir(join(path, 'state')))):
    return 't5x_orbax', join(path, 'state')
  if any(n.endswith('.safetensors') for n in names):
    return 'hf', path
  pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
  if pickles:
    raise _refuse_pickle(join(path, pickles[0]))
  steps = [(int(m.group(1)), n) for n in names
           for m in [re.fullmatch(r'checkpoint_(\d+)', n)] if m]
  for _, name in sorted(steps, reverse=True):
    sub = join(path, name)
    if isdir(sub) and {'checkpoint', 'state'} & set(listdir(sub)):
      return detect(sub)
  if any(n.startswith('model.ckpt') for n in names):
    raise CheckpointError(f'{path}: a Mesh TensorFlow checkpoint (model.ckpt-*); convert it to '
                          'T5X first (t5x/scripts/convert_tf_checkpoint.py) or use the T5X or '
                          'Hugging Face release of the model')
  raise CheckpointError(
      f'{path}: unknown checkpoint layout; expected a T5X legacy `checkpoint` msgpack file, an '
      'Orbax `state/` directory, `checkpoint_N/` subdirectories, or Hugging Face '
      '`model.safetensors` + `config.json`')


def _is_orbax_tree(names: set[str]) -> bool:
  """Whether a directory listing is an Orbax PyTree (legacy T5X dirs have neither file)."""
  return '_METADATA' in names or 'manifest.ocdbt' in names


def step_of(path: str) -> int | None:
  """The N of the nearest `checkpoint_N` component of `path`, if any."""
  for part in reversed(str(path).rstrip('/').split('/')):
    m = re.fullmatch(r'checkpoint_(\d+)', part)
    if m:
      return int(m.group(1))
  return None


def find_t5x_config(checkpoint_dir: str) -> tuple[T5Config, str] | None:
  """A `config.json` holding `{"t5x_T5Config": {...}}` next to or above `checkpoint_dir`."""
  directory = str(checkpoint_dir).rstrip('/')
  if os.path.basename(directory) == 'state':  # Orbax: checkpoint_N/state
    directory = os.path.dirname(directory)
  for _ in range(3):
    candidate = join(directory, 'config.json')
    if exists(candidate):
      try:
        data = json.loads(read_bytes(candidate))
      except ValueError as e:
        raise CheckpointError(f'{candidate}: not valid JSON ({e})') from None
      if isinstance(data, dict) and 't5x_T5Config' in data:
        try:
          return T5Config.from_dict(data['t5x_T5Config']), candidate
        except (TypeError, ValueError) as e:
          raise CheckpointError(f'{candidate}: bad t5x_T5Config ({e})') from None
    parent = os.path.dirname(directory)
    if not parent or parent == directory:
      break
    directory = parent
  return None


# ----------------------------------------------------------------------------- public API


def read_shapes(path: str) -> tuple[dict[Path, tuple[tuple[int, ...], str]], dict[str, Any]]:
  """{param path: (shape, stored dtype)} and info, reading only headers and metadata.

  `info` has 'format', 'path' (what was read), 'step', 'config' (T5Config) and 'config_source'.
  """
  fmt, where = detect(path)
  if fmt == 'hf':
    shapes, config = hf.read_hf_shapes(where)
    source = join(where, 'config.json')
  else:
    reader = t5x_legacy if fmt == 't5x_legacy' else t5x_orbax
    shapes = reader.read_shapes(where)
    config, source = _t5x_config(where, {p: s for p, (s, _) in shapes.items()})
  info = dict(format=fmt, path=where, step=step_of(where), config=config, config_source=source)
  return shapes, info


def _t5x_config(where: str, shapes: Mapping[Path, tuple[int, ...]]) -> tuple[T5Config, str]:
  found = find_t5x_config(where)
  if found is not None:
    return found
  return infer_config(shapes, where), 'parameter shapes'


def open_leaves(path: str, config: T5Config | str | None = None):
  """The backbone leaves of a T5 checkpoint (`{path: leaves.Leaf}`, prompt params left out),
  checked against its config, and info; nothing but headers and metadata is read yet.

  Returns:
    (leaves, info): info has 'format', 'path', 'step', 'config' (the T5Config given, or else
    inferred), 'config_source', 'dtypes' ({stored dtype: leaf count}) and 'skipped' (prompt
    params left out).
  """
  fmt, where = detect(path)
  if fmt == 'hf':
    found, inferred = hf.leaves(where)
    source = join(where, 'config.json')
  else:
    found = (t5x_legacy if fmt == 't5x_legacy' else t5x_orbax).leaves(where)
    inferred, source = None, None
  skipped = sorted(path_str(p) for p in found if is_prompt_path(p))
  found = {p: leaf for p, leaf in found.items() if not is_prompt_path(p)}
  shapes = {p: leaf.shape for p, leaf in found.items()}
  if inferred is None:
    inferred, source = _t5x_config(where, shapes)
  check_shapes(shapes, inferred, f'{where} (config from {source})')
  if config is not None:
    config, source = as_config(config), 'given'
    check_shapes(shapes, config, f'{where} (config given)')
  dtypes: dict[str, int] = {}
  for leaf in found.values():
    dtypes[leaf.dtype] = dtypes.get(leaf.dtype, 0) + 1
  info = dict(format=fmt, path=where, step=step_of(where), config=config or inferred,
              config_source=source, dtypes=dtypes, skipped=skipped)
  return found, info


def read_params(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a T5 checkpoint's params (float32 numpy, T5X tree) without building a module.

  Returns:
    (params, info): info as `open_leaves` gives it (the config inferred from the checkpoint).
  """
  from jaxprompt.checkpoints.leaves import read_whole  # pylint: disable=g-import-not-at-top
  found, info = open_leaves(path)
  flat = {p: read_whole(leaf).astype(np.float32, copy=False) for p, leaf in found.items()}
  return unflatten(flat), info


def load_checkpoint(path: str, config: T5Config | str | None = None, shardings=None,
                    dtype: str = 'float32'):
  """Reads a T5 backbone straight onto devices, leaf by leaf: each process reads only the
  slices its devices hold (see `jaxprompt.checkpoints.leaves`).

  Args:
    path, config: as `load_t5`.
    shardings: a params-shaped tree of `jax.sharding.Sharding` (e.g. the engine's
      `backbone_shardings_for(config, mesh, rules)`), or a function of the T5Config returning
      one; None places every leaf on the default device.
    dtype: the dtype the params are held in ('float32' or 'bfloat16').

  Returns:
    (module, params, info): info as `open_leaves` gives it, plus 'fingerprint' (of the weights
    as stored, whatever `dtype` holds them; see `backbone.fingerprint`).
  """
  from jaxprompt.checkpoints import leaves as leaves_lib  # pylint: disable=g-import-not-at-top
  from jaxprompt.model import Transformer  # pylint: disable=g-import-not-at-top
  found, info = open_leaves(path, config)
  config = info['config']
  if callable(shardings):
    shardings = shardings(config)
  if shardings is not None:
    shardings = flatten(shardings)
  samples: dict[Path, Any] = {}
  params = leaves_lib.place(found, shardings, dtype, samples)
  leaves_lib.complete(samples)
  info['fingerprint'] = leaves_lib.digest(config, samples)
  return Transformer(config), unflatten(params), info


def load_t5(path: str, config: T5Config | str | None = None, shardings=None,
            dtype: str = 'float32'):
  """Reads a T5 backbone and builds its module.

  Args:
    path: a T5X legacy or Orbax checkpoint (`checkpoint_N/`, its `checkpoint` file or `state/`,
      or a model directory: the latest step is used) or a Hugging Face T5 directory with
      `config.json` and `model.safetensors` (or sharded `model-*-of-*.safetensors` + index).
    config: a T5Config or a name for `get_config` (e.g. 't5_1_1_base'); every parameter shape is
      checked against it. None infers it (HF `config.json`, a T5X `config.json` holding
      `t5x_T5Config`, or the parameter shapes).
    shardings: where the params go (see `load_checkpoint`); None: the default device.
    dtype: 'float32' (default) or 'bfloat16'.

  Returns:
    (module, params): a `jaxprompt.model.Transformer` and its params as jax arrays.

  Raises:
    CheckpointError: a one-line message naming the file and what to do.
  """
  module, params, _ = load_checkpoint(path, config, shardings, dtype)
  return module, params


# The format modules use the helpers above, so they are imported last (none of them imports
# tensorstore, orbax or safetensors before it is used).
from jaxprompt.checkpoints import hf, t5x_legacy, t5x_orbax  # noqa: E402
from jaxprompt.checkpoints.hf import save_hf  # noqa: E402
from jaxprompt.checkpoints.t5x_legacy import save_t5x_legacy  # noqa: E402
from jaxprompt.checkpoints.t5x_orbax import save_t5x_orbax  # noqa: E402

__all__ = [
    'CheckpointError', 'check_shapes', 'detect', 'expected_shapes', 'infer_config',
    'load_checkpoint', 'load_t5', 'open_leaves', 'read_params', 'read_shapes', 'save_hf', 'save_t5x_legacy', 'save_t5x_orbax',
]
