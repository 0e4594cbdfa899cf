"""TFDS tasks and mixtures, offline: every registered task yields batches from mocked TFDS.

`tfds.testing.mock_data(policy=MockPolicy.USE_CODE)` builds random examples from each dataset
builder's code (features and label names), so no metadata or data files are needed. It knows no
split sizes, so `try_in_mem_cache=False` and mixing rates fall back to `tasks.TRAIN_SIZES`.
"""

import functools

import data_helpers
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from jaxprompt.data import features, files, tasks

LENGTHS = {'inputs': 48, 'targets': 8}
TASK_NAMES = [f'jaxprompt_{spec.name}' for spec in tasks.tfds_task_specs()]
MIXTURE_NAMES = ['jaxprompt_glue_mixture', 'jaxprompt_super_glue_mixture']


@pytest.fixture(scope='module')
def registered():
  return tasks.register_tasks(data_helpers.vocabulary())


def mocked():
  return tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE)


def test_register_tasks_names_and_idempotence(registered):
  assert registered == TASK_NAMES + MIXTURE_NAMES
  assert all(name.isidentifier() and name.startswith('jaxprompt_') for name in registered)
  before = {name: seqio.get_mixture_or_task(name) for name in registered}
  assert tasks.register_tasks(data_helpers.vocabulary()) == registered
  for name in registered:
    assert seqio.get_mixture_or_task(name) is before[name]


def test_expected_tasks_are_present(registered):
  for name in ('glue_cola', 'glue_sst2', 'glue_mrpc', 'glue_qqp', 'glue_stsb', 'glue_mnli',
               'glue_qnli', 'glue_rte', 'super_glue_boolq', 'super_glue_cb', 'super_glue_copa',
               'super_glue_multirc', 'super_glue_record', 'super_glue_rte', 'super_glue_wic',
               'super_glue_wsc', 'imdb', 'snli', 'squad', 'nq_open', 'multi_news', 'samsum',
               'movie_rationales'):
    assert f'jaxprompt_{name}' in registered


def test_tasks_carry_features_metrics_and_labels(registered):
  for name in TASK_NAMES:
    task = seqio.get_mixture_or_task(name)
    assert set(task.output_features) == {'inputs', 'targets'}
    assert all(f.add_eos for f in task.output_features.values())
    assert task.predict_metric_fns, name
  assert tasks.LABELS['jaxprompt_glue_sst2'] == ('negative', 'positive')
  assert tasks.LABELS['jaxprompt_glue_mnli'] == ('entailment', 'neutral', 'contradiction')
  assert tasks.LABELS['jaxprompt_super_glue_cb'] == ('entailment', 'contradiction', 'neutral')
  assert tasks.label_names('jaxprompt_glue_stsb') is None
  assert tasks.label_names('jaxprompt_squad') is None
  mnli = seqio.get_mixture_or_task('jaxprompt_glue_mnli')
  assert {'validation', 'validation_matched', 'validation_mismatched'} <= set(mnli.splits)


@pytest.mark.parametrize('name', TASK_NAMES + MIXTURE_NAMES)
def test_every_task_yields_batches_offline(registered, name):
  is_mixture = name in MIXTURE_NAMES
  with mocked():
    batches = features.get_dataset(
        name, LENGTHS, 'train' if is_mixture else 'validation', batch_size=4,
        shuffle=is_mixture, seed=0, num_epochs=None if is_mixture else 1,
        try_in_mem_cache=False)
    batch = next(batches)
  assert batch['encoder_input_tokens'].shape == (4, LENGTHS['inputs'])
  for key in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights'):
    assert batch[key].shape == (4, LENGTHS['targets'])
  assert batch['example_mask'].tolist() == ([1, 1, 1, 1] if is_mixture else [1, 1, 1, 0])
  real = batch['example_mask'] == 1
  assert (batch['decoder_loss_weights'][real].sum(axis=1) > 0).all()


def test_mocked_examples_are_formatted(registered):
  with mocked():
    task = seqio.get_mixture_or_task('jaxprompt_glue_sst2')
    example = next(task.get_dataset(None, 'train', shuffle=False,
                                    try_in_mem_cache=False).as_numpy_iterator())
  assert example['inputs_pretokenized'].startswith(b'sentence: ')
  assert example['targets_pretokenized'] in (b'negative', b'positive')
  assert example['inputs'][-1] == 1 and example['targets'][-1] == 1  # EOS


def test_task_prefix_flag_reregisters(registered):
  try:
    tasks.register_tasks(data_helpers.vocabulary(), add_task_prefix=True)
    with mocked():
      task = seqio.get_mixture_or_task('jaxprompt_glue_sst2')
      example = next(task.get_dataset(None, 'train', shuffle=False,
                                      try_in_mem_cache=False).as_numpy_iterator())
    assert example['inputs_pretokenized'].startswith(b'sst2 sentence: ')
  finally:
    tasks.register_tasks(data_helpers.vocabulary())


def test_name_prefix(registered):
  names = tasks.register_tasks(data_helpers.vocabulary(), name_prefix='other')
  assert 'other_glue_sst2' in names and 'other_glue_mixture' in names
  mixture = seqio.get_mixture_or_task('other_glue_mixture')
  assert {t.name for t in mixture.tasks} == {f'other_{t}' for t in tasks.GLUE_MIXTURE_TASKS}


def test_glue_mixture_is_examples_proportional_with_cap(registered):
  mixture = seqio.get_mixture_or_task('jaxprompt_glue_mixture')
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert len(rates) == 8
  assert rates['jaxprompt_glue_rte'] == 2490  # TFDS sizes, no metadata on disk here
  assert rates['jaxprompt_glue_mnli'] == 392702  # below the cap 2**19
  capped = tasks.register_mixture('capped_glue', list(rates), cap=10000)
  assert capped.get_rate(seqio.get_mixture_or_task('jaxprompt_glue_qqp')) == 10000
  assert capped.get_rate(seqio.get_mixture_or_task('jaxprompt_glue_rte')) == 2490


def test_fixed_rate_mixture_and_errors(tmp_path):
  names = []
  for i, n in enumerate((3, 5)):
    path = data_helpers.write_jsonl(tmp_path / f'{i}.jsonl',
                                    [{'input': f'x{j}', 'target': 'y'} for j in range(n)])
    files.register_file_task(f'mix_part_{i}', path, vocabulary=data_helpers.vocabulary())
    names.append(f'mix_part_{i}')
  proportional = tasks.register_mixture('mix_proportional', names)
  assert [proportional.get_rate(t) for t in proportional.tasks] == [3, 5]
  fixed = tasks.register_mixture('mix_fixed', names, rates=[1.0, 2.0])
  assert [fixed.get_rate(t) for t in fixed.tasks] == [1.0, 2.0]
  fixed = tasks.register_mixture('mix_fixed', names, rates={'mix_part_0': 4, 'mix_part_1': 1})
  assert [fixed.get_rate(t) for t in fixed.tasks] == [4.0, 1.0]
  with pytest.raises(ValueError, match='one rate per task'):
    tasks.register_mixture('mix_bad', names, rates=[1.0])
  with pytest.raises(ValueError, match='no rate for'):
    tasks.register_mixture('mix_bad', names, rates={'mix_part_0': 1.0})
  batches = features.get_dataset('mix_fixed', {'inputs': 8, 'targets': 4}, batch_size=4, seed=1)
  assert next(batches)['encoder_input_tokens'].shape == (4, 8)


def test_examples_proportional_rate_without_any_count():
  task = seqio.Task('no_count', source=seqio.FunctionDataSource(
      lambda split, shuffle_files: None, splits=['train']),
      output_features=tasks.output_features(data_helpers.vocabulary()))
  with pytest.raises(ValueError, match='fixed rates'):
    tasks.examples_proportional_rate(task)


def test_mixture_rate_is_seqios_with_maximum(registered):
  mixture = tasks.register_mixture('mix_partial_check', ['jaxprompt_glue_rte'], cap=7)
  rate_fn = mixture._task_to_rate['jaxprompt_glue_rte']
  assert isinstance(rate_fn, functools.partial) and rate_fn.keywords == {'cap': 7}
  assert np.isclose(mixture.get_rate(mixture.tasks[0]), 7)
  assert tasks.register_mixture('mix_partial_check', ['jaxprompt_glue_rte'], cap=7) is mixture
