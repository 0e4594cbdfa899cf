"""Tasks from the user's own files: JSONL, TSV or CSV with text columns.

Each row gives an input text (one column, or several joined T5 style as 'a: .. b: ..') and
either a target text or a label that `label_names` verbalises (label value -> target text).
Files are read with Python's json/csv at registration, so every problem surfaces at once as a
one-line `DataFileError` naming the file, the line and the fix.

Example:
  >>> register_file_task('my_sentiment', 'train.tsv', 'dev.tsv', input_column='text',
  ...                    label_column='label', label_names={'0': 'negative', '1': 'positive'},
  ...                    vocabulary=vocab)
  >>> LABELS['my_sentiment']
  ('negative', 'positive')
"""

import csv
import functools
import io
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from jaxprompt.data import metrics
from jaxprompt.data import preprocessors as prep
from jaxprompt.data import tasks as tasks_lib
from jaxprompt.data import vocab as vocab_lib

LABELS = tasks_lib.LABELS
FORMATS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.tsv': 'tsv', '.csv': 'csv'}
LabelNames = Union[Mapping[Any, str], Sequence[str]]


class DataFileError(ValueError):
  """A problem in a data file; the message is one line: 'path:line: what is wrong; the fix'."""


def _decode_lines(path: str) -> list[str]:
  """Reads `path` as UTF-8 lines (a BOM is dropped); names the first undecodable line."""
  with open(path, 'rb') as f:
    raw_lines = f.read().split(b'\n')
  lines = []
  for number, raw in enumerate(raw_lines, start=1):
    try:
      lines.append(raw.decode('utf-8-sig' if number == 1 else 'utf-8'))
    except UnicodeDecodeError as error:
      raise DataFileError(
          f'{path}:{number}: text is not UTF-8 (byte 0x{raw[error.start]:02x} at column '
          f'{error.start + 1}); re-save the file as UTF-8.') from None
  return lines


def read_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
  """Reads a JSONL/TSV/CSV file into `(line number, row)` pairs (CSV/TSV need a header row).

  Raises:
    DataFileError: unknown extension, missing or empty file, bad JSON, non-UTF-8 text.
  """
  fmt = FORMATS.get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise DataFileError(f'{path}: unknown file type; name it .jsonl, .tsv or .csv.')
  if not os.path.exists(path):
    raise DataFileError(f'{path}: no such file; check the path.')
  lines = _decode_lines(path)
  rows = []
  if fmt == 'jsonl':
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise DataFileError(f'{path}:{number}: not valid JSON ({error.msg}); write one JSON '
                            'object per line.') from None
      if not isinstance(row, dict):
        raise DataFileError(f'{path}:{number}: expected a JSON object, got '
                            f'{type(row).__name__}; write one object per line.')
      rows.append((number, row))
  else:
    if fmt == 'tsv':  # TSV has no quoting: a quote is text (as in GLUE's files)
      reader = csv.reader(io.StringIO('\n'.join(lines)), delimiter='\t', quoting=csv.QUOTE_NONE)
      fix = 'a text holds a tab; replace it with a space'
    else:
      reader = csv.reader(io.StringIO('\n'.join(lines)))
      fix = 'quote fields that hold a comma'
    header, last_line = None, 0
    for record in reader:
      number, last_line = last_line + 1, reader.line_num
      if not any(field.strip() for field in record):
        continue
      if header is None:
        header = [h.strip() for h in record]
        continue
      if len(record) != len(header):
        raise DataFileError(f'{path}:{number}: {len(record)} fields but the header has '
                            f'{len(header)}; {fix}.')
      rows.append((number, dict(zip(header, record))))
  if not rows:
    raise DataFileError(f'{path}: no examples (empty file or only a header); add one example '
                        'per line.')
  return rows


def _field(path: str, number: int, row: Mapping[str, Any], column: str, argument: str) -> str:
  if column not in row:
    raise DataFileError(f'{path}:{number}: missing column {column!r} (columns: '
                        f'{", ".join(map(str, row))}); add it or pass {argument}= with the '
                        'right name.')
  value = row[column]
  if value is None:
    raise DataFileError(f'{path}:{number}: column {column!r} is empty (null); give it a value.')
  return value if isinstance(value, str) else json.dumps(value)


def _label_key(value: Any) -> str:
  """Label values from JSON (1, true, 1.0) and from CSV ('1', 'true') compare as strings."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value).strip()


def verbalizer(label_names: LabelNames) -> dict[str, str]:
  """{label key: target text} from a mapping or from a list indexed by the label value."""
  if isinstance(label_names, Mapping):
    return {_label_key(k): str(v) for k, v in label_names.items()}
  return {str(i): str(v) for i, v in enumerate(label_names)}


def read_examples(path: str, input_column: Union[str, Sequence[str]] = 'input',
                  target_column: str = 'target', label_column: Optional[str] = None,
                  label_names: Optional[LabelNames] = None) -> tuple[list[str], list[str]]:
  """Reads `(inputs, targets)` text lists from one file.

  Args:
    path: a .jsonl, .tsv or .csv file.
    input_column: the input text column, or several joined as 'name1: text1 name2: text2'.
    target_column: the target text column (when `label_column` is None).
    label_column: a label column; its values are looked up in `label_names`.
    label_names: label value -> target text (a mapping, or a list indexed by the value). When
      None, the label values themselves are the targets.

  Raises:
    DataFileError: on missing columns or unknown labels (and everything `read_rows` raises).
  """
  columns = [input_column] if isinstance(input_column, str) else list(input_column)
  names = verbalizer(label_names) if label_names is not None else None
  inputs, targets = [], []
  for number, row in read_rows(path):
    texts = [_field(path, number, row, c, 'input_column') for c in columns]
    inputs.append(texts[0] if len(texts) == 1 else
                  ' '.join(f'{c}: {t}' for c, t in zip(columns, texts)))
    if label_column is None:
      targets.append(_field(path, number, row, target_column, 'target_column'))
      continue
    if row.get(label_column) is None:
      _field(path, number, row, label_column, 'label_column')  # raises: missing or null
    label = _label_key(row[label_column])
    if names is None:
      targets.append(label)
    elif label in names:
      targets.append(names[label])
    else:
      raise DataFileError(f'{path}:{number}: label {label!r} is not in label_names (known: '
                          f'{", ".join(map(repr, names))}); add it to label_names or fix the '
                          'row.')
  return inputs, targets


def _file_stamp(path: Optional[str]) -> Any:
  if path is None:
    return None
  stat = os.stat(path)
  return (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def register_file_task(name: str, train_path: str, validation_path: Optional[str] = None,
                       input_column: Union[str, Sequence[str]] = 'input',
                       target_column: str = 'target', label_column: Optional[str] = None,
                       label_names: Optional[LabelNames] = None,
                       vocabulary: Optional[seqio.Vocabulary] = None, *,
                       test_path: Optional[str] = None,
                       metric_fns: Optional[Sequence[Callable[..., Any]]] = None) -> seqio.Task:
  """Registers a seqio Task (splits train/validation/test) read from the user's files.

  Classification (`label_column` set) records its label texts in `LABELS[name]`, maps
  generations back to class ids for metrics and defaults to accuracy and macro F1; text
  targets default to SQuAD-normalised exact match and token F1.

  Args:
    name: the task name (a Python identifier, as seqio requires).
    train_path: the training file (.jsonl, .tsv or .csv).
    validation_path: optional validation file in any of these formats.
    input_column: see `read_examples`.
    target_column: see `read_examples`.
    label_column: see `read_examples`.
    label_names: see `read_examples`.
    vocabulary: the tokenizer; T5's default SentencePiece model when None.
    test_path: optional test file.
    metric_fns: seqio-style metrics instead of the defaults.

  Returns:
    The registered `seqio.Task` (re-registering unchanged arguments and files is a no-op).

  Raises:
    DataFileError: a problem in one of the files, with its line and the fix.
  """
  if not name.isidentifier():
    raise ValueError(f'task name {name!r} is not a Python identifier; use letters, digits '
                     'and underscores.')
  vocabulary = vocabulary or vocab_lib.get_vocabulary()
  paths = {'train': train_path, 'validation': validation_path, 'test': test_path}
  paths = {split: path for split, path in paths.items() if path is not None}
  read = functools.partial(read_examples, input_column=input_column,
                           target_column=target_column, label_column=label_column,
                           label_names=label_names)
  data = {split: read(path) for split, path in paths.items()}

  labels = None
  if label_column is not None:
    if label_names is not None:
      labels = tuple(dict.fromkeys(verbalizer(label_names).values()))
    else:
      labels = tuple(sorted(set(data['train'][1])))
  user_metric_fns = metric_fns
  if metric_fns is None:
    metric_fns = ([metrics.accuracy, metrics.macro_f1(len(labels))] if labels
                  else [metrics.squad])
  postprocess_fn = (functools.partial(prep.label_to_class_id, label_names=labels) if labels
                    else prep.text_postprocess)

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed  # The Task shuffles examples.
    inputs, targets = data[split]
    return tf.data.Dataset.from_tensor_slices(
        {'inputs': tf.constant(inputs, tf.string), 'targets': tf.constant(targets, tf.string)})

  source = seqio.FunctionDataSource(
      dataset_fn, splits=list(data),
      num_input_examples={split: len(d[0]) for split, d in data.items()})
  config = ('file', tuple((s, _file_stamp(p)) for s, p in paths.items()), repr(input_column),
            target_column, label_column, repr(label_names), tasks_lib.vocabulary_key(vocabulary),
            None if user_metric_fns is None else tuple(map(id, user_metric_fns)))
  return tasks_lib.register_text_task(name, source, [], vocabulary, metric_fns,
                                      postprocess_fn, labels, config)
