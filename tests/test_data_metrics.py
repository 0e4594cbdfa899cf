"""Metrics against hand-computed values and independent libraries (sklearn, scipy, rouge_score).

The reference libraries are test-only; tests that need one skip when it is not installed.
"""

import random

import numpy as np
import pytest

from jaxprompt.data import metrics

RNG = np.random.default_rng(0)
TARGETS = RNG.integers(0, 3, 60).tolist()
PREDICTIONS = [t if RNG.random() < 0.6 else int(RNG.integers(-1, 3)) for t in TARGETS]


def test_accuracy_by_hand():
  assert metrics.accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == {'accuracy': 75.0}
  assert metrics.accuracy(['a', 'b'], ['a', 'c']) == {'accuracy': 50.0}


def test_binary_f1_by_hand():
  # tp = 2, fp = 1, fn = 1 -> precision 2/3, recall 2/3, F1 2/3.
  assert metrics.f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0])['f1'] == pytest.approx(200 / 3)
  assert metrics.f1([0, 0], [0, 0])['f1'] == 0.0


def test_matthews_by_hand():
  # tp 2, tn 1, fp 1, fn 0: (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1) = 2 / sqrt(12).
  value = metrics.matthews_corrcoef([1, 1, 0, 0], [1, 1, 1, 0])['matthews_corrcoef']
  assert value == pytest.approx(100 * 2 / np.sqrt(12))
  assert metrics.matthews_corrcoef([1, 1], [1, 1])['matthews_corrcoef'] == 0.0


def test_classification_against_sklearn():
  sk = pytest.importorskip('sklearn.metrics')
  binary_t = [t % 2 for t in TARGETS]
  binary_p = [p % 2 if p >= 0 else -1 for p in PREDICTIONS]
  assert metrics.accuracy(TARGETS, PREDICTIONS)['accuracy'] == pytest.approx(
      100 * sk.accuracy_score(TARGETS, PREDICTIONS))
  assert metrics.f1(binary_t, binary_p)['f1'] == pytest.approx(
      100 * sk.f1_score(binary_t, binary_p, pos_label=1, labels=[1], average='macro'))
  assert metrics.macro_f1(3)(TARGETS, PREDICTIONS)['macro_f1'] == pytest.approx(
      100 * sk.f1_score(TARGETS, PREDICTIONS, labels=[0, 1, 2], average='macro',
                        zero_division=0))
  for t, p in ((TARGETS, PREDICTIONS), (binary_t, binary_p)):
    assert metrics.matthews_corrcoef(t, p)['matthews_corrcoef'] == pytest.approx(
        100 * sk.matthews_corrcoef(t, p))


def test_correlations_by_hand():
  assert metrics.pearson_corrcoef([1, 2, 3], [2, 4, 6])['pearson_corrcoef'] == pytest.approx(100)
  assert metrics.spearman_corrcoef([1, 2, 3], [1, 8, 27])['spearman_corrcoef'] == pytest.approx(
      100)
  assert metrics.spearman_corrcoef([1, 2, 3], [3, 2, 1])['spearman_corrcoef'] == pytest.approx(
      -100)


def test_correlations_against_scipy():
  stats = pytest.importorskip('scipy.stats')
  t = np.round(RNG.uniform(0, 5, 50) * 5) / 5  # STS-B style, many ties
  p = np.round((t + RNG.normal(0, 1, 50)) * 5) / 5
  assert metrics.pearson_corrcoef(t, p)['pearson_corrcoef'] == pytest.approx(
      100 * stats.pearsonr(t, p)[0])
  assert metrics.spearman_corrcoef(t, p)['spearman_corrcoef'] == pytest.approx(
      100 * stats.spearmanr(t, p)[0])


def test_squad_normalisation_and_token_f1():
  assert metrics.normalize_answer('The  Cat, sat!') == 'cat sat'
  assert metrics.normalize_answer('An apple a day') == 'apple day'
  # pred 'cat sat mat', gold 'cat on mat': 2 common, P = R = 2/3.
  assert metrics.token_f1('the cat sat the mat', 'cat on mat') == pytest.approx(2 / 3)
  assert metrics.token_f1('', '') == 1.0
  assert metrics.token_f1('a', 'dog') == 0.0  # 'a' normalises to nothing


def test_squad_takes_max_over_gold_answers():
  result = metrics.squad([['Paris', 'the city of Paris'], ['blue']],
                         ['city of Paris', 'red'])
  assert result['exact_match'] == pytest.approx(50.0)
  assert result['f1'] == pytest.approx(50.0)
  assert metrics.squad(['Paris'], ['paris.']) == {'exact_match': 100.0, 'f1': 100.0}


def test_exact_match_is_literal():
  assert metrics.exact_match(['Paris', 'a'], ['paris', 'a']) == {'exact_match': 50.0}


def test_multirc_groups_by_question():
  targets = [{'group': (0, 0), 'value': 1}, {'group': (0, 0), 'value': 0},
             {'group': (0, 1), 'value': 1}, {'group': (1, 0), 'value': 0}]
  predictions = [1, 0, 0, 0]
  result = metrics.multirc(targets, predictions)
  assert result['exact_match'] == pytest.approx(100 * 2 / 3)  # groups (0,0) and (1,0) right
  assert result['f1a'] == pytest.approx(100 * 2 / 3)  # tp 1, fn 1, fp 0


def test_rouge_by_hand():
  reference, prediction = 'the cat sat on the mat', 'the cat lay on the mat'
  # unigrams: 5 of 6 shared; bigrams: 'the cat', 'on the', 'the mat' = 3 of 5.
  assert metrics.rouge_n(reference, prediction, 1) == pytest.approx(5 / 6)
  assert metrics.rouge_n(reference, prediction, 2) == pytest.approx(3 / 5)
  assert metrics.rouge_l(reference, prediction) == pytest.approx(5 / 6)
  assert metrics.rouge_tokenize("It's 3 o'clock!") == ['it', 's', '3', 'o', 'clock']


def _random_summary(rng: random.Random, words) -> str:
  sentences = [' '.join(rng.choice(words) for _ in range(rng.randint(1, 9)))
               for _ in range(rng.randint(1, 3))]
  return '\n'.join(s.capitalize() + rng.choice(['.', '!', ',']) for s in sentences)


def test_rouge_against_rouge_score():
  rouge_scorer = pytest.importorskip('rouge_score.rouge_scorer')
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL', 'rougeLsum'],
                                    use_stemmer=False)
  rng = random.Random(0)
  words = 'the a cat dog sat ran on mat home fast 12 big'.split()
  targets = [_random_summary(rng, words) for _ in range(40)]
  predictions = [_random_summary(rng, words) for _ in range(40)]
  ours = metrics.rouge(targets, predictions)
  for key in ('rouge1', 'rouge2', 'rougeL', 'rougeLsum'):
    reference = np.mean([scorer.score(t, p)[key].fmeasure for t, p in zip(targets, predictions)])
    assert ours[key] == pytest.approx(100 * reference), key


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match='one prediction per target'):
    metrics.accuracy([1, 2], [1])
