"""The lab world's tasks as seqio tasks, with the lab's own word-level vocabulary.

For every task `<t>` of `jaxprompt.lab.world.TASKS` two seqio tasks are registered:

* `lab_<t>`: plain inputs (`'red cat two'`), for prompt tuning and evaluation; no task prefix,
  as in Lester et al.'s prompt tuning;
* `lab_<t>_prefixed`: inputs led by the task name (`'has_red: red cat two'`), as in T5's
  multi-task training. The backbone is pretrained on the mixture `lab_sources` of the prefixed
  SOURCE tasks; the prefixed TARGET tasks exist only for oracle/model-tuning baselines.

The vocabulary is a SentencePiece *word* model: one piece per word of the language, per function
word and per task prefix (`'has_red:'`), ids pad 0, eos 1, unk 2, no bos, no sentinels. Ids
follow the world's word order (items, then function words, then prefixes in registry order), so
`red` is 3. It depends only on the world's definition, not on the data seed, and is cached under
`$JAXPROMPT_CACHE/lab` (default `~/.cache/jaxprompt/lab`) by a digest of its corpus.

Example:
  >>> vocab = register_lab_tasks()
  >>> ds = seqio.get_mixture_or_task('lab_has_green').get_dataset(
  ...     {'inputs': 16, 'targets': 16}, split='validation', shuffle=False)
  >>> task_labels('lab_has_green')
  ('yes', 'no')
"""

import functools
import hashlib
import os
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from jaxprompt.data import metrics
from jaxprompt.data import tasks as data_tasks
from jaxprompt.lab import world
from jaxprompt.lab.cache import (  # noqa: F401 - re-exported
    EOS_ID, PAD_ID, UNK_ID, _trainer_args, default_cache_dir, vocabulary_digest,
    vocabulary_tokens)

EXTRA_IDS = 0
DEFAULT_SIZES: Dict[str, int] = {'train': 10000, 'validation': 200, 'test': 200}
# Longest tokenized example of any lab task, EOS included (inputs: prefix + 8 words + EOS).
SEQUENCE_LENGTH: Dict[str, int] = {'inputs': world.MAX_LENGTH + 2, 'targets': world.MAX_LENGTH + 1}
SOURCES_MIXTURE = 'lab_sources'
LAB_PROMPT_LENGTH = 10  # the demo's and the reports' prompt length
LAB_SCHEDULE = {'train_steps': 300, 'batch_size': 32, 'eval_period': 50}  # the demo's
_TASK_PREFIX = 'lab_'
_PREFIXED_SUFFIX = '_prefixed'

# ---------------------------------------------------------------------------------------------
# Names.


def seqio_name(task: str, prefixed: bool = False) -> str:
  """The seqio task name of lab task `task` (`'has_red'` -> `'lab_has_red'`)."""
  world.get_task(task)
  return f'{_TASK_PREFIX}{task}{_PREFIXED_SUFFIX if prefixed else ""}'


def world_name(name: str) -> str:
  """The lab task of a seqio name (`'lab_has_red_prefixed'` -> `'has_red'`); bare names pass."""
  if name.startswith(_TASK_PREFIX) and name not in world.TASKS:
    name = name[len(_TASK_PREFIX):]
    if name.endswith(_PREFIXED_SUFFIX) and name not in world.TASKS:
      name = name[:-len(_PREFIXED_SUFFIX)]
  return world.get_task(name).name


def task_labels(name: str) -> Optional[Tuple[str, ...]]:
  """The label words of a classification task (seqio or world name), None for generation."""
  return world.get_task(world_name(name)).labels


def task_prefix(name: str) -> str:
  """The prefix the prefixed variant puts before the inputs, e.g. `'has_red: '`."""
  return world.get_task(world_name(name)).prefix


# ---------------------------------------------------------------------------------------------
# Vocabulary.


def _corpus(tokens: Sequence[str]) -> List[str]:
  # A word model numbers pieces by frequency: token i occurs len - i times, so ids keep our order.
  n = len(tokens)
  return [' '.join([t] * (n - i)) for i, t in enumerate(tokens)]


def train_lab_vocabulary(model_path: str) -> str:
  """Trains the lab's word-level SentencePiece model and writes it to `model_path`.

  Training is single threaded on a fixed corpus, and the output path is cleared from the stored
  trainer spec, so the file's bytes are the same on every run. The model is checked to encode
  every token as exactly one piece with the expected id.

  Args:
    model_path: where to write the `.model` file (directories are created).

  Returns:
    `model_path`.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  tokens = vocabulary_tokens()
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    prefix = os.path.join(tmp, 'lab')
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(tokens)), model_prefix=prefix, **_trainer_args(tokens))
    proto = sentencepiece_model_pb2.ModelProto()
    with open(prefix + '.model', 'rb') as f:
      proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = ''
    data = proto.SerializeToString()
    processor = spm.SentencePieceProcessor(model_proto=data)
    for i, token in enumerate(tokens, start=3):
      if processor.encode(token) != [i]:
        raise ValueError(f'lab vocabulary encodes {token!r} as {processor.encode(token)}, '
                         f'expected [{i}]; the world has a token SentencePiece splits.')
    staged = os.path.join(tmp, 'staged.model')
    with open(staged, 'wb') as f:
      f.write(data)
    os.replace(staged, model_path)  # Atomic: concurrent callers see a whole file or none.
  return model_path


def lab_vocabulary_path(cache_dir: Optional[str] = None) -> str:
  """The path of the cached lab vocabulary, training it first when missing."""
  path = os.path.join(cache_dir or default_cache_dir(), f'lab_vocab_{vocabulary_digest()}.model')
  if not os.path.exists(path):
    train_lab_vocabulary(path)
  return path


def get_lab_vocabulary(cache_dir: Optional[str] = None) -> seqio.SentencePieceVocabulary:
  """The lab's `seqio.SentencePieceVocabulary` (word pieces, no sentinel ids)."""
  return seqio.SentencePieceVocabulary(lab_vocabulary_path(cache_dir), extra_ids=EXTRA_IDS)


# ---------------------------------------------------------------------------------------------
# Postprocessing.


def normalize(text, example=None, is_target=False) -> str:  # pylint: disable=unused-argument
  """seqio postprocess_fn: the text (bytes decoded) with whitespace collapsed to single spaces."""
  if isinstance(text, bytes):
    text = text.decode('utf-8')
  return ' '.join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Tasks.


def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *,
                task: str, sizes: Mapping[str, int], world_seed: int) -> tf.data.Dataset:
  del shuffle_files, seed  # The data is fixed by the world seed; seqio shuffles examples.
  examples = world.generate_examples(task, split, sizes[split], world_seed)
  return tf.data.Dataset.from_tensor_slices({
      'inputs': tf.constant([e['inputs'] for e in examples], tf.string),
      'targets': tf.constant([e['targets'] for e in examples], tf.string)})


def _add_prefix(dataset: tf.data.Dataset, prefix: str) -> tf.data.Dataset:
  """Prepends `prefix` to the `inputs` text."""
  return dataset.map(lambda ex: {**ex, 'inputs': tf.strings.join([prefix, ex['inputs']])},
                     num_parallel_calls=tf.data.AUTOTUNE)


_add_prefix.maps_one_to_one = True  # one example in, one out: a per-host read runs it late


def _output_features(vocab: seqio.Vocabulary) -> Dict[str, seqio.Feature]:
  return {'inputs': seqio.Feature(vocab, add_eos=True, required=True),
          'targets': seqio.Feature(vocab, add_eos=True)}


def _make_task(task: str, prefixed: bool, vocab: seqio.Vocabulary, sizes: Mapping[str, int],
               world_seed: int) -> seqio.Task:
  lab_task = world.get_task(task)
  source = seqio.FunctionDataSource(
      functools.partial(_dataset_fn, task=task, sizes=dict(sizes), world_seed=world_seed),
      splits=world.SPLITS, num_input_examples=dict(sizes))
  preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  if prefixed:
    preprocessors.insert(0, functools.partial(_add_prefix, prefix=lab_task.prefix))
  metric = metrics.accuracy if lab_task.kind == 'classification' else metrics.exact_match
  return seqio.Task(seqio_name(task, prefixed), source, _output_features(vocab),
                    preprocessors=preprocessors, postprocess_fn=normalize, metric_fns=[metric])


def tokenized_examples(task: str, split: str, n: int, seed: int = 0, prefixed: bool = False,
                       vocab: Optional[seqio.SentencePieceVocabulary] = None
                       ) -> Dict[str, np.ndarray]:
  """Examples as padded id arrays, without tf.data: the same ids as the seqio task gives.

  A fast path for small CPU runs (the seqio pipeline tokenizes one example at a time).

  Args:
    task: a lab task name (world or seqio name; `prefixed` decides the variant).
    split: 'train', 'validation' or 'test'.
    n: number of examples (`generate_examples(task, split, n, seed)`).
    seed: world seed.
    prefixed: whether inputs start with the task-name prefix.
    vocab: the lab vocabulary; `get_lab_vocabulary()` when None.

  Returns:
    `{'inputs': [n, SEQUENCE_LENGTH['inputs']], 'targets': [n, SEQUENCE_LENGTH['targets']]}`
    int32 arrays, each row the ids followed by EOS, then zeros (pad).
  """
  vocab = vocab or get_lab_vocabulary()
  name = world_name(task)
  prefix = world.TASKS[name].prefix if prefixed else ''
  examples = world.generate_examples(name, split, n, seed)
  out = {}
  for key, length in SEQUENCE_LENGTH.items():
    texts = [(prefix if key == 'inputs' else '') + e[key] for e in examples]
    ids = vocab.tokenizer.encode(texts) if texts else []
    array = np.zeros((len(texts), length), np.int32)
    for row, piece_ids in enumerate(ids):
      array[row, :len(piece_ids) + 1] = list(piece_ids) + [EOS_ID]
    out[key] = array
  return out


_REGISTERED: Dict[str, object] = {}


def registered_names() -> List[str]:
  """The seqio task and mixture names `register_lab_tasks` adds."""
  names = [seqio_name(t, p) for t in world.TASKS for p in (False, True)]
  return names + [SOURCES_MIXTURE]


def register_lab_tasks(cache_dir: Optional[str] = None, seed: int = 0,
                       sizes: Optional[Mapping[str, int]] = None
                       ) -> seqio.SentencePieceVocabulary:
  """Registers `lab_<t>`, `lab_<t>_prefixed` for every world task, and `lab_sources`.

  The label words of classification tasks also go to `jaxprompt.data.tasks.LABELS` (so
  `jaxprompt.data.label_names('lab_has_red')` gives `('yes', 'no')`). Idempotent: a second call with the same arguments does nothing; a call with other arguments
  replaces the lab's tasks and mixture.

  Args:
    cache_dir: where the vocabulary is cached; `default_cache_dir()` when None.
    seed: the world seed of the generated examples (the vocabulary does not depend on it).
    sizes: examples per split; `DEFAULT_SIZES` for the missing splits.

  Returns:
    The lab vocabulary the tasks use.
  """
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  vocab_path = lab_vocabulary_path(cache_dir)
  key = (vocab_path, int(seed), tuple(sorted(sizes.items())))
  if _REGISTERED.get('key') == key and all(
      n in seqio.TaskRegistry.names() or n in seqio.MixtureRegistry.names()
      for n in registered_names()):
    return _REGISTERED['vocab']
  for name in registered_names():
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
  vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=EXTRA_IDS)
  for task in world.TASKS:
    for prefixed in (False, True):
      name = seqio_name(task, prefixed)
      seqio.TaskRegistry.add_provider(name, _make_task(task, prefixed, vocab, sizes, int(seed)))
      if world.TASKS[task].labels:  # Read by rank classification and class-label init.
        data_tasks.LABELS[name] = world.TASKS[task].labels
      # Runs on lab tasks default to the lab's short sequences, a 10-token prompt and a
      # schedule of minutes on a laptop (the paper's 30,000 steps are for real tasks).
      data_tasks.TASK_DEFAULTS[name] = {'feature_lengths': dict(SEQUENCE_LENGTH),
                                        'prompt_length': LAB_PROMPT_LENGTH, **LAB_SCHEDULE}
  # All tasks have the same train size, so equal rates are also examples-proportional.
  seqio.MixtureRegistry.add(
      SOURCES_MIXTURE, [seqio_name(t, prefixed=True) for t in world.SOURCE_TASKS],
      default_rate=1.0)
  _REGISTERED.update(key=key, vocab=vocab,
                     arguments=dict(cache_dir=cache_dir, seed=int(seed), sizes=dict(sizes)))
  return vocab


def registration() -> Optional[Dict[str, object]]:
  """The arguments of the lab tasks' current registration (None: not registered yet)."""
  arguments = _REGISTERED.get('arguments')
  return dict(arguments) if arguments is not None else None


def source_rates(rates: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
  """The mixture rate of every source task: `rates[task]`, else `rates[skill]`, else 1."""
  rates = dict(rates or {})
  unknown = [k for k in rates if k not in world.TASKS and k not in world.SKILL_PARTS]
  if unknown:
    raise ValueError(f'mixture rates for unknown tasks or skills: {", ".join(unknown)}')
  out = {}
  for t in world.SOURCE_TASKS:
    out[t] = float(rates.get(t, rates.get(world.TASKS[t].skill, 1.0)))
  return out


def register_sources_mixture(rates: Optional[Mapping[str, float]] = None) -> str:
  """Registers the prefixed source tasks as a mixture with `source_rates(rates)`; its name.

  Without rates (or all rates 1) this is `lab_sources`; otherwise `lab_sources_<digest>`, a
  digest of the rates. A task at rate 0 is left out. Call `register_lab_tasks` first.
  """
  per_task = source_rates(rates)
  if all(r == 1.0 for r in per_task.values()):
    return SOURCES_MIXTURE
  text = repr(sorted(per_task.items()))
  name = f'{SOURCES_MIXTURE}_{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}'
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(
      name, [(seqio_name(t, prefixed=True), r) for t, r in per_task.items() if r > 0])
  return name

