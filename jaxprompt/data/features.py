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
import logging
from typing import Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

logger = logging.getLogger(__name__)
TRUNCATED = 'truncated'  # passthrough feature: [inputs cut, targets cut]
EXAMPLE_MASK = 'example_mask'
TASK_INDEX = 'task_index'  # with_task_index: the example's task, a position in member_tasks()
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


class BatchIterator:
  """Iterator of numpy batches with a `truncation` counter and an `example_mask`."""

  def __init__(self, dataset: tf.data.Dataset, batch_size: int,
               truncation: TruncationCounter):
    self._iterator = iter(dataset)
    self.batch_size = batch_size
    self.truncation = truncation

  def __iter__(self) -> 'BatchIterator':
    return self

  def save(self, path: str) -> None:
    """Writes the pipeline's position (tf.data iterator state, shuffle buffers included), so
    `restore` continues from here without replaying what was read (T5X checkpoints its
    dataset iterator the same way)."""
    tf.train.Checkpoint(iterator=self._iterator).write(path)

  def restore(self, path: str) -> None:
    tf.train.Checkpoint(iterator=self._iterator).read(path).assert_consumed()

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = {k: v.numpy() for k, v in next(self._iterator).items()}
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


def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                split: str = 'train', batch_size: int = 32, *, shuffle: bool = True,
                seed: Optional[int] = None, num_epochs: Optional[int] = None,
                shard_id: int = 0, num_shards: int = 1, use_cached: bool = False,
                try_in_mem_cache: bool = True, with_task_index: bool = False) -> BatchIterator:
  """Numpy batches of a seqio task or mixture for a prompted encoder-decoder.

  Training: `shuffle=True`, a `seed` for a reproducible order and `num_epochs=None` (repeat).
  Evaluation: `shuffle=False, num_epochs=1`: every example once, in order; the last batch is
  padded with zeros to `batch_size` and `example_mask` marks the real rows, so metrics can be
  exact. Each host reads its own shard (`seqio.ShardInfo(shard_id, num_shards)`).

  Args:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: {'inputs': text budget, 'targets': target budget}.
    split: the split to read.
    batch_size: examples per batch (per host).
    shuffle: shuffle files and examples.
    seed: seed for shuffling and mixing; the same seed gives the same batches.
    num_epochs: passes over the data; None repeats forever.
    shard_id: this host's shard.
    num_shards: number of hosts reading disjoint shards.
    use_cached: read a seqio cache made offline (`seqio-cache`), as T5X can.
    try_in_mem_cache: let seqio keep small sources in memory (it asks TFDS for split sizes,
      which mocked TFDS data does not have).
    with_task_index: add `task_index` [B], each example's task as a position in the mixture's
      `member_tasks` (0 for a task): mixed-task batches for a stack of task prompts. A mixture
      is then sampled here from its members at the mixture's rates.

  Returns:
    A `BatchIterator` of dicts with `encoder_input_tokens` [B, inputs], `decoder_input_tokens`,
    `decoder_target_tokens`, `decoder_loss_weights` [B, targets] (int32) and `example_mask` [B];
    its `.truncation` counts the examples that were cut.
  """
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  lengths = {'inputs': int(task_feature_lengths['inputs']),
             'targets': int(task_feature_lengths['targets'])}
  shard_info = seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None
  read = dict(sequence_length=None, split=split, use_cached=use_cached, shuffle=shuffle,
              shard_info=shard_info, num_epochs=num_epochs, try_in_mem_cache=try_in_mem_cache)
  passthrough = {TRUNCATED: 2}
  if with_task_index:
    members = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    parts = []
    for i, task in enumerate(members):
      part = task.get_dataset(seed=None if seed is None else seed + i, **read)
      parts.append(part.map(
          lambda ex, i=i: {'inputs': ex['inputs'], 'targets': ex['targets'],
                           TASK_INDEX: tf.constant([i], tf.int32)}))
    if len(parts) == 1:
      dataset = parts[0]
    else:
      rates = [float(provider.get_rate(t)) for t in members]
      dataset = tf.data.Dataset.sample_from_datasets(
          parts, [r / sum(rates) for r in rates], seed=seed, stop_on_empty_dataset=False)
    passthrough[TASK_INDEX] = 1
  else:
    dataset = provider.get_dataset(seed=seed, **read)
  features = provider.output_features
  keeps_eos = {k: features[k].add_eos for k in ('inputs', 'targets')}
  dataset = dataset.map(lambda ex: _truncate(ex, lengths, keeps_eos),
                        num_parallel_calls=tf.data.AUTOTUNE)
  converter = seqio.EncDecFeatureConverter(
      pack=False, passthrough_features={
          k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for k in passthrough})
  dataset = converter(dataset, {**lengths, **passthrough})
  dataset = dataset.batch(batch_size)
  options = tf.data.Options()
  options.deterministic = True
  dataset = dataset.with_options(options).prefetch(2)
  return BatchIterator(dataset, batch_size, TruncationCounter(mixture_or_task_name, lengths))
