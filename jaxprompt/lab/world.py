"""A small artificial world of related text-to-text tasks, for demos and tests.

The language has 18 *item* words in three categories (colours, animals, numbers-as-words) and a
few *function* words used as answers (yes/no, even/odd, the category nouns, zero). Every input
is a sequence of 3-8 item words; every task maps it to a short output. Tasks are built from a
handful of shared skills (membership, counting, parity, comparison, selection, filtering, ...)
and differ in a detail (which word, which category, which position), so how related two tasks
are is known by construction: see `relatedness_matrix`.

Tasks are split into SOURCE tasks, on which the lab's backbone is pretrained (inputs prefixed by
the task name, as in T5's multi-task pretraining), and held-out TARGET tasks, which the backbone
never sees and which a prompt must steer it to. Most targets are a new detail of a source skill;
two (`has_duplicate`, `max_number`) share nothing with any source.

Example:
  >>> generate_examples('has_green', 'train', 2, seed=0)
  [{'inputs': '...', 'targets': 'yes'}, {'inputs': '...', 'targets': 'no'}]
  >>> names, matrix = relatedness_matrix()
"""

import dataclasses
import functools
import hashlib
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# ---------------------------------------------------------------------------------------------
# The language.

COLOURS = ('red', 'blue', 'green', 'yellow', 'black', 'white')
ANIMALS = ('cat', 'dog', 'fish', 'bird', 'cow', 'horse')
NUMBERS = ('one', 'two', 'three', 'four', 'five', 'six')
CATEGORIES: Dict[str, Tuple[str, ...]] = {
    'colour': COLOURS, 'animal': ANIMALS, 'number': NUMBERS}
ITEM_WORDS: Tuple[str, ...] = COLOURS + ANIMALS + NUMBERS
CATEGORY_OF: Dict[str, str] = {w: c for c, ws in CATEGORIES.items() for w in ws}
NUMBER_VALUE: Dict[str, int] = {w: i + 1 for i, w in enumerate(NUMBERS)}

YES_NO = ('yes', 'no')
EVEN_ODD = ('even', 'odd')
CATEGORY_LABELS = ('colour', 'animal', 'number')
COUNT_LABELS = ('zero',) + NUMBERS  # counts 0..6, as words.
FUNCTION_WORDS: Tuple[str, ...] = YES_NO + EVEN_ODD + CATEGORY_LABELS + ('zero',)
WORDS: Tuple[str, ...] = ITEM_WORDS + FUNCTION_WORDS

MIN_LENGTH = 3
MAX_LENGTH = 8
SPLITS = ('train', 'validation', 'test')
# Every input sequence belongs to exactly one split, for all tasks and seeds, by a stable hash of
# its words: buckets [0, 10) test, [10, 20) validation, [20, 100) train.
_SPLIT_BUCKETS = {'test': (0, 10), 'validation': (10, 20), 'train': (20, 100)}

Words = Tuple[str, ...]
Example = Tuple[Words, str]

# ---------------------------------------------------------------------------------------------
# Skills. Each skill is built from sub-skills; two tasks share a sub-skill when their skills do.

SKILL_PARTS: Dict[str, Tuple[str, ...]] = {
    'membership': ('find_word',),
    'count': ('categorise', 'count'),
    'parity': ('categorise', 'count', 'parity'),
    'compare': ('categorise', 'count', 'compare'),
    'extreme': ('categorise', 'count', 'compare'),
    'position': ('position',),
    'order': ('emit',),
    'filter': ('categorise', 'emit'),
    'duplicate': ('match_pairs',),
    'maximum': ('number_order',),
}


@dataclasses.dataclass(frozen=True)
class LabTask:
  """One task of the lab world.

  Attributes:
    name: the task's name, also its pretraining prefix (`'<name>: '`).
    skill: the skill group (a key of `SKILL_PARTS`).
    kind: 'classification' (targets from `labels`) or 'generation'.
    labels: the label words of a classification task (its verbalizers), else None.
    role: 'source' (seen in pretraining) or 'target' (held out for prompt tuning).
    fn: `fn(rng: random.Random) -> (input_words, target)`, a pure sampler of one example.
    detail: what distinguishes the task within its skill (a word, a category, a position).
    description: one line in English.
  """
  name: str
  skill: str
  kind: str
  labels: Optional[Tuple[str, ...]]
  role: str
  fn: Callable[[random.Random], Example]
  detail: str = ''
  description: str = ''

  @property
  def parts(self) -> Tuple[str, ...]:
    """The sub-skills of the task's skill."""
    return SKILL_PARTS[self.skill]

  @property
  def prefix(self) -> str:
    """The task-name prefix used by the pretraining (prefixed) variant of the task."""
    return f'{self.name}: '


# ---------------------------------------------------------------------------------------------
# Samplers. Each returns a function `rng -> (words, target)`; classification samplers first draw
# the label uniformly, so labels are balanced by construction.


def _others(excluded: Sequence[str]) -> Tuple[str, ...]:
  return tuple(w for w in ITEM_WORDS if w not in excluded)


def _fill(rng: random.Random, counts: Dict[str, int], pool_rest: Sequence[str] = (),
          n_rest: int = 0) -> Words:
  """Shuffled words with `counts[c]` words of category c and `n_rest` words from `pool_rest`."""
  words = [rng.choice(CATEGORIES[c]) for c, k in counts.items() for _ in range(k)]
  words += [rng.choice(pool_rest) for _ in range(n_rest)]
  rng.shuffle(words)
  return tuple(words)


def _random_words(rng: random.Random, pool: Sequence[str] = ITEM_WORDS) -> Words:
  length = rng.randint(MIN_LENGTH, MAX_LENGTH)
  return tuple(rng.choice(pool) for _ in range(length))


def _membership(word: str):
  rest = _others([word])

  def fn(rng: random.Random) -> Example:
    answer = rng.choice(YES_NO)
    words = list(_random_words(rng, rest))
    if answer == 'yes':
      for i in rng.sample(range(len(words)), rng.choice((1, 1, 2))):
        words[i] = word
    return tuple(words), answer
  return fn


def _category_with_count(rng: random.Random, category: str, count: int) -> Words:
  length = rng.randint(max(MIN_LENGTH, count), MAX_LENGTH)
  return _fill(rng, {category: count}, _others(CATEGORIES[category]), length - count)


def _count(category: str):
  def fn(rng: random.Random) -> Example:
    count = rng.randrange(len(COUNT_LABELS))
    return _category_with_count(rng, category, count), COUNT_LABELS[count]
  return fn


def _parity(category: str):
  def fn(rng: random.Random) -> Example:
    answer = rng.choice(EVEN_ODD)
    count = rng.choice((0, 2, 4, 6) if answer == 'even' else (1, 3, 5))
    return _category_with_count(rng, category, count), answer
  return fn


def _compare(first: str, second: str):
  (third,) = [c for c in CATEGORIES if c not in (first, second)]

  def fn(rng: random.Random) -> Example:
    answer = rng.choice(YES_NO)
    while True:
      a, b, c = rng.randint(0, 5), rng.randint(0, 5), rng.randint(0, 3)
      if a != b and (a > b) == (answer == 'yes') and MIN_LENGTH <= a + b + c <= MAX_LENGTH:
        return _fill(rng, {first: a, second: b, third: c}), answer
  return fn


def _extreme(most: bool):
  def fn(rng: random.Random) -> Example:
    answer = rng.choice(CATEGORY_LABELS)
    while True:
      counts = {c: rng.randint(1, 6) for c in CATEGORY_LABELS}
      if not MIN_LENGTH <= sum(counts.values()) <= MAX_LENGTH:
        continue
      best = (max if most else min)(counts.values())
      winners = [c for c, k in counts.items() if k == best]
      if winners == [answer]:
        return _fill(rng, counts), answer
  return fn


def _position(index: int):
  def fn(rng: random.Random) -> Example:
    words = _random_words(rng)
    return words, words[index]
  return fn


def _order(reverse: bool):
  def fn(rng: random.Random) -> Example:
    words = _random_words(rng)
    return words, ' '.join(reversed(words) if reverse else words)
  return fn


def _filter(category: str):
  def fn(rng: random.Random) -> Example:
    words = _category_with_count(rng, category, rng.randint(1, 5))
    return words, ' '.join(w for w in words if CATEGORY_OF[w] == category)
  return fn


def _duplicate(rng: random.Random) -> Example:
  answer = rng.choice(YES_NO)
  length = rng.randint(MIN_LENGTH, MAX_LENGTH)
  if answer == 'no':
    return tuple(rng.sample(ITEM_WORDS, length)), answer
  words = rng.sample(ITEM_WORDS, length - 1)
  words.insert(rng.randint(0, len(words)), rng.choice(words))
  return tuple(words), answer


def _max_number(rng: random.Random) -> Example:
  top = rng.randint(2, len(NUMBERS))  # 'two'..'six', uniform; 'one' only has one-word inputs.
  pool = NUMBERS[:top]
  while True:
    words = _random_words(rng, pool)
    if pool[-1] in words:
      return words, pool[-1]


# ---------------------------------------------------------------------------------------------
# The registry.

_C, _G = 'classification', 'generation'
_S, _T = 'source', 'target'


def _task(name, skill, kind, labels, role, fn, detail, description) -> Tuple[str, LabTask]:
  return name, LabTask(name, skill, kind, labels, role, fn, detail, description)


def _membership_task(word: str, role: str):
  return _task(f'has_{word}', 'membership', _C, YES_NO, role, _membership(word), word,
               f'is "{word}" in the sequence?')


def _count_task(category: str, role: str):
  return _task(f'count_{category}s', 'count', _C, COUNT_LABELS, role, _count(category), category,
               f'how many {category} words (zero..six)?')


def _parity_task(category: str, role: str):
  return _task(f'parity_{category}s', 'parity', _C, EVEN_ODD, role, _parity(category), category,
               f'is the number of {category} words even or odd?')


def _compare_task(first: str, second: str, role: str):
  return _task(f'more_{first}s_than_{second}s', 'compare', _C, YES_NO, role,
               _compare(first, second), f'{first}>{second}',
               f'are there more {first} words than {second} words? (never a tie)')


def _filter_task(category: str, role: str):
  return _task(f'filter_{category}s', 'filter', _G, None, role, _filter(category), category,
               f'the {category} words, in order')


TASKS: Dict[str, LabTask] = dict([
    _membership_task('red', _S),
    _membership_task('blue', _S),
    _membership_task('cat', _S),
    _membership_task('four', _S),
    _membership_task('green', _T),
    _membership_task('dog', _T),
    _count_task('colour', _S),
    _count_task('animal', _S),
    _count_task('number', _T),
    _parity_task('colour', _S),
    _parity_task('number', _S),
    _parity_task('animal', _T),
    _compare_task('colour', 'animal', _S),
    _compare_task('animal', 'number', _S),
    _compare_task('number', 'colour', _T),
    _task('majority', 'extreme', _C, CATEGORY_LABELS, _S, _extreme(most=True), 'most',
          'which category has the most words? (all present, no tie)'),
    _task('minority', 'extreme', _C, CATEGORY_LABELS, _T, _extreme(most=False), 'fewest',
          'which category has the fewest words? (all present, no tie)'),
    _task('first_word', 'position', _G, None, _S, _position(0), 'first', 'the first word'),
    _task('last_word', 'position', _G, None, _S, _position(-1), 'last', 'the last word'),
    _task('second_word', 'position', _G, None, _T, _position(1), 'second', 'the second word'),
    _task('copy', 'order', _G, None, _S, _order(reverse=False), 'forward', 'the sequence'),
    _task('reverse', 'order', _G, None, _S, _order(reverse=True), 'backward',
          'the sequence reversed'),
    _filter_task('colour', _S),
    _filter_task('animal', _S),
    _filter_task('number', _T),
    _task('has_duplicate', 'duplicate', _C, YES_NO, _T, _duplicate, 'any',
          'does a word occur twice? (at most one repeated pair)'),
    _task('max_number', 'maximum', _G, None, _T, _max_number, 'max',
          'the largest number word (inputs are number words only)'),
])

SOURCE_TASKS: Tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.role == 'source')
TARGET_TASKS: Tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.role == 'target')


def get_task(name: str) -> LabTask:
  """Returns the lab task called `name`; raises KeyError naming the known tasks otherwise."""
  try:
    return TASKS[name]
  except KeyError:
    raise KeyError(f'unknown lab task {name!r}; known: {", ".join(TASKS)}') from None


# ---------------------------------------------------------------------------------------------
# Examples.


def _stable_int(text: str, digits: int = 16) -> int:
  return int(hashlib.blake2b(text.encode('utf-8'), digest_size=digits // 2).hexdigest(), 16)


def split_of(words: Sequence[str]) -> str:
  """The split ('train', 'validation' or 'test') an input sequence belongs to, for every task."""
  bucket = _stable_int(' '.join(words)) % 100
  for split, (lo, hi) in _SPLIT_BUCKETS.items():
    if lo <= bucket < hi:
      return split
  raise AssertionError(bucket)


def split_seed(task_name: str, split: str, seed: int) -> int:
  """The seed of the random stream for one (task, split, seed); distinct streams per split."""
  return _stable_int(f'jaxprompt.lab|{task_name}|{split}|{seed}')


@functools.lru_cache(maxsize=256)
def _generate(task_name: str, split: str, n: int, seed: int) -> Tuple[Tuple[str, str], ...]:
  task = get_task(task_name)
  rng = random.Random(split_seed(task_name, split, seed))
  seen = set()
  examples = []
  misses = 0
  while len(examples) < n:
    words, target = task.fn(rng)
    if split_of(words) != split:
      continue
    inputs = ' '.join(words)
    # Evaluation splits hold distinct inputs while the space allows (50 misses in a row).
    if split != 'train' and inputs in seen and misses < 50:
      misses += 1
      continue
    misses = 0
    seen.add(inputs)
    examples.append((inputs, target))
  return tuple(examples)


def generate_examples(task_name: str, split: str, n: int, seed: int = 0) -> List[Dict[str, str]]:
  """Deterministically generates `n` examples of a lab task.

  Splits never overlap: an input sequence belongs to one split for all tasks (`split_of`), so no
  validation or test input of any task occurs in any task's train split. Validation and test
  inputs are also distinct within the split. The first `m` examples for `n > m` equal the
  examples for `m`. Classification labels are drawn uniformly.

  Args:
    task_name: a key of `TASKS`.
    split: 'train', 'validation' or 'test'.
    n: number of examples.
    seed: world seed; different seeds give different examples.

  Returns:
    A list of `{'inputs': str, 'targets': str}`, words separated by single spaces, no prefix.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  return [{'inputs': i, 'targets': t} for i, t in _generate(task_name, split, int(n), int(seed))]


# ---------------------------------------------------------------------------------------------
# Relatedness.


def relatedness(a: str, b: str) -> float:
  """Relatedness of two tasks by construction.

  1.0 when both have the same skill (a task with itself included; the tasks then differ only in
  their detail), 0.5 when their skills differ but share a sub-skill (`SKILL_PARTS`), else 0.0.
  """
  ta, tb = get_task(a), get_task(b)
  if ta.skill == tb.skill:
    return 1.0
  return 0.5 if set(ta.parts) & set(tb.parts) else 0.0


def relatedness_matrix(names: Optional[Sequence[str]] = None) -> Tuple[List[str], np.ndarray]:
  """Returns `(names, matrix)` with `matrix[i, j] = relatedness(names[i], names[j])`.

  Args:
    names: the tasks, in order; all of `TASKS` (registry order) when None.
  """
  names = list(TASKS if names is None else names)
  matrix = np.array([[relatedness(a, b) for b in names] for a in names], dtype=np.float32)
  return names, matrix


def related_sources(target: str, min_relatedness: float = 0.5) -> Dict[str, float]:
  """The source tasks related to `target` (at least `min_relatedness`), most related first."""
  scores = {s: relatedness(target, s) for s in SOURCE_TASKS if s != target}
  kept = {s: r for s, r in scores.items() if r >= min_relatedness}
  return dict(sorted(kept.items(), key=lambda kv: -kv[1]))
