"""The one evaluation path: validation, `jaxprompt eval`, the lab reports and the notebooks.

Examples come from the data layer's own feature conversion (`get_dataset`, in order, every
example once, the last batch padded and masked), are read once and kept in memory. Scoring
runs on the engine's mesh with the training placement, jitted once per shape: rank
classification over the task's label verbalizers, greedy decoding with the KV cache, or beam
search; predictions are postprocessed by the task and fed to its metric functions, and the
teacher-forced loss comes along. A mixture is evaluated task by task and macro-averaged.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxprompt import host as _host

_host.import_quietly('seqio')  # TensorFlow's native libraries print as they load
import seqio  # noqa: E402

from jaxprompt.config import EVAL_MODES
from jaxprompt.model import decoding
from jaxprompt.train.steps import LossConfig, make_eval_step

LOSS_METRICS = ('loss_per_token', 'token_accuracy')


def primary_score(metrics: dict[str, float]) -> float:
  """The task's first metric: what `metric='score'` selects on."""
  if 'score' in metrics:
    return metrics['score']
  return next(v for k, v in metrics.items() if k not in LOSS_METRICS)


@dataclasses.dataclass
class EvalData:
  """One split of one task, tokenised by the data layer, in order, in memory."""

  batches: list[dict[str, np.ndarray]]  # each with `example_mask`
  raw: list[dict[str, Any]]  # the preprocessed examples, for the task's postprocess_fn
  truncated: int

  @property
  def num_examples(self) -> int:
    return len(self.raw)


def load_eval_data(task: str, split: str, feature_lengths: dict[str, int], batch_size: int,
                   max_examples: int | None = None) -> EvalData:
  """The examples of `split` as padded batches (same order as `eval_examples`)."""
  from jaxprompt.data.evaluation import eval_examples
  from jaxprompt.data.features import EXAMPLE_MASK, get_dataset
  raw = eval_examples(task, split, try_in_mem_cache=False)[:max_examples]
  if not raw:
    raise ValueError(f'task {task}: split {split!r} has no examples')
  it = get_dataset(task, feature_lengths, split, batch_size, shuffle=False, num_epochs=1,
                   try_in_mem_cache=False)
  batches, seen = [], 0
  for batch in it:
    keep = np.arange(batch_size) < len(raw) - seen
    batch[EXAMPLE_MASK] = batch[EXAMPLE_MASK] * keep
    batch['decoder_loss_weights'] = batch['decoder_loss_weights'] * keep[:, None]
    batches.append(batch)
    seen += int(keep.sum())
    if seen >= len(raw):
      break
  return EvalData(batches, raw, it.truncation.inputs_truncated + it.truncation.targets_truncated)


def label_names(task: seqio.Task) -> list[str] | None:
  """The task's label verbalizers, if it is a classification task."""
  from jaxprompt.data import tasks as data_tasks
  names = data_tasks.label_names(task.name)
  if names is None and hasattr(task, 'labels'):
    names = task.labels
  return list(names) if names else None


def _pad_rows(seqs: Sequence[Sequence[int]]) -> np.ndarray:
  out = np.zeros((len(seqs), max(len(s) for s in seqs)), np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return out


class Predicting:
  """The predicting half of evaluation, shared by validation, `jaxprompt eval` and `jaxprompt
  infer`: one jitted program per batch shape on the engine's mesh that turns token batches into
  label log-likelihoods (rank classification), greedy generations (KV cache) or beam search's
  best beam, and those outputs into texts.

  Args:
    engine: the `jaxprompt.train.engine.Engine` (module, mesh, frozen tree, batch placement).
    inputs: the method's evaluation mapping `(trainable, frozen, batch) -> (params, prompt)`.
    vocab: the tokenizer generations are decoded with.
    labels: the label verbalizers rank classification scores (None: generation only).
    mode: 'rank', 'greedy' or 'beam'.
    batch_extras: constant batch entries (e.g. `task_index` for a prompt stack).
    ensemble: the prompt is a stack [n, P, d] of prompts for one task; every example runs
      with each of them in one batch and the n predictions vote (ties go to the earlier row).

  A batch holds `encoder_input_tokens` [B, L], `example_mask` [B] and `decoder_target_tokens`
  [B, T] (its width is the number of output steps decoded; its values are not read), plus what
  the method's mapping reads (`task_index` for a stack).
  """

  def __init__(self, engine, inputs: Callable, vocab, labels: Sequence[str] | None, mode: str,
               *, prompt_position: int = 0, batch_extras: dict[str, Any] | None = None,
               ensemble: bool = False, num_beams: int = 4):
    if mode not in ('rank', 'greedy', 'beam'):
      raise ValueError(f'prediction mode {mode!r}: choose rank, greedy or beam')
    if mode == 'rank' and not labels:
      raise ValueError('rank classification needs label verbalizers; use greedy decoding')
    self.engine, self.inputs, self.vocab, self.mode = engine, inputs, vocab, mode
    self.labels = list(labels) if labels else None
    self.prompt_position, self.num_beams, self.ensemble = prompt_position, num_beams, ensemble
    self.batch_extras = batch_extras or {}
    self.label_tokens = None
    if self.labels:
      self.label_tokens = jnp.asarray(_pad_rows(
          [list(vocab.encode(label)) + [vocab.eos_id] for label in self.labels]))

  def with_extras(self, batch_extras: dict[str, Any]) -> 'Predicting':
    """The same program with other constant batch entries (another row of a prompt stack)."""
    self._program  # noqa: B018 - built once here, so every copy shares it
    other = copy.copy(self)
    other.batch_extras = dict(batch_extras)
    return other

  def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    from jaxprompt.data.features import EXAMPLE_MASK
    size = len(batch[EXAMPLE_MASK])
    out = {k: v for k, v in batch.items() if k != EXAMPLE_MASK}
    for k, v in self.batch_extras.items():
      out[k] = np.full((size,) + np.shape(v), v)
    return self.engine.put_full_batch(out)

  @functools.cached_property
  def _program(self):
    module, position, mode = self.engine.module, self.prompt_position, self.mode
    inputs, ensemble, num_beams = self.inputs, self.ensemble, self.num_beams

    def predict(trainable, frozen, batch, label_tokens):
      params, prompt = inputs(trainable, frozen, batch)
      tokens = batch['encoder_input_tokens']
      max_len = batch['decoder_target_tokens'].shape[1]
      if ensemble:  # [B, L] x [n, P, d] -> rows b * n + i run example b with prompt i
        n = prompt.shape[0]
        tokens = jnp.repeat(tokens, n, axis=0)
        prompt = jnp.tile(prompt, (batch['encoder_input_tokens'].shape[0], 1, 1))
      if mode == 'rank':
        return decoding.rank_classify(module, params, tokens, label_tokens, prompt, position)
      if mode == 'beam':
        seqs, scores = decoding.beam_search(module, params, tokens, max_len, num_beams,
                                            prompt=prompt, prompt_position=position)
        return seqs[:, 0], scores[:, 0]
      return decoding.greedy_decode(module, params, tokens, max_len, prompt, position)

    return self.engine.jit(predict)

  def outputs(self, trainable, batch: dict[str, np.ndarray]):
    """The program's host outputs for one batch: label log-likelihoods [B, C] (rank), tokens
    [B, T] (greedy), or (tokens [B, T], scores [B]) (beam); an ensemble has n rows per example."""
    return jax.device_get(self._program(trainable, self.engine.frozen, self.device_batch(batch),
                                        self.label_tokens))

  def texts(self, outputs, size: int) -> list[str]:
    """One text per example of a batch of `size` rows (label verbalizers or decoded tokens)."""
    if self.mode == 'rank':
      texts = [self.labels[int(p)] for p in np.argmax(np.asarray(outputs), axis=-1)]
    else:
      tokens = outputs[0] if self.mode == 'beam' else outputs
      texts = [self.decode(p) for p in np.asarray(tokens)]
    if self.ensemble:
      n = len(texts) // size
      texts = [collections.Counter(texts[b * n:(b + 1) * n]).most_common(1)[0][0]
               for b in range(size)]
    return texts

  def decode(self, tokens: np.ndarray) -> str:
    tokens = list(tokens)
    if self.vocab.eos_id in tokens:
      tokens = tokens[:tokens.index(self.vocab.eos_id)]
    return self.vocab.decode([int(t) for t in tokens if t > 0])


class Evaluator:
  """`evaluator(trainable) -> {metric: value}` for one task split, on the engine's mesh.

  Args:
    engine: the `jaxprompt.train.engine.Engine` (module, mesh, frozen tree, batch placement).
    inputs: the method's evaluation mapping `(trainable, frozen, batch) -> (params, prompt)`.
    task: a registered seqio task.
    data: from `load_eval_data`.
    mode: 'rank' (label verbalizers), 'greedy', 'beam', or 'auto' (rank when the task has
      labels, else greedy).
    batch_extras: constant batch entries (e.g. `task_index` for a prompt stack).
    ensemble: see `Predicting`.
  """

  def __init__(self, engine, inputs: Callable, task: str, data: EvalData, mode: str = 'auto',
               *, prompt_position: int = 0, loss: LossConfig = LossConfig(),
               batch_extras: dict[str, Any] | None = None, ensemble: bool = False,
               num_beams: int = 4):
    if mode not in EVAL_MODES:
      raise ValueError(f'evaluation mode {mode!r}: choose one of {EVAL_MODES}')
    self.engine, self.inputs, self.data = engine, inputs, data
    self.task = seqio.get_mixture_or_task(task)
    self.labels = label_names(self.task)
    self.mode = ('rank' if self.labels else 'greedy') if mode == 'auto' else mode
    if self.mode == 'rank' and not self.labels:
      raise ValueError(f'task {self.task.name} has no label verbalizers; use greedy decoding')
    self.ensemble = ensemble
    self.predicting = Predicting(engine, inputs, self.task.output_features['targets'].vocabulary,
                                 self.labels, self.mode, prompt_position=prompt_position,
                                 batch_extras=batch_extras, ensemble=ensemble,
                                 num_beams=num_beams)
    self._loss_step = None if ensemble else engine.jit(
        make_eval_step(engine.module, inputs, loss, prompt_position))

  def with_extras(self, batch_extras: dict[str, Any]) -> 'Evaluator':
    """The same evaluation with other constant batch entries (another row of a prompt stack),
    sharing this one's data and compiled programs."""
    other = copy.copy(self)
    other.predicting = self.predicting.with_extras(batch_extras)
    return other

  def predictions(self, trainable) -> list[str]:
    """Predicted texts (label verbalizers or decoded generations), one per example, in order."""
    from jaxprompt.data.features import EXAMPLE_MASK
    out: list[str] = []
    for batch in self.data.batches:
      texts = self.predicting.texts(self.predicting.outputs(trainable, batch),
                                    len(batch[EXAMPLE_MASK]))
      out.extend(t for t, keep in zip(texts, batch[EXAMPLE_MASK]) if keep)
    return out

  def __call__(self, trainable) -> dict[str, float]:
    from jaxprompt.data.evaluation import compute_metrics
    texts = self.predictions(trainable)
    metrics = {k: float(v) for k, v in
               compute_metrics(self.task.name, self.data.raw, texts, self.task).items()}
    if self._loss_step is not None:
      sums = {'loss': 0.0, 'weight_sum': 0.0, 'num_correct': 0.0}
      for batch in self.data.batches:
        m = jax.device_get(self._loss_step(trainable, self.engine.frozen,
                                           self.predicting.device_batch(batch)))
        for k in sums:
          sums[k] += float(m[k])
      metrics['loss_per_token'] = sums['loss'] / max(sums['weight_sum'], 1e-9)
      metrics['token_accuracy'] = 100.0 * sums['num_correct'] / max(sums['weight_sum'], 1e-9)
    return metrics


class Validation:
  """Every task of a run (one, or each member of a mixture): `validation(trainable)` gives
  the task's metrics plus 'score' (its first metric); for several tasks, `TASK/metric` for
  each and their macro-averaged 'score' and loss."""

  def __init__(self, evaluators: dict[str, Evaluator]):
    self.evaluators = evaluators

  def __call__(self, trainable) -> dict[str, float]:
    per_task = {name: ev(trainable) for name, ev in self.evaluators.items()}
    if len(per_task) == 1:
      (metrics,) = per_task.values()
      return {'score': primary_score(metrics), **metrics}
    out = {'score': float(np.mean([primary_score(m) for m in per_task.values()]))}
    losses = [m['loss_per_token'] for m in per_task.values() if 'loss_per_token' in m]
    if losses:
      out['loss_per_token'] = float(np.mean(losses))
    for name, metrics in per_task.items():
      out.update({f'{name}/{k}': v for k, v in metrics.items()})
    return out


def build_validation(engine, method, tasks: Sequence[str], split: str,
                     feature_lengths: dict[str, int], batch_size: int, mode: str = 'auto',
                     max_examples: int | None = None, prompt_position: int = 0,
                     loss: LossConfig = LossConfig()) -> Validation:
  """A `Validation` of `method`'s trainable on each of `tasks` (task i uses the method's
  `eval_extras(i)`, e.g. its row of a prompt stack)."""
  size = engine.data_parallel_size
  batch_size = -(-batch_size // size) * size  # a multiple of the data axis
  evaluators = {}
  for i, task in enumerate(tasks):
    data = load_eval_data(task, split, feature_lengths, batch_size, max_examples)
    evaluators[task] = Evaluator(engine, method.eval_inputs, task, data, mode,
                                 prompt_position=prompt_position, loss=loss,
                                 batch_extras=method.eval_extras(i), ensemble=method.ensemble)
  return Validation(evaluators)
