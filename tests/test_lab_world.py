"""Tests of the lab world (jaxprompt.lab.world) and its seqio tasks (jaxprompt.lab.tasks)."""

import collections
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxprompt.lab import world  # pylint: disable=g-import-not-at-top,wrong-import-position

N_TRAIN = 1500


def _count(words, category):
  return sum(world.CATEGORY_OF[w] == category for w in words)


def _counts(words):
  return {c: _count(words, c) for c in world.CATEGORIES}


def _yes(condition):
  return 'yes' if condition else 'no'


# An independent statement of what each task computes, checked against every generated example.
ORACLE = {
    'has_red': lambda w: _yes('red' in w),
    'has_blue': lambda w: _yes('blue' in w),
    'has_cat': lambda w: _yes('cat' in w),
    'has_four': lambda w: _yes('four' in w),
    'has_green': lambda w: _yes('green' in w),
    'has_dog': lambda w: _yes('dog' in w),
    'count_colours': lambda w: world.COUNT_LABELS[_count(w, 'colour')],
    'count_animals': lambda w: world.COUNT_LABELS[_count(w, 'animal')],
    'count_numbers': lambda w: world.COUNT_LABELS[_count(w, 'number')],
    'parity_colours': lambda w: ('even', 'odd')[_count(w, 'colour') % 2],
    'parity_numbers': lambda w: ('even', 'odd')[_count(w, 'number') % 2],
    'parity_animals': lambda w: ('even', 'odd')[_count(w, 'animal') % 2],
    'more_colours_than_animals': lambda w: _yes(_count(w, 'colour') > _count(w, 'animal')),
    'more_animals_than_numbers': lambda w: _yes(_count(w, 'animal') > _count(w, 'number')),
    'more_numbers_than_colours': lambda w: _yes(_count(w, 'number') > _count(w, 'colour')),
    'majority': lambda w: max(_counts(w).items(), key=lambda kv: kv[1])[0],
    'minority': lambda w: min(_counts(w).items(), key=lambda kv: kv[1])[0],
    'first_word': lambda w: w[0],
    'last_word': lambda w: w[-1],
    'second_word': lambda w: w[1],
    'copy': ' '.join,
    'reverse': lambda w: ' '.join(w[::-1]),
    'filter_colours': lambda w: ' '.join(x for x in w if world.CATEGORY_OF[x] == 'colour'),
    'filter_animals': lambda w: ' '.join(x for x in w if world.CATEGORY_OF[x] == 'animal'),
    'filter_numbers': lambda w: ' '.join(x for x in w if world.CATEGORY_OF[x] == 'number'),
    'has_duplicate': lambda w: _yes(len(set(w)) < len(w)),
    'max_number': lambda w: max(w, key=world.NUMBER_VALUE.get),
}


def test_registry_shape():
  assert set(ORACLE) == set(world.TASKS)
  assert 15 <= len(world.TASKS) <= 30
  assert set(world.SOURCE_TASKS) | set(world.TARGET_TASKS) == set(world.TASKS)
  for name, task in world.TASKS.items():
    assert task.name == name
    assert task.skill in world.SKILL_PARTS
    assert task.role in ('source', 'target')
    assert task.kind in ('classification', 'generation')
    assert (task.labels is not None) == (task.kind == 'classification')
    assert task.prefix == f'{name}: '


def test_same_seed_same_examples_and_prefix_stable():
  for name in world.TASKS:
    a = world.generate_examples(name, 'train', 50, seed=3)
    world._generate.cache_clear()  # pylint: disable=protected-access
    assert world.generate_examples(name, 'train', 50, seed=3) == a
    assert world.generate_examples(name, 'train', 20, seed=3) == a[:20]
    assert world.generate_examples(name, 'train', 50, seed=4) != a
    assert world.generate_examples(name, 'validation', 50, seed=3) != a


def test_examples_match_task_semantics():
  for name in world.TASKS:
    for split, n in (('train', N_TRAIN), ('validation', 200), ('test', 200)):
      for ex in world.generate_examples(name, split, n, seed=0):
        words = ex['inputs'].split()
        assert ' '.join(words) == ex['inputs']
        assert world.MIN_LENGTH <= len(words) <= world.MAX_LENGTH
        assert all(w in world.ITEM_WORDS for w in words)
        assert ex['targets'] == ORACLE[name](words), (name, ex)


def test_splits_never_overlap():
  for name in world.TASKS:
    inputs = {s: [e['inputs'] for e in world.generate_examples(name, s, n, seed=0)]
              for s, n in (('train', N_TRAIN), ('validation', 200), ('test', 200))}
    assert not set(inputs['train']) & set(inputs['validation'])
    assert not set(inputs['train']) & set(inputs['test'])
    assert not set(inputs['validation']) & set(inputs['test'])
    for split in ('validation', 'test'):
      assert len(set(inputs[split])) == len(inputs[split]), (name, split)
    for split, xs in inputs.items():
      assert all(world.split_of(x.split()) == split for x in xs)


def test_labels_balanced():
  for name, task in world.TASKS.items():
    if task.kind != 'classification':
      continue
    counts = collections.Counter(
        e['targets'] for e in world.generate_examples(name, 'train', N_TRAIN, seed=0))
    assert set(counts) == set(task.labels), name
    expected = N_TRAIN / len(task.labels)
    for label, count in counts.items():
      assert 0.8 * expected < count < 1.2 * expected, (name, label, count)


def test_relatedness_matrix_structure():
  names, m = world.relatedness_matrix()
  assert names == list(world.TASKS)
  assert m.shape == (len(names), len(names))
  np.testing.assert_array_equal(m, m.T)
  np.testing.assert_array_equal(np.diag(m), 1.0)
  assert set(np.unique(m)) <= {0.0, 0.5, 1.0}
  for i, a in enumerate(names):
    for j, b in enumerate(names):
      ta, tb = world.TASKS[a], world.TASKS[b]
      shared = set(ta.parts) & set(tb.parts)
      expected = 1.0 if ta.skill == tb.skill else (0.5 if shared else 0.0)
      assert m[i, j] == expected, (a, b)
  assert world.relatedness('has_red', 'has_green') == 1.0
  assert world.relatedness('count_colours', 'parity_animals') == 0.5
  assert world.relatedness('has_red', 'reverse') == 0.0
  sub_names, sub = world.relatedness_matrix(['copy', 'reverse', 'max_number'])
  np.testing.assert_array_equal(sub, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  assert sub_names == ['copy', 'reverse', 'max_number']


def test_targets_have_source_relatives_except_controls():
  controls = set()
  for target in world.TARGET_TASKS:
    relatives = world.related_sources(target, min_relatedness=1.0)
    if not relatives:
      controls.add(target)
      assert not world.related_sources(target, min_relatedness=0.5)
  assert controls == {'has_duplicate', 'max_number'}
  # Every skill with a target also has at least one source.
  for target in set(world.TARGET_TASKS) - controls:
    assert len(world.related_sources(target, 1.0)) >= 1


# ---------------------------------------------------------------------------------------------
# Vocabulary and seqio.

SIZES = {'train': 40, 'validation': 16, 'test': 16}


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
  from jaxprompt.lab import tasks  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path_factory.mktemp('labcache'))
  vocab = tasks.register_lab_tasks(cache_dir=cache, seed=0, sizes=SIZES)
  return tasks, vocab, cache


def test_vocabulary_round_trips_every_token(lab):
  tasks, vocab, _ = lab
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  tokens = tasks.vocabulary_tokens()
  assert vocab.vocab_size == len(tokens) + 3
  for i, token in enumerate(tokens, start=3):
    assert vocab.encode(token) == [i]
    assert vocab.decode([i]) == token
  sentence = ' '.join(world.WORDS)
  assert vocab.encode(sentence) == list(range(3, 3 + len(world.WORDS)))
  assert vocab.decode(vocab.encode(sentence)) == sentence
  assert vocab.encode('red') == [3]
  assert vocab.encode('purple') == [vocab.unk_id]


def test_vocabulary_is_deterministic_and_cached(lab, tmp_path):
  tasks, _, cache = lab
  a = tasks.train_lab_vocabulary(str(tmp_path / 'a' / 'x.model'))
  b = tasks.train_lab_vocabulary(str(tmp_path / 'b' / 'y.model'))
  with open(a, 'rb') as fa, open(b, 'rb') as fb:
    assert fa.read() == fb.read()
  path = tasks.lab_vocabulary_path(cache)
  assert os.path.dirname(path) == cache
  with open(path, 'rb') as f, open(a, 'rb') as fa:
    assert f.read() == fa.read()
  assert sorted(os.listdir(cache)) == [os.path.basename(path)]


def test_every_task_builds_through_seqio(lab):
  import seqio  # pylint: disable=g-import-not-at-top
  tasks, vocab, _ = lab
  for name in world.TASKS:
    for prefixed in (False, True):
      split = 'train' if prefixed else 'validation'
      task = seqio.get_mixture_or_task(tasks.seqio_name(name, prefixed))
      assert task.output_features['inputs'].vocabulary is vocab
      examples = list(task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator())
      assert len(examples) == SIZES[split]
      expected = world.generate_examples(name, split, SIZES[split], seed=0)
      for ex, raw in zip(examples, expected):
        inputs = ex['inputs_pretokenized'].decode()
        assert inputs == (world.TASKS[name].prefix if prefixed else '') + raw['inputs']
        assert ex['targets_pretokenized'].decode() == raw['targets']
        for key in ('inputs', 'targets'):
          ids = ex[key].tolist()
          assert ids[-1] == vocab.eos_id and vocab.unk_id not in ids
          assert vocab.decode(ids[:-1]) == ex[f'{key}_pretokenized'].decode()
        assert len(ex['inputs']) == len(inputs.split()) + 1


def test_sources_mixture_and_idempotence(lab):
  import seqio  # pylint: disable=g-import-not-at-top
  tasks, vocab, cache = lab
  mixture = seqio.get_mixture_or_task(tasks.SOURCES_MIXTURE)
  assert sorted(t.name for t in mixture.tasks) == sorted(
      tasks.seqio_name(s, prefixed=True) for s in world.SOURCE_TASKS)
  ds = mixture.get_dataset({'inputs': 16, 'targets': 16}, split='train', shuffle=True, seed=0)
  prefixes = {vocab.encode(world.TASKS[s].prefix.strip())[0] for s in world.SOURCE_TASKS}
  for ex in ds.take(8).as_numpy_iterator():
    assert ex['inputs'][0] in prefixes
  assert tasks.register_lab_tasks(cache_dir=cache, seed=0, sizes=SIZES) is vocab
  task = seqio.get_mixture_or_task('lab_has_red')
  assert tasks.register_lab_tasks(cache_dir=cache, seed=0, sizes=SIZES) is vocab
  assert seqio.get_mixture_or_task('lab_has_red') is task


def test_labels_names_and_metrics(lab):
  tasks, _, _ = lab
  assert tasks.task_labels('lab_has_green') == ('yes', 'no')
  assert tasks.task_labels('lab_parity_colours_prefixed') == ('even', 'odd')
  assert tasks.task_labels('majority') == ('colour', 'animal', 'number')
  assert tasks.task_labels('lab_copy') is None
  assert tasks.world_name('lab_count_numbers_prefixed') == 'count_numbers'
  assert tasks.task_prefix('lab_has_red') == 'has_red: '
  with pytest.raises(KeyError, match='unknown lab task'):
    tasks.world_name('lab_nope')
  from jaxprompt.data import label_names  # pylint: disable=g-import-not-at-top
  assert label_names('lab_has_green') == ('yes', 'no')
  assert label_names('lab_count_numbers_prefixed') == world.COUNT_LABELS
  assert label_names('lab_copy') is None
  assert tasks.normalize(b' a  b ') == 'a b'
  import seqio  # pylint: disable=g-import-not-at-top
  for name, metric in (('lab_has_green', 'accuracy'), ('lab_reverse', 'exact_match')):
    task = seqio.get_mixture_or_task(name)
    (fn,) = task.metric_fns
    targets = [task.postprocess_fn(t, is_target=True) for t in (b'a b', b'c')]
    predictions = [task.postprocess_fn(p) for p in (' a  b', 'd')]
    assert fn(targets, predictions) == {metric: 50.0}


def test_tokenized_examples_match_seqio(lab):
  import seqio  # pylint: disable=g-import-not-at-top
  tasks, vocab, _ = lab
  assert tasks.SEQUENCE_LENGTH == {'inputs': 10, 'targets': 9}
  for name, prefixed in (('reverse', True), ('has_green', False), ('filter_numbers', False)):
    arrays = tasks.tokenized_examples(name, 'test', SIZES['test'], prefixed=prefixed, vocab=vocab)
    ds = seqio.get_mixture_or_task(tasks.seqio_name(name, prefixed)).get_dataset(
        None, split='test', shuffle=False)
    for row, ex in enumerate(ds.as_numpy_iterator()):
      for key in ('inputs', 'targets'):
        ids = ex[key].tolist()
        assert arrays[key][row].tolist() == ids + [0] * (tasks.SEQUENCE_LENGTH[key] - len(ids))
