"""The data layer: vocabularies, seqio tasks and mixtures, file tasks, batches and metrics.

Library only (no gin): entry points bind these functions. Importing this package registers
nothing; call `register_tasks()` (TFDS benchmarks), `register_file_task()` (your files) or
`setup_tasks()` (every task a run can name).
"""

import logging as _logging
from typing import Sequence as _Sequence

from jaxprompt import host as _host

_host.import_quietly('seqio')  # TensorFlow's native libraries print oneDNN / CUDA lines on load
_host.hide_accelerators_from_tensorflow()


class _DropNoise(_logging.Filter):
  """seqio logs a long warning for every uncached dataset it reads (every batch source here)."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return 'uncached FunctionDataset' not in record.getMessage()


_logging.getLogger('absl').addFilter(_DropNoise())

from jaxprompt.data.features import BatchIterator, TruncationCounter, encoder_length, get_dataset
from jaxprompt.data.files import DataFileError, register_file_task
from jaxprompt.data.tasks import LABELS, label_names, register_mixture, register_tasks
from jaxprompt.data.vocab import (
    DEFAULT_VOCAB_PATH,
    MT5_VOCAB_PATH,
    get_vocabulary,
    train_sentencepiece,
)



def setup_tasks(vocabulary: str | None = None, train_file: str | None = None,
                validation_file: str | None = None, task_name: str = 'user_task',
                input_column: str = 'input', target_column: str = 'target',
                label_column: str | None = None, label_names: _Sequence[str] | None = None):
  """Registers the TFDS tasks, the tasks of every registered source (`jaxprompt.registry`; the
  lab's, once `jaxprompt.lab` is imported) and, optionally, a task from the user's files."""
  from jaxprompt import registry  # pylint: disable=g-import-not-at-top
  vocab = get_vocabulary(vocabulary) if vocabulary else None
  register_tasks(vocab)
  for register in registry.task_sources().values():
    register()
  if train_file:
    register_file_task(task_name, train_file, validation_file, input_column=input_column,
                       target_column=target_column, label_column=label_column,
                       label_names=list(label_names) if label_names else None, vocabulary=vocab)


__all__ = [
    'BatchIterator', 'DataFileError', 'DEFAULT_VOCAB_PATH', 'encoder_length', 'get_dataset',
    'get_vocabulary', 'label_names', 'LABELS', 'MT5_VOCAB_PATH', 'register_file_task',
    'register_mixture', 'register_tasks', 'setup_tasks', 'train_sentencepiece',
    'TruncationCounter',
]
