"""T5 configuration, field for field the T5X `network.T5Config`, and the named sizes."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 encoder-decoder (the fields of T5X's `T5Config`).

  `dtype` is the activation dtype; checkpoints hold float32 params (a frozen backbone may be
  held in bfloat16: `jaxprompt.model.cast_frozen`).
  `mlp_activations=('relu',)` with `logits_via_embedding=True` is T5 1.0;
  `('gelu', 'linear')` with untied logits is T5.1.1 / LM-adapted / mT5 / Flan-T5.
  """

  vocab_size: int = 32128
  dtype: str = 'float32'
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: tuple[str, ...] = ('gelu', 'linear')
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    for name in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim',
                 'num_encoder_layers', 'num_decoder_layers'):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f'T5Config.{name} must be positive, got {getattr(self, name)}')
    if self.dtype not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f"T5Config.dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
    for act in self.mlp_activations:
      if act not in ('relu', 'gelu', 'linear', 'gelu_new', 'silu'):
        raise ValueError(f'T5Config.mlp_activations: unknown activation {act!r}')

  @property
  def family(self) -> str:
    """'t5_1_0' (relu, tied logits) or 't5_1_1' (gated, untied), the two T5X layouts."""
    gated = len(self.mlp_activations) > 1
    if not gated and self.logits_via_embedding:
      return 't5_1_0'
    if gated and not self.logits_via_embedding:
      return 't5_1_1'
    return 'custom'

  def replace(self, **changes: Any) -> 'T5Config':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['mlp_activations'] = list(self.mlp_activations)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'T5Config':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'T5Config: unknown fields {unknown}; known: {sorted(names)}')
    return cls(**d)


_GATED = dict(mlp_activations=('gelu', 'linear'), logits_via_embedding=False)
_RELU = dict(mlp_activations=('relu',), logits_via_embedding=True)

# d_model / heads / mlp / layers per stack (head_dim 64) — t5x-compat.md.
_T5_1_1_SIZES = {
    'small': (512, 6, 1024, 8),
    'base': (768, 12, 2048, 12),
    'large': (1024, 16, 2816, 24),
    'xl': (2048, 32, 5120, 24),
    'xxl': (4096, 64, 10240, 24),
}
# Original T5 (Raffel et al. 2020): d_model / heads / mlp / layers / head_dim.
_T5_1_0_SIZES = {
    'small': (512, 8, 2048, 6, 64),
    'base': (768, 12, 3072, 12, 64),
    'large': (1024, 16, 4096, 24, 64),
    '3B': (1024, 32, 16384, 24, 128),
    '11B': (1024, 128, 65536, 24, 128),
}
T5_VOCAB = 32128
MT5_VOCAB = 250112


def _build_named() -> dict[str, T5Config]:
  named: dict[str, T5Config] = {}
  tiny = dict(emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=2,
              num_decoder_layers=2, vocab_size=128)
  named['t5_1_1_tiny'] = T5Config(**tiny, **_GATED)
  named['t5_1_0_tiny'] = T5Config(**tiny, **_RELU)
  for size, (d, h, f, n) in _T5_1_1_SIZES.items():
    cfg = T5Config(vocab_size=T5_VOCAB, emb_dim=d, num_heads=h, head_dim=64, mlp_dim=f,
                   num_encoder_layers=n, num_decoder_layers=n, **_GATED)
    named[f't5_1_1_{size}'] = cfg
    named[f't5_1_1_lm100k_{size}'] = cfg  # LM-adapted: same shapes, other weights
    named[f'flan_t5_{size}'] = cfg
    named[f'mt5_{size}'] = cfg.replace(vocab_size=MT5_VOCAB)
  for size, (d, h, f, n, k) in _T5_1_0_SIZES.items():
    named[f't5_1_0_{size}'] = T5Config(vocab_size=T5_VOCAB, emb_dim=d, num_heads=h, head_dim=k,
                                       mlp_dim=f, num_encoder_layers=n, num_decoder_layers=n,
                                       **_RELU)
  named['t5_1_0_xl'] = named['t5_1_0_3B']
  named['t5_1_0_xxl'] = named['t5_1_0_11B']
  return named


NAMED_CONFIGS: dict[str, T5Config] = _build_named()


def get_config(name: str, **overrides: Any) -> T5Config:
  """Returns a named config (e.g. 't5_1_1_base', 't5_1_0_small', 'mt5_xl', 't5_1_1_tiny')."""
  if name not in NAMED_CONFIGS:
    raise ValueError(f'unknown T5 config {name!r}; choose one of: {", ".join(sorted(NAMED_CONFIGS))}')
  return NAMED_CONFIGS[name].replace(**overrides) if overrides else NAMED_CONFIGS[name]
