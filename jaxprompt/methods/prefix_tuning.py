"""Prefix tuning (Li & Liang 2021) and deep prompts (P-tuning v2, Liu et al. 2022).

Trainable key/value rows are put in front of the keys and values of attention layers (the
model's `PromptInputs.prefixes` seam); the backbone and its input stay as they are. The
parameters are those of HF PEFT's `PrefixEncoder` (peft/tuners/prefix_tuning/model.py),
reimplemented in Flax:

    flat = E                                   prefix_projection False: E [P, R * t]
    flat = Linear(tanh(Linear(E)))             prefix_projection True:  E [P, t], hidden h

t is PEFT's `token_dim`, here the attention width heads * head_dim (PEFT's default is d_model,
which is wrong for T5s whose heads * head_dim != d_model, e.g. T5.1.1-small: PEFT then needs
token_dim set, as the export does); h is `encoder_hidden_size` (default t). The P x R rows of
`flat` are [heads, head_dim] keys and values, assigned to layers by `prefix_layout`:

* 'peft' (default): what PEFT's prefix tuning does on HF T5 (PEFT 0.21, transformers 5.23), read
  from their code and checked against it: R = 2n with n = max(encoder, decoder layers) (PEFT's
  `num_layers`; its default, the encoder's depth, fails when the decoder is deeper). PEFT
  doubles the rows of a seq2seq model ([R] -> [2R]) and cuts them into groups of four (self
  key, self value, cross key, cross value) per decoder layer; the T5 encoder never receives
  past keys and PEFT empties the cross-attention cache, so only *decoder self-attention* gets a
  prefix, and decoder layer i takes rows (4i mod 2n, 4i + 1 mod 2n). With n even, layers i and
  i + n/2 share their prefix and half the rows are unused (zero gradient); this is PEFT's
  behaviour, kept for parity and export.
* 'every_layer': P-tuning v2's deep prompts: a distinct prefix in every attention layer
  (encoder self-attention, decoder self-attention and cross-attention), R = 2 (Le + 2 Ld). Not a
  layout PEFT's T5 can load, so it does not export to PEFT.

Prefixes sit before the text for T5's relative position bias (HF's convention for past keys).
Initialised as PEFT (torch's defaults): E ~ N(0, 1), Linear ~ U(+-1/sqrt(fan_in)); PEFT's
`init_weights='zero'` is not offered. Default optimizer: AdamW, lr 1e-2, no weight decay.

The product is the [P, R * t] matrix of rows `flat` (the projection MLP is folded away, as PEFT
saves a trained prefix), a prompt file whose metadata names the layout and the shapes, which
`jaxprompt eval` reads back and `jaxprompt export --to peft` writes as a PREFIX_TUNING adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import unfreeze

from jaxprompt.config import ConfigError
from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.methods.p_tuning import TorchDense, adamw
from jaxprompt.model.network import SCAN_AXIS, PromptInputs
from jaxprompt.prompts.files import read_prompt, write_prompt

LAYOUTS = ('peft', 'every_layer')


@dataclasses.dataclass(frozen=True)
class Dims:
  """The attention shapes of a backbone that a prefix must fit."""

  encoder_layers: int
  decoder_layers: int
  num_heads: int
  head_dim: int

  @property
  def token_dim(self) -> int:
    return self.num_heads * self.head_dim

  def rows(self, layout: str) -> int:
    """R: key/value rows per prefix position."""
    if layout == 'peft':
      return 2 * max(self.encoder_layers, self.decoder_layers)
    return 2 * (self.encoder_layers + 2 * self.decoder_layers)


def dims_of_config(config) -> Dims:
  return Dims(config.num_encoder_layers, config.num_decoder_layers, config.num_heads,
              config.head_dim)


def dims_of_params(params) -> Dims:
  """The `Dims` of a T5X params tree (scanned or not): model_inputs sees params, not a config."""
  def depth(stack):
    if SCAN_AXIS in stack:
      return int(jax.tree_util.tree_leaves(stack[SCAN_AXIS])[0].shape[0])
    return sum(1 for k in stack if k.startswith('layers_'))

  encoder = params['encoder']
  heads = int(encoder['relpos_bias']['rel_embedding'].shape[0])
  layer = encoder[SCAN_AXIS] if SCAN_AXIS in encoder else encoder['layers_0']
  width = int(layer['attention']['key']['kernel'].shape[-1])
  return Dims(depth(encoder), depth(params['decoder']), heads, width // heads)


def prefixes_of(flat: jax.Array, layout: str, dims: Dims) -> dict[str, jax.Array]:
  """[P, R * t] rows -> the model's prefixes {site: [layers, 2, 1, H, P, head_dim]}."""
  length = flat.shape[0]
  rows = flat.reshape(length, -1, dims.num_heads, dims.head_dim)  # [P, R, H, k]
  rows = jnp.transpose(rows, (1, 2, 0, 3))[:, None]  # [R, 1, H, P, k]
  if rows.shape[0] != dims.rows(layout):
    raise ValueError(f'a {layout} prefix of {rows.shape[0]} rows per position does not fit this '
                     f'backbone ({dims.rows(layout)} rows)')
  if layout == 'peft':
    count = rows.shape[0]
    index = np.array([[(4 * i) % count, (4 * i + 1) % count]
                      for i in range(dims.decoder_layers)])
    return {'decoder': rows[index]}  # [Ld, 2, 1, H, P, k]
  pairs = rows.reshape((-1, 2) + rows.shape[1:])
  le, ld = dims.encoder_layers, dims.decoder_layers
  return {'encoder': pairs[:le], 'decoder': pairs[le:le + ld], 'cross': pairs[le + ld:]}


class PrefixEncoder(nn.Module):
  """PEFT's `PrefixEncoder`: () -> the [P, R * t] prefix rows."""

  length: int
  rows: int
  token_dim: int
  projection: bool = False
  hidden: int | None = None

  @nn.compact
  def __call__(self):
    normal = jax.nn.initializers.normal(1.0)
    if not self.projection:
      return self.param('embedding', normal, (self.length, self.rows * self.token_dim))
    x = self.param('embedding', normal, (self.length, self.token_dim))
    x = jnp.tanh(TorchDense(self.hidden or self.token_dim, name='transform_0')(x))
    return TorchDense(self.rows * self.token_dim, name='transform_2')(x)


def flat_prefix(params) -> jax.Array:
  """The [P, R * t] rows of prefix-encoder parameters (or of a product read back)."""
  if 'transform_0' not in params:
    return params['embedding']
  token_dim = params['embedding'].shape[1]
  rows = params['transform_2']['kernel'].shape[1] // token_dim
  module = PrefixEncoder(params['embedding'].shape[0], rows, token_dim, True,
                         params['transform_0']['kernel'].shape[1])
  return module.apply({'params': params})


def check_peft_layout(meta: dict[str, Any], dims: Dims, where: str) -> None:
  """A one-line error when a PEFT prefix's layers or heads (its adapter config's num_layers,
  num_attention_heads, token_dim) are not the backbone's."""
  layers = max(dims.encoder_layers, dims.decoder_layers)
  for key, want, what in (('num_layers', layers, 'layers (max of encoder and decoder)'),
                          ('num_heads', dims.num_heads, 'attention heads'),
                          ('head_dim', dims.head_dim, 'head_dim')):
    if meta.get(key) is not None and int(meta[key]) != want:
      raise ValueError(f'{where}: a prefix for {meta[key]} {what}, but this backbone has {want}; '
                       'use it with the backbone it was trained for')


def continue_peft(adapter_dir: str, fresh, ctx: Context):
  """The prefix-encoder weights of a PEFT prefix-tuning run (`--init_from ADAPTER_DIR` holding
  `prompt_encoder.safetensors`, see `jaxprompt.checkpoints.peft`), checked against this run."""
  import os  # pylint: disable=g-import-not-at-top
  from jaxprompt.checkpoints import peft as peft_lib  # pylint: disable=g-import-not-at-top
  o = ctx.options
  if not os.path.isdir(adapter_dir):
    raise ConfigError(f'--init_from {adapter_dir}: a prefix_tuning run starts from the encoder '
                      'weights of a PEFT prefix-tuning adapter directory (see docs/methods.md)')
  if o.prefix_layout != 'peft':
    raise ConfigError(f'--init_from {adapter_dir}: a PEFT prefix has layout peft; pass '
                      '--prefix_layout peft')
  config, params = peft_lib.peft_encoder_params(adapter_dir)
  if config['peft_type'] != 'PREFIX_TUNING':
    raise ConfigError(f'--init_from {adapter_dir}: a {config["peft_type"]} adapter; '
                      'prefix_tuning continues a PREFIX_TUNING one')
  heads, token_dim = int(config['num_attention_heads']), int(config['token_dim'])
  check_peft_layout({'num_layers': config['num_layers'], 'num_heads': heads,
                     'head_dim': token_dim // heads}, dims_of_config(ctx.backbone.module.config),
                    f'--init_from {adapter_dir}')
  projection = 'transform_0' in params
  if projection != o.prefix_projection:
    raise ConfigError(f'--init_from {adapter_dir}: PEFT\'s prefix_projection is {projection}; '
                      f'pass --prefix_projection {projection}')
  if params['embedding'].shape[0] != ctx.config.prompt_length:
    raise ConfigError(f'--init_from {adapter_dir}: {params["embedding"].shape[0]} virtual tokens; '
                      f'pass --prompt_length {params["embedding"].shape[0]}')
  if projection and params['transform_0']['kernel'].shape[1] != (o.encoder_hidden_size or
                                                                   token_dim):
    raise ConfigError(f'--init_from {adapter_dir}: PEFT\'s encoder_hidden_size is '
                      f'{params["transform_0"]["kernel"].shape[1]}; pass --encoder_hidden_size '
                      f'{params["transform_0"]["kernel"].shape[1]}')
  peft_lib.check_encoder_shapes(params, fresh, adapter_dir)
  return jax.tree_util.tree_map(jnp.asarray, params)


@dataclasses.dataclass(frozen=True)
class PrefixTuningOptions:
  prefix_projection: bool = False  # PEFT's reparameterisation MLP (embedding -> tanh MLP)
  encoder_hidden_size: int | None = None  # its hidden width h; None: heads * head_dim
  prefix_layout: str = 'peft'  # 'peft' (decoder self-attention, as PEFT) or 'every_layer'

  def __post_init__(self):
    if self.prefix_layout not in LAYOUTS:
      raise ConfigError(f'prefix_layout (--prefix_layout) must be one of {", ".join(LAYOUTS)}, '
                        f'got {self.prefix_layout!r}')
    if not isinstance(self.prefix_projection, bool):
      raise ConfigError('prefix_projection (--prefix_projection) must be True or False, got '
                        f'{self.prefix_projection!r}')
    size = self.encoder_hidden_size
    if size is not None and (not isinstance(size, int) or size < 1):
      raise ConfigError(f'encoder_hidden_size (--encoder_hidden_size) must be a positive integer,'
                        f' got {size!r}')


@register
class PrefixTuning(Method):
  """Key/value prefixes in attention layers, with PEFT's parameters (see the module doc)."""

  name = 'prefix_tuning'
  Options = PrefixTuningOptions
  learning_rate = 1e-2
  weight_decay = None

  # The trainable is {layout: PrefixEncoder params}: model_inputs reads the layout off it and
  # the shapes off the backbone, so nothing about a run is kept on this shared instance.
  def init(self, rng, ctx: Context):
    o, dims = ctx.options, dims_of_config(ctx.backbone.module.config)
    module = PrefixEncoder(ctx.config.prompt_length, dims.rows(o.prefix_layout), dims.token_dim,
                           o.prefix_projection, o.encoder_hidden_size)
    params = unfreeze(module.init(rng)['params'])
    if ctx.config.init_from:  # continue a PEFT prefix-tuning run with its encoder weights
      params = continue_peft(ctx.config.init_from, params, ctx)
    return {o.prefix_layout: params}, {}

  @staticmethod
  def model_inputs(trainable, frozen, batch):
    del batch
    params = frozen['backbone']
    (layout, encoder), = trainable.items()
    return params, PromptInputs(None, prefixes_of(flat_prefix(encoder), layout,
                                                  dims_of_params(params)))

  def optimizer(self, ctx: Context):
    return adamw(self, ctx)

  # ---- the product: the prefix rows ----
  def product_value(self, trainable) -> np.ndarray:
    (_, encoder), = trainable.items()
    return np.asarray(jax.device_get(jax.jit(flat_prefix)(encoder)), np.float32)

  def product_metadata(self, ctx: Context) -> dict[str, Any]:
    dims = dims_of_config(ctx.backbone.module.config)
    return dict(prefix_layout=ctx.options.prefix_layout,
                prefix_projection=ctx.options.prefix_projection,
                **dataclasses.asdict(dims))

  def save_product(self, trainable, extras, path: str, metadata: dict[str, Any]) -> str:
    """One prompt file of the [P, R * t] rows (no `.npy` copy: it is not an input prompt)."""
    del extras
    return write_prompt(path + '.safetensors', self.product_value(trainable), overwrite=True,
                        method=self.name, **metadata)

  def load_product(self, path: str, ctx: Context):
    from jaxprompt.prompts.files import check_compatible
    pf = read_prompt(path)
    layout = pf.metadata.get('prefix_layout')
    if pf.metadata.get('method') != self.name or layout not in LAYOUTS:
      raise ValueError(f'{path}: not a prefix_tuning product (its metadata names method '
                       f'{pf.metadata.get("method")!r}, prefix_layout {layout!r})')
    dims = dims_of_config(ctx.backbone.module.config)
    if layout == 'peft':
      check_peft_layout(pf.metadata, dims, path)
    expected = dims.rows(layout) * dims.token_dim
    if pf.value.ndim != 2 or pf.value.shape[1] != expected:
      raise ValueError(f'{path}: prefix rows of shape {tuple(pf.value.shape)} do not fit this '
                       f'backbone ([P, {expected}] for {layout}: {dataclasses.asdict(dims)}); '
                       'evaluate it with the backbone it was trained for')
    check_compatible(pf, pf.width, ctx.backbone, path=path)  # the backbone warning only
    return {layout: {'embedding': jnp.asarray(pf.value)}}, {}

  def contract_options(self) -> dict[str, Any]:
    return {'prefix_projection': True, 'encoder_hidden_size': 6}


__all__ = ['Dims', 'LAYOUTS', 'PrefixEncoder', 'PrefixTuning', 'PrefixTuningOptions',
           'check_peft_layout', 'continue_peft', 'dims_of_config', 'dims_of_params',
           'flat_prefix', 'prefixes_of']
