"""Using a tuned prompt: predictions for new inputs (`jaxprompt infer`, `jaxprompt.infer`,
`Predictor`).

Inference is evaluation without labels: the same product loading as `jaxprompt eval`
(`evaluate.load_product`: prompt files of every method, `.npy`, PEFT adapters, model-tuned
checkpoints, ensembles, no prompt), the same engine and the same predicting program
(`train.evaluation.Predicting`: rank classification over label verbalizers, greedy decoding
with the key/value cache, beam search), one compiled program per batch shape (the last batch
is padded).

Many tasks in one batch (Lester et al. 2021's mixed-task serving): given one prompt per task
(`{task: file}` or a SPoT prompt library), the prompts are stacked [n, P, d] and every example
picks its task's row through the `prompt_stack` mapping, so one copy of the backbone and one
program serve every task. Each task's prompt is what its own method feeds the model at
evaluation, so any product whose evaluation prompt is a plain [P, d] array mixes.

Texts are tokenised as the data layer does (`data.features`): the text's pieces, EOS, cut to
`inputs_length` keeping the EOS, padded with 0. A file's text is the model's input as it is: a
task's own preprocessing (a GLUE field prefix, say) applies to `--task/--split` examples, not
to a file's rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxprompt import host as _host
from jaxprompt.prompts import prompt as prompt_lib

MODES = ('auto', 'greedy', 'beam', 'rank')
PARTIAL = '.partial'  # rows written so far; renamed to the output when every row is done
PARTIAL_STATE = '.partial.json'  # what the partial rows were computed with (for --resume)


class InferenceError(ValueError):
  """Bad inference input; the message is one line naming the file/flag and the fix."""


@dataclasses.dataclass
class Row:
  """One input: its text, its task (mixed-task inference) and its own fields, kept in the
  output."""

  text: str
  task: str | None = None
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def encode_texts(vocab, texts: Sequence[str], length: int) -> tuple[np.ndarray, int]:
  """([N, length] int32 tokens, how many texts were cut): the data layer's convention (the
  pieces, EOS; a text over budget keeps its first `length - 1` pieces and the EOS)."""
  out = np.zeros((len(texts), length), np.int32)
  cut = 0
  for i, text in enumerate(texts):
    ids = list(vocab.encode(text)) + [vocab.eos_id]
    if len(ids) > length:
      ids, cut = ids[:length - 1] + ids[-1:], cut + 1
    out[i, :len(ids)] = ids
  return out, cut


def _registered(task: str | None) -> bool:
  if not task:
    return False
  import seqio
  return task in seqio.TaskRegistry.names() or task in seqio.MixtureRegistry.names()


def _task_vocabulary(task: str):
  import seqio
  return seqio.get_mixture_or_task(task).output_features['inputs'].vocabulary


def _vocabulary(vocabulary, tasks: Sequence[str], backbone):
  """The tokenizer: given, else a registered task's, else the lab's for the lab backbone, else
  T5's."""
  if vocabulary is not None and not isinstance(vocabulary, str):
    return vocabulary
  from jaxprompt.data.vocab import get_vocabulary
  if vocabulary:
    return get_vocabulary(vocabulary)
  for task in tasks:
    if _registered(task):
      return _task_vocabulary(task)
  if isinstance(backbone, str) and (backbone == 'lab' or backbone.startswith('lab:')):
    from jaxprompt.lab.tasks import get_lab_vocabulary
    return get_lab_vocabulary()
  return get_vocabulary()


def _task_lengths(tasks: Sequence[str]) -> dict[str, int]:
  """The longest of the tasks' own feature lengths (inputs 512, targets 16 when none says)."""
  from jaxprompt.config import FALLBACK_FEATURE_LENGTHS
  from jaxprompt.data.tasks import task_defaults
  known = [task_defaults(t).get('feature_lengths') for t in tasks if _registered(t)]
  known = [k for k in known if k]
  if not known:
    return dict(FALLBACK_FEATURE_LENGTHS)
  return {key: max(k.get(key, FALLBACK_FEATURE_LENGTHS[key]) for k in known)
          for key in ('inputs', 'targets')}


def _task_prompts(prompt, library) -> dict[str, str] | None:
  """{task: prompt file} for mixed-task inference, from `{task: file}`, 'task=FILE' specs or
  a prompt library; None for a single product (or none)."""
  if library is not None:
    if prompt is not None:
      raise InferenceError('give either --library or --prompt, not both')
    from jaxprompt.methods import library as library_lib
    entries = library_lib.entries(library)
    if not entries:
      raise InferenceError(f'--library {library}: holds no prompts; add some with '
                           '`jaxprompt library add`')
    return {task: library_lib.prompt_path(library, task) for task in sorted(entries)}
  if isinstance(prompt, Mapping):
    return {str(k): str(v) for k, v in prompt.items()}
  specs = [prompt] if isinstance(prompt, str) else list(prompt or [])
  if not any('=' in s and not os.path.exists(s) for s in specs):
    return None
  out = {}
  for spec in (p for s in specs for p in s.split(',') if p):
    task, sep, path = spec.partition('=')
    if not sep or not task or not path:
      raise InferenceError(f'--prompt {spec}: give TASK=FILE pairs, e.g. '
                           'lab_has_dog=runs/a/prompt_best.safetensors,lab_has_cat=...')
    out[task] = path
  return out


class Predictor:
  """A backbone loaded once and prompts placed once, answering `predict` calls.

  Args:
    backbone: checkpoint path ('lab' for the lab's), `(module, params)` or a `Backbone`.
    prompt: what `jaxprompt eval` takes (a prompt file of any method, `.npy`, a PEFT adapter
      directory, a model-tuned checkpoint, several files as an ensemble, None or 'none' for
      the backbone alone), or one prompt per task for mixed-task batches: `{task: file}` or
      'task=FILE,task=FILE'. A prompt stack's file serves each of its tasks with its row.
    library: a SPoT prompt library directory: one prompt per task, mixed-task batches.
    mode: 'greedy', 'beam', 'rank' (label verbalizers) or 'auto' (rank when the labels are
      known: `label_names` or the tasks' own, else greedy).
    label_names: rank classification's label texts (default: the tasks' own).
    inputs_length / max_decode_length: the text budget and output steps (default: the
      longest of the tasks' own lengths, else 512 / 16).
    batch_size: rows per compiled batch (rounded up to a multiple of the data axis).
    vocabulary: a SentencePiece model path or a seqio vocabulary (default: the tasks', the
      lab's for the lab backbone, else T5's).
    config: the backbone's T5 config name when the checkpoint cannot say.
    run_config: a `RunConfig` for placement: `num_partitions`, `model_parallel_submesh`,
      `logical_axis_rules`, `param_dtype`, the activation `dtype` (None: the backbone
      config's own, as `tune` and `eval`), multi-host options.

  Example:
    >>> p = Predictor('lab', library='runs/library')                   # doctest: +SKIP
    >>> p.predict(['the dog ran', 'two cats'], task=['lab_has_dog', 'lab_count_animals'])
  """

  def __init__(self, backbone, prompt=None, *, library: str | None = None, mode: str = 'auto',
               num_beams: int = 4, label_names: Sequence[str] | None = None,
               inputs_length: int | None = None, max_decode_length: int | None = None,
               batch_size: int = 32, vocabulary=None, config=None, run_config=None,
               prompt_position: str | None = None, task: str | None = None):
    from jaxprompt import evaluate
    from jaxprompt.checkpoints.backbone import load_backbone
    from jaxprompt.config import RunConfig
    from jaxprompt.methods import get_method
    from jaxprompt.train import engine as engine_lib, evaluation, partitioning
    if mode not in MODES:
      raise InferenceError(f'--mode {mode}: choose one of {", ".join(MODES)}')
    if prompt in ('none', 'None', ['none']):
      prompt = None
    placement = run_config or RunConfig()
    partitioning.initialize_distributed(placement.coordinator_address, placement.num_processes,
                                        placement.process_id)
    mesh, rules = partitioning.mesh_from_config(placement), partitioning.rules_from_config(placement)
    per_task = _task_prompts(prompt, library)
    bb = load_backbone(backbone, config, dtype=placement.param_dtype,
                       shardings=lambda c: engine_lib.backbone_shardings_for(c, mesh, rules),
                       activation_dtype=placement.dtype)
    self.backbone = bb
    batch_extras: dict[str, Any] = {}
    if per_task is not None:
      method = get_method('prompt_stack')
      self.tasks = list(per_task)
      stack, position = self._stack(bb, per_task, prompt_position)
      trainable, extras = prompt_lib.prompt_tree(stack), {}
    else:
      single = prompt[0] if isinstance(prompt, (list, tuple)) and len(prompt) == 1 else prompt
      stack_tasks = self._stack_tasks(single)
      if stack_tasks:  # a prompt stack's file: each of its tasks with its row
        self.tasks = stack_tasks
        method, trainable, extras, position = evaluate.load_product(bb, single, stack_tasks)
        method = get_method('prompt_stack')  # rows by each example's task_index
      else:
        self.tasks = [task] if task else self._product_task(single)
        method, trainable, extras, position = evaluate.load_product(
            bb, single, self.tasks or ['inference'])
        batch_extras = method.eval_extras(0)
      position = prompt_position or position
    self.mixed = method.uses_task_index
    self.vocab = _vocabulary(vocabulary, self.tasks, backbone)
    lengths = _task_lengths(self.tasks)
    self.inputs_length = int(inputs_length or lengths['inputs'])
    self.max_decode_length = int(max_decode_length or lengths['targets'])
    self.labels, self._allowed = self._label_sets(label_names)
    if mode == 'auto':
      mode = 'rank' if self.labels else 'greedy'
    if mode == 'rank' and not self.labels:
      raise InferenceError('--mode rank needs label texts: give --label_names (e.g. no,yes) or '
                           'prompts of labelled tasks')
    self.mode, self.num_beams = mode, num_beams
    position_index = prompt_lib.position_index(position or 'prefix')
    self.engine, state = engine_lib.build_engine(
        bb.module, method.eval_inputs, None, {'backbone': bb.params, **extras}, trainable,
        prompt_position=position_index, mesh=mesh, rules=rules,
        trainable_is_backbone=method.trains_backbone)
    self.trainable = state.trainable
    size = self.engine.data_parallel_size
    self.batch_size = -(-int(batch_size) // size) * size
    self.predicting = evaluation.Predicting(
        self.engine, method.eval_inputs, self.vocab, self.labels, mode,
        prompt_position=position_index, batch_extras=batch_extras, ensemble=method.ensemble,
        num_beams=num_beams)

  # ---- setting up ----
  @staticmethod
  def _stack(bb, per_task: Mapping[str, str], prompt_position) -> tuple[np.ndarray, str | None]:
    """Each task's evaluation prompt (its method's own mapping of its product), stacked."""
    from jaxprompt import evaluate
    values, positions = [], set()
    for task, path in per_task.items():
      method, trainable, extras, position = evaluate.load_product(bb, path, [task])
      if method.uses_task_index or method.ensemble or method.trains_backbone:
        raise InferenceError(f'{path} ({task}): a {method.name} product cannot share a batch '
                             'with other tasks; give one prompt file per task')
      params, prompt = method.eval_inputs(trainable, {'backbone': bb.params, **extras},
                                          {'task_index': np.zeros((1,), np.int32)})
      if not isinstance(prompt, jax.Array | np.ndarray) or np.ndim(prompt) != 2 or (
          params is not bb.params):
        raise InferenceError(f'{path} ({task}): a {method.name} product feeds the model more '
                             'than one [P, d] prompt (e.g. per-layer prefixes); run its task '
                             'alone with --prompt FILE')
      values.append(np.asarray(jax.device_get(prompt), np.float32))
      positions.add(prompt_position or position or 'prefix')
    shapes = {v.shape for v in values}
    if len(shapes) > 1:
      detail = ', '.join(f'{t} {v.shape[0]}' for t, v in zip(per_task, values))
      raise InferenceError(f'prompts of one batch must share a length; got {detail}: run the '
                           'tasks of each length separately')
    if len(positions) > 1:
      raise InferenceError(f'prompts of one batch must enter at one position; got '
                           f'{sorted(positions)}: pass --prompt_position')
    return np.stack(values), positions.pop()

  @staticmethod
  def _stack_tasks(prompt) -> list[str] | None:
    if not isinstance(prompt, str) or not os.path.isfile(prompt):
      return None
    try:
      from jaxprompt.prompts.files import read_prompt
      meta = read_prompt(prompt).metadata
    except (ValueError, OSError):
      return None
    return list(meta['tasks']) if meta.get('method') == 'prompt_stack' and meta.get(
        'tasks') else None

  @staticmethod
  def _product_task(prompt) -> list[str]:
    """The task a single prompt file says it was tuned on (for its vocabulary and lengths)."""
    if not isinstance(prompt, str) or not os.path.isfile(prompt):
      return []
    try:
      from jaxprompt.prompts.files import read_prompt
      task = read_prompt(prompt).metadata.get('task')
    except (ValueError, OSError):
      return []
    return [task] if task else []

  def _label_sets(self, label_names):
    """(the labels scored, {task: indices of its own labels}): every task's labels are scored
    in one program and each row picks among its task's."""
    from jaxprompt.train.evaluation import label_names as task_labels
    if label_names:
      return list(label_names), {}
    import seqio
    per_task = {t: task_labels(seqio.get_mixture_or_task(t)) for t in self.tasks
                if _registered(t)}
    if not self.tasks or any(t not in per_task or not per_task[t] for t in self.tasks):
      return None, {}
    union = list(dict.fromkeys(label for t in self.tasks for label in per_task[t]))
    return union, {t: [union.index(label) for label in per_task[t]] for t in self.tasks}

  # ---- predicting ----
  def task_ids(self, tasks: str | Sequence[str | None] | None, count: int) -> np.ndarray | None:
    """Each row's row of the prompt stack (mixed-task inference), checked before any work."""
    if not self.mixed:
      return None
    if tasks is None or isinstance(tasks, str):
      tasks = [tasks] * count
    missing = sorted({str(t) for t in tasks if t not in self.tasks})
    if missing:
      raise InferenceError(f'task {", ".join(missing)} has no prompt (prompts for: '
                           f'{", ".join(self.tasks)}); add it to the library or pass '
                           '--prompt TASK=FILE')
    return np.asarray([self.tasks.index(t) for t in tasks], np.int32)

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
    return encode_texts(self.vocab, texts, self.inputs_length)

  def predict_tokens(self, tokens: np.ndarray, task_ids: np.ndarray | None = None,
                     tasks: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """Predictions for [N, L] input tokens (0-padded, EOS-ended): one dict per row with
    `prediction` (and `scores` {label: log-likelihood} in rank mode, `score` in beam mode)."""
    out = []
    for start in range(0, len(tokens), self.batch_size):
      out.extend(self.predict_batch(tokens[start:start + self.batch_size],
                                    None if task_ids is None else
                                    task_ids[start:start + self.batch_size],
                                    None if tasks is None else
                                    tasks[start:start + self.batch_size]))
    return out

  def predict_batch(self, tokens: np.ndarray, task_ids=None, tasks=None) -> list[dict]:
    """At most `batch_size` rows, padded to it (one compiled program for every batch)."""
    from jaxprompt.data.features import EXAMPLE_MASK
    n, size = len(tokens), self.batch_size
    batch = {'encoder_input_tokens': np.zeros((size, tokens.shape[1]), np.int32),
             'decoder_target_tokens': np.zeros((size, self.max_decode_length), np.int32),
             EXAMPLE_MASK: (np.arange(size) < n).astype(np.int32)}
    batch['encoder_input_tokens'][:n] = tokens
    if task_ids is not None:
      batch['task_index'] = np.zeros((size,), np.int32)
      batch['task_index'][:n] = task_ids
    outputs = self.predicting.outputs(self.trainable, batch)
    if self.mode == 'rank':
      scores = np.asarray(outputs, np.float64)
      if self.predicting.ensemble:  # each example's prompts vote; scores are their mean
        scores = scores.reshape(size, -1, scores.shape[-1])
        texts = self.predicting.texts(outputs, size)
        scores = scores.mean(axis=1)
      rows = []
      for i in range(n):
        allowed = self._allowed.get(tasks[i] if tasks is not None else None,
                                    range(len(self.labels)))
        best = max(allowed, key=lambda c: scores[i, c])
        text = texts[i] if self.predicting.ensemble else self.labels[best]
        rows.append({'prediction': text,
                     'scores': {self.labels[c]: float(scores[i, c]) for c in allowed}})
      return rows
    texts = self.predicting.texts(outputs, size)[:n]
    if self.mode == 'beam':
      beam_scores = np.asarray(outputs[1])
      if self.predicting.ensemble:
        return [{'prediction': t} for t in texts]
      return [{'prediction': t, 'score': float(s)} for t, s in zip(texts, beam_scores)]
    return [{'prediction': t} for t in texts]

  def predict(self, texts: str | Sequence[str], task: str | Sequence[str] | None = None
              ) -> list[str]:
    """Predicted texts for input texts (mixed-task: `task` names each row's task, or one
    task for all)."""
    return [r['prediction'] for r in self.predict_rows(texts, task)]

  def predict_rows(self, texts: str | Sequence[str], task: str | Sequence[str] | None = None
                   ) -> list[dict[str, Any]]:
    """`predict` with the scores (see `predict_tokens`)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tasks = [task] * len(texts) if task is None or isinstance(task, str) else list(task)
    if len(tasks) != len(texts):
      raise InferenceError(f'{len(texts)} texts but {len(tasks)} tasks')
    ids = self.task_ids(tasks, len(texts))
    tokens, _ = self.encode(texts)
    return self.predict_tokens(tokens, ids, tasks)

  def settings(self) -> dict[str, Any]:
    """What the predictions depend on (a resumed run must match it)."""
    return dict(backbone=self.backbone.fingerprint, tasks=self.tasks, mode=self.mode,
                num_beams=self.num_beams, labels=self.labels, inputs_length=self.inputs_length,
                max_decode_length=self.max_decode_length, batch_size=self.batch_size,
                dtype=self.backbone.module.config.dtype,
                param_dtype=str(jax.tree_util.tree_leaves(self.backbone.params)[0].dtype),
                prompt=_digest(jax.device_get(self.trainable)))


def _digest(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return 'sha256:' + h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Rows in, rows out.


def read_input_rows(path: str, input_column: str = 'input', task_column: str = 'task'
                    ) -> list[Row]:
  """A JSONL / TSV / CSV file's rows: the text of `input_column`, the task of `task_column`
  (when present), every field kept. Errors name the file, the line and the fix."""
  from jaxprompt.data.files import DataFileError, read_rows
  try:
    rows = read_rows(path)
  except DataFileError as e:
    raise InferenceError(f'--input {e}') from None
  out = []
  for number, row in rows:
    if input_column not in row:
      raise InferenceError(f'{path}:{number}: no column {input_column!r} (columns: '
                           f'{", ".join(map(str, row))}); name the text column with '
                           '--input_column')
    text = row[input_column]
    if not isinstance(text, str):
      text = '' if text is None else json.dumps(text)
    if not text.strip():
      raise InferenceError(f'{path}:{number}: empty {input_column!r} text; give the row a text '
                           'or remove it')
    task = row.get(task_column)
    out.append(Row(text, None if task is None else str(task), dict(row)))
  return out


def _task_rows(task: str, split: str, max_examples: int | None, predictor: Predictor
               ) -> tuple[list[Row], np.ndarray]:
  """A seqio task's examples, tokenised by the data layer exactly as evaluation reads them."""
  from jaxprompt.data.features import EXAMPLE_MASK
  from jaxprompt.train.evaluation import load_eval_data
  lengths = {'inputs': predictor.inputs_length, 'targets': predictor.max_decode_length}
  data = load_eval_data(task, split, lengths, predictor.batch_size, max_examples)
  tokens = np.concatenate([b['encoder_input_tokens'][b[EXAMPLE_MASK] > 0]
                           for b in data.batches])
  rows = []
  for i, ex in enumerate(data.raw):
    fields = {'index': i}
    for key, name in (('inputs_pretokenized', 'input'), ('targets_pretokenized', 'target')):
      if key in ex:
        value = ex[key]
        fields[name] = value.decode('utf-8') if isinstance(value, bytes) else str(value)
    rows.append(Row(fields.get('input', ''), task, fields))
  if data.truncated:
    print(f'jaxprompt: {data.truncated} texts of {task} [{split}] were cut to the budget '
          f'(inputs {predictor.inputs_length}); raise --inputs_length to keep them whole',
          file=sys.stderr)
  return rows, tokens


def _partial_paths(output: str) -> tuple[str, str]:
  return output + PARTIAL, output + PARTIAL_STATE


def _rows_done(partial: str) -> int:
  """Complete rows in a partial output (a line cut by a kill is dropped)."""
  if not os.path.exists(partial):
    return 0
  with open(partial, 'rb') as f:
    data = f.read()
  keep = data[:data.rfind(b'\n') + 1]
  if len(keep) != len(data):
    with open(partial, 'wb') as f:
      f.write(keep)
  return keep.count(b'\n')


def _check_output(output: str, resume: bool, overwrite: bool) -> None:
  if not output.endswith(('.jsonl', '.json')):
    raise InferenceError(f'--output {output}: predictions are written as JSON lines; name the '
                         'file .jsonl')
  if os.path.exists(output) and not overwrite:
    raise InferenceError(f'--output {output} exists (a finished inference); pass --overwrite to '
                         'replace it or choose another --output')
  partial, _ = _partial_paths(output)
  if os.path.exists(partial) and not (resume or overwrite):
    raise InferenceError(f'{partial}: an interrupted inference into {output}; pass --resume to '
                         'finish it or --overwrite to start again')
  folder = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(folder):
    raise InferenceError(f'--output {output}: folder {folder} does not exist; create it first')


def infer(*, backbone, prompt=None, library: str | None = None, input: str | None = None,
          output: str | None = None, task: str | None = None, split: str = 'validation',
          input_column: str = 'input', task_column: str = 'task', mode: str = 'auto',
          num_beams: int = 4, label_names: Sequence[str] | None = None,
          inputs_length: int | None = None, max_decode_length: int | None = None,
          batch_size: int = 32, max_examples: int | None = None, vocabulary=None, config=None,
          run_config=None, resume: bool = False, overwrite: bool = False,
          progress: bool = False, predictor: Predictor | None = None) -> list[dict[str, Any]]:
  """Predictions for every row of `input` (a JSONL/TSV/CSV file) or of a seqio `task`/`split`,
  in order: each row's own fields plus `prediction` (and `scores` / `score`, see
  `Predictor.predict_tokens`). With `output`, they are also written there as JSON lines: to
  `OUTPUT.partial` batch by batch, renamed to `OUTPUT` at the end, so the file is complete or
  absent; `resume` continues an interrupted run from its last written batch. Process 0 writes;
  every process computes (each on its devices' share of every batch). See `Predictor` for the
  other arguments.
  """
  if (input is None) == (task is None):
    raise InferenceError('give the inputs: --input FILE or --task TASK (with --split)')
  if output is not None:
    _check_output(output, resume, overwrite)
  if input is not None:
    rows = read_input_rows(input, input_column, task_column)  # every row checked: no work yet
  predictor = predictor or Predictor(
      backbone, prompt, library=library, mode=mode, num_beams=num_beams,
      label_names=label_names, inputs_length=inputs_length, max_decode_length=max_decode_length,
      batch_size=batch_size, vocabulary=vocabulary, config=config, run_config=run_config,
      task=task)
  if input is not None:
    rows = rows[:max_examples]
    if predictor.mixed and any(r.task is None for r in rows):
      line = next(i for i, r in enumerate(rows) if r.task is None)
      raise InferenceError(f'{input}: row {line + 1} names no task; with one prompt per task '
                           f'every row needs a {task_column!r} field (--task_column)')
    task_ids = predictor.task_ids([r.task for r in rows], len(rows))
    tokens, cut = predictor.encode([r.text for r in rows])
    if cut:
      print(f'jaxprompt: {cut} of {len(rows)} inputs were longer than {predictor.inputs_length}'
            ' tokens and were cut (raise --inputs_length to keep them whole)', file=sys.stderr)
  else:
    rows, tokens = _task_rows(task, split, max_examples, predictor)
    task_ids = predictor.task_ids(task, len(rows))
  tasks = [r.task for r in rows]
  return _run(predictor, rows, tokens, task_ids, tasks, output, resume, progress)


def _run(predictor: Predictor, rows: list[Row], tokens, task_ids, tasks, output, resume,
         progress) -> list[dict[str, Any]]:
  writer = jax.process_index() == 0
  done, partial, state_path = 0, None, None
  settings = dict(predictor.settings(), inputs=_digest(tokens), rows=len(rows))
  if output is not None:
    partial, state_path = _partial_paths(output)
    if writer and resume and os.path.exists(partial):
      with open(state_path) as f:
        saved = json.load(f)
      if saved != json.loads(json.dumps(settings)):
        differ = sorted(k for k in settings if saved.get(k) != json.loads(json.dumps(settings[k])))
        raise InferenceError(f'{partial}: was computed with other settings ({", ".join(differ)})'
                             '; pass the same options to --resume, or --overwrite to start again')
      done = _rows_done(partial)
    elif writer:
      with open(state_path, 'w') as f:
        json.dump(settings, f)
      open(partial, 'w').close()
    done = _agreed(done)
  size = predictor.batch_size
  done -= done % size  # whole batches only: a resumed batch is the batch a clean run computes
  results: list[dict[str, Any]] = []
  if done:
    with open(partial) as f:
      results = [json.loads(line) for line in f][:done]
  bar = None
  if progress and writer and done < len(rows):
    from tqdm import tqdm
    bar = tqdm(total=len(rows), initial=done, desc='infer', unit='ex', file=sys.stderr)
  with (open(partial, 'r+') if writer and partial else _nothing()) as f:
    if f is not None:
      f.seek(0)
      for _ in range(done):
        f.readline()
      f.truncate()
    for start in range(done, len(rows), size):
      stop = min(start + size, len(rows))
      preds = predictor.predict_batch(tokens[start:stop],
                                      None if task_ids is None else task_ids[start:stop],
                                      tasks[start:stop])
      batch_rows = [{**r.fields, **p} for r, p in zip(rows[start:stop], preds)]
      results.extend(batch_rows)
      if f is not None:
        f.write(''.join(json.dumps(r, ensure_ascii=False, default=str) + '\n'
                        for r in batch_rows))
        f.flush()
      if bar is not None:
        bar.update(stop - start)
  if bar is not None:
    bar.close()
  if output is not None and writer:
    os.replace(partial, output)
    os.remove(state_path)
  return results


class _nothing:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _agreed(value: int) -> int:
  """Process 0's value on every process (multi-host: only process 0 reads the output)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
