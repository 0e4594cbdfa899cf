"""Adafactor as T5X applies it, expressed as an optax transformation.

T5X's Adafactor (t5x/adafactor.py) updates each parameter as

  beta2_t = 1 - (step - step_offset + 1) ** -decay_rate   # step = 0 on update 1
  v_t     = beta2_t * v_{t-1} + (1 - beta2_t) * (g**2 + epsilon1)   # or factored
  y       = g / sqrt(v_t)
  y       = y / max(1, rms(y) / clipping_threshold)
  param   = (1 - weight_decay_rate) * param - lr * [param_scale] * y

so the first update uses beta2 = 0 (v_1 = g**2 + epsilon1), and weight decay is
decoupled and *not* multiplied by the learning rate. The second moment is
factored into row and column statistics only when the two largest dimensions
are both >= `min_dim_size_to_factor` (128); a (P, d) prompt with P < 128 keeps
a full (P, d) accumulator. T5X computes in float32 whatever the parameter dtype
and keeps its statistics in float32; so does `t5x_adafactor`.

Every one of these steps exists as an optax building block, and their chain
reproduces a trace recorded from T5X itself to float32 rounding
(tests/test_optimizers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ['t5x_adafactor', 'masked_trainable']


def _cast_floats(tree: Any, dtype_of: Callable[[Any], Any]) -> Any:
  """Casts floating leaves of `tree` to `dtype_of(leaf)`; others unchanged."""

  def cast(x):
    if x is None or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return x
    return jnp.asarray(x).astype(dtype_of(x))

  return jax.tree.map(cast, tree)


def _computed_in_float32(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """Runs `inner` on float32 copies of gradients and params (as T5X does).

  The optimizer state is created from float32 params, so low-precision
  parameters still get float32 statistics; the returned updates are cast back
  to the dtype of the incoming gradients.
  """
  to_f32 = lambda tree: _cast_floats(tree, lambda _: jnp.float32)

  def init_fn(params):
    return inner.init(to_f32(params))

  def update_fn(updates, state, params=None):
    new_updates, new_state = inner.update(
        to_f32(updates), state, None if params is None else to_f32(params))
    new_updates = jax.tree.map(
        lambda u, g: u.astype(jnp.result_type(g)), new_updates, updates)
    return new_updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def t5x_adafactor(
    learning_rate: float | optax.Schedule = 0.3,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    clipping_threshold: float | None = 1.0,
    weight_decay_rate: float | None = 1e-5,
    multiply_by_parameter_scale: bool = False,
    momentum: float | None = None,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
  """Adafactor with T5X's exact update rule (prompt-tuning defaults).

  The defaults are the prompt-tuning paper's settings (constant lr 0.3,
  decay_rate 0.8, no parameter scaling, update clipping 1, no momentum,
  weight decay 1e-5). For model tuning as T5X does it by default, pass
  `multiply_by_parameter_scale=True`, `weight_decay_rate=None` and T5X's
  learning-rate schedule.

  Args:
    learning_rate: Constant step size, or an optax schedule evaluated at the
      number of updates applied so far (0 on the first update, like T5X's
      `learning_rate_fn(train_state.step)`).
    decay_rate: Exponent of the second-moment schedule
      `beta2_t = 1 - (t + 1) ** -decay_rate`.
    step_offset: Subtracted from the update count in that schedule
      (`t = count - step_offset`), as in T5X. The count of a fresh optax state
      starts at 0, so keep 0 unless the count was restored from a checkpoint.
    clipping_threshold: Clip each update to this RMS (per parameter); None
      disables clipping.
    weight_decay_rate: Decoupled decay `param <- (1 - rate) * param - ...`, not
      scaled by the learning rate; None disables it.
    multiply_by_parameter_scale: Scale the step by `max(rms(param), epsilon2)`.
    momentum: T5X's `beta1`: EMA of the (lr-scaled) updates; None disables it.
    factored: Allow factored second moments for matrices.
    min_dim_size_to_factor: Factor only if the two largest dims are >= this.
    epsilon1: Added to squared gradients.
    epsilon2: Lower bound of the parameter scale.
    weight_decay_mask: Optional optax mask (tree or callable) selecting the
      parameters that receive weight decay.

  Returns:
    An `optax.GradientTransformation`; its updates are applied with
    `optax.apply_updates`, so the usual optax loop gives T5X's parameters.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = t5x_adafactor()
    >>> prompt = jnp.zeros((20, 24))
    >>> state = tx.init(prompt)
    >>> updates, state = tx.update(jnp.ones((20, 24)), state, prompt)
    >>> round(float(optax.apply_updates(prompt, updates)[0, 0]), 6)  # -lr
    -0.3
  """
  chain = [
      optax.scale_by_factored_rms(
          factored=factored,
          decay_rate=decay_rate,
          step_offset=step_offset,
          min_dim_size_to_factor=min_dim_size_to_factor,
          epsilon=epsilon1,
      )
  ]
  if clipping_threshold is not None:
    chain.append(optax.clip_by_block_rms(clipping_threshold))
  chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    chain.append(optax.scale_by_param_block_rms(min_scale=epsilon2))
  if momentum is not None:
    chain.append(optax.ema(momentum, debias=False))
  if weight_decay_rate is not None:
    # After the lr scaling: the decay term is weight_decay_rate * param.
    chain.append(
        optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
  chain.append(optax.scale(-1.0))
  return _computed_in_float32(optax.chain(*chain))


def masked_trainable(
    tx: optax.GradientTransformation,
    mask: Any,
) -> optax.GradientTransformation:
  """Applies `tx` to the masked leaves and freezes (zero update) the rest.

  Unlike `optax.masked`, which passes the gradients of unmasked leaves through
  unchanged, frozen leaves here get a zero update, and no optimizer state is
  kept for them. Prefer differentiating only the trainable pytree; this is for
  code that must hand one full tree to the optimizer.

  Args:
    tx: The transformation for trainable leaves.
    mask: A tree of booleans matching the params (True = trainable), or a
      function `params -> such a tree`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'prompt': jnp.ones(3), 'frozen': jnp.ones(3)}
    >>> tx = masked_trainable(optax.sgd(1.0), {'prompt': True, 'frozen': False})
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates['frozen'].tolist()
    [0.0, 0.0, 0.0]
  """

  def labels(params):
    tree = mask(params) if callable(mask) else mask
    return jax.tree.map(lambda m: 'train' if m else 'freeze', tree)

  return optax.multi_transform(
      {'train': tx, 'freeze': optax.set_to_zero()}, labels)


def per_row(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` applied to every row (leading axis) of every leaf on its own: a stack of n prompts
  gets n independent optimizer states, so Adafactor's factored statistics, its update
  clipping and its step never mix rows (each row gets the update it would get alone)."""

  def init(params):
    return jax.vmap(tx.init)(params)

  def update(updates, state, params=None):
    if params is None:
      return jax.vmap(lambda u, s: tx.update(u, s))(updates, state)
    return jax.vmap(tx.update)(updates, state, params)

  return optax.GradientTransformation(init, update)
