"""SentencePiece vocabularies: T5's public ones by path, and small ones trained locally.

T5 models use a SentencePiece model with 100 sentinel ids (`<extra_id_0>` ... `<extra_id_99>`)
appended after its pieces; seqio adds them when the vocabulary is built with `extra_ids=100`.
Ids follow T5's conventions: pad 0, eos 1, unk 2, no bos.

Example:
  >>> vocab = get_vocabulary()  # T5's cc_all.32000 model (needs access to gs://t5-data)
  >>> path = train_sentencepiece(['a tiny corpus', 'of two lines'], '/tmp/tiny', vocab_size=40)
  >>> vocab = get_vocabulary(path)
"""

import os
import re
from typing import Iterable, Optional, Sequence

import seqio

DEFAULT_VOCAB_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
MT5_VOCAB_PATH = 'gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model'
DEFAULT_EXTRA_IDS = 100

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


def get_vocabulary(path: Optional[str] = None,
                   extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """Returns the SentencePiece vocabulary at `path` with `extra_ids` sentinels.

  Args:
    path: a `.model` file (local or any path tf.io.gfile reads); T5's default when None.
    extra_ids: number of sentinel ids appended after the model's pieces (T5 uses 100).

  Returns:
    A `seqio.SentencePieceVocabulary`; the model file is read lazily, on first use.
  """
  return seqio.SentencePieceVocabulary(path or DEFAULT_VOCAB_PATH, extra_ids=extra_ids)


def train_sentencepiece(texts: Iterable[str],
                        model_prefix: str,
                        vocab_size: int,
                        *,
                        model_type: str = 'unigram',
                        required_chars: str = '',
                        user_defined_symbols: Sequence[str] = (),
                        seed_sentencepiece_size: int = 10000) -> str:
  """Trains a small SentencePiece model with T5's id conventions (pad 0, eos 1, unk 2, no bos).

  Every character of `texts` (and of `required_chars`) is kept (character coverage 1.0), and
  the trained model is checked to encode each text without an unknown piece. Training is single
  threaded on the texts in the given order, so the same inputs give the same model.

  Args:
    texts: the training sentences (one string per sentence or line).
    model_prefix: the output path without extension; writes `<prefix>.model` and `.vocab`.
    vocab_size: the number of pieces including pad, eos and unk; treated as an upper bound when
      the texts are too small to fill it.
    model_type: 'unigram' (T5's), 'bpe', 'char' or 'word'.
    required_chars: characters the model must cover even if the texts lack them.
    user_defined_symbols: pieces that are never split.
    seed_sentencepiece_size: size of the unigram seed vocabulary.

  Returns:
    The path of the `.model` file.

  Raises:
    ValueError: when `texts` is empty, `vocab_size` is below the number of characters, or the
      model cannot encode one of the characters used.
  """
  sentences = [t for t in texts if t and t.strip()]
  if required_chars:
    sentences.append(' '.join(sorted(set(required_chars) - set(' \t\n'))))
  if not sentences:
    raise ValueError('train_sentencepiece got no non-empty text; pass at least one sentence.')
  directory = os.path.dirname(model_prefix)
  if directory:
    os.makedirs(directory, exist_ok=True)
  try:
    _train(sentences, model_prefix, vocab_size, model_type, user_defined_symbols,
           seed_sentencepiece_size)
  except RuntimeError as error:
    if 'smaller than required_chars' not in str(error):
      raise
    needed = re.search(r'vs (\d+)', str(error))
    raise ValueError(f'vocab_size {vocab_size} is below the number of distinct characters plus '
                     f'pad/eos/unk; raise vocab_size to at least '
                     f'{needed.group(1) if needed else "that"}.') from None
  model_path = model_prefix + '.model'
  _check_coverage(model_path, sentences)
  return model_path


def _train(sentences, model_prefix, vocab_size, model_type, user_defined_symbols,
           seed_sentencepiece_size) -> None:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=1.0,
      hard_vocab_limit=False,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      user_defined_symbols=list(user_defined_symbols),
      seed_sentencepiece_size=seed_sentencepiece_size,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2)


def _check_coverage(model_path: str, sentences: Sequence[str]) -> None:
  """Raises ValueError when the model maps a character of `sentences` to unk."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  processor = spm.SentencePieceProcessor(model_file=model_path)
  chars = sorted(set(''.join(sentences)) - set(' \t\n\r'))
  missing = [c for c in chars if UNK_ID in processor.encode(c)]
  if missing:
    raise ValueError(
        f'SentencePiece model {model_path} cannot encode {missing!r}; add these characters to '
        'the texts or to required_chars, or raise vocab_size.')
