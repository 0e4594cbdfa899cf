"""The main job: tune a soft prompt for a frozen T5 on a seqio task (or tune the whole model).

    >>> import jaxprompt
    >>> result = jaxprompt.tune('my_task', backbone='path/to/checkpoint', model_dir='runs/x',
    ...                         prompt_length=20, train_steps=1000)        # doctest: +SKIP
    >>> result.best_metrics, result.prompt_path                            # doctest: +SKIP

`tune` is a plain function of plain arguments; gin binds it at the entry points
(`jaxprompt tune`, `python -m jaxprompt.train`), never inside the library.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import sys
from typing import Any, Mapping

import jax
import numpy as np
import optax
import seqio

from jaxprompt import __version__
from jaxprompt.model import T5Config, Transformer
from jaxprompt.prompts import initializers, prompt as prompt_lib
from jaxprompt.prompts.files import check_compatible, read_prompt, write_prompt
from jaxprompt.train import checkpointing, engine as engine_lib, evaluation, loop, steps
from jaxprompt.train.optimizers import t5x_adafactor

METHODS = {
    'prompt_tuning': steps.prompt_inputs,
    'model_tuning': steps.model_tuning_inputs,
}
PROMPT_INITS = ('uniform', 'uniform_positive', 'sampled_vocab', 'class_labels', 'text', 'file')


@dataclasses.dataclass
class TuneResult:
  """What a run produced (paths are inside `model_dir`)."""

  model_dir: str
  step: int
  best_step: int | None
  best_metrics: dict[str, float] | None
  initial_metrics: dict[str, float] | None
  final_metrics: dict[str, float] | None
  prompt_path: str | None
  best_prompt_path: str | None
  plot_path: str | None
  trainable: Any = dataclasses.field(repr=False, default=None)
  best_model_path: str | None = None  # model tuning: a T5X checkpoint of the best weights


def load_backbone(backbone, config: T5Config | str | None = None,
                  dropout_rate: float | None = None) -> tuple[Transformer, Any, str]:
  """`backbone` is a checkpoint path or a `(module, params)` pair -> (module, params, name)."""
  if isinstance(backbone, (tuple, list)):
    module, params = backbone
    name = 'in-memory'
  else:
    from jaxprompt.checkpoints import load_t5
    module, params = load_t5(str(backbone), config=config)
    name = os.path.abspath(str(backbone)) if '://' not in str(backbone) else str(backbone)
  if dropout_rate is not None and dropout_rate != module.config.dropout_rate:
    module = Transformer(module.config.replace(dropout_rate=dropout_rate))
  return module, params, name


def make_prompt_init(kind: str, embedding, vocabulary: seqio.Vocabulary | None,
                     labels: list[str] | None = None, scale: float = 0.5, text: str | None = None,
                     file: str | None = None, population: int = 5000,
                     backbone: str | None = None):
  """An initialiser by name (see `jaxprompt.prompts.initializers`)."""
  if kind == 'uniform':
    return initializers.uniform(scale, symmetric=True)
  if kind == 'uniform_positive':
    return initializers.uniform(scale, symmetric=False)
  if kind == 'sampled_vocab':
    return initializers.sampled_vocab(embedding, population)
  if kind == 'class_labels':
    if not labels:
      print('prompt init: the task has no label verbalizers; using sampled vocabulary',
            file=sys.stderr)
      return initializers.sampled_vocab(embedding, population)
    ids = [list(vocabulary.encode(label)) for label in labels]
    return initializers.class_labels(embedding, ids, initializers.sampled_vocab(embedding,
                                                                                population))
  if kind == 'text':
    if not text:
      raise ValueError("prompt init 'text' needs the text (--prompt_init_text)")
    return initializers.text(embedding, list(vocabulary.encode(text)))
  if kind == 'file':
    if not file:
      raise ValueError("prompt init 'file' needs a prompt file (--prompt_init_file)")
    pf = read_prompt(file)
    check_compatible(pf, embedding.shape[-1], backbone, path=file)
    return initializers.from_array(pf.masked_value())
  raise ValueError(f'unknown prompt init {kind!r}; choose one of {PROMPT_INITS}')


def _task_labels(task_name: str) -> list[str] | None:
  from jaxprompt.data.tasks import label_names
  names = label_names(task_name)
  return list(names) if names else None


def tune(task: str, *, backbone, model_dir: str, method: str = 'prompt_tuning',
         config: T5Config | str | None = None, prompt_length: int = 100,
         prompt_init: str = 'class_labels', prompt_init_scale: float = 0.5,
         prompt_init_text: str | None = None, prompt_init_file: str | None = None,
         prompt_position: str = 'prefix', train_steps: int = 30000, batch_size: int = 32,
         learning_rate: float | None = None, weight_decay: float = 1e-5,
         feature_lengths: Mapping[str, int] | None = None, eval_period: int = 1000,
         log_period: int = 10, eval_split: str = 'validation', eval_mode: str = 'auto',
         eval_batch_size: int | None = None, max_eval_examples: int | None = None,
         metric: str = 'score', higher_is_better: bool = True, patience: int | None = None,
         seed: int = 0, num_partitions: int = 1, dropout_rate: float | None = None,
         z_loss: float = 1e-4, label_smoothing: float = 0.0,
         loss_normalizing_factor: float | None = None, resume: bool = True,
         progress: bool = True, keep_checkpoints: int = 2,
         optimizer: optax.GradientTransformation | None = None,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> TuneResult:
  """Tunes a soft prompt (or, with `method='model_tuning'`, every weight) on `task`.

  Args:
    task: a registered seqio task or mixture name.
    backbone: checkpoint path (T5X legacy / Orbax / HF) or a `(module, params)` pair.
    model_dir: the run directory; an existing one is resumed if it holds this run.
    method: 'prompt_tuning' or 'model_tuning'.
    config: T5 config (or name) when the checkpoint cannot say.
    prompt_length: P.
    prompt_init: 'class_labels' (paper), 'sampled_vocab', 'uniform' (U[-s, s]),
      'uniform_positive' (U[0, s)), 'text' or 'file'.
    prompt_position: 'prefix', 'prefix_after_bos' or 'suffix'.
    learning_rate: 0.3 for prompts, 1e-3 for model tuning by default.
    feature_lengths: {'inputs': text budget, 'targets': ...}; the encoder sees P + inputs.
    eval_period: steps between validation runs (and checkpoints).
    metric: validation metric selecting the best checkpoint; 'score' is the task's first
      metric. `patience` evaluations without improvement stop the run (early stopping).
    num_partitions: size of the model-parallel mesh axis.
    optimizer: replaces the default T5X Adafactor (lr, weight decay above then unused).
    coordinator_address, num_processes, process_id: multi-host runs (`jax.distributed`);
      each host then reads its own shard of the training data.
  """
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; choose one of {sorted(METHODS)}')
  feature_lengths = dict(feature_lengths or {'inputs': 256, 'targets': 16})
  from jaxprompt.train.partitioning import initialize_distributed
  initialize_distributed(coordinator_address, num_processes, process_id)
  module, params, backbone_name = load_backbone(backbone, config, dropout_rate)
  cfg = module.config
  seqio_task = seqio.get_mixture_or_task(task)
  eval_task_name = seqio_task.tasks[0].name if isinstance(seqio_task, seqio.Mixture) else task
  eval_task = seqio.get_mixture_or_task(eval_task_name)
  vocab = eval_task.output_features['targets'].vocabulary
  labels = _task_labels(eval_task_name)
  is_prompt = method != 'model_tuning'
  prompt_length = prompt_length if is_prompt else 0
  position = prompt_lib.position_index(prompt_position)

  manifest = dict(
      method=method, backbone=backbone_name, task=task, prompt_length=prompt_length, seed=seed,
      batch_size=batch_size, t5_config=cfg.to_dict(), prompt_init=prompt_init if is_prompt else None,
      prompt_position=prompt_position, train_steps=train_steps, feature_lengths=feature_lengths,
      learning_rate=learning_rate, jaxprompt_version=__version__)
  checkpointing.prepare_run_dir(model_dir, manifest, resume=resume)

  rng = jax.random.PRNGKey(seed)
  init_rng, dropout_rng = jax.random.split(rng)
  if is_prompt:
    embedding = np.asarray(params['token_embedder']['embedding'])
    init_fn = make_prompt_init(prompt_init, embedding, vocab, labels, prompt_init_scale,
                               prompt_init_text, prompt_init_file, backbone=backbone_name)
    trainable = prompt_lib.init_prompt(init_rng, prompt_length, cfg.emb_dim, init_fn)
    frozen = {'backbone': params}
    tx = t5x_adafactor(learning_rate=0.3 if learning_rate is None else learning_rate,
                       weight_decay_rate=weight_decay)
  else:
    trainable, frozen = params, {}
    tx = t5x_adafactor(learning_rate=1e-3 if learning_rate is None else learning_rate,
                       weight_decay_rate=None)
  tx = optimizer or tx
  model_inputs = METHODS[method]
  loss = steps.LossConfig(z_loss, label_smoothing, loss_normalizing_factor)
  eng, state = engine_lib.build_engine(
      module, model_inputs, tx, frozen, trainable, loss=loss, prompt_position=position,
      num_partitions=num_partitions, trainable_is_backbone=not is_prompt)

  examples = evaluation.load_examples(eval_task, eval_split, feature_lengths, max_eval_examples)
  evaluator = evaluation.Evaluator(module, eng.frozen, model_inputs, eval_task, examples,
                                   eval_batch_size or batch_size, eval_mode, position,
                                   eng.eval_step)

  def evaluate(trainable):
    metrics = evaluator(trainable)
    first = next(k for k in metrics if k not in ('loss_per_token', 'token_accuracy'))
    return {'score': metrics[first], **metrics}

  shard_id, num_shards = jax.process_index(), jax.process_count()

  def batches(position_: int):
    from jaxprompt.data.features import get_dataset
    it = get_dataset(task, feature_lengths, 'train', batch_size // num_shards, shuffle=True,
                     seed=seed, num_epochs=None, shard_id=shard_id, num_shards=num_shards)
    strip = lambda b: {k: v for k, v in b.items() if k != 'example_mask'}  # noqa: E731
    return map(strip, itertools.islice(it, position_, None))

  prompt_meta = dict(backbone=backbone_name, task=task, method=method, init=prompt_init,
                     position=prompt_position)
  best_path = os.path.join(model_dir, 'prompt_best.safetensors')

  best_model_dir = os.path.join(model_dir, 'model_best')

  def on_best(trainable, step, metrics):
    if is_prompt:
      value = np.asarray(jax.device_get(prompt_lib.get_prompt(trainable)))
      write_prompt(best_path, value, overwrite=True, step=step, metrics=metrics, **prompt_meta)
      write_prompt(best_path.replace('.safetensors', '.npy'), value, overwrite=True)
    elif jax.process_index() == 0:
      # Model tuning's product is a whole model: a T5X (Orbax) checkpoint that load_t5 reads.
      from jaxprompt.checkpoints import save_t5x_orbax
      shutil.rmtree(best_model_dir, ignore_errors=True)
      save_t5x_orbax(jax.device_get(trainable), best_model_dir, step)
      with open(os.path.join(best_model_dir, 'config.json'), 'w') as f:
        json.dump({'t5x_T5Config': cfg.to_dict(), 'metrics': metrics}, f, indent=1)

  result = loop.train_loop(
      eng.train_step, state, eng.frozen, batches, dropout_rng, model_dir,
      loop.LoopConfig(train_steps=train_steps, eval_period=eval_period, log_period=log_period,
                      keep_checkpoints=keep_checkpoints, metric=metric,
                      higher_is_better=higher_is_better, patience=patience, progress=progress),
      evaluate=evaluate, on_best=on_best, put_batch=eng.put_batch)

  final_metrics = result.evals[-1] if result.evals else None
  prompt_path = None
  if is_prompt:
    prompt_path = os.path.join(model_dir, 'prompt_final.safetensors')
    value = np.asarray(jax.device_get(prompt_lib.get_prompt(result.state.trainable)))
    write_prompt(prompt_path, value, overwrite=True, step=result.step, metrics=final_metrics,
                 **prompt_meta)
    write_prompt(prompt_path.replace('.safetensors', '.npy'), value, overwrite=True)
  summary = dict(step=result.step, best_step=result.best_step, best_metrics=result.best_metrics,
                 initial_metrics=result.evals[0] if result.evals else None,
                 final_metrics=final_metrics, stopped_early=result.stopped_early)
  with open(os.path.join(model_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=float)
  return TuneResult(model_dir, result.step, result.best_step, result.best_metrics,
                    summary['initial_metrics'], final_metrics, prompt_path,
                    best_path if is_prompt and result.best_step is not None else None,
                    result.plot, result.state.trainable,
                    None if is_prompt or result.best_step is None else best_model_dir)
