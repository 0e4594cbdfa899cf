"""Text-to-text formats (T5 style) and the postprocessors that undo them for metrics.

Each `format_*` function maps ONE example (a dict of scalar/1-D tensors, as TFDS yields it) to
a dict with string `inputs` and `targets` plus the ids or answers that evaluation needs. They run
eagerly on hand-written dicts and inside `tf.data.Dataset.map` alike. Formats follow T5's GLUE
and SuperGLUE preprocessing, e.g. SST-2 becomes `{'inputs': 'sentence: it is good',
'targets': 'positive'}`, with the label's name as the target (the verbalizer). T5 put the task
name in front ('sst2 sentence: ...'); the prompt-tuning paper drops it, so `prefix` is None by
default and the name is only added when a prefix is given.

Postprocessors follow seqio's `postprocess_fn(output, example=None, is_target=False)` contract
and turn decoded strings back into what the metrics in `metrics.py` compare.

Example:
  >>> ex = {'sentence': tf.constant('it is good'), 'label': tf.constant(1), 'idx': 0}
  >>> format_classification(ex, feature_names=('sentence',), label_names=('negative', 'positive'))
  {'inputs': <tf.Tensor: b'sentence: it is good'>, 'targets': <... b'positive'>, 'idx': ...}
"""

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

UNKNOWN_LABEL = '<unk>'
Example = Mapping[str, Any]


def join_fields(fields: Sequence[tuple[str, tf.Tensor]],
                prefix: Optional[str] = None) -> tf.Tensor:
  """Joins `[(name, text), ...]` as 'prefix name1: text1 name2: text2' (prefix optional)."""
  pieces = [prefix] if prefix else []
  for name, text in fields:
    pieces += [f'{name}:', text]
  return tf.strings.join(pieces, separator=' ')


def label_text(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
  """Returns `label_names[label]`, or '<unk>' for a missing label (-1, as in GLUE's test sets)."""
  names = tf.constant(list(label_names) + [UNKNOWN_LABEL])
  label = tf.cast(label, tf.int32)
  index = tf.where(label < 0, len(label_names), label)
  return tf.gather(names, index)


def first_or(texts: tf.Tensor, default: str = UNKNOWN_LABEL) -> tf.Tensor:
  """First element of a 1-D string tensor, or `default` when it is empty."""
  return tf.concat([texts, [default]], axis=0)[0]


def format_classification(example: Example, *, feature_names: Sequence[str],
                          label_names: Sequence[str], prefix: Optional[str] = None,
                          id_key: Optional[str] = 'idx',
                          source_keys: Optional[Mapping[str, str]] = None
                          ) -> dict[str, tf.Tensor]:
  """GLUE/SuperGLUE style: 'name1: text1 name2: text2' -> label name (e.g. RTE, BoolQ, COPA).

  `source_keys` reads a shown name from another feature, e.g. {'sentence': 'text'} for IMDB.
  """
  source_keys = source_keys or {}
  out = {
      'inputs': join_fields([(k, example[source_keys.get(k, k)]) for k in feature_names],
                            prefix),
      'targets': label_text(example['label'], label_names),
  }
  if id_key:
    out[id_key] = example[id_key]
  return out


def format_stsb(example: Example, *, prefix: Optional[str] = None) -> dict[str, tf.Tensor]:
  """STS-B as T5: the 0-5 similarity rounded to the nearest 0.2 and written as '3.8'."""
  score = tf.round(tf.cast(example['label'], tf.float32) * 5.0) / 5.0
  return {
      'inputs': join_fields([('sentence1', example['sentence1']),
                             ('sentence2', example['sentence2'])], prefix),
      'targets': tf.strings.as_string(score, precision=1),
      'idx': example['idx'],
  }


def format_multirc(example: Example, *, prefix: Optional[str] = None) -> dict[str, tf.Tensor]:
  """MultiRC as T5: 'question: .. answer: .. paragraph: ..' without HTML -> 'False'/'True'."""
  inputs = join_fields([(k, example[k]) for k in ('question', 'answer', 'paragraph')], prefix)
  inputs = tf.strings.regex_replace(inputs, '<br>', ' ')
  inputs = tf.strings.regex_replace(inputs, '<(/)?b>', '')
  idx = example['idx']
  return {
      'inputs': inputs,
      'targets': label_text(example['label'], ('False', 'True')),
      'idx/paragraph': idx['paragraph'],
      'idx/question': idx['question'],
      'idx/answer': idx['answer'],
  }


def _mark_span(words: tf.Tensor, start: tf.Tensor, text: tf.Tensor, mark: str) -> tf.Tensor:
  """Surrounds words[start:start + len(text.split())] with `mark` tokens."""
  end = start + tf.size(tf.strings.split(text))
  return tf.concat([words[:start], [mark], words[start:end], [mark], words[end:]], axis=0)


def format_wsc(example: Example, *, prefix: Optional[str] = None) -> dict[str, tf.Tensor]:
  """WSC as T5: the noun phrase marked '* .. *', the pronoun '# .. #' -> 'False'/'True'."""
  words = tf.strings.split(example['text'])
  span1 = tf.cast(example['span1_index'], tf.int32)
  span2 = tf.cast(example['span2_index'], tf.int32)
  words = _mark_span(words, span1, example['span1_text'], '*')
  span2 += tf.where(span1 < span2, 2, 0)  # the two '*' marks come before the pronoun
  words = _mark_span(words, span2, example['span2_text'], '#')
  return {
      'inputs': join_fields([('text', tf.strings.reduce_join(words, separator=' '))], prefix),
      'targets': label_text(example['label'], ('False', 'True')),
      'idx': example['idx'],
  }


def format_record(example: Example, *, prefix: Optional[str] = None) -> dict[str, tf.Tensor]:
  """ReCoRD as T5: 'query: .. entities: a, b passage: ..' -> the first gold answer.

  One example per query (T5 emits one per answer); all answers are kept under `answers` and
  the metric takes the max over them.
  """
  passage = tf.strings.regex_replace(example['passage'], r'(\.|\?|\!|\"|\')\n@highlight\n',
                                     r'\1 ')
  passage = tf.strings.regex_replace(passage, r'\n@highlight\n', '. ')
  entities = tf.strings.reduce_join(example['entities'], separator=', ')
  return {
      'inputs': join_fields([('query', example['query']), ('entities', entities),
                             ('passage', passage)], prefix),
      'targets': first_or(example['answers']),
      'answers': example['answers'],
      'idx/passage': example['idx']['passage'],
      'idx/query': example['idx']['query'],
  }


def format_squad(example: Example, *, prefix: Optional[str] = None) -> dict[str, tf.Tensor]:
  """SQuAD as T5: 'question: .. context: ..' -> the first answer; `answers` keeps all."""
  answers = example['answers']['text']
  return {
      'inputs': join_fields([('question', example['question']),
                             ('context', example['context'])], prefix),
      'targets': first_or(answers),
      'answers': answers,
      'id': example['id'],
  }


def format_nq_open(example: Example, *, prefix: Optional[str] = None) -> dict[str, tf.Tensor]:
  """Natural Questions (open) as T5: 'question: ..' -> the first answer; `answers` keeps all."""
  return {
      'inputs': join_fields([('question', example['question'])], prefix),
      'targets': first_or(example['answer']),
      'answers': example['answer'],
  }


def format_summarization(example: Example, *, document_key: str, summary_key: str,
                         prefix: Optional[str] = None) -> dict[str, tf.Tensor]:
  """Summarisation as T5: 'summarize: <document>' -> the summary."""
  return {
      'inputs': join_fields([('summarize', example[document_key])], prefix),
      'targets': example[summary_key],
  }


def drop_unlabeled(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Drops examples with label -1 (e.g. SNLI pairs without a gold label)."""
  return dataset.filter(lambda ex: tf.cast(ex['label'], tf.int32) >= 0)


# ----------------------------------------------------------------------------- postprocessors


def to_text(value: Any) -> str:
  """Decodes bytes (and numpy bytes) to str; leaves str unchanged."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8', errors='replace')
  return str(value)


def label_to_class_id(output: Any, example: Optional[Example] = None, is_target: bool = False,
                      *, label_names: Sequence[str]) -> int:
  """Maps a label name back to its index; anything else (a wrong generation) becomes -1."""
  del example, is_target
  text = to_text(output).strip()
  return list(label_names).index(text) if text in label_names else -1


def string_to_float(output: Any, example: Optional[Example] = None, is_target: bool = False,
                    default: float = -1.0) -> float:
  """Parses a number such as STS-B's '3.8'; `default` (T5's -1) when it is not one."""
  del example, is_target
  try:
    return float(to_text(output))
  except ValueError:
    return default


def multirc_postprocess(output: Any, example: Optional[Example] = None,
                        is_target: bool = False) -> Any:
  """Targets become {'group': (paragraph, question), 'value': 0/1}; predictions 0/1 (-1)."""
  value = label_to_class_id(output, label_names=('False', 'True'))
  if not is_target:
    return value
  group = (int(example['idx/paragraph']), int(example['idx/question']))
  return {'group': group, 'value': value}


def answers_postprocess(output: Any, example: Optional[Example] = None,
                        is_target: bool = False) -> Any:
  """Targets become the list of gold answers (from `example['answers']`); predictions text."""
  if is_target and example is not None and 'answers' in example:
    answers = [to_text(a) for a in np.asarray(example['answers']).reshape(-1)]
    return answers or [to_text(output)]
  return to_text(output)


def text_postprocess(output: Any, example: Optional[Example] = None,
                     is_target: bool = False) -> str:
  """Decodes to str (summaries, free-form targets)."""
  del example, is_target
  return to_text(output)
