"""The T5 encoder-decoder, as T5X's `examples/t5/network.py` lays it out.

The one seam for prompts: `encode` (and `__call__`) take optional prompt
embeddings `[P, d]` or `[B, P, d]` that are inserted into the embedded input
before input dropout, at `prompt_position` (0 = prefix). The encoder mask gets
ones at the prompt positions, so prompt and text attend to each other fully, and
the decoder cross-attends to them. Nothing else here knows about prompts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxprompt.model import layers
from jaxprompt.model.config import T5Config

Array = jax.Array


def _dtype(config: T5Config):
  return jnp.dtype(config.dtype)


class EncoderLayer(nn.Module):
  config: T5Config
  relative_embedding: nn.Module

  @nn.compact
  def __call__(self, inputs: Array, encoder_mask: Array | None = None,
               deterministic: bool = False) -> Array:
    cfg, dtype = self.config, _dtype(self.config)
    length = inputs.shape[-2]
    encoder_bias = self.relative_embedding(length, length, True)  # [1, H, L, L]
    x = layers.LayerNorm(dtype=dtype, name='pre_attention_layer_norm')(inputs)
    x = layers.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype,
        dropout_rate=cfg.dropout_rate, float32_logits=cfg.float32_attention_logits,
        name='attention')(x, x, encoder_mask, encoder_bias, deterministic=deterministic)
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = x + inputs
    y = layers.LayerNorm(dtype=dtype, name='pre_mlp_layer_norm')(x)
    y = layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                        intermediate_dropout_rate=cfg.dropout_rate, dtype=dtype,
                        name='mlp')(y, deterministic=deterministic)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    return y + x  # [B, L, d]


class DecoderLayer(nn.Module):
  config: T5Config
  relative_embedding: nn.Module

  @nn.compact
  def __call__(self, inputs: Array, encoded: Array, decoder_mask: Array | None = None,
               encoder_decoder_mask: Array | None = None, deterministic: bool = False,
               decode: bool = False, max_decode_length: int | None = None) -> Array:
    cfg, dtype = self.config, _dtype(self.config)
    length = max_decode_length if decode and max_decode_length else inputs.shape[-2]
    decoder_bias = self.relative_embedding(length, length, False)

    def attention(name):
      return layers.MultiHeadDotProductAttention(
          num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype,
          dropout_rate=cfg.dropout_rate, float32_logits=cfg.float32_attention_logits, name=name)

    def dropout(x):
      return nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
          x, deterministic=deterministic)

    x = layers.LayerNorm(dtype=dtype, name='pre_self_attention_layer_norm')(inputs)
    x = attention('self_attention')(x, x, decoder_mask, decoder_bias,
                                    deterministic=deterministic, decode=decode)
    x = dropout(x) + inputs
    y = layers.LayerNorm(dtype=dtype, name='pre_cross_attention_layer_norm')(x)
    y = attention('encoder_decoder_attention')(y, encoded, encoder_decoder_mask,
                                               deterministic=deterministic)
    y = dropout(y) + x
    z = layers.LayerNorm(dtype=dtype, name='pre_mlp_layer_norm')(y)
    z = layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                        intermediate_dropout_rate=cfg.dropout_rate, dtype=dtype,
                        name='mlp')(z, deterministic=deterministic)
    return dropout(z) + y  # [B, L, d]


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_mask: Array | None = None,
               deterministic: bool = False, prompt: Array | None = None,
               prompt_position: int = 0) -> Array:
    cfg, dtype = self.config, _dtype(self.config)
    relpos = layers.RelativePositionBiases(num_buckets=32, max_distance=128,
                                           num_heads=cfg.num_heads, dtype=dtype,
                                           name='relpos_bias')
    x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))  # [B, L, d]
    if prompt is not None:
      x = insert_prompt(x, prompt.astype(x.dtype), prompt_position)  # [B, P + L, d]
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = x.astype(dtype)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, relative_embedding=relpos, name=f'layers_{i}')(
          x, encoder_mask, deterministic)
    x = layers.LayerNorm(dtype=dtype, name='encoder_norm')(x)
    return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, decoder_input_tokens: Array,
               decoder_mask: Array | None = None, encoder_decoder_mask: Array | None = None,
               deterministic: bool = False, decode: bool = False,
               max_decode_length: int | None = None) -> Array:
    cfg, dtype = self.config, _dtype(self.config)
    relpos = layers.RelativePositionBiases(num_buckets=32, max_distance=128,
                                           num_heads=cfg.num_heads, dtype=dtype,
                                           name='relpos_bias')
    y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    y = y.astype(dtype)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, relative_embedding=relpos, name=f'layers_{i}')(
          y, encoded, decoder_mask=decoder_mask, encoder_decoder_mask=encoder_decoder_mask,
          deterministic=deterministic, decode=decode, max_decode_length=max_decode_length)
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
  """T5 encoder-decoder with T5X's `__call__`, `encode` and `decode` signatures."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(num_embeddings=cfg.vocab_size, features=cfg.emb_dim,
                                       dtype=_dtype(cfg))
    self.encoder = Encoder(cfg, shared_embedding=self.token_embedder)
    self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             enable_dropout: bool = True, prompt: Array | None = None,
             prompt_position: int = 0) -> Array:
    """[B, L] tokens (+ optional prompt [P, d] / [B, P, d]) -> [B, P + L, d]."""
    dtype = _dtype(self.config)
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
                        prompt=prompt, prompt_position=prompt_position)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: int | None = None, prompt_position: int = 0) -> Array:
    """Decoder logits [B, Ld, V]; the prompt length is read off `encoded`'s length."""
    del decoder_positions  # T5 positions are relative; kept for T5X's signature.
    dtype = _dtype(self.config)
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
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               decoder_positions: Array | None = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: int | None = None,
               prompt: Array | None = None, prompt_position: int = 0) -> Array:
    """Teacher-forced logits [B, Ld, V] (float32 for untied T5.1.1 heads)."""
    del encoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout, prompt,
                          prompt_position)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout, decode, max_decode_length,
                       prompt_position)


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


def params_axes(config: T5Config) -> dict[str, Any]:
  """The `params_axes` collection (logical axis names per param), without allocating params."""
  module = Transformer(config)
  variables = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), **_dummy_batch(), enable_dropout=False))
  return variables['params_axes']


def param_shapes(config: T5Config) -> dict[str, Any]:
  """Shape/dtype structs of the params tree, without allocating."""
  module = Transformer(config)
  variables = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), **_dummy_batch(), enable_dropout=False))
  return variables['params']
