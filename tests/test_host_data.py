"""Per-host reading of the global batch: each process gets exactly its rows of the 1-process run.

The reference is the whole read (seqio's own `Task.get_dataset`/`Mixture.get_dataset`, or the
task-index sampler, batched at the global size) sliced to the process's rows.
"""

import os

import data_helpers
import numpy as np
import pytest
import seqio
import tensorflow as tf

from jaxprompt.data import features, files, tasks

LENGTHS = {'inputs': 12, 'targets': 4}
BATCH = 8
STEPS = 3


@pytest.fixture(scope='module')
def task_names(tmp_path_factory):
  """Three file tasks of different sizes and words, and mixtures of them."""
  root = tmp_path_factory.mktemp('host_data')
  vocab = data_helpers.vocabulary()
  names = []
  for i, (size, word) in enumerate(((13, 'dog'), (7, 'cat'), (21, 'city'))):
    rows = [{'input': f'{word} {" ".join(["the"] * (j % 5))} {j}', 'target': f'{word} {j % 3}'}
            for j in range(size)]
    path = data_helpers.write_jsonl(root / f'part{i}.jsonl', rows)
    files.register_file_task(f'host_part_{i}', path, vocabulary=vocab)
    names.append(f'host_part_{i}')
  tasks.register_mixture('host_mix', names, rates=[1.0, 2.0, 0.5])
  return names


def batches(name, count=1, index=0, steps=STEPS, **kwargs):
  it = features.get_dataset(name, LENGTHS, 'train', BATCH, seed=5, process_index=index,
                            process_count=count, **kwargs)
  return it, [next(it) for _ in range(steps)]


def assert_rows(whole, mine, index, count, start=0):
  """`mine` are the rows of process `index` of `count` of the global batches `whole[start:]`."""
  rows = slice(index * BATCH // count, (index + 1) * BATCH // count)
  assert len(mine) and len(whole) >= start + len(mine)
  for step, batch in enumerate(mine):
    reference = whole[start + step]
    assert set(features.MODEL_FEATURES) <= set(batch) <= set(reference)
    for key, value in batch.items():
      np.testing.assert_array_equal(value, reference[key][rows], err_msg=f'{key} step {step}')


SLOW = pytest.mark.slow  # mixtures build a pipeline per member


@pytest.mark.parametrize('name,with_task_index', [
    ('host_part_0', False), pytest.param('host_mix', False, marks=SLOW),
    pytest.param('host_mix', True, marks=SLOW)])
def test_each_process_gets_its_rows_of_the_one_process_batch(task_names, name, with_task_index):
  _, whole = batches(name, with_task_index=with_task_index)
  assert whole[0]['encoder_input_tokens'].shape == (BATCH, LENGTHS['inputs'])
  if with_task_index:  # the mixture really mixes: every member within three global batches
    assert set(np.concatenate([b['task_index'] for b in whole])) == {0, 1, 2}
  for count, index in ((2, 1), (4, 2), (8, 7)):
    it, mine = batches(name, count, index, with_task_index=with_task_index)
    assert it.reading == {'read': 'per_host', 'batch_size': BATCH,
                          'rows': [index * BATCH // count, (index + 1) * BATCH // count]}
    assert_rows(whole, mine, index, count)


def test_the_whole_read_is_seqios_stream(task_names):
  """The 1-process reference itself: seqio's shuffled stream of the task, in order."""
  task = seqio.get_mixture_or_task('host_part_2')
  stream = task.get_dataset(None, 'train', shuffle=True, seed=5, num_epochs=None)
  inputs = [ex['inputs'] for ex, _ in zip(stream.as_numpy_iterator(), range(BATCH * STEPS))]
  _, whole = batches('host_part_2')
  _, mine = batches('host_part_2', 4, 2)
  for step in range(STEPS):
    for row in range(2):
      expected = inputs[step * BATCH + 4 + row]
      got = mine[step]['encoder_input_tokens'][row]
      np.testing.assert_array_equal(got[:len(expected)], expected)
      assert not got[len(expected):].any()
    assert (whole[step]['encoder_input_tokens'][4:6] == mine[step]['encoder_input_tokens']).all()


@pytest.mark.parametrize('name,with_task_index', [
    ('host_part_1', False), pytest.param('host_mix', True, marks=SLOW)])
def test_a_saved_position_resumes_the_same_rows(task_names, tmp_path, name, with_task_index):
  _, whole = batches(name, steps=5, with_task_index=with_task_index)
  it, _ = batches(name, 4, 1, steps=2, with_task_index=with_task_index)
  path = str(tmp_path / 'position')
  it.save(path)
  resumed, _ = batches(name, 4, 1, steps=0, with_task_index=with_task_index)
  resumed.restore(path)
  assert_rows(whole, [next(resumed) for _ in range(3)], 1, 4, start=2)
  # A position is only restored into the same reading: other rows (another process count) or
  # the whole read refuse it (TrainBatches then replays).
  for other in (dict(count=2, index=1), dict(count=4, index=1, read='whole')):
    it, _ = batches(name, steps=0, with_task_index=with_task_index, **other)
    with pytest.raises(features.PositionMismatch, match='resume with the same processes'):
      it.restore(path)


def test_lab_task_with_its_prefix_is_read_per_host():
  from jaxprompt.lab import tasks as lab_tasks
  lab_tasks.register_lab_tasks()
  name = lab_tasks.seqio_name('has_red', prefixed=True)
  assert features._tail_start(seqio.get_mixture_or_task(name)) == 0  # prefix and tokenise
  _, whole = batches(name, steps=2)
  it, mine = batches(name, 2, 1, steps=2)
  assert it.reading['read'] == 'per_host'
  assert_rows(whole, mine, 1, 2)


@pytest.mark.parametrize('filter_at,reading', [(2, 'whole'), (1, 'per_host')])
def test_a_filter_keeps_what_follows_it_per_host(task_names, filter_at, reading):
  """A preprocessor that may drop examples runs on the whole stream; only the one-to-one tail
  after it runs per host (none: the task is read whole), and the rows are right either way."""
  base = seqio.get_mixture_or_task('host_part_2')
  name = f'host_filtered_{filter_at}'
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)

  def drop_short(dataset):  # unknown to the per-host read
    return dataset.filter(lambda ex: tf.size(ex['inputs']) > 3)

  preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  preprocessors.insert(filter_at, drop_short)
  seqio.TaskRegistry.add(name, source=base.source, output_features=base.output_features,
                         preprocessors=preprocessors)
  assert features._tail_start(seqio.get_mixture_or_task(name)) == filter_at + 1
  _, whole = batches(name)
  assert (whole[0]['encoder_input_tokens'] > 0).sum(axis=1).min() > 4  # the filter worked
  it, mine = batches(name, 2, 1)
  assert it.reading['read'] == reading
  assert_rows(whole, mine, 1, 2)


def test_bad_process_arguments(task_names):
  with pytest.raises(ValueError, match='batch_size 8 is not a multiple of the 3 processes'):
    features.get_dataset('host_part_0', LENGTHS, batch_size=8, seed=0, process_count=3)
  with pytest.raises(ValueError, match='process_index 2 of process_count 2'):
    features.get_dataset('host_part_0', LENGTHS, batch_size=8, seed=0, process_index=2,
                         process_count=2)


def test_a_position_saved_before_readings_were_recorded_resumes_the_whole_read(task_names,
                                                                               tmp_path):
  it, whole = batches('host_part_1', steps=2)
  path = str(tmp_path / 'old')
  tf.train.Checkpoint(iterator=it._iterator).write(path)  # as saved before this change
  expected = [next(it) for _ in range(2)]
  resumed, _ = batches('host_part_1', steps=0)
  resumed.restore(path)
  assert_rows(expected, [next(resumed) for _ in range(2)], 0, 1)
  per_host, _ = batches('host_part_1', 2, 0, steps=0)
  with pytest.raises(features.PositionMismatch):
    per_host.restore(path)


def test_train_batches_resume_and_replay_their_rows(task_names, tmp_path, monkeypatch, capsys):
  """The run's batches on process 1 of 2: a saved position resumes; at another process count
  (process 3 of 4) the position is refused and the batches are replayed to the same place."""
  import jax
  from jaxprompt import tuning
  from jaxprompt.config import RunConfig
  config = RunConfig(batch_size=BATCH, feature_lengths=LENGTHS, seed=5)
  _, whole = batches('host_part_0', steps=5)

  def on_process(index, count):
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    monkeypatch.setattr(jax, 'process_count', lambda: count)

  on_process(1, 2)
  run = tuning.TrainBatches('host_part_0', config, str(tmp_path), 0)
  assert_rows(whole, [next(run) for _ in range(2)], 1, 2)
  run.save(2)
  assert_rows(whole, [next(tuning.TrainBatches('host_part_0', config, str(tmp_path), 2))], 1, 2,
              start=2)
  on_process(3, 4)  # process 3 finds a position saved for other rows (process 1 of 2's)
  saved = os.path.join(tmp_path, 'data_state', 'step_2')
  for name in os.listdir(saved):
    os.rename(os.path.join(saved, name), os.path.join(saved, name.replace('_1.', '_3.')))
  capsys.readouterr()
  resumed = tuning.TrainBatches('host_part_0', config, str(tmp_path), 2)
  assert 'resume with the same processes; replaying 2 batches' in capsys.readouterr().err
  assert_rows(whole, [next(resumed) for _ in range(2)], 3, 4, start=2)


def test_one_to_one_preprocessors_are_known_by_their_mark_not_their_name():
  formatter = tasks.map_examples(lambda ex: ex)
  assert features.maps_one_to_one(formatter)
  assert features.maps_one_to_one(seqio.preprocessors.tokenize)
  renamed = tasks.map_examples(lambda ex: ex)
  renamed.__qualname__ = 'something_else'
  assert features.maps_one_to_one(renamed)
  assert not features.maps_one_to_one(lambda ds: ds.filter(lambda ex: True))
