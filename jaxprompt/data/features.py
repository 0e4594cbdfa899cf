"""Batches for a prompted encoder-decoder: feature conversion, counted truncation, padding.

The prompt is prepended to the *embedded* input inside the model, so the token batches hold
text only: `encoder_input_tokens` is `TASK_FEATURE_LENGTHS['inputs']` long (the text budget)
and the encoder sees `encoder_length(task_feature_lengths, prompt_length)` positions.

Texts longer than their budget are cut (keeping the final EOS, as seqio's
`append_eos_after_trim`), and every cut is counted in a `TruncationCounter` and logged the
first time it happens, never silently.

Example:
  >>> batches = get_dataset('jaxprompt_glue_rte', {'inputs': 256, 'targets': 8}, 'train',
  ...                       batch_size=32, seed=0)
  >>> batch = next(batches)   # numpy: encoder_input_tokens [32, 256], decoder_* [32, 8], ...
  >>> batches.truncation.inputs_truncated
"""

import dataclasses
import functools
import json
import logging
from typing import Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx  # the switch tf.function(autograph=) sets

logger = logging.getLogger(__name__)
TRUNCATED = 'truncated'  # passthrough feature: [inputs cut, targets cut]
EXAMPLE_MASK = 'example_mask'
TASK_INDEX = 'task_index'  # with_task_index: the example's task, a position in member_tasks()
_READING_KEY = 'reading/.ATTRIBUTES/VARIABLE_VALUE'  # in a saved data position
MODEL_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
                  'decoder_loss_weights')


def encoder_length(task_feature_lengths: Mapping[str, int], prompt_length: int) -> int:
  """Positions the encoder sees: the prompt plus the inputs' text budget."""
  return int(prompt_length) + int(task_feature_lengths['inputs'])


@dataclasses.dataclass
class TruncationCounter:
  """How many examples had their inputs or targets cut to the budget so far.

  Attributes:
    name: the task or mixture counted.
    lengths: the budgets, e.g. {'inputs': 256, 'targets': 8}.
    examples: real (non-padding) examples seen.
    inputs_truncated: examples whose inputs were cut.
    targets_truncated: examples whose targets were cut.
  """
  name: str
  lengths: Mapping[str, int]
  examples: int = 0
  inputs_truncated: int = 0
  targets_truncated: int = 0
  _warned: bool = False

  def update(self, truncated: np.ndarray, example_mask: np.ndarray) -> None:
    """Adds one batch: `truncated` [B, 2] flags, `example_mask` [B]."""
    real = example_mask.astype(bool)
    self.examples += int(real.sum())
    self.inputs_truncated += int(truncated[real, 0].sum())
    self.targets_truncated += int(truncated[real, 1].sum())
    if not self._warned and (self.inputs_truncated or self.targets_truncated):
      self._warned = True
      logger.warning('%s: texts longer than the budget are being truncated: %s. Raise '
                      'TASK_FEATURE_LENGTHS to keep them whole.', self.name, self.summary())

  def summary(self) -> str:
    """One line: counts and percentages of truncated inputs and targets."""
    def part(feature, count):
      share = 100.0 * count / self.examples if self.examples else 0.0
      return f'{count} of {self.examples} {feature} ({share:.1f}%) cut to {self.lengths[feature]}'
    return (f'{part("inputs", self.inputs_truncated)}, '
            f'{part("targets", self.targets_truncated)}')


def _truncate(example: Mapping[str, tf.Tensor], lengths: Mapping[str, int],
              keeps_eos: Mapping[str, bool]) -> dict[str, tf.Tensor]:
  """Cuts inputs/targets to their budget (the last token, EOS, kept) and flags the cuts."""
  out, flags = dict(example), []
  for key in ('inputs', 'targets'):
    tokens, limit = example[key], lengths[key]
    too_long = tf.size(tokens) > limit
    if keeps_eos[key]:
      cut = tf.concat([tokens[:limit - 1], tokens[-1:]], axis=0)
    else:
      cut = tokens[:limit]
    out[key] = tf.cond(too_long, lambda c=cut: c, lambda t=tokens: t)
    flags.append(tf.cast(too_long, tf.int32))
  out[TRUNCATED] = tf.stack(flags)
  return out


class PositionMismatch(ValueError):
  """A saved data position belongs to another reading of the batches (other rows, other read)."""


class BatchIterator:
  """Iterator of numpy batches with a `truncation` counter and an `example_mask`.

  `rows` keeps a slice of each batch read (a host's share of a whole read); `reading` names what
  the pipeline reads ({'read': 'whole'} or a per-host read's batch and rows) and is saved with
  the position, so a position is only restored into the same reading.
  """

  def __init__(self, dataset: tf.data.Dataset, batch_size: int,
               truncation: TruncationCounter, rows: slice = slice(None),
               reading: Optional[Mapping[str, object]] = None):
    self._iterator = iter(dataset)
    self.batch_size = batch_size
    self.truncation = truncation
    self.rows = rows
    self.reading = dict(reading or {'read': 'whole'})

  def __iter__(self) -> 'BatchIterator':
    return self

  def save(self, path: str) -> None:
    """Writes the pipeline's position (tf.data iterator state, shuffle buffers included), so
    `restore` continues from here without replaying what was read (T5X checkpoints its
    dataset iterator the same way), and with it what this pipeline reads."""
    reading = tf.Variable(json.dumps(self.reading, sort_keys=True))
    tf.train.Checkpoint(iterator=self._iterator, reading=reading).write(path)

  def restore(self, path: str) -> None:
    """Continues from a position `save` wrote; `PositionMismatch` if it was saved by another
    reading (a per-host read for other rows: another process count), which it cannot resume."""
    recorded = _READING_KEY in dict(tf.train.list_variables(path))
    saved = {'read': 'whole'}  # positions saved before readings were recorded
    if recorded:
      saved = json.loads(tf.train.load_checkpoint(path).get_tensor(_READING_KEY))
    if saved != self.reading:
      raise PositionMismatch(f'{path}: the data position was saved by {saved}, not by this '
                             f'process\'s {self.reading}; resume with the same processes')
    objects = dict(iterator=self._iterator, **({'reading': tf.Variable('')} if recorded else {}))
    tf.train.Checkpoint(**objects).read(path).assert_consumed()

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = {k: v.numpy()[self.rows] for k, v in next(self._iterator).items()}
    except StopIteration:
      if self.truncation.examples:
        logger.info('%s: end of data; %s', self.truncation.name, self.truncation.summary())
      raise
    size = len(batch[TRUNCATED])
    batch[EXAMPLE_MASK] = np.ones(size, np.int32)
    if size < self.batch_size:  # the last batch of a finite split: pad and mask
      pad = self.batch_size - size
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    self.truncation.update(batch.pop(TRUNCATED), batch[EXAMPLE_MASK])
    if TASK_INDEX in batch:
      batch[TASK_INDEX] = batch[TASK_INDEX].reshape(-1)
    return batch


def traced_as_written(build):
  """`build` makes its tf.data pipeline with AutoGraph off: each map/filter function is traced
  as written. tf.data otherwise runs every one through AutoGraph, which re-parses its source
  (for a lambda, its whole module): 16 s of a 4-step tiny run's 30 s start-up on 2 cores,
  measured 2026-12-07. The pipelines' functions (seqio's, TFDS's, ours) branch on Python
  values only, never on a tensor, so the traced graphs are the same."""
  @functools.wraps(build)
  def wrapper(*args, **kwargs):
    with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED):
      return build(*args, **kwargs)
  return wrapper


@traced_as_written
def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                split: str = 'train', batch_size: int = 32, *, shuffle: bool = True,
                seed: Optional[int] = None, num_epochs: Optional[int] = None,
                shard_id: int = 0, num_shards: int = 1, use_cached: bool = False,
                try_in_mem_cache: bool = True, with_task_index: bool = False,
                process_index: int = 0, process_count: int = 1,
                read: str = 'per_host') -> BatchIterator:
  """Numpy batches of a seqio task or mixture for a prompted encoder-decoder.

  Training: `shuffle=True`, a `seed` for a reproducible order and `num_epochs=None` (repeat).
  Evaluation: `shuffle=False, num_epochs=1`: every example once, in order; the last batch is
  padded with zeros to `batch_size` and `example_mask` marks the real rows, so metrics can be
  exact.

  Multi-host training: `batch_size` is the global batch, and process `process_index` of
  `process_count` gets its rows of each global batch (rows `index * B / count` on), the same
  examples in the same order whatever the number of processes. `read='per_host'` numbers the
  examples of seqio's shuffled stream before the task's one-to-one tail of preprocessors
  (tokenisation) and runs that tail on this process's rows only; tasks where that would change
  the stream (a filtering or random preprocessor last) are read whole, as `read='whole'` does:
  every process reads the global batch and keeps its slice.

  Args:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: {'inputs': text budget, 'targets': target budget}.
    split: the split to read.
    batch_size: examples per batch (the global batch when `process_count` > 1).
    shuffle: shuffle files and examples.
    seed: seed for shuffling and mixing; the same seed gives the same batches.
    num_epochs: passes over the data; None repeats forever.
    shard_id: this host's shard of seqio's own sharding (`seqio.ShardInfo`): other examples,
      not the same global batch; not with `process_count`.
    num_shards: number of hosts reading disjoint shards.
    use_cached: read a seqio cache made offline (`seqio-cache`), as T5X can.
    try_in_mem_cache: let seqio keep small sources in memory (it asks TFDS for split sizes,
      which mocked TFDS data does not have).
    with_task_index: add `task_index` [B], each example's task as a position in the mixture's
      `member_tasks` (0 for a task): mixed-task batches for a stack of task prompts. A mixture
      is then sampled here from its members at the mixture's rates.
    process_index: this process, for its rows of the global batch.
    process_count: processes sharing each global batch; it must divide `batch_size`.
    read: 'per_host' (preprocess this process's rows only, where the task allows) or 'whole'.

  Returns:
    A `BatchIterator` of dicts with `encoder_input_tokens` [B, inputs], `decoder_input_tokens`,
    `decoder_target_tokens`, `decoder_loss_weights` [B, targets] (int32) and `example_mask` [B]
    (B: this process's rows); its `.truncation` counts the examples that were cut.
  """
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  lengths = {'inputs': int(task_feature_lengths['inputs']),
             'targets': int(task_feature_lengths['targets'])}
  rows = _process_rows(batch_size, process_index, process_count)
  if read not in ('per_host', 'whole'):
    raise ValueError(f"read {read!r}: choose 'per_host' or 'whole'")
  if process_count > 1 and num_shards > 1:
    raise ValueError('num_shards (seqio sharding) and process_count (rows of one global batch) '
                     'are two ways to split the data; pass one of them')
  truncation = TruncationCounter(mixture_or_task_name, lengths)
  members = _members(provider, split, seed, shuffle, with_task_index)
  reason = _per_host_obstacle(members, shuffle, seed, num_epochs, use_cached)
  if process_count > 1 and read == 'per_host' and reason is None:
    dataset = _per_host_examples(provider, members, split, shuffle, try_in_mem_cache,
                                 with_task_index, rows, batch_size)
    dataset = _batches(dataset, provider, lengths, with_task_index, rows.stop - rows.start)
    reading = {'read': 'per_host', 'batch_size': batch_size, 'rows': [rows.start, rows.stop]}
    return BatchIterator(dataset, rows.stop - rows.start, truncation, reading=reading)
  if process_count > 1 and read == 'per_host':
    logger.info('%s: every process reads the whole global batch: %s', mixture_or_task_name,
                reason)
  shard_info = seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None
  read_args = dict(sequence_length=None, split=split, use_cached=use_cached, shuffle=shuffle,
                   shard_info=shard_info, num_epochs=num_epochs,
                   try_in_mem_cache=try_in_mem_cache)
  if with_task_index:
    parts = [member.task.get_dataset(seed=member.seed, **read_args).map(
        functools.partial(_text_features, task_index=member.index)) for member in members]
    dataset = (parts[0] if len(parts) == 1 else tf.data.Dataset.sample_from_datasets(
        parts, _member_weights(provider, members), seed=seed, stop_on_empty_dataset=False))
  else:
    dataset = provider.get_dataset(seed=seed, **read_args)
  dataset = _batches(dataset, provider, lengths, with_task_index, batch_size)
  return BatchIterator(dataset, rows.stop - rows.start, truncation, rows=rows)


@dataclasses.dataclass(frozen=True)
class _Member:
  """A task read for a batch stream: its shuffle seed and its `task_index` (None: no index)."""
  task: seqio.Task
  seed: Optional[int]
  index: Optional[int]


def _members(provider, split: str, seed: Optional[int], shuffle: bool,
             with_task_index: bool) -> list[_Member]:
  """The tasks a stream reads, each with the seed the whole read gives it.

  With a task index, member i is shuffled with `seed + i` (so tasks sharing a source differ);
  a seqio mixture shuffles every member with `seed` and skips those without the split.
  """
  if not isinstance(provider, seqio.Mixture):
    return [_Member(provider, seed, 0 if with_task_index else None)]
  if with_task_index:
    return [_Member(t, None if seed is None else seed + i, i)
            for i, t in enumerate(provider.tasks)]
  return [_Member(t, seed, None) for t in provider.tasks if split in t.splits]


def _member_weights(provider, members: list[_Member]) -> list[float]:
  rates = [float(provider.get_rate(m.task)) for m in members]
  return [r / sum(rates) for r in rates]


def _process_rows(batch_size: int, index: int, count: int) -> slice:
  """Process `index`'s rows of a global batch of `batch_size` shared by `count` processes."""
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'process_index {index} of process_count {count}: need 0 <= index < count')
  if batch_size % count:
    raise ValueError(f'batch_size {batch_size} is not a multiple of the {count} processes; '
                     'choose one that is')
  share = batch_size // count
  return slice(index * share, (index + 1) * share)


def _text_features(example, task_index: Optional[int] = None) -> dict[str, tf.Tensor]:
  """The features every member of a stream shares: inputs, targets (and the task index)."""
  out = {'inputs': example['inputs'], 'targets': example['targets']}
  if task_index is not None:
    out[TASK_INDEX] = tf.constant([task_index], tf.int32)
  return out


def _batches(dataset: tf.data.Dataset, provider, lengths: Mapping[str, int],
             with_task_index: bool, batch_size: int) -> tf.data.Dataset:
  """Counted truncation, feature conversion and batching of a stream of text examples."""
  passthrough = {TRUNCATED: 2, **({TASK_INDEX: 1} if with_task_index else {})}
  features = provider.output_features
  keeps_eos = {k: features[k].add_eos for k in ('inputs', 'targets')}
  dataset = dataset.map(lambda ex: _truncate(ex, lengths, keeps_eos),
                        num_parallel_calls=tf.data.AUTOTUNE)
  # `_truncate` has cut every feature to its length: seqio's own check (a traced assert per
  # feature, 4 s of a tiny run's start) could never fire.
  converter = seqio.EncDecFeatureConverter(
      pack=False, apply_length_check=False, passthrough_features={
          k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for k in passthrough})
  dataset = converter(dataset, {**lengths, **passthrough})
  dataset = dataset.batch(batch_size)
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options).prefetch(2)


# ---------------------------------------------------------------------------------------------
# Per-host reading.
#
# seqio's Task.get_dataset reads the source, runs the preprocessors before its cache point,
# repeats, runs the others and shuffles last, so tokenised examples fill the shuffle buffer. The
# shuffle's order depends only on the seed and the number of elements, not on their contents:
# preprocessors that map each example to exactly one example, deterministically, can run after
# the shuffle instead without changing the stream. A per-host read therefore rebuilds that
# pipeline with the task's one-to-one tail left out, numbers the shuffled raw examples, keeps
# this process's rows and only then runs the tail (tokenisation). Mixtures are sampled by a
# selector that depends only on the seed and the rates, so each member keeps the examples whose
# global position falls in this process's rows.

# seqio preprocessors known to map one example to one, the same whatever else is in the stream.
_ONE_TO_ONE_SEQIO = (seqio.preprocessors.rekey, seqio.preprocessors.tokenize,
                     seqio.preprocessors.tokenize_and_append_eos, seqio.preprocessors.append_eos,
                     seqio.preprocessors.append_eos_after_trim)
# jaxprompt's own preprocessors say so themselves (`data.tasks.map_examples`' formatters, the
# lab's task prefix): a preprocessor with this attribute set True is run per host.
ONE_TO_ONE_ATTRIBUTE = 'maps_one_to_one'


def maps_one_to_one(preprocessor) -> bool:
  """Whether `preprocessor` maps each example to exactly one, deterministically (no filter, no
  randomness, no dependence on other examples): then it can run on a host's rows only."""
  fn = preprocessor
  while isinstance(fn, functools.partial):
    fn = fn.func
  return bool(getattr(fn, ONE_TO_ONE_ATTRIBUTE, False)) or fn in _ONE_TO_ONE_SEQIO


def _tail_start(task: seqio.Task) -> int:
  """Where the task's one-to-one tail of preprocessors starts (its cache point may be in it)."""
  preprocessors = list(task.preprocessors)
  start = len(preprocessors)
  while start and (isinstance(preprocessors[start - 1], seqio.CacheDatasetPlaceholder)
                   or maps_one_to_one(preprocessors[start - 1])):
    start -= 1
  return start


def _per_host_obstacle(members: list[_Member], shuffle: bool, seed: Optional[int],
                       num_epochs: Optional[int], use_cached: bool) -> Optional[str]:
  """Why this stream cannot be read per host (None: it can)."""
  if num_epochs is not None:
    return 'a finite split (num_epochs set)'
  if shuffle and seed is None:
    return 'no seed: every process would shuffle differently'
  if use_cached:
    return 'use_cached'
  for member in members:
    task = member.task
    if task.requires_caching:
      return f'{task.name} requires an offline cache'
    if shuffle and task.shuffle_buffer_size is None:
      return f'{task.name} has no shuffle buffer'
    if _tail_start(task) == len(task.preprocessors):
      return f'{task.name} ends with a preprocessor not known to map one example to one'
  return None


def _apply(task: seqio.Task, dataset: tf.data.Dataset, preprocessors) -> tf.data.Dataset:
  for preprocessor in preprocessors:  # as seqio's Task._preprocess_dataset, without lengths
    dataset = seqio.utils.add_kwargs_to_transform(
        preprocessor, sequence_length=None, output_features=task.output_features)(dataset)
  return dataset


def _shuffled_raw(task: seqio.Task, split: str, shuffle: bool, seed: Optional[int],
                  try_in_mem_cache: bool, tail: int) -> tf.data.Dataset:
  """seqio's `Task.get_dataset(sequence_length=None, num_epochs=None)` stream, with the
  preprocessors from `tail` on left out: the same examples in the same order, before the tail."""
  source = task.source
  dataset = source.get_dataset(split=split, shuffle=shuffle, seed=seed)
  size = source.num_input_examples(split)
  if try_in_mem_cache and size and size < seqio.dataset_providers._MAX_EXAMPLES_TO_MEM_CACHE:
    dataset = dataset.cache()
  head = list(task.preprocessors)[:tail]
  before_repeat, after_repeat, after_seed = [], head, seed
  if task.supports_caching:  # seqio's seeds: the post-cache steps start 42 per step later
    point = next(i for i, p in enumerate(task.preprocessors)
                 if isinstance(p, seqio.CacheDatasetPlaceholder))
    before_repeat, after_repeat = head[:point], head[point + 1:]
    after_seed = None if seed is None else seed + 42 * point
  with seqio.utils.map_seed_manager(seed):
    dataset = _apply(task, dataset, before_repeat)
  dataset = dataset.repeat()
  with seqio.utils.map_seed_manager(after_seed):
    dataset = _apply(task, dataset, after_repeat)
  if shuffle:
    dataset = dataset.shuffle(task.shuffle_buffer_size, seed=seed)
  return dataset


def _per_host_examples(provider, members: list[_Member], split: str, shuffle: bool,
                       try_in_mem_cache: bool, with_task_index: bool, rows: slice,
                       batch_size: int) -> tf.data.Dataset:
  """This process's rows of the endless global stream of text examples, each preprocessed
  here only."""

  def in_rows(position):
    row = position % batch_size
    return (row >= rows.start) & (row < rows.stop)

  def member_examples(member: _Member, keep: tf.data.Dataset) -> tf.data.Dataset:
    tail = _tail_start(member.task)
    raw = _shuffled_raw(member.task, split, shuffle, member.seed, try_in_mem_cache, tail)
    mine = tf.data.Dataset.zip(raw, keep).filter(_second).map(_first)
    mine = _apply(member.task, mine, [p for p in member.task.preprocessors[tail:]
                                      if not isinstance(p, seqio.CacheDatasetPlaceholder)])
    return mine.map(functools.partial(_text_features, task_index=member.index),
                    num_parallel_calls=tf.data.AUTOTUNE)

  if len(members) == 1:
    return member_examples(members[0], tf.data.Dataset.counter().map(in_rows))
  # (position, member) of every example of the whole read's mixture
  numbered = _mixture_choices(provider, members, shuffle, with_task_index).enumerate()

  def keep_of(member: int) -> tf.data.Dataset:  # for each example of `member`: is it ours?
    return numbered.filter(lambda position, m: tf.equal(m, member)).map(
        lambda position, m: in_rows(position))

  parts = [member_examples(m, keep_of(i)) for i, m in enumerate(members)]
  ours = numbered.filter(lambda position, m: in_rows(position)).map(_second)
  return tf.data.Dataset.choose_from_datasets(parts, ours, stop_on_empty_dataset=False)


def _first(a, b):
  del b
  return a


def _second(a, b):
  del a
  return b


def _mixture_choices(provider, members: list[_Member], shuffle: bool,
                     with_task_index: bool) -> tf.data.Dataset:
  """The member each position of the whole read's mixture takes its example from.

  Sampling from endless datasets picks a member from the seed and the rates alone, so sampling
  from endless streams of member numbers gives the whole read's choices.
  """
  numbers = [tf.data.Dataset.from_tensors(tf.constant(i, tf.int64)).repeat()
             for i in range(len(members))]
  seed = members[0].seed  # the run's seed (member i of a task-index read has seed + i)
  if with_task_index:
    return tf.data.Dataset.sample_from_datasets(numbers, _member_weights(provider, members),
                                                seed=seed, stop_on_empty_dataset=False)
  sample_seed = seed if seed is not None else (None if shuffle else 42)  # as seqio's Mixture
  rates = [float(provider.get_rate(m.task)) for m in members]
  return provider._sample_fn(numbers, rates, sample_seed)  # pylint: disable=protected-access
