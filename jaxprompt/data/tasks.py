"""seqio Tasks and Mixtures for the papers' benchmarks, read from TFDS.

`register_tasks()` registers, under the `jaxprompt_` prefix, GLUE (`jaxprompt_glue_sst2`, ...),
SuperGLUE (`jaxprompt_super_glue_boolq`, ...) and the tasks of Su et al. that TFDS carries
(`jaxprompt_imdb`, `jaxprompt_snli`, `jaxprompt_squad`, ...), plus SPoT's examples-proportional
mixtures `jaxprompt_glue_mixture` and `jaxprompt_super_glue_mixture` (cap 2**19). Classification
tasks put their verbalised labels (the target strings) in `LABELS[task_name]`.

Example:
  >>> names = register_tasks(get_vocabulary(spm_path))
  >>> seqio.get_mixture_or_task('jaxprompt_glue_sst2').get_dataset(
  ...     {'inputs': 64, 'targets': 4}, split='validation')
"""

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from jaxprompt.data import metrics
from jaxprompt.data import preprocessors as prep
from jaxprompt.data import vocab as vocab_lib

logger = logging.getLogger(__name__)
MIXTURE_CAP = 2**19
LABELS: dict[str, tuple[str, ...]] = {}
# Run defaults a task knows for itself (`feature_lengths`, `prompt_length`), e.g. the lab's
# short sequences; a run uses them where the user gave none (see `jaxprompt.config`).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {}
"""Task name -> the label names its targets use, in class-id order (classification only)."""
TRAIN_SIZES: dict[str, int] = {}
"""Task name -> train examples, used for mixing rates when TFDS metadata is not on disk."""
_REGISTERED: dict[str, Any] = {}  # task/mixture name -> the configuration it was registered with

_TRAIN_VAL = {'train': 'train', 'validation': 'validation'}
_TRAIN_VAL_TEST = {'train': 'train', 'validation': 'validation', 'test': 'test'}
_MNLI_SPLITS = {'train': 'train', 'validation': 'validation_matched',
                'validation_matched': 'validation_matched',
                'validation_mismatched': 'validation_mismatched'}
_BINARY = ('False', 'True')
_NLI3 = ('entailment', 'neutral', 'contradiction')
_SENTIMENT = ('negative', 'positive')


@dataclasses.dataclass(frozen=True)
class TfdsTaskSpec:
  """How one TFDS dataset becomes a text-to-text task.

  Attributes:
    name: the task name after the name prefix, e.g. 'glue_sst2'.
    tfds_name: TFDS name, config and version, e.g. 'glue/sst2:2.0.0'.
    formatter: `example -> {'inputs', 'targets', ...}`; called with `prefix=`.
    task_prefix: the task name written before the inputs when task prefixes are on.
    metric_fns: seqio-style metrics.
    postprocess_fn: seqio postprocessor applied to targets and predictions.
    label_names: the verbalised labels of a classification task, else None.
    splits: our split name -> TFDS split.
    train_size: train examples in the TFDS release (mixing-rate fallback).
    drop_unlabeled: whether to drop examples with label -1 first.
  """
  name: str
  tfds_name: str
  formatter: Callable[..., dict[str, tf.Tensor]]
  task_prefix: str
  metric_fns: Sequence[Callable[..., Mapping[str, float]]]
  postprocess_fn: Callable[..., Any]
  label_names: Optional[tuple[str, ...]] = None
  splits: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(_TRAIN_VAL))
  train_size: int = 0
  drop_unlabeled: bool = False


def _classification(name, tfds_name, feature_names, label_names, metric_fns, task_prefix,
                    train_size, **kwargs) -> TfdsTaskSpec:
  formatter = functools.partial(prep.format_classification, feature_names=feature_names,
                                label_names=label_names, id_key=kwargs.pop('id_key', 'idx'),
                                source_keys=kwargs.pop('source_keys', None))
  postprocess = functools.partial(prep.label_to_class_id, label_names=label_names)
  return TfdsTaskSpec(name, tfds_name, formatter, task_prefix, metric_fns, postprocess,
                      tuple(label_names), train_size=train_size, **kwargs)


def tfds_task_specs() -> list[TfdsTaskSpec]:
  """The TFDS tasks `register_tasks` registers (formats as T5's GLUE/SuperGLUE preprocessing)."""
  acc, f1_acc = [metrics.accuracy], [metrics.f1, metrics.accuracy]
  glue, sg = 'glue/{}:2.0.0', 'super_glue/{}:1.0.2'
  pair = ('sentence1', 'sentence2')
  summarize = prep.format_summarization
  specs = [
      _classification('glue_cola', glue.format('cola'), ('sentence',),
                      ('unacceptable', 'acceptable'), [metrics.matthews_corrcoef], 'cola', 8551),
      _classification('glue_sst2', glue.format('sst2'), ('sentence',), _SENTIMENT, acc, 'sst2',
                      67349),
      _classification('glue_mrpc', glue.format('mrpc'), pair, ('not_equivalent', 'equivalent'),
                      f1_acc, 'mrpc', 3668),
      _classification('glue_qqp', glue.format('qqp'), ('question1', 'question2'),
                      ('not_duplicate', 'duplicate'), f1_acc, 'qqp', 363846),
      TfdsTaskSpec('glue_stsb', glue.format('stsb'), prep.format_stsb, 'stsb',
                   [metrics.pearson_corrcoef, metrics.spearman_corrcoef],
                   prep.string_to_float, train_size=5749),
      _classification('glue_mnli', glue.format('mnli'), ('hypothesis', 'premise'), _NLI3, acc,
                      'mnli', 392702, splits=_MNLI_SPLITS),
      _classification('glue_qnli', glue.format('qnli'), ('question', 'sentence'),
                      ('entailment', 'not_entailment'), acc, 'qnli', 104743),
      _classification('glue_rte', glue.format('rte'), pair, ('entailment', 'not_entailment'),
                      acc, 'rte', 2490),
      _classification('super_glue_boolq', sg.format('boolq'), ('passage', 'question'), _BINARY,
                      acc, 'boolq', 9427),
      _classification('super_glue_cb', sg.format('cb'), ('hypothesis', 'premise'),
                      ('entailment', 'contradiction', 'neutral'),
                      [metrics.accuracy, metrics.macro_f1(3)], 'cb', 250),
      _classification('super_glue_copa', sg.format('copa'),
                      ('choice1', 'choice2', 'premise', 'question'), ('choice1', 'choice2'), acc,
                      'copa', 400),
      TfdsTaskSpec('super_glue_multirc', sg.format('multirc'), prep.format_multirc, 'multirc',
                   [metrics.multirc], prep.multirc_postprocess, _BINARY, train_size=27243),
      TfdsTaskSpec('super_glue_record', sg.format('record'), prep.format_record, 'record',
                   [metrics.squad], prep.answers_postprocess, train_size=100730),
      _classification('super_glue_rte', sg.format('rte'), ('hypothesis', 'premise'),
                      ('entailment', 'not_entailment'), acc, 'rte', 2490),
      _classification('super_glue_wic', sg.format('wic'), ('sentence1', 'sentence2', 'word'),
                      _BINARY, acc, 'wic', 5428),
      TfdsTaskSpec('super_glue_wsc', sg.format('wsc.fixed'), prep.format_wsc, 'wsc', acc,
                   functools.partial(prep.label_to_class_id, label_names=_BINARY), _BINARY,
                   train_size=554),
      # Su et al. (2022) tasks that TFDS carries; see README.md for those it lacks.
      _classification('imdb', 'imdb_reviews/plain_text:1.0.0', ('sentence',), _SENTIMENT, acc,
                      'imdb', 25000, splits={'train': 'train', 'validation': 'test',
                                             'test': 'test'}, id_key=None,
                      source_keys={'sentence': 'text'}),
      _classification('movie_rationales', 'movie_rationales:0.1.0', ('sentence',), _SENTIMENT,
                      acc, 'movie_rationales', 1600, splits=_TRAIN_VAL_TEST, id_key=None,
                      source_keys={'sentence': 'review'}),
      _classification('snli', 'snli:1.1.0', ('hypothesis', 'premise'), _NLI3, acc, 'snli',
                      550152, splits=_TRAIN_VAL_TEST, id_key=None, drop_unlabeled=True),
      TfdsTaskSpec('squad', 'squad/v1.1:3.0.0', prep.format_squad, 'squad', [metrics.squad],
                   prep.answers_postprocess, train_size=87599),
      TfdsTaskSpec('nq_open', 'natural_questions_open:1.0.0', prep.format_nq_open, 'nq',
                   [metrics.squad], prep.answers_postprocess, train_size=87925),
      TfdsTaskSpec('multi_news', 'multi_news:2.1.0',
                   functools.partial(summarize, document_key='document', summary_key='summary'),
                   'multi_news', [metrics.rouge], prep.text_postprocess,
                   splits=_TRAIN_VAL_TEST, train_size=44972),
      TfdsTaskSpec('samsum', 'samsum:1.0.0',
                   functools.partial(summarize, document_key='dialogue', summary_key='summary'),
                   'samsum', [metrics.rouge], prep.text_postprocess, splits=_TRAIN_VAL_TEST,
                   train_size=14732),
  ]
  return specs


GLUE_MIXTURE_TASKS = ('glue_cola', 'glue_sst2', 'glue_mrpc', 'glue_qqp', 'glue_stsb',
                      'glue_mnli', 'glue_qnli', 'glue_rte')
SUPER_GLUE_MIXTURE_TASKS = ('super_glue_boolq', 'super_glue_cb', 'super_glue_copa',
                            'super_glue_multirc', 'super_glue_record', 'super_glue_rte',
                            'super_glue_wic', 'super_glue_wsc')


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """`inputs` and `targets`, both tokenized with `vocabulary` and ending in EOS."""
  return {'inputs': seqio.Feature(vocabulary, add_eos=True),
          'targets': seqio.Feature(vocabulary, add_eos=True)}


def vocabulary_key(vocabulary: seqio.Vocabulary) -> tuple[Any, ...]:
  """A cheap identity for a vocabulary that does not read its model file."""
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return ('spm', vocabulary.sentencepiece_model_file, vocabulary.extra_ids)
  return ('object', id(vocabulary))


def map_examples(fn: Callable[..., Mapping[str, tf.Tensor]],
                 **kwargs) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """A seqio preprocessor that maps `fn(example, **kwargs)` over the dataset."""

  def preprocessor(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(functools.partial(fn, **kwargs),
                       num_parallel_calls=tf.data.AUTOTUNE)

  preprocessor.__name__ = getattr(fn, '__name__', 'map_examples')
  preprocessor.maps_one_to_one = True  # one example in, one out: a per-host read runs it late
  return preprocessor


def register_text_task(name: str, source: seqio.DataSource,
                       formatters: Sequence[Callable[[tf.data.Dataset], tf.data.Dataset]],
                       vocabulary: seqio.Vocabulary, metric_fns: Sequence[Callable[..., Any]],
                       postprocess_fn: Optional[Callable[..., Any]],
                       label_names: Optional[Sequence[str]], config: Any) -> seqio.Task:
  """Registers a text-to-text task (formatters, tokenize, cache point, EOS) idempotently.

  A task already registered with the same `config` is kept as it is (so mixtures holding it
  stay valid); with another `config` it is replaced.
  """
  if name in seqio.TaskRegistry.names():
    if _REGISTERED.get(name) == config:
      return seqio.TaskRegistry.get(name)
    seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[*formatters, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features=output_features(vocabulary),
      postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns))
  _REGISTERED[name] = config
  if label_names is not None:
    LABELS[name] = tuple(label_names)
  else:
    LABELS.pop(name, None)
  return task


def register_tasks(vocabulary: Optional[seqio.Vocabulary] = None, *,
                   add_task_prefix: bool = False, name_prefix: str = 'jaxprompt') -> list[str]:
  """Registers every TFDS task and the GLUE/SuperGLUE mixtures; safe to call again.

  Args:
    vocabulary: the tokenizer; T5's default SentencePiece model (100 extra ids) when None.
    add_task_prefix: write the task name before the inputs, as T5 did ('sst2 sentence: ...').
      Off by default, as in the prompt-tuning paper.
    name_prefix: registered names are `f'{name_prefix}_{spec.name}'`.

  Returns:
    The registered task and mixture names.
  """
  vocabulary = vocabulary or vocab_lib.get_vocabulary()
  names = []
  for spec in tfds_task_specs():
    name = f'{name_prefix}_{spec.name}'
    formatters = []
    if spec.drop_unlabeled:
      formatters.append(prep.drop_unlabeled)
    formatters.append(map_examples(spec.formatter,
                                   prefix=spec.task_prefix if add_task_prefix else None))
    register_text_task(
        name, seqio.TfdsDataSource(spec.tfds_name, splits=dict(spec.splits)), formatters,
        vocabulary, spec.metric_fns, spec.postprocess_fn, spec.label_names,
        config=(spec.name, spec.tfds_name, vocabulary_key(vocabulary), add_task_prefix))
    TRAIN_SIZES[name] = spec.train_size
    names.append(name)
  for mixture, members in (('glue_mixture', GLUE_MIXTURE_TASKS),
                           ('super_glue_mixture', SUPER_GLUE_MIXTURE_TASKS)):
    register_mixture(f'{name_prefix}_{mixture}', [f'{name_prefix}_{t}' for t in members])
    names.append(f'{name_prefix}_{mixture}')
  return names


def examples_proportional_rate(task: seqio.Task, cap: int = MIXTURE_CAP) -> float:
  """min(train examples, cap), by seqio's `mixing_rate_num_examples`.

  Falls back to `TRAIN_SIZES` (the TFDS release sizes) when the dataset's metadata is not on
  disk yet, so a mixture can be built before its datasets are prepared.
  """
  try:
    return float(seqio.mixing_rate_num_examples(task, maximum=cap))
  except (KeyError, ValueError, TypeError) as error:
    if task.name not in TRAIN_SIZES:
      raise ValueError(f'cannot count the train examples of task {task.name} ({error}); '
                       'prepare its data or give the mixture fixed rates.') from error
    logger.warning('Mixing rate of %s from its known TFDS size (%s).', task.name, error)
    return float(min(TRAIN_SIZES[task.name], cap))


def register_mixture(name: str, tasks: Sequence[str], *, cap: int = MIXTURE_CAP,
                     rates: Optional[Union[Mapping[str, float], Sequence[float]]] = None
                     ) -> seqio.Mixture:
  """Registers (or replaces) a mixture of registered tasks.

  Args:
    name: the mixture name.
    tasks: names of registered tasks or mixtures.
    cap: examples-proportional mixing with rate min(train examples, cap) (SPoT: K = 2**19).
    rates: fixed rates instead, as {task: rate} or one rate per task in `tasks`' order.

  Returns:
    The registered `seqio.Mixture`; unchanged arguments (and member tasks) return the one
    already registered.
  """
  if rates is None:
    members = list(tasks)
    default_rate = functools.partial(examples_proportional_rate, cap=cap)
  else:
    if not isinstance(rates, Mapping):
      if len(rates) != len(tasks):
        raise ValueError(f'mixture {name}: {len(rates)} rates for {len(tasks)} tasks; give one '
                         'rate per task.')
      rates = dict(zip(tasks, rates))
    missing = [t for t in tasks if t not in rates]
    if missing:
      raise ValueError(f'mixture {name}: no rate for {missing}; add them to rates.')
    members, default_rate = [(t, float(rates[t])) for t in tasks], None
  # Unchanged arguments and member objects: keep the registered mixture (idempotent).
  config = ('mixture', tuple(tasks), cap, repr(rates),
            tuple(id(seqio.get_mixture_or_task(t)) for t in tasks))
  if name in seqio.MixtureRegistry.names():
    if _REGISTERED.get(name) == config:
      return seqio.MixtureRegistry.get(name)
    seqio.MixtureRegistry.remove(name)
  mixture = seqio.MixtureRegistry.add(name, members, default_rate=default_rate)
  _REGISTERED[name] = config
  return mixture


def label_names(task_name: str) -> Optional[tuple[str, ...]]:
  """The verbalised labels of a registered classification task, or None."""
  return LABELS.get(task_name)


def member_tasks(name: str) -> tuple[str, ...]:
  """The tasks of a mixture in the mixture's order (a task's own name for a task); the
  `task_index` of a mixed-task batch is a position in this tuple."""
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return tuple(t.name for t in provider.tasks)
  return (name,)


def task_defaults(name: str) -> dict[str, Any]:
  """The run defaults the task (or every task of the mixture) carries: the longest feature
  lengths, and the first prompt length / train steps / batch size / eval period among its
  members."""
  out: dict[str, Any] = {}
  for member in member_tasks(name):
    known = TASK_DEFAULTS.get(member, {})
    if 'feature_lengths' in known:
      old = out.get('feature_lengths', {})
      out['feature_lengths'] = {k: max(v, old.get(k, 0)) for k, v in
                                known['feature_lengths'].items()}
    for name in ('prompt_length', 'train_steps', 'batch_size', 'eval_period'):
      if name in known:
        out.setdefault(name, known[name])
  return out


def check_task_name(name: str) -> None:
  """Raises a one-line error naming the close matches when `name` is not registered."""
  import difflib
  known = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
  if name in known:
    return
  close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
  hint = f'; did you mean {", ".join(close)}?' if close else (
      '; lab tasks are named lab_<task> (e.g. lab_has_green), the TFDS ones jaxprompt_<task>')
  raise ValueError(f'unknown task {name!r}{hint}')
