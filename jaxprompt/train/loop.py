"""The training loop: steps, periodic evaluation, best-checkpoint selection, resume.

The loop is the same for every method: it only sees a jitted `train_step`, a state,
the frozen arguments, a deterministic batch source that can start at any position,
and an `evaluate(trainable) -> metrics` callable.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax

from jaxprompt.train import agreement
from jaxprompt.train.checkpointing import (Checkpointer, checkpoint_storage_error,
                                          prune_data_states)
from jaxprompt.train.summaries import MetricsLog, plot_run


class NonFiniteLossError(FloatingPointError):
  pass


class DivergedError(NonFiniteLossError):
  """The trainable stayed finite but grew by orders of magnitude (a learning rate far too high:
  at lr 1e30 a prompt reaches ~1e30, its gradients vanish, and validation cannot tell)."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, evaluate and checkpoint.

  `metric` names the validation metric that selects the best checkpoint
  (`higher_is_better` gives its direction); `patience` stops training after that
  many evaluations without improvement (early stopping), None never stops early.
  """

  train_steps: int
  eval_period: int = 100
  log_period: int = 10
  keep_checkpoints: int = 2
  metric: str = 'loss_per_token'
  higher_is_better: bool = False
  patience: int | None = None
  # A step after which the trainable's global norm exceeds this multiple of its norm at step 0
  # counts as diverged, like a non-finite one (None: no check). Tuning at sane rates moves a
  # prompt's norm by well under 10x; an overflowing rate moves it by 1e20x and more.
  max_norm_growth: float | None = 1e4
  progress: bool = True
  writer: bool = True  # this process writes the run's logs and plot (process 0 of a multi-host run)

  def __post_init__(self):
    for name in ('train_steps', 'eval_period', 'log_period'):
      if getattr(self, name) <= 0:
        raise ValueError(f'LoopConfig.{name} must be positive, got {getattr(self, name)}')


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  best_step: int | None
  best_metrics: dict[str, float] | None
  evals: list[dict[str, Any]]
  stopped_early: bool
  plot: str | None


def _is_better(new: float, old: float | None, higher: bool) -> bool:
  if old is None:
    return True
  return new > old if higher else new < old


def _bad_step(host: list[dict], first: int, initial_norm: float, config: LoopConfig,
              kept: int | None, model_dir: str) -> NonFiniteLossError | None:
  """The error for the first of the logged steps `first, first + 1, ...` that was non-finite
  or took the trainable's norm past `max_norm_growth` x its initial norm; None if none did."""
  limit = (config.max_norm_growth * initial_norm
           if config.max_norm_growth is not None and initial_norm else None)
  for i, m in enumerate(host):
    norm = float(m['trainable_norm'])
    if bool(m['nonfinite']) or (limit is not None and norm > limit):
      break
  else:
    return None
  where = (f'{model_dir}/checkpoints holds the last good state (step {kept}); lower the '
           'learning rate (or check the data) and continue it with --resume'
           if kept is not None else 'no checkpoint was written yet; start again with a lower '
           'learning rate (or check the data)')
  if bool(m['nonfinite']):
    return NonFiniteLossError(f'non-finite loss, gradient or update at step {first + i}: '
                              f'training stopped; {where}')
  return DivergedError(f"diverged at step {first + i}: the trainable's norm grew from "
                       f'{initial_norm:.3g} to {norm:.3g} ({norm / initial_norm:.1e}x, over the '
                       f'{config.max_norm_growth:g}x limit): training stopped; {where}')


def train_loop(train_step: Callable, state, frozen, batches: Callable[[int], Iterator[dict]],
               rng: jax.Array, model_dir: str, config: LoopConfig,
               evaluate: Callable[[Any], dict[str, float]] | None = None,
               on_best: Callable[[Any, int, dict], None] | None = None,
               on_validation: Callable[[Any, int, dict], None] | None = None,
               put_batch: Callable[[dict], dict] = lambda b: b) -> LoopResult:
  """Trains until `config.train_steps`, resuming from the latest checkpoint in `model_dir`.

  Args:
    train_step: jitted `(state, frozen, batch, rng) -> (state, metrics)`.
    state: a fresh `TrainState` (replaced by the checkpoint when resuming).
    frozen: the frozen arguments (backbone params, fixed masks, ...).
    batches: `batches(position)` yields training batches starting at batch `position`; if
      the iterator has `save(step)`, it is called with every checkpoint (the data position).
    rng: base dropout key; step `i` uses `fold_in(rng, i)`, so a resumed run repeats it.
    model_dir: the run directory (see `checkpointing`).
    config: the loop settings.
    evaluate: `evaluate(trainable) -> {metric: value}` on the validation split.
    on_best: called with `(trainable, step, metrics)` whenever validation improves.
    on_validation: called with `(trainable, step, metrics)` after every validation, once its
      checkpoint is written (again for the restored step on resume: it must be idempotent).
    put_batch: places a host batch on devices (sharding).
  """
  checkpoints = Checkpointer(os.path.join(model_dir, 'checkpoints'), config.keep_checkpoints)
  best = Checkpointer(os.path.join(model_dir, 'best'), 1)
  log = MetricsLog(model_dir) if config.writer else None
  meta: dict[str, Any] = {'best_step': None, 'best_metrics': None, 'bad_evals': 0, 'evals': []}
  # Every process has read the checkpoints (resume? which best?) before any process writes one,
  # and they must have seen the same: all act on one decision, whatever order they came in.
  agreement.same(f'{model_dir}: its checkpoints',
                 lambda: dict(latest=checkpoints.latest_step(), best=best.all_steps()),
                 hint=agreement.SHARED_STORAGE)
  if checkpoints.latest_step() is not None:
    state, meta = checkpoints.restore(state)
    print(f'resuming {model_dir} from step {int(state.step)}', file=sys.stderr)
  step = int(state.step)
  if meta.get('initial_norm') is None:  # the yardstick of divergence: the norm at step 0
    meta['initial_norm'] = float(jax.jit(optax.global_norm)(state.trainable))  # global arrays too
  if log is not None:
    log.truncate(step)

  def run_eval(step: int) -> tuple[bool, bool]:
    """Evaluates and records the best in `meta`: (stop early?, is this the best so far?)."""
    metrics = {k: float(v) for k, v in evaluate(state.trainable).items()}
    if log is not None:
      log.write(step, 'eval', metrics)
    meta['evals'].append({'step': step, **metrics})
    if config.metric not in metrics:
      raise KeyError(f'validation metric {config.metric!r} not among {sorted(metrics)}; '
                     'set the selection metric to one of them')
    best_value = None if meta['best_metrics'] is None else meta['best_metrics'][config.metric]
    is_best = _is_better(metrics[config.metric], best_value, config.higher_is_better)
    if is_best:
      meta.update(best_step=step, best_metrics=metrics, bad_evals=0)
    else:
      meta['bad_evals'] += 1
    return config.patience is not None and meta['bad_evals'] >= config.patience, is_best

  def save(step: int, is_best: bool) -> None:
    try:
      write(step, is_best)
    except Exception as e:  # disk full, read-only: one line, earlier checkpoints intact
      error = checkpoint_storage_error(e, model_dir, step)
      if error is None:
        raise
      raise error from None

  def write(step: int, is_best: bool) -> None:
    # The periodic checkpoint first: a best checkpoint or product never runs ahead of the
    # checkpoint a resumed run starts from. The data position goes first of all, so a
    # checkpoint never exists without it.
    if hasattr(source, 'save'):
      source.save(step)
    checkpoints.save(step, state, meta)
    if config.writer:
      prune_data_states(model_dir, checkpoints.all_steps())
    if is_best:
      best.save(step, state, {'metrics': meta['best_metrics']})
      if on_best is not None:
        on_best(state.trainable, step, meta['best_metrics'])
    validated(step)

  def validated(step: int) -> None:
    """`on_validation` for the validation of `step`, if there was one."""
    last = meta['evals'][-1] if meta['evals'] else None
    if on_validation is not None and last is not None and last['step'] == step:
      on_validation(state.trainable, step, {k: v for k, v in last.items() if k != 'step'})

  # A run killed after its last checkpoint may have left a best beyond it: drop it, and
  # re-export the best when it is the state just restored.
  for later in [s for s in best.all_steps() if s > step]:
    best.delete(later)
  if meta['best_step'] == step and step not in best.all_steps() and step > 0:
    best.save(step, state, {'metrics': meta['best_metrics']})
    if on_best is not None:
      on_best(state.trainable, step, meta['best_metrics'])
  if step > 0:
    validated(step)

  source = batches(step)
  if evaluate is not None and step == 0 and not meta['evals']:
    save(0, run_eval(0)[1])

  progress = None
  if config.progress and config.writer and step < config.train_steps:
    from tqdm.auto import tqdm
    progress = tqdm(total=config.train_steps, initial=step, desc='train', unit='step',
                    dynamic_ncols=True, file=sys.stderr)
  stopped_early = False
  pending: list[dict] = []
  tick, tick_step = time.perf_counter(), step
  try:
    while step < config.train_steps:
      try:
        batch = next(source)
      except StopIteration:
        raise RuntimeError(f'the training data ran out at step {step}; repeat the dataset or '
                           'lower the number of train steps') from None
      state, metrics = train_step(state, frozen, put_batch(batch), rng)
      pending.append(metrics)
      step += 1
      at_checkpoint = step % config.eval_period == 0 or step == config.train_steps
      if step % config.log_period == 0 or at_checkpoint:
        host = jax.device_get(pending)
        pending = []
        error = _bad_step(host, step - len(host) + 1, meta['initial_norm'], config,
                          checkpoints.latest_step(), model_dir)
        if error is not None:  # before anything of this state is evaluated, saved or called best
          raise error
        summed = {k: float(np.sum([m[k] for m in host])) for k in ('loss', 'weight_sum',
                                                                    'num_correct', 'z_loss')}
        now = time.perf_counter()
        rate = (step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, step
        row = {'loss': summed['loss'] / len(host),
               'loss_per_token': summed['loss'] / max(summed['weight_sum'], 1e-9),
               # percent, as every validation metric (T5's convention)
               'token_accuracy': 100.0 * summed['num_correct'] / max(summed['weight_sum'], 1e-9),
               'z_loss': summed['z_loss'] / len(host), 'grad_norm': float(host[-1]['grad_norm']),
               'steps_per_sec': rate}
        if log is not None:
          log.write(step, 'train', row)
        if progress is not None:
          progress.set_postfix(loss=f'{row["loss_per_token"]:.4f}', steps_s=f'{rate:.2f}')
      if progress is not None:
        # The bar counts steps that ran, not steps dispatched: fed at dispatch it raced ahead
        # and stalled at every log_period sync, and its ETA swung (a 3.3-min lab build read
        # 23 min to 2 h). Waiting for the step before keeps one step in flight.
        if len(pending) > 1:
          jax.block_until_ready(pending[-2])
        progress.update(1)
      if at_checkpoint:
        is_best = False
        if evaluate is not None:
          stopped_early, is_best = run_eval(step)
        save(step, is_best)
        if stopped_early:
          print(f'early stopping at step {step}: no improvement of {config.metric} in '
                f'{config.patience} evaluations', file=sys.stderr)
          break
  finally:  # the bar ends its line before any message
    if progress is not None:
      progress.close()
  if step not in checkpoints.all_steps():
    save(step, False)
  checkpoints.close()
  best.close()
  plot = None
  if log is not None:
    log.close()
    plot = plot_run(model_dir, metric=config.metric if evaluate else None)
  return LoopResult(state, step, meta['best_step'], meta['best_metrics'], meta['evals'],
                    stopped_early, plot)


def restore_best(model_dir: str, state_like):
  """The best checkpoint's state (by the validation metric) of a finished or running run."""
  best = Checkpointer(os.path.join(model_dir, 'best'), 1)
  if best.latest_step() is None:
    raise FileNotFoundError(f'{model_dir}/best: no best checkpoint; was validation run?')
  state, meta = best.restore(state_like)
  best.close()
  return state, meta

