"""The run driver: one method, one task, one frozen backbone, one `RunConfig`.

    >>> import jaxprompt
    >>> result = jaxprompt.tune('lab_has_green', backbone='lab', model_dir='runs/x',
    ...                         train_steps=300)                           # doctest: +SKIP
    >>> result.best_metrics, result.best_prompt_path                       # doctest: +SKIP

`run()` is the only place a run is put together: it checks every option before it writes
anything, places the backbone and the method's trainable on the mesh, validates each task
of the run on the engine, trains with the shared loop (checkpoints, best-by-metric, resume)
and has the method write its product. `tune()` is its keyword view, which gin binds at the
entry points (`jaxprompt tune`, `python -m jaxprompt.train`), never inside the library.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import optax
from jaxprompt import host as _host

_host.import_quietly('seqio')  # TensorFlow's native libraries print as they load
import seqio  # noqa: E402

from jaxprompt.version import __version__
from jaxprompt.checkpoints.backbone import Backbone
from jaxprompt.config import (FALLBACK_FEATURE_LENGTHS, FALLBACK_PROMPT_LENGTH,
                              FALLBACK_SCHEDULE, RunConfig, split_options)
from jaxprompt.methods import Context, Method, get_method
from jaxprompt.model import layout as model_layout
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.train import checkpointing, engine as engine_lib, evaluation, loop, partitioning, steps
from jaxprompt.train import agreement


@dataclasses.dataclass
class TuneResult:
  """What a run produced (paths are inside `model_dir`)."""

  model_dir: str
  step: int
  best_step: int | None
  best_metrics: dict[str, float] | None
  initial_metrics: dict[str, float] | None
  final_metrics: dict[str, float] | None
  prompt_path: str | None  # the final product (a prompt file; a checkpoint for model tuning)
  best_prompt_path: str | None  # the best product by the validation metric
  plot_path: str | None
  trainable: Any = dataclasses.field(repr=False, default=None)
  best_model_path: str | None = None  # model tuning: a T5X checkpoint of the best weights
  backbone: Backbone | None = dataclasses.field(repr=False, default=None)
  opt_state: Any = dataclasses.field(repr=False, default=None)


def tune(task: str, *, backbone, model_dir: str, method: str = 'prompt_tuning',
         optimizer: optax.GradientTransformation | None = None, config=None,
         **options) -> TuneResult:
  """Tunes `method`'s trainable (a soft prompt by default) on `task` with `backbone` frozen.

  Args:
    task: a registered seqio task or mixture name.
    backbone: a checkpoint path (T5X legacy / Orbax / HF; 'lab' for the lab's), a
      `(module, params)` pair, or a `Backbone`.
    model_dir: the run directory; `resume=True` continues the run it holds.
    method: a registered method (`jaxprompt.methods.method_names()`).
    optimizer: replaces the method's default optimizer (T5X Adafactor).
    config: the backbone's T5 config (or a name such as 't5_1_1_base', as the model gin files
      bind it) when the checkpoint cannot say; every parameter shape is checked against it.
    **options: any `jaxprompt.config.RunConfig` field (train_steps, batch_size,
      prompt_length, learning_rate, feature_lengths, eval_period, ...) or an option of the
      method (its `Options` dataclass). An unknown name is an error naming close matches.
  """
  m = get_method(method)
  run_options, method_options = split_options(options, m.Options)
  run_config = RunConfig(method=method, **run_options)
  return run(m, task, backbone, model_dir, run_config, m.Options(**method_options),
             optimizer=optimizer, t5_config=config)


def resolve_config(config: RunConfig, task: str) -> RunConfig:
  """Fills what the user left to the task (lengths, prompt length, steps, batch size, eval
  period) with the task's own, else the paper's."""
  from jaxprompt.data.tasks import task_defaults
  known = task_defaults(task) if task else {}  # no task (`jaxprompt plan`): the paper's
  schedule = {name: getattr(config, name) or known.get(name, fallback)
              for name, fallback in FALLBACK_SCHEDULE.items()}
  return config.replace(
      **schedule,
      prompt_length=config.prompt_length or known.get('prompt_length', FALLBACK_PROMPT_LENGTH),
      feature_lengths={**known.get('feature_lengths', FALLBACK_FEATURE_LENGTHS),
                       **(config.feature_lengths or {})})


def make_context(method: Method, task: str, backbone, config: RunConfig, options,
                 t5_config=None) -> Context:
  """Checks the task, reads the backbone, resolves the config: all before anything is written."""
  from jaxprompt.data.tasks import check_task_name, label_names, member_tasks
  from jaxprompt.train.partitioning import initialize_distributed
  check_task_name(task)
  initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
  # Processes come seconds (or minutes) apart; they start the run together, as its first
  # collective (in loading) waits only so long (30 s on CPU) for a late process.
  agreement.barrier('start a run')
  bb = load_run_backbone(method, backbone, t5_config, config)
  config = resolve_config(config, task)
  tasks = member_tasks(task)
  first = seqio.get_mixture_or_task(tasks[0])
  labels = label_names(tasks[0])
  return Context(bb, task, tasks, first.output_features['targets'].vocabulary,
                 list(labels) if labels else None, config, options)


def load_run_backbone(method: Method, backbone, t5_config, config: RunConfig, devices=None):
  """The backbone as the run reads it (`jaxprompt plan` passes abstract weights through here)."""
  from jaxprompt.checkpoints.backbone import load_backbone as load
  # Read straight into the engine's shardings (this process's slices only); the engine's
  # placement of these arrays is then a no-op. A trained backbone stays float32.
  mesh = partitioning.mesh_from_config(config, devices)
  rules = partitioning.rules_from_config(config)
  return load(backbone, t5_config, dropout_rate=config.dropout_rate,
              shardings=lambda c: engine_lib.backbone_shardings_for(c, mesh, rules),
              dtype='float32' if method.trains_backbone else config.param_dtype,
            activation_dtype=config.dtype)


def run(method: Method, task: str, backbone, model_dir: str, config: RunConfig, options,
        optimizer: optax.GradientTransformation | None = None, t5_config=None) -> TuneResult:
  """Trains a run of `method` (see `tune`)."""
  check_backbone_options(method, config)
  ctx = make_context(method, task, backbone, config, options, t5_config)
  config, bb = ctx.config, ctx.backbone
  model_dir = os.path.abspath(model_dir)
  position = prompt_lib.position_index(config.prompt_position)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  trainable, extras = method.init(init_rng, ctx)  # may fail on the user's init file: before writing
  tx = optimizer or method.optimizer(ctx)
  # A backbone read from a path is the run's own: stacking frees its unrolled layers.
  ctx, trainable = hold_backbone(method, ctx, trainable, release=isinstance(backbone, str))
  bb = ctx.backbone

  is_writer = jax.process_index() == 0
  manifest = dict(
      method=method.name, backbone=bb.fingerprint, backbone_path=bb.path, task=task,
      seed=config.seed, batch_size=config.batch_size, train_steps=config.train_steps,
      prompt_init=config.prompt_init, init_from=config.init_from,
      prompt_position=config.prompt_position,
      feature_lengths=config.feature_lengths, learning_rate=config.learning_rate,
      t5_config=bb.module.config.to_dict(), jaxprompt_version=__version__,
      config=dataclasses.asdict(config), method_options=dataclasses.asdict(ctx.options),
      **method.identity(ctx))
  loss = loss_config(config)
  eng, state = run_engine(method, ctx, trainable, extras, tx)
  validation = None if config.eval_split is None else evaluation.build_validation(
      eng, method, ctx.tasks, config.eval_split, config.feature_lengths,
      config.eval_batch_size or config.batch_size, config.eval_mode, config.max_eval_examples,
      position, loss)

  identity = checkpointing.IDENTITY_KEYS + tuple(method.identity(ctx))
  # Every process checks before anything is written (a directory of another run is left
  # untouched) and all act on one verdict; then process 0 holds the directory and writes the
  # manifest, and the others go on once it has. Processes may arrive in any order.
  agreement.same(f'{model_dir}: the run directory', lambda: checkpointing.check_run_dir(
      model_dir, manifest, config.resume, identity), hint=agreement.SHARED_STORAGE)
  lock = agreement.by_writer(f'{model_dir}: hold the run directory', lambda: (
      checkpointing.hold_run_dir(model_dir, manifest, config.resume, identity)))
  watch = None
  if jax.process_count() > 1:
    watch = partitioning.PeerWatch(f'restart every process with --resume to continue '
                                   f'{model_dir} from its last checkpoint').start()
  try:
    return _train(method, ctx, model_dir, eng, state, validation, extras, dropout_rng,
                  is_writer)
  except Exception as e:
    partitioning.lost_process_error(e)
    raise
  finally:
    if watch is not None:
      watch.stop()
    if lock is not None:
      lock.release()


def loss_config(config: RunConfig) -> steps.LossConfig:
  return steps.LossConfig(config.z_loss, config.label_smoothing, config.loss_normalizing_factor)


def run_engine(method: Method, ctx: Context, trainable, extras, tx, devices=None):
  """The run's engine and initial state: the held backbone (`hold_backbone`) and the trainable
  on the run's mesh (of `devices`, all by default) with its rules, loss, prompt position and
  microbatches. `jaxprompt plan` builds its engine here too, from abstract weights."""
  config, bb = ctx.config, ctx.backbone
  return engine_lib.build_engine(
      bb.module, method.model_inputs, tx, {'backbone': bb.params, **extras}, trainable,
      loss=loss_config(config), prompt_position=prompt_lib.position_index(config.prompt_position),
      mesh=partitioning.mesh_from_config(config, devices),
      rules=partitioning.rules_from_config(config), accumulate_steps=config.accumulate_steps,
      trainable_is_backbone=method.trains_backbone)


def check_backbone_options(method: Method, config: RunConfig) -> None:
  """How the backbone may be held for `method`: a trained backbone stays float32."""
  from jaxprompt.config import ConfigError, option_names
  if method.trains_backbone and config.param_dtype != 'float32':
    raise ConfigError(f'{option_names("param_dtype")} {config.param_dtype!r}: {method.name} '
                      'trains the backbone, which is kept float32; leave param_dtype float32')


def hold_backbone(method: Method, ctx: Context, trainable, release: bool = False
                  ) -> tuple[Context, Any]:
  """The backbone as the run holds it: the module with `remat_policy` / `scan_layers`, the
  frozen weights in `param_dtype` and stacked when scanned (a backbone trainable, model
  tuning, is stacked too). Its config and fingerprint, the checkpoint's identity, are kept.
  Any other trainable is float32, even one initialised from a bfloat16 embedding.
  `release`: the frozen weights are the run's own (read from a path), so each unrolled layer
  is freed as it is stacked (`stack_layers`): the weights are held once, not twice."""
  config, bb = ctx.config, ctx.backbone
  module = bb.module.clone(remat_policy=config.remat_policy, scan_layers=config.scan_layers)
  params = model_layout.cast_frozen(bb.params, config.param_dtype)
  if not method.trains_backbone:
    trainable = model_layout.cast_frozen(trainable, 'float32')
  if config.scan_layers:
    params = model_layout.stack_layers(params, release=release and not method.trains_backbone)
    if method.trains_backbone:
      trainable = model_layout.stack_layers(trainable)
  bb = dataclasses.replace(bb, module=module, params=params)
  return dataclasses.replace(ctx, backbone=bb), trainable


def _train(method: Method, ctx: Context, model_dir: str, eng, state, validation, extras,
           dropout_rng, is_writer: bool) -> TuneResult:
  """The loop and the products of a prepared run (the run directory is held)."""
  config, bb, task = ctx.config, ctx.backbone, ctx.task

  def batches(start: int):
    return TrainBatches(task, config, model_dir, start, with_task_index=method.uses_task_index)

  product_meta = dict(backbone=bb.name, backbone_fingerprint=bb.fingerprint, task=task,
                      tasks=list(ctx.tasks),
                      init=f'from {config.init_from}' if config.init_from else config.prompt_init,
                      position=config.prompt_position, t5_config=bb.module.config.to_dict(),
                      **method.product_metadata(ctx))
  best_stem = os.path.join(model_dir, 'model_best' if method.trains_backbone else 'prompt_best')
  scanned_trainable = method.trains_backbone and bb.module.scan_layers

  def product(trainable):  # a trained backbone is saved unrolled, as every reader expects
    return model_layout.unstack_layers(trainable) if scanned_trainable else trainable
  best_path: list[str] = []

  def on_best(trainable, step, metrics):
    if is_writer:
      best_path[:] = [method.save_product(product(trainable), extras, best_stem,
                                          dict(product_meta, step=step, metrics=metrics))]

  result = loop.train_loop(
      eng.train_step, state, eng.frozen, batches, dropout_rng, model_dir,
      loop.LoopConfig(train_steps=config.train_steps, eval_period=config.eval_period,
                      log_period=config.log_period, keep_checkpoints=config.keep_checkpoints,
                      metric=config.metric, higher_is_better=config.higher_is_better,
                      patience=config.patience, max_norm_growth=config.max_norm_growth,
                      progress=config.progress, writer=is_writer),
      evaluate=validation, on_best=on_best, put_batch=eng.put_batch,
      on_validation=((lambda trainable, step, metrics: method.after_validation(
          trainable, extras, step, metrics, model_dir, ctx)) if is_writer else None))

  final_metrics = result.evals[-1] if result.evals else None
  if not best_path and result.best_step is not None:
    best_path = [best_stem + ('' if method.trains_backbone else '.safetensors')]
  summary = dict(step=result.step, train_steps=config.train_steps, best_step=result.best_step,
                 best_metrics=result.best_metrics,
                 initial_metrics=result.evals[0] if result.evals else None,
                 final_metrics=final_metrics, stopped_early=result.stopped_early)

  def write_products() -> str | None:
    path = None
    if not method.trains_backbone:
      path = method.save_product(result.state.trainable, extras,
                                 os.path.join(model_dir, 'prompt_final'),
                                 dict(product_meta, step=result.step, metrics=final_metrics))
    with open(os.path.join(model_dir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=float)
    return path

  # Process 0 writes; every process returns once the products exist (a caller reads them).
  final_path = agreement.by_writer(f'{model_dir}: the products of the run', write_products,
                                   share=True)
  best = best_path[0] if best_path else None
  return TuneResult(model_dir, result.step, result.best_step, result.best_metrics,
                    summary['initial_metrics'], final_metrics, final_path,
                    None if method.trains_backbone else best, result.plot,
                    product(result.state.trainable), best if method.trains_backbone else None, bb,
                    result.state.opt_state)


class TrainBatches:
  """This host's share of the run's training batches, from position `start` on.

  Every host reads its rows of the same deterministic stream of *global* batches (seed, task,
  lengths; `get_dataset` with the process index and count tokenises only those rows), so a
  global batch never depends on the number of hosts: 2 processes x 1 device see exactly the
  batches of 1 process x 2 devices. The pipeline's position is saved beside each checkpoint
  (`save`), and a resumed run restores it instead of replaying every batch consumed so far;
  without a usable saved position (none, or saved by another number of processes) it replays
  (and says so).
  """

  def __init__(self, task: str, config: RunConfig, model_dir: str, start: int,
               with_task_index: bool = False):
    from jaxprompt.data.features import PositionMismatch, get_dataset
    self.model_dir = model_dir
    self.index, count = jax.process_index(), jax.process_count()
    self._it = get_dataset(task, config.feature_lengths, 'train', config.batch_size,
                           shuffle=True, seed=config.seed, num_epochs=None,
                           with_task_index=with_task_index, process_index=self.index,
                           process_count=count)
    if start:
      saved = checkpointing.data_state_path(model_dir, start, self.index)
      why = f'no saved data position for step {start}'
      if checkpointing.data_state_exists(saved):
        try:
          self._it.restore(saved)
          return
        except PositionMismatch as e:
          why = str(e)
      import sys
      print(f'resume: {why}; replaying {start} batches', file=sys.stderr)
      for _ in range(start):
        next(self._it)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    from jaxprompt.data.features import EXAMPLE_MASK
    return {k: v for k, v in next(self._it).items() if k != EXAMPLE_MASK}

  def save(self, step: int) -> None:
    """Saves the position after `step` batches (called by the loop with each checkpoint)."""
    self._it.save(checkpointing.data_state_path(self.model_dir, step, self.index))

