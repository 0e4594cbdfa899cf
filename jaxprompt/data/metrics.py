"""Metrics in seqio's style: `fn(targets, predictions) -> {name: value}`, values in percent.

Targets and predictions are what a task's postprocessor returns: class ids for classification
(-1 for a generation that is no label), floats for STS-B, lists of gold answers for SQuAD-like
tasks, `{'group', 'value'}` dicts for MultiRC targets, strings for summaries.

Example:
  >>> accuracy([0, 1, 1], [0, 1, 0])
  {'accuracy': 66.66666666666667}
  >>> squad([['the Cat', 'a dog']], ['cat'])
  {'exact_match': 100.0, 'f1': 100.0}
"""

import collections
import re
import string
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

Metrics = dict[str, float]
_PUNCTUATION = frozenset(string.punctuation)


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'got {len(targets)} targets but {len(predictions)} predictions; '
                     'pass one prediction per target.')


# ----------------------------------------------------------------------------- classification


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> Metrics:
  """Percentage of predictions equal to their target."""
  _check_lengths(targets, predictions)
  hits = [t == p for t, p in zip(targets, predictions)]
  return {'accuracy': 100.0 * float(np.mean(hits)) if hits else 0.0}


def _f1_for_class(targets: np.ndarray, predictions: np.ndarray, cls: Any) -> float:
  true_positive = np.sum((predictions == cls) & (targets == cls))
  predicted = np.sum(predictions == cls)
  actual = np.sum(targets == cls)
  if predicted + actual == 0:
    return 0.0
  return float(2.0 * true_positive / (predicted + actual))


def f1(targets: Sequence[Any], predictions: Sequence[Any], positive: Any = 1) -> Metrics:
  """Binary F1 of the `positive` class (MRPC, QQP, MultiRC's F1a)."""
  _check_lengths(targets, predictions)
  return {'f1': 100.0 * _f1_for_class(np.asarray(targets), np.asarray(predictions), positive)}


def macro_f1(num_classes: int) -> Callable[[Sequence[int], Sequence[int]], Metrics]:
  """Returns a metric: the mean over classes 0..num_classes-1 of each class's F1 (CB)."""

  def macro_f1_fn(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
    _check_lengths(targets, predictions)
    t, p = np.asarray(targets), np.asarray(predictions)
    scores = [_f1_for_class(t, p, c) for c in range(num_classes)]
    return {'macro_f1': 100.0 * float(np.mean(scores))}

  return macro_f1_fn


def matthews_corrcoef(targets: Sequence[Any], predictions: Sequence[Any]) -> Metrics:
  """Matthews correlation (multi-class form, from the confusion matrix), as for CoLA."""
  _check_lengths(targets, predictions)
  classes = sorted(set(targets) | set(predictions))
  index = {c: i for i, c in enumerate(classes)}
  confusion = np.zeros((len(classes), len(classes)))
  for t, p in zip(targets, predictions):
    confusion[index[t], index[p]] += 1
  n = confusion.sum()
  correct = np.trace(confusion)
  true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
  numerator = correct * n - pred_counts @ true_counts
  denominator = np.sqrt((n**2 - pred_counts @ pred_counts) * (n**2 - true_counts @ true_counts))
  return {'matthews_corrcoef': 100.0 * float(numerator / denominator) if denominator else 0.0}


# ----------------------------------------------------------------------------- regression


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Metrics:
  """Pearson correlation between the float targets and predictions (STS-B)."""
  _check_lengths(targets, predictions)
  t, p = np.asarray(targets, float), np.asarray(predictions, float)
  t, p = t - t.mean(), p - p.mean()
  denominator = np.sqrt((t @ t) * (p @ p))
  return {'pearson_corrcoef': 100.0 * float(t @ p / denominator) if denominator else 0.0}


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """Ranks 1..n, ties sharing the mean of the ranks they span."""
  order = np.argsort(values, kind='stable')
  ranks = np.empty(len(values))
  sorted_values = values[order]
  start = 0
  for end in range(1, len(values) + 1):
    if end == len(values) or sorted_values[end] != sorted_values[start]:
      ranks[order[start:end]] = (start + end + 1) / 2.0
      start = end
  return ranks


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Metrics:
  """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
  _check_lengths(targets, predictions)
  t = _average_ranks(np.asarray(targets, float))
  p = _average_ranks(np.asarray(predictions, float))
  return {'spearman_corrcoef': pearson_corrcoef(t, p)['pearson_corrcoef']}


# ----------------------------------------------------------------------------- QA


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCTUATION)
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def token_f1(prediction: str, gold: str) -> float:
  """F1 (0..1) of the normalised token multisets; two empty answers score 1."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  if not pred_tokens or not gold_tokens:
    return float(pred_tokens == gold_tokens)
  common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred_tokens), common / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Union[str, Sequence[str]]], predictions: Sequence[str]) -> Metrics:
  """Exact match and token F1 after SQuAD normalisation, max over each target's gold answers.

  A target may be a single string or a list of acceptable answers (SQuAD, NQ, ReCoRD).
  """
  _check_lengths(targets, predictions)
  em_scores, f1_scores = [], []
  for gold, prediction in zip(targets, predictions):
    answers = [gold] if isinstance(gold, str) else list(gold)
    em_scores.append(max(float(normalize_answer(prediction) == normalize_answer(a))
                         for a in answers))
    f1_scores.append(max(token_f1(prediction, a) for a in answers))
  return {'exact_match': 100.0 * float(np.mean(em_scores)) if em_scores else 0.0,
          'f1': 100.0 * float(np.mean(f1_scores)) if f1_scores else 0.0}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> Metrics:
  """Percentage of predictions identical (as strings, no normalisation) to their target."""
  _check_lengths(targets, predictions)
  return {'exact_match': accuracy(list(targets), list(predictions))['accuracy']}


def multirc(targets: Sequence[Mapping[str, Any]], predictions: Sequence[int]) -> Metrics:
  """MultiRC: exact match over questions (all answers of a group right) and F1a over answers.

  Args:
    targets: dicts `{'group': question id, 'value': 0/1}`, one per answer option.
    predictions: 0/1 (or -1) per answer option.
  """
  _check_lengths(targets, predictions)
  groups = collections.defaultdict(list)
  for target, prediction in zip(targets, predictions):
    groups[target['group']].append(target['value'] == prediction)
  exact = [all(hits) for hits in groups.values()]
  values = [t['value'] for t in targets]
  return {'exact_match': 100.0 * float(np.mean(exact)) if exact else 0.0,
          'f1a': f1(values, predictions)['f1']}


# ----------------------------------------------------------------------------- ROUGE


def rouge_tokenize(text: str) -> list[str]:
  """ROUGE's standard tokenisation: lowercase, non-alphanumerics become spaces, no stemming."""
  return re.sub(r'[^a-z0-9]+', ' ', text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _fmeasure(hits: float, num_reference: int, num_prediction: int) -> float:
  if hits == 0:
    return 0.0
  precision, recall = hits / num_prediction, hits / num_reference
  return 2 * precision * recall / (precision + recall)


def rouge_n(reference: str, prediction: str, n: int) -> float:
  """ROUGE-N F-measure (0..1) from clipped n-gram overlap."""
  ref, pred = _ngrams(rouge_tokenize(reference), n), _ngrams(rouge_tokenize(prediction), n)
  hits = sum((ref & pred).values())
  return _fmeasure(hits, sum(ref.values()), sum(pred.values()))


def _lcs_table(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
  table = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int32)
  for i, token in enumerate(a, start=1):
    for j, other in enumerate(b, start=1):
      table[i, j] = table[i - 1, j - 1] + 1 if token == other else max(table[i - 1, j],
                                                                        table[i, j - 1])
  return table


def rouge_l(reference: str, prediction: str) -> float:
  """ROUGE-L F-measure (0..1): longest common subsequence of the whole texts."""
  ref, pred = rouge_tokenize(reference), rouge_tokenize(prediction)
  if not ref or not pred:
    return 0.0
  return _fmeasure(float(_lcs_table(ref, pred)[-1, -1]), len(ref), len(pred))


def _lcs_positions(reference: Sequence[str], candidate: Sequence[str]) -> set[int]:
  """Positions in `reference` of one longest common subsequence with `candidate`."""
  table = _lcs_table(reference, candidate)
  i, j, positions = len(reference), len(candidate), set()
  while i > 0 and j > 0:
    if reference[i - 1] == candidate[j - 1]:
      positions.add(i - 1)
      i, j = i - 1, j - 1
    elif table[i, j - 1] > table[i - 1, j]:
      j -= 1
    else:
      i -= 1
  return positions


def rouge_lsum(reference: str, prediction: str) -> float:
  """Summary-level ROUGE-L (0..1): union LCS over newline-separated sentences."""
  ref_sents = [s for s in (rouge_tokenize(x) for x in reference.split('\n')) if s]
  pred_sents = [s for s in (rouge_tokenize(x) for x in prediction.split('\n')) if s]
  if not ref_sents or not pred_sents:
    return 0.0
  ref_left = collections.Counter(t for s in ref_sents for t in s)
  pred_left = collections.Counter(t for s in pred_sents for t in s)
  num_ref, num_pred = sum(ref_left.values()), sum(pred_left.values())
  hits = 0
  for sentence in ref_sents:
    union = set().union(*(_lcs_positions(sentence, p) for p in pred_sents))
    for token in (sentence[i] for i in sorted(union)):
      if ref_left[token] > 0 and pred_left[token] > 0:
        hits += 1
        ref_left[token] -= 1
        pred_left[token] -= 1
  return _fmeasure(hits, num_ref, num_pred)


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> Metrics:
  """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (percent), no stemming."""
  _check_lengths(targets, predictions)
  scores = collections.defaultdict(list)
  for reference, prediction in zip(targets, predictions):
    scores['rouge1'].append(rouge_n(reference, prediction, 1))
    scores['rouge2'].append(rouge_n(reference, prediction, 2))
    scores['rougeL'].append(rouge_l(reference, prediction))
    scores['rougeLsum'].append(rouge_lsum(reference, prediction))
  return {k: 100.0 * float(np.mean(v)) if v else 0.0 for k, v in scores.items()} or {
      'rouge1': 0.0, 'rouge2': 0.0, 'rougeL': 0.0, 'rougeLsum': 0.0}
