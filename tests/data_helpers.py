"""Helpers for the data tests: a small SentencePiece vocabulary trained here, and data files."""

from __future__ import annotations

import functools
import json
import os
import random
import string
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from jaxprompt.data import vocab as vocab_lib  # noqa: E402

WORDS = ('the a an it is was good bad movie film great awful sentence premise hypothesis '
         'question answer passage entailment neutral contradiction positive negative true '
         'false choice summarize text query entities context dog cat city council feared '
         'violence refused permit because they demonstrators yes no paris france capital').split()
# Every character the tests (and the mocked TFDS data) use.
ALL_CHARS = string.printable


def generated_corpus(num_sentences: int = 300, seed: int = 0) -> list[str]:
  """Sentences of WORDS and labels, plus every printable character."""
  rng = random.Random(seed)
  sentences = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
               for _ in range(num_sentences)]
  return sentences + [ALL_CHARS]


@functools.cache
def spm_model_path(vocab_size: int = 300) -> str:
  """Trains (once per process) a unigram SentencePiece model on the generated corpus."""
  directory = tempfile.mkdtemp(prefix='jaxprompt_spm_')
  return vocab_lib.train_sentencepiece(generated_corpus(), os.path.join(directory, 'tiny'),
                                       vocab_size, required_chars=ALL_CHARS)


@functools.cache
def vocabulary(vocab_size: int = 300):
  """The seqio vocabulary (100 extra ids) of `spm_model_path`."""
  return vocab_lib.get_vocabulary(spm_model_path(vocab_size))


def write_jsonl(path, rows) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return str(path)


def write_text(path, text: str) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)
