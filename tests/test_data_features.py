"""Batches: encoder length with a prompt, determinism, eval padding, sharding, truncation."""

import logging

import data_helpers
import numpy as np
import pytest

from jaxprompt.data import evaluation, features, files

NUM_EXAMPLES = 10
LENGTHS = {'inputs': 16, 'targets': 4}


@pytest.fixture(scope='module')
def task_name(tmp_path_factory):
  """A file task of NUM_EXAMPLES short examples, example i's input naming i."""
  directory = tmp_path_factory.mktemp('features')
  rows = [{'input': f'the dog {i}', 'target': 'yes' if i % 2 else 'no'}
          for i in range(NUM_EXAMPLES)]
  path = data_helpers.write_jsonl(directory / 'train.jsonl', rows)
  files.register_file_task('features_task', path, path, vocabulary=data_helpers.vocabulary())
  return 'features_task'


def take(batches, n):
  return [next(batches) for _ in range(n)]


def decode_inputs(batch):
  vocabulary = data_helpers.vocabulary()
  return [vocabulary.decode(row.tolist()) for row, m in
          zip(batch['encoder_input_tokens'], batch['example_mask']) if m]


def test_encoder_length_adds_the_prompt():
  assert features.encoder_length({'inputs': 256, 'targets': 8}, prompt_length=100) == 356
  assert features.encoder_length({'inputs': 256, 'targets': 8}, prompt_length=0) == 256


def test_model_features_and_shapes(task_name):
  batch = next(features.get_dataset(task_name, LENGTHS, 'train', batch_size=4, seed=0))
  assert set(batch) == set(features.MODEL_FEATURES) | {'example_mask'}
  assert batch['encoder_input_tokens'].shape == (4, 16)
  assert batch['decoder_target_tokens'].shape == (4, 4)
  assert batch['encoder_input_tokens'].dtype == np.int32
  # Decoder inputs are the targets shifted right behind a 0 (T5's BOS).
  np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
  np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                batch['decoder_target_tokens'][:, :-1])
  np.testing.assert_array_equal(batch['decoder_loss_weights'],
                                batch['decoder_target_tokens'] > 0)


def test_same_seed_same_batches(task_name):
  def run(seed):
    return take(features.get_dataset(task_name, LENGTHS, 'train', batch_size=4, seed=seed), 6)
  first, second, other = run(3), run(3), run(4)
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any((a['encoder_input_tokens'] != c['encoder_input_tokens']).any()
             for a, c in zip(first, other))


def test_training_repeats_and_shuffles(task_name):
  batches = take(features.get_dataset(task_name, LENGTHS, 'train', batch_size=4, seed=0), 5)
  texts = [t for b in batches for t in decode_inputs(b)]
  assert len(texts) == 20 and all(b['example_mask'].all() for b in batches)
  # seqio repeats before it shuffles (as T5X), so epochs blend in the shuffle buffer.
  assert set(texts) <= {f'the dog {i}' for i in range(NUM_EXAMPLES)}
  assert texts[:NUM_EXAMPLES] != [f'the dog {i}' for i in range(NUM_EXAMPLES)]


def test_eval_keeps_every_example_once_and_pads_the_last_batch(task_name):
  batches = list(features.get_dataset(task_name, LENGTHS, 'validation', batch_size=4,
                                      shuffle=False, num_epochs=1))
  assert len(batches) == 3
  assert [b['example_mask'].tolist() for b in batches][-1] == [1, 1, 0, 0]
  assert all(b['encoder_input_tokens'].shape == (4, 16) for b in batches)
  np.testing.assert_array_equal(batches[-1]['encoder_input_tokens'][2:], 0)
  np.testing.assert_array_equal(batches[-1]['decoder_loss_weights'][2:], 0)
  texts = [t for b in batches for t in decode_inputs(b)]
  assert texts == [f'the dog {i}' for i in range(NUM_EXAMPLES)]


def test_shards_are_disjoint_and_cover_the_split(task_name):
  texts = []
  for shard in range(2):
    batches = features.get_dataset(task_name, LENGTHS, 'validation', batch_size=4,
                                   shuffle=False, num_epochs=1, shard_id=shard, num_shards=2)
    texts.append([t for b in batches for t in decode_inputs(b)])
  assert len(texts[0]) == len(texts[1]) == NUM_EXAMPLES // 2
  assert sorted(texts[0] + texts[1]) == sorted(f'the dog {i}' for i in range(NUM_EXAMPLES))


def test_truncation_is_counted_and_logged(tmp_path, caplog):
  rows = [{'input': 'the dog', 'target': 'yes'},
          {'input': ' '.join(['the dog'] * 20), 'target': 'yes'},
          {'input': 'a cat', 'target': ' '.join(['no'] * 20)}]
  path = data_helpers.write_jsonl(tmp_path / 'long.jsonl', rows)
  files.register_file_task('features_long', path, vocabulary=data_helpers.vocabulary())
  with caplog.at_level(logging.WARNING):
    batches = features.get_dataset('features_long', LENGTHS, 'train', batch_size=4,
                                   shuffle=False, num_epochs=1)
    batch = next(batches)
  counter = batches.truncation
  assert (counter.examples, counter.inputs_truncated, counter.targets_truncated) == (3, 1, 1)
  assert 'truncated' in caplog.text and '1 of 3 inputs' in caplog.text
  # A cut text keeps its budget and still ends with EOS (1), as seqio's append_eos_after_trim.
  assert batch['encoder_input_tokens'][1, -1] == 1
  assert batch['decoder_target_tokens'][2, -1] == 1
  assert (batch['encoder_input_tokens'][1] > 0).all()
  assert counter.summary().startswith('1 of 3 inputs (33.3%) cut to 16')


def test_nothing_truncated_nothing_logged(task_name, caplog):
  with caplog.at_level(logging.WARNING):
    batches = features.get_dataset(task_name, {'inputs': 32, 'targets': 4}, 'validation',
                                   batch_size=8, shuffle=False, num_epochs=1)
    list(batches)
  assert batches.truncation.examples == NUM_EXAMPLES
  assert batches.truncation.inputs_truncated == 0
  assert 'truncated' not in caplog.text


def test_eval_examples_align_with_batches_and_metrics_are_exact(task_name):
  examples = evaluation.eval_examples(task_name, 'validation')
  assert [ex['inputs_pretokenized'].decode() for ex in examples] == [
      f'the dog {i}' for i in range(NUM_EXAMPLES)]
  targets = [ex['targets_pretokenized'].decode() for ex in examples]
  assert evaluation.compute_metrics(task_name, examples, targets) == {
      'exact_match': 100.0, 'f1': 100.0}
  wrong_half = [t if i < 5 else 'maybe' for i, t in enumerate(targets)]
  assert evaluation.compute_metrics(task_name, examples, wrong_half)['exact_match'] == 50.0
  with pytest.raises(ValueError, match='example_mask'):
    evaluation.compute_metrics(task_name, examples, targets + ['extra'])
