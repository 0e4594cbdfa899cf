"""Tasks from user files: the three formats, verbalizers, and every error message."""

import os

import data_helpers
import pytest
import seqio

from jaxprompt.data import files, metrics, tasks

SENTIMENT = {'0': 'negative', '1': 'positive'}


def examples(task_name, split):
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
  return [(ex['inputs_pretokenized'].decode(), ex['targets_pretokenized'].decode())
          for ex in dataset.as_numpy_iterator()]


def test_jsonl_input_target(tmp_path):
  train = data_helpers.write_jsonl(tmp_path / 'train.jsonl', [
      {'input': 'question: capital of france', 'target': 'paris'},
      {'input': 'question: a number', 'target': 12}])
  files.register_file_task('file_qa', train, vocabulary=data_helpers.vocabulary())
  assert examples('file_qa', 'train') == [('question: capital of france', 'paris'),
                                          ('question: a number', '12')]
  assert 'file_qa' not in tasks.LABELS
  assert seqio.get_mixture_or_task('file_qa').predict_metric_fns == [metrics.squad]


def test_tsv_label_column_with_verbalizer(tmp_path):
  train = data_helpers.write_text(tmp_path / 'train.tsv',
                                  'text\tlabel\na "good" film\t1\nawful\t0\n\n')
  valid = data_helpers.write_text(tmp_path / 'dev.tsv', 'text\tlabel\nit is great\t1\n')
  task = files.register_file_task('file_sentiment', train, valid, input_column='text',
                                  label_column='label', label_names=SENTIMENT,
                                  vocabulary=data_helpers.vocabulary())
  assert examples('file_sentiment', 'train') == [('a "good" film', 'positive'),
                                                 ('awful', 'negative')]
  assert examples('file_sentiment', 'validation') == [('it is great', 'positive')]
  assert tasks.LABELS['file_sentiment'] == ('negative', 'positive')
  assert task.postprocess_fn(b'positive') == 1
  assert sorted(task.splits) == ['train', 'validation']


def test_csv_several_input_columns_and_label_list(tmp_path):
  train = data_helpers.write_text(
      tmp_path / 'train.csv',
      'premise,hypothesis,label\n"A dog, running.",An animal moves.,0\nA cat.,A dog.,2\n')
  files.register_file_task('file_nli', train, input_column=('premise', 'hypothesis'),
                           label_column='label',
                           label_names=['entailment', 'neutral', 'contradiction'],
                           vocabulary=data_helpers.vocabulary())
  assert examples('file_nli', 'train') == [
      ('premise: A dog, running. hypothesis: An animal moves.', 'entailment'),
      ('premise: A cat. hypothesis: A dog.', 'contradiction')]
  assert tasks.LABELS['file_nli'] == ('entailment', 'neutral', 'contradiction')


def test_json_label_values_match_string_keys(tmp_path):
  train = data_helpers.write_jsonl(tmp_path / 't.jsonl', [
      {'input': 'yes', 'label': 1}, {'input': 'no', 'label': 0.0},
      {'input': 'sure', 'label': True}])
  files.register_file_task('file_bool', train, label_column='label',
                           label_names={0: 'no', 1: 'yes', 'true': 'yes'},
                           vocabulary=data_helpers.vocabulary())
  assert [t for _, t in examples('file_bool', 'train')] == ['yes', 'no', 'yes']
  assert tasks.LABELS['file_bool'] == ('no', 'yes')


def test_label_values_are_targets_without_names(tmp_path):
  train = data_helpers.write_jsonl(tmp_path / 't.jsonl', [
      {'input': 'a', 'label': 'pos'}, {'input': 'b', 'label': 'neg'}])
  files.register_file_task('file_raw_labels', train, label_column='label',
                           vocabulary=data_helpers.vocabulary())
  assert tasks.LABELS['file_raw_labels'] == ('neg', 'pos')


def test_registration_is_idempotent_and_sees_edits(tmp_path):
  path = tmp_path / 'train.jsonl'
  data_helpers.write_jsonl(path, [{'input': 'a', 'target': 'b'}])
  first = files.register_file_task('file_again', str(path), vocabulary=data_helpers.vocabulary())
  again = files.register_file_task('file_again', str(path), vocabulary=data_helpers.vocabulary())
  assert first is again
  data_helpers.write_jsonl(path, [{'input': 'a', 'target': 'b'}, {'input': 'c', 'target': 'd'}])
  os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock resolution
  edited = files.register_file_task('file_again', str(path),
                                    vocabulary=data_helpers.vocabulary())
  assert edited is not first
  assert len(examples('file_again', 'train')) == 2


def _error(tmp_path, name, content, **kwargs):
  path = tmp_path / name
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content, encoding='utf-8')
  with pytest.raises(files.DataFileError) as info:
    files.register_file_task('file_broken', str(path), vocabulary=data_helpers.vocabulary(),
                             **kwargs)
  message = str(info.value)
  assert '\n' not in message and message.startswith(str(path))
  return message


def test_error_missing_column(tmp_path):
  message = _error(tmp_path, 'a.jsonl', '{"input": "x", "target": "y"}\n{"input": "z"}\n')
  assert "a.jsonl:2: missing column 'target'" in message and 'target_column=' in message
  message = _error(tmp_path, 'b.tsv', 'text\ttarget\nx\ty\n')
  assert "b.tsv:2: missing column 'input'" in message and 'input_column=' in message
  message = _error(tmp_path, 'c.csv', 'input,target\nx,y\n', label_column='label',
                   label_names=SENTIMENT)
  assert "c.csv:2: missing column 'label'" in message


def test_error_empty_file(tmp_path):
  assert 'no examples' in _error(tmp_path, 'empty.jsonl', '')
  assert 'no examples' in _error(tmp_path, 'header.csv', 'input,target\n')
  assert 'no examples' in _error(tmp_path, 'blank.tsv', '\n\n')


def test_error_unknown_label(tmp_path):
  message = _error(tmp_path, 'l.tsv', 'input\tlabel\nok\t1\nhm\t2\n', label_column='label',
                   label_names=SENTIMENT)
  assert "l.tsv:3: label '2' is not in label_names" in message and "'0', '1'" in message


def test_error_not_utf8(tmp_path):
  message = _error(tmp_path, 'latin.csv', 'input,target\nok,fine\n'.encode() +
                   'caf\u00e9,x\n'.encode('latin-1'))
  assert 'latin.csv:3: text is not UTF-8 (byte 0xe9 at column 4)' in message
  assert 're-save the file as UTF-8' in message


def test_error_bad_json_and_not_an_object(tmp_path):
  assert 'j.jsonl:2: not valid JSON' in _error(tmp_path, 'j.jsonl', '{"input": "a"}\n{oops\n')
  assert 'k.jsonl:1: expected a JSON object' in _error(tmp_path, 'k.jsonl', '["a", "b"]\n')


def test_error_null_value_and_field_count(tmp_path):
  assert "n.jsonl:1: column 'target' is empty" in _error(
      tmp_path, 'n.jsonl', '{"input": "a", "target": null}\n')
  assert 'f.tsv:3: 3 fields but the header has 2' in _error(
      tmp_path, 'f.tsv', 'input\ttarget\na\tb\na\tb\tc\n')


def test_error_file_type_and_missing_file(tmp_path):
  assert 'unknown file type' in _error(tmp_path, 'data.txt', 'a b\n')
  with pytest.raises(files.DataFileError, match='no such file'):
    files.register_file_task('file_broken', str(tmp_path / 'missing.jsonl'),
                             vocabulary=data_helpers.vocabulary())


def test_task_name_must_be_an_identifier(tmp_path):
  train = data_helpers.write_jsonl(tmp_path / 't.jsonl', [{'input': 'a', 'target': 'b'}])
  with pytest.raises(ValueError, match='identifier'):
    files.register_file_task('my-task', train, vocabulary=data_helpers.vocabulary())
