"""The T5X parameter tree every checkpoint reader describes: paths, expected shapes, the config
a tree implies, and the error every reader raises."""

from __future__ import annotations

import re
from typing import Any, Mapping

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
