"""The data layer: vocabularies, seqio tasks and mixtures, file tasks, batches and metrics.

Library only (no gin): entry points bind these functions. Importing this package registers
nothing; call `register_tasks()` (TFDS benchmarks) or `register_file_task()` (your files).
"""

import logging as _logging

from jaxprompt import host as _host

_host.import_quietly('seqio')  # TensorFlow's native libraries print oneDNN / CUDA lines on load


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

__all__ = [
    'BatchIterator', 'DataFileError', 'DEFAULT_VOCAB_PATH', 'encoder_length', 'get_dataset',
    'get_vocabulary', 'label_names', 'LABELS', 'MT5_VOCAB_PATH', 'register_file_task',
    'register_mixture', 'register_tasks', 'train_sentencepiece', 'TruncationCounter',
]
