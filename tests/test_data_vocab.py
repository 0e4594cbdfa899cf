"""Vocabularies: T5 paths, extra ids, and the locally trained SentencePiece model."""

import os
import string

import data_helpers
import pytest
import sentencepiece as spm

from jaxprompt.data import vocab as vocab_lib


def test_default_paths_are_t5s_and_nothing_is_read():
  vocabulary = vocab_lib.get_vocabulary()
  assert vocabulary.sentencepiece_model_file == vocab_lib.DEFAULT_VOCAB_PATH
  assert vocab_lib.DEFAULT_VOCAB_PATH == 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
  assert vocab_lib.MT5_VOCAB_PATH == (
      'gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model')
  assert vocabulary.extra_ids == 100


def test_trained_model_follows_t5_id_conventions():
  processor = spm.SentencePieceProcessor(model_file=data_helpers.spm_model_path())
  assert processor.pad_id() == 0
  assert processor.eos_id() == 1
  assert processor.unk_id() == 2
  assert processor.bos_id() == -1


def test_trained_model_covers_every_character():
  processor = spm.SentencePieceProcessor(model_file=data_helpers.spm_model_path())
  for char in string.printable.strip():
    assert 2 not in processor.encode(char), char


def test_extra_ids_sit_after_the_pieces():
  vocabulary = data_helpers.vocabulary()
  base = spm.SentencePieceProcessor(model_file=data_helpers.spm_model_path()).get_piece_size()
  assert vocabulary.vocab_size == base + 100
  assert vocabulary.encode('<extra_id_0>')[-1] == base + 99  # T5: extra_id_0 is the last id
  text = 'the movie was good.'
  assert vocabulary.decode(vocabulary.encode(text)) == text


def test_training_is_deterministic(tmp_path):
  texts = data_helpers.generated_corpus(50, seed=3)
  first = vocab_lib.train_sentencepiece(texts, str(tmp_path / 'a'), 120)
  second = vocab_lib.train_sentencepiece(texts, str(tmp_path / 'b'), 120)
  def pieces(path):  # the proto also records the output path, so compare pieces and scores
    processor = spm.SentencePieceProcessor(model_file=path)
    return [(processor.id_to_piece(i), processor.get_score(i))
            for i in range(processor.get_piece_size())]
  assert pieces(first) == pieces(second)
  assert os.path.exists(str(tmp_path / 'a.vocab'))


def test_coverage_check_names_missing_characters():
  with pytest.raises(ValueError, match='cannot encode'):
    vocab_lib._check_coverage(data_helpers.spm_model_path(), ['the dog \u00e9\u00e9'])


def test_too_small_vocab_size_says_how_large(tmp_path):
  with pytest.raises(ValueError, match='at least'):
    vocab_lib.train_sentencepiece([string.printable], str(tmp_path / 'x'), 20)


def test_empty_texts_are_refused(tmp_path):
  with pytest.raises(ValueError, match='no non-empty text'):
    vocab_lib.train_sentencepiece(['', '  '], str(tmp_path / 'x'), 50)
