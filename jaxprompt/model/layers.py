"""T5 building blocks with T5X's parameter names, shapes and logical axes.

Every parameter is created with `param_with_axes`, so `init` also returns a
`params_axes` collection that the partitioner maps to mesh shardings.
"""

from __future__ import annotations

import functools
import operator
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

param_with_axes = nn_partitioning.param_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

Array = jax.Array
Initializer = Callable[..., Array]

# T5X initialisers (examples/t5/network.py, layers.py).
default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
default_embed_init = nn.initializers.normal(stddev=1.0)
relpos_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
MASK_BIAS = -1e10


def _activation(name: str) -> Callable[[Array], Array]:
  return {
      'relu': nn.relu,
      'gelu': nn.gelu,  # tanh approximation, as T5X and HF's "gelu_new"
      'gelu_new': nn.gelu,
      'silu': nn.silu,
      'linear': lambda x: x,
  }[name]


class DenseGeneral(nn.Module):
  """A bias-free dense layer with a 2-D kernel `(prod(in), prod(features))` as T5X stores it."""

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  kernel_axes: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % inputs.ndim for a in axis)
    in_shape = tuple(inputs.shape[a] for a in axis)
    kernel_shape = (int(np.prod(in_shape)), int(np.prod(features)))
    init_shape = in_shape + features

    def init(rng, shape, dtype=jnp.float32):
      del shape  # T5X draws from the un-flattened shape so fan-in/out are per head.
      return jnp.reshape(self.kernel_init(rng, init_shape, dtype), kernel_shape)

    kernel = param_with_axes('kernel', init, kernel_shape, jnp.float32, axes=self.kernel_axes)
    kernel = jnp.reshape(jnp.asarray(kernel, self.dtype), init_shape)
    inputs = jnp.asarray(inputs, self.dtype)
    contract = tuple(range(len(axis)))
    return jax.lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))


class Embed(nn.Module):
  """Token embedding `(vocab, embed)`; `attend` gives the tied output logits."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  embedding_init: Initializer = default_embed_init

  def setup(self):
    self.embedding = param_with_axes('embedding', self.embedding_init,
                                     (self.num_embeddings, self.features), jnp.float32,
                                     axes=('vocab', 'embed'))

  def __call__(self, tokens: Array) -> Array:
    # A one-hot-free gather; identical values to T5X's `jnp.take`.
    return jnp.asarray(self.embedding, self.dtype)[tokens]

  def attend(self, query: Array) -> Array:
    # T5X attends in float32 (`attend_dtype`), whatever the activation dtype.
    return jnp.dot(jnp.asarray(query, jnp.float32), jnp.asarray(self.embedding, jnp.float32).T)


class LayerNorm(nn.Module):
  """T5's RMS norm: no mean subtraction, no bias, computed in float32."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    scale = param_with_axes('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32,
                            axes=('embed',))
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(y, self.dtype) * jnp.asarray(scale, self.dtype)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """T5's log-spaced relative position buckets (`memory - query` positions)."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
      np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """Per-head scalar bias from bucketed relative positions, shared by all layers of a stack."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  embedding_init: Initializer = relpos_init

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True,
               query_offset: int = 0) -> Array:
    """[1, heads, qlen, klen]. `query_offset`: query i sits at position i + offset among the keys
    (P key/value prefixes come first: HF T5's `past_seen_tokens`)."""
    context = np.arange(qlen, dtype=np.int32)[:, None] + query_offset
    memory = np.arange(klen, dtype=np.int32)[None, :]
    buckets = relative_position_bucket(memory - context, bidirectional, self.num_buckets,
                                       self.max_distance)  # [q, k], computed at trace time
    table = param_with_axes('rel_embedding', self.embedding_init,
                            (self.num_heads, self.num_buckets), jnp.float32,
                            axes=('heads', 'relpos_buckets'))
    table = jnp.asarray(table, self.dtype)
    values = table[:, buckets]  # [heads, q, k]
    return values[None]  # [1, heads, q, k]


def make_attention_mask(query_input: Array, key_input: Array,
                        pairwise_fn: Callable = jnp.multiply, dtype=jnp.float32) -> Array:
  """[B, q] x [B, k] -> [B, 1, q, k]."""
  mask = pairwise_fn(query_input[..., :, None], key_input[..., None, :])
  return mask[..., None, :, :].astype(dtype)


def make_causal_mask(x: Array, dtype=jnp.float32) -> Array:
  idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idxs, idxs, jnp.greater_equal, dtype=dtype)


def combine_masks(*masks: Array | None, dtype=jnp.float32) -> Array | None:
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks).astype(dtype)


def combine_biases(*biases: Array | None) -> Array | None:
  biases = [b for b in biases if b is not None]
  if not biases:
    return None
  return functools.reduce(operator.add, biases)


def mask_to_bias(mask: Array | None, dtype) -> Array | None:
  if mask is None:
    return None
  return jax.lax.select(mask > 0, jnp.zeros(mask.shape, dtype),
                        jnp.full(mask.shape, MASK_BIAS).astype(dtype))


def _sum_of_products(a: Array, b: Array, axis: int) -> Array:
  """sum(a * b, axis) accumulated in float32, as a dot accumulates, in a and b's dtype."""
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=axis).astype(
      jnp.result_type(a, b))


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None,
                          dropout_rng, dropout_rate: float, deterministic: bool, dtype,
                          float32_logits: bool, heads_major: bool = False) -> Array:
  """[B, q, H, k] x [B, kv, H, k] -> [B, q, H, k]; no 1/sqrt(k): T5 folds it into the query init.

  `heads_major`: key is [B, H, k, kv] and value [B, H, kv, k], the layouts whose products need
  no transpose (the decoding cache's cross-attention keys and values are kept so)."""
  if float32_logits:
    query, key = query.astype(jnp.float32), key.astype(jnp.float32)
  # One decoding step (q = 1) against a heads-major cache: each product is a multiply and a sum
  # over the cache as it lies, which XLA:CPU fuses (as batched dots of 1-row matrices greedy
  # decoding at batch 16 was ~4% slower). Beam search's beams share their example's
  # cross-attention cache: key/value then have B rows and the query B x beams.
  one_step = heads_major and query.shape[1] == 1
  if one_step:
    rows, groups = key.shape[0], query.shape[0] // key.shape[0]
    q = query.reshape((rows, groups) + query.shape[2:])  # [B, g, H, k]
    logits = _sum_of_products(q[..., None], key[:, None], axis=3)  # [B, g, H, kv]
    logits = logits.reshape((query.shape[0], query.shape[2], 1, key.shape[-1]))
  else:
    logits = jnp.einsum('bqhd,bhdk->bhqk' if heads_major else 'bqhd,bkhd->bhqk',
                        query, key)  # [B, H, q, kv]
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  # Softmax in the logits' dtype, as T5X: float32 with `float32_logits`, else the activations'.
  weights = jax.nn.softmax(logits).astype(dtype)
  if not deterministic and dropout_rate > 0.:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                weights.shape[:-2] + (1,) + weights.shape[-1:])
    weights = weights * (keep.astype(dtype) / jnp.asarray(1.0 - dropout_rate, dtype))
  if one_step:
    w = weights.reshape((rows, groups) + weights.shape[1:2] + weights.shape[3:])  # [B, g, H, kv]
    out = _sum_of_products(w[..., None], value[:, None], axis=3)  # [B, g, H, k]
    return out.reshape((query.shape[0], 1) + out.shape[2:])
  return jnp.einsum('bhqk,bhkd->bqhd' if heads_major else 'bhqk,bkhd->bqhd', weights, value)


def prepend_prefix(prefix: Array, key: Array, value: Array, mask: Array | None,
                   heads_major: bool = False) -> tuple[Array, Array, Array | None]:
  """Puts a [2, B or 1, H, P, k] key/value prefix in front of key and value [B, kv, H, k]
  (heads-major: [B, H, k, kv] and [B, H, kv, k]); a [B, 1, q, kv] mask gets P leading ones
  (every query sees the prefix)."""
  batch = key.shape[0]

  def rows(x, axes):  # [B or 1, H, P, k] -> `axes` of it, batch B
    x = jnp.transpose(x, axes).astype(key.dtype)
    return jnp.broadcast_to(x, (batch,) + x.shape[1:])

  if heads_major:
    key = jnp.concatenate([rows(prefix[0], (0, 1, 3, 2)), key], axis=3)
    value = jnp.concatenate([rows(prefix[1], (0, 1, 2, 3)), value], axis=2)
  else:
    key = jnp.concatenate([rows(prefix[0], (0, 2, 1, 3)), key], axis=1)
    value = jnp.concatenate([rows(prefix[1], (0, 2, 1, 3)), value], axis=1)
  return key, value, prefix_mask(prefix, mask)


def prefix_mask(prefix: Array, mask: Array | None) -> Array | None:
  """A [B, 1, q, kv] mask with the [2, B or 1, H, P, k] prefix's P leading ones."""
  if mask is None:
    return None
  ones = jnp.ones(mask.shape[:-1] + (prefix.shape[-2],), mask.dtype)
  return jnp.concatenate([ones, mask], axis=-1)


class MultiHeadDotProductAttention(nn.Module):
  """T5X attention: query/key/value/out kernels, optional autoregressive key/value cache."""

  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32
  dropout_rate: float = 0.
  kernel_init: Initializer = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
  float32_logits: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None,
               bias: Array | None = None, *, decode: bool = False,
               deterministic: bool = False, prefix: Array | None = None,
               static_kv: bool = False) -> Array:
    """`prefix`: optional [2, B or 1, H, P, k] key and value rows put in front of the keys and
    values (prefix tuning); every query sees them, so `mask` gets ones there, and `bias`, if
    given, must already span the P + kv keys.

    `static_kv` (encoder-decoder attention): `inputs_kv` is the same at every decoding step, so
    with `decode` its keys and values (the prefix's rows in front, if any) are projected once,
    when the cache is made, and kept heads-major ([B, H, k, kv] keys, [B, H, kv, k] values):
    each step's products then read them as they lie. T5X projects them again each step and
    XLA hoists that out of the loop, but transposes them for the products at every step (two
    copies of [B, kv, H, k] per layer per token)."""
    depth_scaling = jnp.sqrt(self.head_dim).astype(jnp.float32)

    def query_init(*args):
      return self.kernel_init(*args) / depth_scaling

    projection = functools.partial(DenseGeneral, features=(self.num_heads, self.head_dim),
                                   kernel_axes=('embed', 'joined_kv'), dtype=self.dtype)
    query = projection(kernel_init=query_init, name='query')(inputs_q)  # [B, q, H, k]
    query = with_sharding_constraint(query, ('batch', 'length', 'heads', 'kv'))
    heads_major = decode and static_kv and self.has_variable('cache', 'cached_cross_key')
    if heads_major:
      key = self.get_variable('cache', 'cached_cross_key')
      value = self.get_variable('cache', 'cached_cross_value')
      if prefix is not None:  # its rows are in the cache already
        mask, prefix = prefix_mask(prefix, mask), None
    else:
      key = projection(kernel_init=self.kernel_init, name='key')(inputs_kv)
      value = projection(kernel_init=self.kernel_init, name='value')(inputs_kv)
      key = with_sharding_constraint(key, ('batch', 'length', 'heads', 'kv'))
      value = with_sharding_constraint(value, ('batch', 'length', 'heads', 'kv'))
      if decode and static_kv:  # making the cache: keep the projections, heads-major
        k, v = (key, value) if prefix is None else prepend_prefix(prefix, key, value, None)[:2]
        self.put_variable('cache', 'cached_cross_key', with_sharding_constraint(
            jnp.transpose(k, (0, 2, 3, 1)), ('batch', 'heads', 'kv', 'length')))
        self.put_variable('cache', 'cached_cross_value', with_sharding_constraint(
            jnp.transpose(v, (0, 2, 1, 3)), ('batch', 'heads', 'length', 'kv')))

    if decode and not static_kv:
      # The self-attention cache is heads-major too ([B, H, k, L] keys, [B, H, L, k] values).
      is_initialized = self.has_variable('cache', 'cached_key')
      batch, length, num_heads, head_dim = key.shape
      cached_key = self.variable('cache', 'cached_key', jnp.zeros,
                                 (batch, num_heads, head_dim, length), key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                   (batch, num_heads, length, head_dim), value.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        length = cached_key.value.shape[-1]
        if query.shape[1] != 1:
          raise ValueError(f'decode=True takes one token per step, got length {query.shape[1]}')
        cur = cache_index.value
        key = jax.lax.dynamic_update_slice(
            cached_key.value, jnp.transpose(key, (0, 2, 3, 1)).astype(cached_key.value.dtype),
            (0, 0, 0, cur))
        value = jax.lax.dynamic_update_slice(
            cached_value.value,
            jnp.transpose(value, (0, 2, 1, 3)).astype(cached_value.value.dtype), (0, 0, cur, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = cur + 1
        heads_major = True
        # Attend to positions <= cur only; pick row `cur` of the full relative bias.
        step_mask = (jnp.arange(length) <= cur)[None, None, None, :]
        mask = combine_masks(mask, jnp.broadcast_to(step_mask, (batch, 1, 1, length)))
        if bias is not None:
          bias = jax.lax.dynamic_slice_in_dim(bias, cur, 1, axis=-2)

    if prefix is not None:
      key, value, mask = prepend_prefix(prefix, key, value, mask, heads_major)
    attention_bias = combine_biases(mask_to_bias(mask, self.dtype), bias)
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.:
      dropout_rng = self.make_rng('dropout')
    x = dot_product_attention(query, key, value, attention_bias, dropout_rng, self.dropout_rate,
                              deterministic, self.dtype, self.float32_logits, heads_major)
    out = DenseGeneral(features=inputs_q.shape[-1], axis=(-2, -1), kernel_init=self.kernel_init,
                       kernel_axes=('joined_kv', 'embed'), dtype=self.dtype, name='out')(x)
    return out


class MlpBlock(nn.Module):
  """T5 feed-forward: `wi` (relu) or gated `wi_0`/`wi_1`, then `wo`.

  The first projection's pre-activation is sown into `intermediates/mlp_pre_activation`
  (free unless that collection is mutable): the activated-neuron indicator reads it.
  """

  intermediate_dim: int
  activations: Sequence[str] = ('relu',)
  kernel_init: Initializer = default_kernel_init
  intermediate_dropout_rate: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool = False) -> Array:
    activations = []
    for idx, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{idx}'
      x = DenseGeneral(self.intermediate_dim, dtype=self.dtype, kernel_init=self.kernel_init,
                       kernel_axes=('embed', 'mlp'), name=name)(inputs)
      if idx == 0:
        self.sow('intermediates', 'mlp_pre_activation', x)
      activations.append(_activation(act)(x))
    x = functools.reduce(operator.mul, activations)
    x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    x = with_sharding_constraint(x, ('batch', 'length', 'mlp'))
    return DenseGeneral(inputs.shape[-1], dtype=self.dtype, kernel_init=self.kernel_init,
                        kernel_axes=('mlp', 'embed'), name='wo')(x)
