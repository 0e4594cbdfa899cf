"""The T5 encoder-decoder, as T5X's `examples/t5/network.py` lays it out.

The one seam for prompts: `encode` (and `__call__`) take optional prompt
embeddings `[P, d]` or `[B, P, d]` that are inserted into the embedded input
before input dropout, at `prompt_position` (0 = prefix). The encoder mask gets
ones at the prompt positions, so prompt and text attend to each other fully, and
the decoder cross-attends to them.

The same argument may instead be a `PromptInputs(prompt, prefixes)`: `prefixes` are per-layer
key/value prefixes (prefix tuning, P-tuning v2), a dict with any of
  'encoder'  [Le, 2, B or 1, H, P, k]  encoder self-attention,
  'decoder'  [Ld, 2, B or 1, H, P, k]  decoder self-attention,
  'cross'    [Ld, 2, B or 1, H, P, k]  decoder cross-attention (keys/values over the encoding),
(layer, key/value, batch, heads, positions, head_dim: HF's past_key_values layout stacked on
layers). Every query sees the prefixes; in self-attention they sit before the text for the
relative position bias (HF T5 computes the bias of P past keys so: query i at position P + i),
cross-attention has no position bias. Nothing else here knows about prompts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

from jaxprompt.model import layers
from jaxprompt.model.config import T5Config

Array = jax.Array
SCAN_AXIS = 'layers'  # the logical axis (and param name) of a scanned stack, as in T5X


PREFIX_SITES = ('encoder', 'decoder', 'cross')


class PromptInputs(NamedTuple):
  """What a method hands the model besides params: an input prompt and/or per-layer key/value
  prefixes (see the module docstring). A pytree, so it travels through jit like an array."""

  prompt: Array | None = None
  prefixes: dict[str, Array] | None = None


def split_prompt(prompt) -> tuple[Array | None, dict[str, Array] | None]:
  """(prompt array or None, prefixes or None) of what `Transformer` takes as `prompt`."""
  if isinstance(prompt, PromptInputs):
    return prompt.prompt, prompt.prefixes or None
  return prompt, None


def repeat_prefixes(prefixes: dict[str, Array] | None, repeats: int):
  """Prefixes for a batch whose rows were each repeated `repeats` times (beams, labels)."""
  if not prefixes:
    return prefixes
  return {site: x if x.shape[2] == 1 else jnp.repeat(x, repeats, axis=2)
          for site, x in prefixes.items()}


def check_prefixes(prefixes: dict[str, Array] | None, config: T5Config) -> None:
  if not prefixes:
    return
  unknown = sorted(set(prefixes) - set(PREFIX_SITES))
  if unknown:
    raise ValueError(f'prefixes for {unknown}: the sites are {", ".join(PREFIX_SITES)}')
  for site, x in prefixes.items():
    layers_ = config.num_encoder_layers if site == 'encoder' else config.num_decoder_layers
    if x.ndim != 6 or x.shape[0] != layers_ or x.shape[1] != 2 or x.shape[3:4] != (
        config.num_heads,) or x.shape[5] != config.head_dim:
      raise ValueError(f'{site} prefixes of shape {tuple(x.shape)}: expected [{layers_}, 2, B or '
                       f'1, {config.num_heads}, P, {config.head_dim}] (layers, key/value, batch, '
                       'heads, positions, head_dim)')


def _layer(prefixes, i: int):
  return None if prefixes is None else jax.tree_util.tree_map(lambda x: x[i], prefixes)


def _dtype(config: T5Config):
  return jnp.dtype(config.dtype)


class EncoderLayer(nn.Module):
  """One encoder block. `scanned`: return `(y, None)`, the carry/output pair `nn.scan` takes.

  The relative position bias is computed once per stack (its table is shared by all layers)
  and passed in; arguments are positional so that remat can treat `deterministic` as static.
  """

  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, inputs: Array, encoder_bias: Array, encoder_mask: Array | None = None,
               deterministic: bool = False, prefix: Array | None = None):
    cfg, dtype = self.config, _dtype(self.config)
    x = layers.LayerNorm(dtype=dtype, name='pre_attention_layer_norm')(inputs)
    x = layers.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype,
        dropout_rate=cfg.dropout_rate, float32_logits=cfg.float32_attention_logits,
        name='attention')(x, x, encoder_mask, encoder_bias, deterministic=deterministic,
                          prefix=prefix)
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = x + inputs
    y = layers.LayerNorm(dtype=dtype, name='pre_mlp_layer_norm')(x)
    y = layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                        intermediate_dropout_rate=cfg.dropout_rate, dtype=dtype,
                        name='mlp')(y, deterministic=deterministic)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    y = y + x  # [B, L, d]
    return (y, None) if self.scanned else y


class DecoderLayer(nn.Module):
  """One decoder block (see `EncoderLayer` for `scanned` and the bias argument)."""

  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, inputs: Array, encoded: Array, decoder_bias: Array,
               decoder_mask: Array | None = None, encoder_decoder_mask: Array | None = None,
               deterministic: bool = False, decode: bool = False,
               prefixes: dict[str, Array] | None = None):
    """`prefixes`: this layer's {'decoder': [2, B|1, H, P, k], 'cross': ...} (either optional)."""
    cfg, dtype = self.config, _dtype(self.config)
    prefixes = prefixes or {}

    def attention(name):
      return layers.MultiHeadDotProductAttention(
          num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype,
          dropout_rate=cfg.dropout_rate, float32_logits=cfg.float32_attention_logits, name=name)

    def dropout(x):
      return nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
          x, deterministic=deterministic)

    x = layers.LayerNorm(dtype=dtype, name='pre_self_attention_layer_norm')(inputs)
    x = attention('self_attention')(x, x, decoder_mask, decoder_bias,
                                    deterministic=deterministic, decode=decode,
                                    prefix=prefixes.get('decoder'))
    x = dropout(x) + inputs
    y = layers.LayerNorm(dtype=dtype, name='pre_cross_attention_layer_norm')(x)
    y = attention('encoder_decoder_attention')(y, encoded, encoder_decoder_mask,
                                               deterministic=deterministic, decode=decode,
                                               prefix=prefixes.get('cross'), static_kv=True)
    y = dropout(y) + x
    z = layers.LayerNorm(dtype=dtype, name='pre_mlp_layer_norm')(y)
    z = layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                        intermediate_dropout_rate=cfg.dropout_rate, dtype=dtype,
                        name='mlp')(z, deterministic=deterministic)
    z = dropout(z) + y  # [B, L, d]
    return (z, None) if self.scanned else z


# T5X's remat policies (scalable_t5): what the backward pass keeps of a layer's forward.
REMAT_POLICIES = {
    'none': None,  # no remat: everything the backward pass needs is kept
    'minimal': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # weight matmuls
    'full': jax.checkpoint_policies.nothing_saveable,  # only the layer's inputs
}


def check_layer_options(remat_policy: str, scan_layers: bool) -> None:
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'remat_policy {remat_policy!r} is not one of {", ".join(REMAT_POLICIES)}')
  if not isinstance(scan_layers, bool):
    raise ValueError(f'scan_layers must be True or False, got {scan_layers!r}')


def _stack_of(layer: type[nn.Module], count: int, remat_policy: str, scan_layers: bool,
              static_argnums: tuple[int, ...], num_broadcast: int):
  """The layer class a stack instantiates: rematerialised and/or scanned as asked.

  `static_argnums` count `self` as 0 (flax's convention) and name the Python bools; scanned,
  the carry is the first argument, the `num_broadcast` others are the same for every layer and
  the last (the layers' prefixes, or None) is sliced along its leading layer axis.
  """
  if remat_policy != 'none':
    layer = nn.remat(layer, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan_layers,
                     static_argnums=static_argnums)
  if scan_layers:
    layer = nn_partitioning.scan_with_axes(
        layer, variable_axes={'params': 0, 'cache': 0, 'intermediates': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(nn.broadcast,) * num_broadcast + (0,),
        length=count, axis_name=SCAN_AXIS)
  return layer


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  remat_policy: str = 'none'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_mask: Array | None = None,
               deterministic: bool = False, prompt: Array | None = None,
               prompt_position: int = 0, prefixes: Array | None = None) -> Array:
    """`prefixes`: optional [layers, 2, B or 1, H, P, k] self-attention key/value prefixes."""
    cfg, dtype = self.config, _dtype(self.config)
    relpos = layers.RelativePositionBiases(num_buckets=32, max_distance=128,
                                           num_heads=cfg.num_heads, dtype=dtype,
                                           name='relpos_bias')
    x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))  # [B, L, d]
    if prompt is not None:
      x = insert_prompt(x, prompt.astype(x.dtype), prompt_position)  # [B, P + L, d]
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = x.astype(dtype)
    length = x.shape[-2]
    extra = 0 if prefixes is None else prefixes.shape[-2]
    bias = relpos(length, extra + length, True, extra)  # [1, H, L, P + L], shared by every layer
    layer = _stack_of(EncoderLayer, cfg.num_encoder_layers, self.remat_policy, self.scan_layers,
                      static_argnums=(4,), num_broadcast=3)
    if self.scan_layers:
      x, _ = layer(cfg, scanned=True, name=SCAN_AXIS)(x, bias, encoder_mask, deterministic,
                                                      prefixes)
    else:
      for i in range(cfg.num_encoder_layers):
        x = layer(cfg, name=f'layers_{i}')(x, bias, encoder_mask, deterministic,
                                           _layer(prefixes, i))
    x = layers.LayerNorm(dtype=dtype, name='encoder_norm')(x)
    return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  remat_policy: str = 'none'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, encoded: Array, decoder_input_tokens: Array,
               decoder_mask: Array | None = None, encoder_decoder_mask: Array | None = None,
               deterministic: bool = False, decode: bool = False,
               max_decode_length: int | None = None,
               prefixes: dict[str, Array] | None = None) -> Array:
    """`prefixes`: optional {'decoder': [layers, 2, B|1, H, P, k], 'cross': ...}."""
    cfg, dtype = self.config, _dtype(self.config)
    relpos = layers.RelativePositionBiases(num_buckets=32, max_distance=128,
                                           num_heads=cfg.num_heads, dtype=dtype,
                                           name='relpos_bias')
    y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    y = y.astype(dtype)
    length = max_decode_length if decode and max_decode_length else y.shape[-2]
    prefixes = prefixes or None
    extra = 0 if prefixes is None or 'decoder' not in prefixes else prefixes['decoder'].shape[-2]
    bias = relpos(length, extra + length, False, extra)  # causal; a cached step picks its row
    layer = _stack_of(DecoderLayer, cfg.num_decoder_layers, self.remat_policy, self.scan_layers,
                      static_argnums=(6, 7), num_broadcast=6)
    args = (encoded, bias, decoder_mask, encoder_decoder_mask, deterministic, decode)
    if self.scan_layers:
      y, _ = layer(cfg, scanned=True, name=SCAN_AXIS)(y, *args, prefixes)
    else:
      for i in range(cfg.num_decoder_layers):
        y = layer(cfg, name=f'layers_{i}')(y, *args, _layer(prefixes, i))
    y = layers.LayerNorm(dtype=dtype, name='decoder_norm')(y)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      # Tied output: T5 1.0 rescales by 1/sqrt(d) to undo the embedding's scale.
      logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])
    else:
      logits = layers.DenseGeneral(cfg.vocab_size, dtype=jnp.float32,
                                   kernel_axes=('embed', 'vocab'), name='logits_dense')(y)
    return logits  # [B, L, V], float32 unless dtype says otherwise


def insert_prompt(embedded: Array, prompt: Array, position: int = 0) -> Array:
  """Puts `prompt` [P, d] or [B, P, d] into `embedded` [B, L, d] before index `position`.

  `position` 0 is a prefix, 1 is after a leading BOS, -1 (or L) a suffix after the padded text.
  """
  batch = embedded.shape[0]
  if prompt.ndim == 2:
    prompt = jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
  if prompt.shape[0] != batch or prompt.shape[-1] != embedded.shape[-1]:
    raise ValueError(f'prompt of shape {prompt.shape} does not fit embedded inputs '
                     f'{embedded.shape}: expected [P, {embedded.shape[-1]}] or '
                     f'[{batch}, P, {embedded.shape[-1]}]')
  cut = embedded.shape[1] if position < 0 else position
  return jnp.concatenate([embedded[:, :cut], prompt, embedded[:, cut:]], axis=1)


def encoder_input_mask(encoder_input_tokens: Array, prompt_length: int = 0,
                       prompt_position: int = 0) -> Array:
  """[B, L] tokens -> [B, P + L] mask: real tokens and every prompt position are 1."""
  mask = (encoder_input_tokens > 0).astype(jnp.float32)
  if prompt_length:
    ones = jnp.ones((mask.shape[0], prompt_length, 1), mask.dtype)
    mask = insert_prompt(mask[..., None], ones, prompt_position)[..., 0]
  return mask


class Transformer(nn.Module):
  """T5 encoder-decoder with T5X's `__call__`, `encode` and `decode` signatures.

  `remat_policy` ('none', 'minimal', 'full': T5X's) rematerialises each layer in the backward
  pass; `scan_layers` runs each stack as one `nn.scan` over params stacked on a leading
  'layers' axis (`encoder/layers/...`; see `jaxprompt.model.scan`). Neither is part of
  `config`, the checkpoint's identity: they change memory and compile time, not the numbers.
  Set them with `module.clone(remat_policy=..., scan_layers=...)`.
  """

  config: T5Config
  remat_policy: str = 'none'
  scan_layers: bool = False

  def setup(self):
    cfg = self.config
    check_layer_options(self.remat_policy, self.scan_layers)
    self.token_embedder = layers.Embed(num_embeddings=cfg.vocab_size, features=cfg.emb_dim,
                                       dtype=_dtype(cfg))
    stack = dict(shared_embedding=self.token_embedder, remat_policy=self.remat_policy,
                 scan_layers=self.scan_layers)
    self.encoder = Encoder(cfg, **stack)
    self.decoder = Decoder(cfg, **stack)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             enable_dropout: bool = True, prompt: Array | PromptInputs | None = None,
             prompt_position: int = 0) -> Array:
    """[B, L] tokens (+ optional prompt [P, d] / [B, P, d]) -> [B, P + L, d]; a `PromptInputs`
    also gives the encoder its self-attention prefixes."""
    dtype = _dtype(self.config)
    prompt, prefixes = split_prompt(prompt)
    check_prefixes(prefixes, self.config)
    prompt_length = 0 if prompt is None else prompt.shape[-2]
    if prompt_length and encoder_segment_ids is not None:
      raise ValueError('packed inputs (encoder_segment_ids) cannot be combined with a prompt; '
                       'turn packing off for prompt tuning')
    input_mask = encoder_input_mask(encoder_input_tokens, prompt_length, prompt_position)
    mask = layers.make_attention_mask(input_mask, input_mask, dtype=dtype)
    if encoder_segment_ids is not None:
      mask = layers.combine_masks(mask, layers.make_attention_mask(
          encoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=dtype), dtype=dtype)
    return self.encoder(encoder_input_tokens, mask, deterministic=not enable_dropout,
                        prompt=prompt, prompt_position=prompt_position,
                        prefixes=(prefixes or {}).get('encoder'))

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: int | None = None, prompt_position: int = 0,
             prefixes: dict[str, Array] | None = None) -> Array:
    """Decoder logits [B, Ld, V]; the prompt length is read off `encoded`'s length.
    `prefixes`: per-layer key/value prefixes (the 'decoder' and 'cross' ones are used here)."""
    del decoder_positions  # T5 positions are relative; kept for T5X's signature.
    dtype = _dtype(self.config)
    check_prefixes(prefixes, self.config)
    prefixes = {k: v for k, v in (prefixes or {}).items() if k != 'encoder'} or None
    prompt_length = encoded.shape[1] - encoder_input_tokens.shape[1]
    input_mask = encoder_input_mask(encoder_input_tokens, prompt_length, prompt_position)
    if decode:
      # No target-padding mask at inference: the cache index does the causal masking.
      decoder_mask = None
      encoder_decoder_mask = layers.make_attention_mask(
          jnp.ones_like(decoder_target_tokens, jnp.float32), input_mask, dtype=dtype)
    else:
      decoder_mask = make_decoder_mask(decoder_target_tokens, dtype, decoder_segment_ids)
      encoder_decoder_mask = layers.make_attention_mask(
          (decoder_target_tokens > 0).astype(jnp.float32), input_mask, dtype=dtype)
    if encoder_segment_ids is not None:
      if decode:
        raise ValueError('packed encoder inputs are not supported when decoding')
      encoder_decoder_mask = layers.combine_masks(
          encoder_decoder_mask, layers.make_attention_mask(
              decoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=dtype), dtype=dtype)
    return self.decoder(encoded, decoder_input_tokens, decoder_mask=decoder_mask,
                        encoder_decoder_mask=encoder_decoder_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length, prefixes=prefixes)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               decoder_positions: Array | None = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: int | None = None,
               prompt: Array | PromptInputs | None = None, prompt_position: int = 0) -> Array:
    """Teacher-forced logits [B, Ld, V] (float32 for untied T5.1.1 heads)."""
    del encoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout, prompt,
                          prompt_position)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout, decode, max_decode_length,
                       prompt_position, split_prompt(prompt)[1])


def make_decoder_mask(decoder_target_tokens: Array, dtype, decoder_segment_ids=None) -> Array:
  """Causal mask over non-padding targets (T5X `make_decoder_mask`), [B, 1, L, L]."""
  masks = [layers.make_causal_mask(decoder_target_tokens, dtype=dtype),
           layers.make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0,
                                      dtype=dtype)]
  if decoder_segment_ids is not None:
    masks.append(layers.make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal,
                                            dtype=dtype))
  return layers.combine_masks(*masks, dtype=dtype)


def _dummy_batch(batch: int = 1, length: int = 1) -> dict[str, Any]:
  tokens = jnp.ones((batch, length), jnp.int32)
  return dict(encoder_input_tokens=tokens, decoder_input_tokens=tokens,
              decoder_target_tokens=tokens)


def init_params(config: T5Config, rng: Array | int = 0) -> dict[str, Any]:
  """Randomly initialised float32 params with T5X's initialisers (a plain nested dict)."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  module = Transformer(config)
  init = jax.jit(lambda r: module.init(r, **_dummy_batch(), enable_dropout=False)['params'])
  return init(rng)


def _abstract_variables(config: T5Config, scan_layers: bool) -> dict[str, Any]:
  module = Transformer(config, scan_layers=scan_layers)
  return jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), **_dummy_batch(), enable_dropout=False))


def params_axes(config: T5Config, scan_layers: bool = False) -> dict[str, Any]:
  """The `params_axes` collection (logical axis names per param), without allocating params.
  Scanned, each stacked layer param has 'layers' first."""
  return _abstract_variables(config, scan_layers)['params_axes']


def param_shapes(config: T5Config, scan_layers: bool = False) -> dict[str, Any]:
  """Shape/dtype structs of the params tree (scanned or not), without allocating."""
  return _abstract_variables(config, scan_layers)['params']
