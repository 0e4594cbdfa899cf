"""Validation and test evaluation of a trainable on a seqio task.

Three ways to score: rank classification over the task's label verbalizers (the
fast exact path for classification), greedy decoding with the KV cache, and beam
search. Predictions are postprocessed by the task and fed to its metric functions;
teacher-forced loss metrics come along. Each path is one jitted program per shape.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from jaxprompt.model import Transformer, decoding
from jaxprompt.train.steps import ModelInputs

MODES = ('auto', 'rank', 'greedy', 'beam')


@dataclasses.dataclass
class EvalExamples:
  """Padded, tokenised examples of one split, kept in memory (validation sets are small)."""

  inputs: np.ndarray  # [N, Li] int32
  targets: np.ndarray  # [N, Lt] int32, EOS-terminated
  raw: list[dict[str, Any]]  # the preprocessed examples, for the task's postprocess_fn
  truncated_inputs: int = 0
  truncated_targets: int = 0


def _pad(seqs: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, int]:
  out = np.zeros((len(seqs), length), np.int32)
  truncated = 0
  for i, s in enumerate(seqs):
    if len(s) > length:
      truncated += 1
      s = np.concatenate([s[:length - 1], s[-1:]])  # keep the EOS
    out[i, :len(s)] = s
  return out, truncated


def load_examples(task: seqio.Task | str, split: str, feature_lengths: dict[str, int],
                  max_examples: int | None = None) -> EvalExamples:
  """Tokenised examples of `split`, in order, with truncation counted (never silent)."""
  from jaxprompt.data.evaluation import eval_examples
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  raw = eval_examples(task.name, split, try_in_mem_cache=False)[:max_examples]
  if not raw:
    raise ValueError(f'task {task.name}: split {split!r} has no examples')
  inputs, ti = _pad([r['inputs'] for r in raw], feature_lengths['inputs'])
  targets, tt = _pad([r['targets'] for r in raw], feature_lengths['targets'])
  if ti or tt:
    import warnings
    warnings.warn(f'task {task.name} {split}: {ti} of {len(raw)} inputs and {tt} targets were '
                  f'truncated to {feature_lengths}; raise the feature lengths to keep them',
                  stacklevel=2)
  return EvalExamples(inputs, targets, raw, ti, tt)


def label_names(task: seqio.Task) -> list[str] | None:
  """The task's label verbalizers, if it is a classification task."""
  from jaxprompt.data import tasks as data_tasks
  names = data_tasks.label_names(task.name)
  if names is None and hasattr(task, 'labels'):
    names = task.labels
  return list(names) if names else None


class Evaluator:
  """`evaluator(trainable) -> {metric: value}` for one task split.

  Args:
    module: the T5.
    frozen: the frozen tree as placed by the engine.
    model_inputs: the method's mapping `(trainable, frozen, batch) -> (params, prompt)`.
    task: seqio task (or name).
    examples: from `load_examples`.
    batch_size: eval batch size (the last batch is padded and its padding ignored).
    mode: 'rank' (label verbalizers), 'greedy', 'beam', or 'auto' (rank when the task has
      labels, else greedy).
    prompt_position: where the prompt enters.
    eval_step: the engine's teacher-forced eval step, for loss metrics (optional).
    batch_extras: constant batch entries (e.g. `task_index` for prompt stacks).
    ensemble: the prompt is a stack [n, P, d] of prompts for this one task; every example runs
      with each of them in one batch and the n predictions vote (ties go to the earlier prompt).
  """

  def __init__(self, module: Transformer, frozen, model_inputs: ModelInputs,
               task: seqio.Task | str, examples: EvalExamples, batch_size: int = 32,
               mode: str = 'auto', prompt_position: int = 0, eval_step: Callable | None = None,
               num_beams: int = 4, batch_extras: dict[str, Any] | None = None,
               ensemble: bool = False):
    if mode not in MODES:
      raise ValueError(f'evaluation mode {mode!r}: choose one of {MODES}')
    self.task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
    self.module, self.frozen, self.model_inputs = module, frozen, model_inputs
    self.examples, self.batch_size = examples, batch_size
    self.prompt_position, self.eval_step, self.num_beams = prompt_position, eval_step, num_beams
    self.batch_extras = batch_extras or {}
    self.ensemble = ensemble
    self.labels = label_names(self.task)
    self.mode = ('rank' if self.labels else 'greedy') if mode == 'auto' else mode
    if self.mode == 'rank' and not self.labels:
      raise ValueError(f'task {self.task.name} has no label verbalizers; use greedy decoding')
    vocab = self.task.output_features['targets'].vocabulary
    self.vocab = vocab
    if self.labels:
      ids = [list(vocab.encode(label)) + [vocab.eos_id] for label in self.labels]
      self.label_tokens = _pad([np.asarray(i) for i in ids], max(len(i) for i in ids))[0]

  def _batches(self):
    n = len(self.examples.inputs)
    for start in range(0, n, self.batch_size):
      idx = np.arange(start, min(start + self.batch_size, n))
      pad = self.batch_size - len(idx)
      take = np.concatenate([idx, np.zeros(pad, np.int64)]) if pad else idx
      targets = self.examples.targets[take]
      batch = {
          'encoder_input_tokens': self.examples.inputs[take],
          'decoder_target_tokens': targets,
          'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          'decoder_loss_weights': (targets > 0).astype(np.float32) *
                                  (np.arange(len(take)) < len(idx))[:, None],
      }
      for k, v in self.batch_extras.items():
        batch[k] = np.full((len(take),) + np.shape(v), v)
      yield idx, batch

  @functools.cached_property
  def _predict(self):
    module, position = self.module, self.prompt_position
    max_len = self.examples.targets.shape[1]

    def predict(trainable, frozen, batch, label_tokens):
      params, prompt = self.model_inputs(trainable, frozen, batch)
      tokens = batch['encoder_input_tokens']
      if self.ensemble:  # [B, L] x [n, P, d] -> rows b * n + i run example b with prompt i
        n = prompt.shape[0]
        tokens = jnp.repeat(tokens, n, axis=0)
        prompt = jnp.tile(prompt, (batch['encoder_input_tokens'].shape[0], 1, 1))
      if self.mode == 'rank':
        return jnp.argmax(decoding.rank_classify(module, params, tokens, label_tokens, prompt,
                                                 position), axis=-1)
      if self.mode == 'beam':
        return decoding.beam_search(module, params, tokens, max_len, self.num_beams,
                                    prompt=prompt, prompt_position=position)[0][:, 0]
      return decoding.greedy_decode(module, params, tokens, max_len, prompt, position)

    return jax.jit(predict)

  def predictions(self, trainable) -> list[str]:
    """Predicted texts (label verbalizers or decoded generations), one per example, in order."""
    out: list[str] = []
    label_tokens = jnp.asarray(self.label_tokens) if self.labels else None
    for idx, batch in self._batches():
      pred = np.asarray(self._predict(trainable, self.frozen, batch, label_tokens))
      texts = [self.labels[int(p)] if self.mode == 'rank' else self._decode(p) for p in pred]
      if self.ensemble:
        n = len(texts) // self.batch_size
        texts = [collections.Counter(texts[b * n:(b + 1) * n]).most_common(1)[0][0]
                 for b in range(self.batch_size)]
      out.extend(texts[:len(idx)])
    return out

  def _decode(self, tokens: np.ndarray) -> str:
    tokens = list(tokens)
    if self.vocab.eos_id in tokens:
      tokens = tokens[:tokens.index(self.vocab.eos_id)]
    return self.vocab.decode([t for t in tokens if t > 0])

  def __call__(self, trainable) -> dict[str, float]:
    from jaxprompt.data.evaluation import compute_metrics
    texts = self.predictions(trainable)
    metrics = {k: float(v) for k, v in
               compute_metrics(self.task.name, self.examples.raw, texts, self.task).items()}
    if self.eval_step is not None:
      sums = {'loss': 0.0, 'weight_sum': 0.0, 'num_correct': 0.0}
      for _, batch in self._batches():
        m = jax.device_get(self.eval_step(trainable, self.frozen, batch))
        for k in sums:
          sums[k] += float(m[k])
      metrics['loss_per_token'] = sums['loss'] / max(sums['weight_sum'], 1e-9)
      metrics['token_accuracy'] = 100.0 * sums['num_correct'] / max(sums['weight_sum'], 1e-9)
    return metrics
