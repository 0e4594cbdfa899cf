"""The one train step and eval step, generic over what is trained.

A method supplies `model_inputs(trainable, frozen, batch) -> (backbone_params, prompt)`:
prompt tuning returns the frozen backbone and the trainable prompt; masked prompts,
projectors and prompt stacks are other mappings; model tuning returns the trainable as
the backbone and no prompt. The prompt may also be a `jaxprompt.model.network.PromptInputs`
(an input prompt and/or per-layer key/value prefixes: prefix tuning), which the model takes in
the same argument, so nothing here looks inside it. Gradients are taken with respect to
`trainable` alone and `frozen` is an argument of the jitted step, never a captured constant.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprompt.model import Transformer, loss_and_metrics
from jaxprompt.model.network import PromptInputs
from jaxprompt.prompts.prompt import get_prompt, select_prompts

Batch = dict[str, jax.Array]
ModelInputs = Callable[[Any, Any, Batch], tuple[Any, jax.Array | PromptInputs | None]]


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  trainable: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """T5X loss settings (`Z_LOSS`, `LABEL_SMOOTHING`, `LOSS_NORMALIZING_FACTOR`)."""

  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: float | None = None


# ---- the mappings (trainable, frozen, batch) -> (backbone params, prompt) ----

def prompt_inputs(trainable, frozen, batch):
  """Prompt tuning: frozen backbone, one [P, d] prompt for every example."""
  del batch
  return frozen['backbone'], get_prompt(trainable)


def prompt_stack_inputs(trainable, frozen, batch):
  """Multi-task prompts: a [n, P, d] stack; each example picks row `batch['task_index']`."""
  return frozen['backbone'], select_prompts(get_prompt(trainable), batch['task_index'])


def model_tuning_inputs(trainable, frozen, batch):
  """Model tuning (the baseline): every backbone weight is trained, no prompt."""
  del frozen, batch
  return trainable, None


def init_state(trainable, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))


def _forward(module: Transformer, model_inputs: ModelInputs, trainable, frozen, batch: Batch,
             prompt_position: int, dropout_rng=None):
  params, prompt = model_inputs(trainable, frozen, batch)
  rngs = {} if dropout_rng is None else {'dropout': dropout_rng}
  return module.apply({'params': params}, batch['encoder_input_tokens'],
                      batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                      enable_dropout=dropout_rng is not None, prompt=prompt,
                      prompt_position=prompt_position, rngs=rngs)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def split_microbatches(batch: Batch, count: int) -> Batch:
  """[B, ...] leaves -> [count, B / count, ...]; microbatch i holds rows i, i + count, ...

  Strided rather than contiguous: each data-parallel shard holds a contiguous block of rows,
  so every microbatch takes an equal share of every shard and no rows move between devices.
  """
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f'a batch of {x.shape[0]} rows does not split into {count} microbatches '
                       '(accumulate_steps); choose a batch_size that is a multiple of it')
    return jnp.swapaxes(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, batch)


def make_train_step(module: Transformer, model_inputs: ModelInputs,
                    tx: optax.GradientTransformation, loss: LossConfig = LossConfig(),
                    prompt_position: int = 0, dropout: bool = True, accumulate_steps: int = 1):
  """Returns `train_step(state, frozen, batch, rng) -> (state, metrics)` (pure; jit it).

  With `accumulate_steps=N` (T5X's `num_microbatches`) the batch runs as N microbatches in a
  `lax.scan`, summing gradients and (summed) metrics: the loss is a sum over tokens (divided by
  a constant `loss_normalizing_factor` if set), so the update equals one pass over the whole
  batch while only a microbatch's activations are alive. Microbatch i draws its dropout from
  `fold_in(step_rng, i)`.

  A non-finite loss, gradient or updated trainable leaves the state unchanged (step included)
  and sets `metrics['nonfinite']`, so the caller can stop with the last good state.
  """

  def loss_fn(trainable, frozen, batch, rng):
    logits = _forward(module, model_inputs, trainable, frozen, batch, prompt_position,
                      rng if dropout else None)
    return loss_and_metrics(logits, batch['decoder_target_tokens'],
                            batch.get('decoder_loss_weights'), z_loss=loss.z_loss,
                            label_smoothing=loss.label_smoothing,
                            loss_normalizing_factor=loss.loss_normalizing_factor)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def grads_and_metrics(trainable, frozen, batch, rng):
    if accumulate_steps == 1:
      return grad_fn(trainable, frozen, batch, rng)

    def microbatch(sums, inputs):
      index, micro = inputs
      out = grad_fn(trainable, frozen, micro, jax.random.fold_in(rng, index))
      return jax.tree_util.tree_map(jnp.add, sums, out), None

    micro = split_microbatches(batch, accumulate_steps)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zeros = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(grad_fn, trainable, frozen, first, rng))
    (grads, metrics), _ = jax.lax.scan(microbatch, zeros,
                                       (jnp.arange(accumulate_steps), micro))
    # Every metric is a sum but the ratio.
    metrics['accuracy'] = metrics['num_correct'] / jnp.maximum(metrics['weight_sum'], 1e-9)
    return grads, metrics

  def train_step(state: TrainState, frozen, batch: Batch, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    grads, metrics = grads_and_metrics(state.trainable, frozen, batch, step_rng)
    finite = jnp.isfinite(metrics['loss']) & _all_finite(grads)

    def apply(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
      new = TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state)
      # An update can overflow even from finite gradients (a huge learning rate): keep the old
      # state then too.
      return jax.lax.cond(_all_finite(new.trainable), lambda: new, lambda: state)

    # A branch rather than a per-leaf select: the skipped update is never computed.
    new_state = jax.lax.cond(finite, apply, lambda state: state, state)
    finite = finite & (new_state.step > state.step)
    metrics = dict(metrics, nonfinite=~finite, grad_norm=optax.global_norm(grads),
                   trainable_norm=optax.global_norm(new_state.trainable))
    return new_state, metrics

  return train_step


def make_eval_step(module: Transformer, model_inputs: ModelInputs, loss: LossConfig = LossConfig(),
                   prompt_position: int = 0):
  """Returns `eval_step(trainable, frozen, batch) -> summed loss metrics` (dropout off)."""

  def eval_step(trainable, frozen, batch: Batch):
    logits = _forward(module, model_inputs, trainable, frozen, batch, prompt_position)
    _, metrics = loss_and_metrics(logits, batch['decoder_target_tokens'],
                                  batch.get('decoder_loss_weights'), z_loss=loss.z_loss,
                                  label_smoothing=loss.label_smoothing,
                                  loss_normalizing_factor=loss.loss_normalizing_factor)
    return metrics

  return eval_step
