"""The T5X encoder-decoder loss: weighted token cross-entropy with label smoothing and z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def cross_entropy_with_logits(logits: Array, targets: Array, z_loss: float) -> tuple[Array, Array]:
  """Per-token soft-target cross-entropy plus `z_loss * logsumexp(logits)**2`.

  Args:
    logits: [B, L, V] float.
    targets: [B, L, V] soft targets (one-hot, possibly smoothed).
    z_loss: coefficient of the squared log-partition penalty.

  Returns:
    (loss [B, L] including the z-loss, z-loss [B, L]).
  """
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  log_softmax = logits - log_z
  loss = -jnp.sum(targets * log_softmax, axis=-1)
  total_z_loss = z_loss * jnp.square(jnp.squeeze(log_z, axis=-1))
  return loss + total_z_loss, total_z_loss


def compute_weighted_cross_entropy(
    logits: Array, targets: Array, weights: Array | None = None, label_smoothing: float = 0.0,
    z_loss: float = 0.0, loss_normalizing_factor: float | Array | None = None,
) -> tuple[Array, Array, Array]:
  """T5X's token loss, summed over tokens (divided by `loss_normalizing_factor` if given).

  Args:
    logits: [B, L, V].
    targets: [B, L] int token ids.
    weights: [B, L] loss weights (0 on padding); None weighs every token 1.
    label_smoothing: mass spread uniformly over the other V - 1 tokens.
    z_loss: coefficient of the z-loss (T5X default 1e-4).
    loss_normalizing_factor: divides the summed loss when set.

  Returns:
    (total loss, total z-loss, weight sum), scalars.
  """
  if logits.ndim != targets.ndim + 1:
    raise ValueError(f'logits {logits.shape} and targets {targets.shape} ranks do not match')
  logits = logits.astype(jnp.float32)
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = (1.0 - confidence) / (vocab_size - 1)
  normalizing_constant = -(confidence * np.log(confidence) +
                           (vocab_size - 1) * low_confidence * np.log(low_confidence + 1e-20))
  soft_targets = jax.nn.one_hot(targets, vocab_size) * (confidence - low_confidence)
  soft_targets = soft_targets + low_confidence
  loss, z = cross_entropy_with_logits(logits, soft_targets, z_loss)
  loss = loss - normalizing_constant
  if weights is None:
    weight_sum = jnp.asarray(np.prod(targets.shape), jnp.float32)
  else:
    weights = weights.astype(jnp.float32)
    loss, z = loss * weights, z * weights
    weight_sum = jnp.sum(weights)
  if loss_normalizing_factor is not None:
    loss, z = loss / loss_normalizing_factor, z / loss_normalizing_factor
  return jnp.sum(loss), jnp.sum(z), weight_sum


def loss_and_metrics(logits: Array, targets: Array, weights: Array | None = None, *,
                     label_smoothing: float = 0.0, z_loss: float = 1e-4,
                     loss_normalizing_factor: float | None = None) -> tuple[Array, dict]:
  """The training loss and T5X's usual metrics (summed values; divide by weight_sum to average).

  Returns:
    (loss, {'loss', 'z_loss', 'cross_ent_loss', 'accuracy', 'weight_sum', 'num_correct'}).
  """
  loss, total_z, weight_sum = compute_weighted_cross_entropy(
      logits, targets, weights, label_smoothing, z_loss, loss_normalizing_factor)
  w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * w)
  metrics = {
      'loss': loss,
      'z_loss': total_z,
      'cross_ent_loss': loss - total_z,
      'weight_sum': weight_sum,
      'num_correct': correct,
      'accuracy': correct / jnp.maximum(weight_sum, 1e-9),
  }
  return loss, metrics
