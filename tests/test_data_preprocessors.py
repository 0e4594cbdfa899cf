"""Each text-to-text format on hand-written examples, and the postprocessors."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from jaxprompt.data import preprocessors as prep
from jaxprompt.data import tasks

SPECS = {spec.name: spec for spec in tasks.tfds_task_specs()}


def text(tensor) -> str:
  return tensor.numpy().decode('utf-8')


def to_tensors(value):
  if isinstance(value, dict):
    return {k: to_tensors(v) for k, v in value.items()}
  return tf.convert_to_tensor(value)


def formatted(name, example, prefix=None):
  """Formats `example` (made tensors, as TFDS yields) as the registered task `name` does."""
  example = to_tensors(example)
  return SPECS[name].formatter(example, prefix=prefix)


@pytest.mark.parametrize('name, example, inputs, target', [
    ('glue_sst2', {'sentence': 'a great movie', 'label': 1, 'idx': 0},
     'sentence: a great movie', 'positive'),
    ('glue_cola', {'sentence': 'Him went.', 'label': 0, 'idx': 0},
     'sentence: Him went.', 'unacceptable'),
    ('glue_mrpc', {'sentence1': 'A b.', 'sentence2': 'B a.', 'label': 1, 'idx': 0},
     'sentence1: A b. sentence2: B a.', 'equivalent'),
    ('glue_qqp', {'question1': 'Why?', 'question2': 'How?', 'label': 0, 'idx': 0},
     'question1: Why? question2: How?', 'not_duplicate'),
    ('glue_mnli', {'premise': 'P.', 'hypothesis': 'H.', 'label': 2, 'idx': 0},
     'hypothesis: H. premise: P.', 'contradiction'),
    ('glue_qnli', {'question': 'Q?', 'sentence': 'S.', 'label': 1, 'idx': 0},
     'question: Q? sentence: S.', 'not_entailment'),
    ('glue_rte', {'sentence1': 'S1.', 'sentence2': 'S2.', 'label': 0, 'idx': 0},
     'sentence1: S1. sentence2: S2.', 'entailment'),
    ('super_glue_boolq', {'question': 'is it?', 'passage': 'It is.', 'label': 1, 'idx': 0},
     'passage: It is. question: is it?', 'True'),
    ('super_glue_cb', {'premise': 'P.', 'hypothesis': 'H.', 'label': 2, 'idx': 0},
     'hypothesis: H. premise: P.', 'neutral'),
    ('super_glue_copa', {'premise': 'It rained.', 'choice1': 'Wet.', 'choice2': 'Dry.',
                         'question': 'effect', 'label': 0, 'idx': 0},
     'choice1: Wet. choice2: Dry. premise: It rained. question: effect', 'choice1'),
    ('super_glue_rte', {'premise': 'P.', 'hypothesis': 'H.', 'label': 1, 'idx': 0},
     'hypothesis: H. premise: P.', 'not_entailment'),
    ('super_glue_wic', {'sentence1': 'A bank.', 'sentence2': 'The bank.', 'word': 'bank',
                        'start1': 2, 'end1': 6, 'start2': 4, 'end2': 8, 'label': 0, 'idx': 0},
     'sentence1: A bank. sentence2: The bank. word: bank', 'False'),
    ('imdb', {'text': 'Loved it.', 'label': 1}, 'sentence: Loved it.', 'positive'),
    ('movie_rationales', {'review': 'Dull.', 'label': 0, 'evidences': ['Dull']},
     'sentence: Dull.', 'negative'),
    ('snli', {'premise': 'P.', 'hypothesis': 'H.', 'label': 1}, 'hypothesis: H. premise: P.',
     'neutral'),
])
def test_classification_formats(name, example, inputs, target):
  out = formatted(name, example)
  assert text(out['inputs']) == inputs
  assert text(out['targets']) == target
  assert text(out['targets']) == SPECS[name].label_names[example['label']]


def test_task_prefix_is_optional():
  example = {'sentence': 'fine', 'label': 1, 'idx': 3}
  assert text(formatted('glue_sst2', example)['inputs']) == 'sentence: fine'
  assert text(formatted('glue_sst2', example, prefix='sst2')['inputs']) == 'sst2 sentence: fine'
  assert int(formatted('glue_sst2', example)['idx']) == 3


def test_missing_label_becomes_unk():
  out = formatted('glue_rte', {'sentence1': 'a', 'sentence2': 'b', 'label': -1, 'idx': 0})
  assert text(out['targets']) == '<unk>'


# 2.5 * 5 = 12.5 -> 12: tf.round, as in T5, rounds half to even.
@pytest.mark.parametrize('label, target', [(3.77, '3.8'), (0.1, '0.0'), (5.0, '5.0'),
                                           (2.5, '2.4'), (1.29, '1.2')])
def test_stsb_rounds_to_fifths(label, target):
  out = formatted('glue_stsb', {'sentence1': 'A.', 'sentence2': 'B.', 'label': label, 'idx': 0})
  assert text(out['inputs']) == 'sentence1: A. sentence2: B.'
  assert text(out['targets']) == target


def test_multirc_strips_html_and_keeps_ids():
  example = {'question': 'Who?', 'answer': 'Bob', 'label': 1,
             'paragraph': '<b>Sent 1: </b>Bob ran.<br><b>Sent 2: </b>He won.',
             'idx': {'paragraph': 4, 'question': 7, 'answer': 2}}
  out = formatted('super_glue_multirc', example)
  assert text(out['inputs']) == ('question: Who? answer: Bob paragraph: Sent 1: Bob ran. '
                                 'Sent 2: He won.')
  assert text(out['targets']) == 'True'
  assert (int(out['idx/paragraph']), int(out['idx/question']), int(out['idx/answer'])) == (
      4, 7, 2)


def test_wsc_marks_both_spans():
  example = {'text': 'The city councilmen refused the demonstrators a permit because they '
                     'feared violence.',
             'span1_index': 1, 'span1_text': 'city councilmen',
             'span2_index': 9, 'span2_text': 'they', 'label': 1, 'idx': 0}
  out = formatted('super_glue_wsc', example)
  assert text(out['inputs']) == ('text: The * city councilmen * refused the demonstrators a '
                                 'permit because # they # feared violence.')
  assert text(out['targets']) == 'True'


def test_wsc_pronoun_before_noun():
  example = {'text': 'When it rained the dog hid.', 'span1_index': 4, 'span1_text': 'dog',
             'span2_index': 1, 'span2_text': 'it', 'label': 0, 'idx': 0}
  out = formatted('super_glue_wsc', example)
  assert text(out['inputs']) == 'text: When # it # rained the * dog * hid.'
  assert text(out['targets']) == 'False'


def test_record_joins_entities_and_highlights():
  example = {'query': 'The @placeholder won.', 'entities': ['Paris', 'France'],
             'passage': 'A story.\n@highlight\nParis won\n@highlight\nFrance lost',
             'answers': ['Paris', 'paris'], 'idx': {'passage': 1, 'query': 2}}
  out = formatted('super_glue_record', example)
  assert text(out['inputs']) == ('query: The @placeholder won. entities: Paris, France passage: '
                                 'A story. Paris won. France lost')
  assert text(out['targets']) == 'Paris'
  assert [a.decode() for a in out['answers'].numpy()] == ['Paris', 'paris']
  no_answer = dict(example, answers=tf.constant([], tf.string))
  assert text(formatted('super_glue_record', no_answer)['targets']) == '<unk>'


def test_squad_and_nq_open():
  squad = {'question': 'Capital?', 'context': 'Paris is the capital.', 'id': 'q1',
           'title': 'France', 'answers': {'text': ['Paris', 'Paris'], 'answer_start': [0, 0]}}
  out = formatted('squad', squad)
  assert text(out['inputs']) == 'question: Capital? context: Paris is the capital.'
  assert text(out['targets']) == 'Paris'
  out = formatted('nq_open', {'question': 'capital of france', 'answer': ['Paris', 'paris']})
  assert text(out['inputs']) == 'question: capital of france'
  assert text(out['targets']) == 'Paris'
  assert len(out['answers'].numpy()) == 2


def test_summarization():
  out = formatted('multi_news', {'document': 'Long text.', 'summary': 'Short.'})
  assert (text(out['inputs']), text(out['targets'])) == ('summarize: Long text.', 'Short.')
  out = formatted('samsum', {'dialogue': 'A: hi\nB: yo', 'summary': 'Greetings.', 'id': '1'},
                  prefix='samsum')
  assert text(out['inputs']) == 'samsum summarize: A: hi\nB: yo'


def test_formats_run_inside_tf_data():
  dataset = tf.data.Dataset.from_tensor_slices(
      {'sentence': ['good', 'bad'], 'label': [1, -1], 'idx': [0, 1]})
  fn = functools.partial(SPECS['glue_sst2'].formatter, prefix=None)
  targets = [ex['targets'] for ex in dataset.map(fn).as_numpy_iterator()]
  assert targets == [b'positive', b'<unk>']


def test_drop_unlabeled():
  dataset = tf.data.Dataset.from_tensor_slices({'label': [0, -1, 2]})
  assert [ex['label'] for ex in prep.drop_unlabeled(dataset).as_numpy_iterator()] == [0, 2]


def test_postprocessors():
  to_id = functools.partial(prep.label_to_class_id, label_names=('negative', 'positive'))
  assert to_id(b'positive') == 1
  assert to_id('negative ') == 0
  assert to_id(b'maybe') == -1
  assert prep.string_to_float(b'3.8') == pytest.approx(3.8)
  assert prep.string_to_float(b'many') == -1.0
  example = {'idx/paragraph': np.int32(4), 'idx/question': np.int32(7)}
  assert prep.multirc_postprocess(b'True', example, is_target=True) == {
      'group': (4, 7), 'value': 1}
  assert prep.multirc_postprocess(b'False', example) == 0
  example = {'answers': np.array([b'Paris', b'the city'])}
  assert prep.answers_postprocess(b'Paris', example, is_target=True) == ['Paris', 'the city']
  assert prep.answers_postprocess(b'Lyon', example) == 'Lyon'
  assert prep.text_postprocess(b'caf\xc3\xa9') == 'caf\u00e9'
