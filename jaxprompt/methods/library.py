"""The prompt library: a directory of self-describing prompt files and an index (SPoT).

    LIBRARY/
      index.json                      {"format", "entries": {task: entry}}
      prompts/<task>-<id>.safetensors the task's (source) prompt, a jaxprompt prompt file
      embeddings/<task>-<id>.safetensors  its task embedding (the prompt after N steps), optional
      .lock                           fcntl lock taken by every writer

An entry records the task, the backbone (fingerprint and path), the prompt's length and width,
the step it was taken at, the seed, its validation metrics, its initialiser, the run it came
from and, when there is one, the task embedding and the steps it was taken at.

Adding is atomic: the prompt (and embedding) file is written under a fresh name first, then the
index is rewritten through a temporary file and `os.replace`; a file an old entry pointed at is
removed only after the new index is in place. A crash therefore leaves at worst an unlisted
file, never an index naming a missing one. Writers hold an exclusive `fcntl` lock on `.lock`
for the whole read-modify-write, so two writers never lose each other's entries.

`prompt_path(directory, task)` is what `--init_from LIBRARY_DIR:TASK` resolves through.

Prompt similarity (SPoT, Vu et al. 2022, section 4; reused by the transferability work):
`cosine_average_tokens` and `per_token_average_cosine`, and `rank` for retrieval.

    jaxprompt library list DIR [--backbone B] [--json]
    jaxprompt library add DIR --prompt FILE [--task T] [--embedding FILE] [--replace]
    jaxprompt library show DIR TASK [--json]
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxprompt.prompts.files import jsonable as _jsonable
from jaxprompt.prompts.init import register_source_resolver

FORMAT = 'jaxprompt.library/1'
INDEX = 'index.json'
LOCK = '.lock'
PROMPTS = 'prompts'
EMBEDDINGS = 'embeddings'


class LibraryError(ValueError):
  """A bad library, entry or argument; the message is one line naming the fix."""


# ---------------------------------------------------------------------------------------------
# Similarity of prompts (task embeddings).

def _as_2d(e, name: str) -> np.ndarray:
  e = np.asarray(e, np.float64)
  if e.ndim != 2:
    raise LibraryError(f'{name}: a prompt / task embedding is [L, d], got shape {e.shape}')
  return e


def _check_widths(e1: np.ndarray, e2: np.ndarray) -> None:
  if e1.shape[-1] != e2.shape[-1]:
    raise LibraryError(f'prompt widths differ: {e1.shape[-1]} vs {e2.shape[-1]}; prompts of '
                       'different backbones cannot be compared')


def _unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def cosine_average_tokens(e1, e2) -> float:
  """cos(mean_i e1_i, mean_j e2_j): the cosine of the two prompts' average tokens."""
  e1, e2 = _as_2d(e1, 'e1'), _as_2d(e2, 'e2')
  _check_widths(e1, e2)
  return float(np.dot(_unit(e1.mean(0)), _unit(e2.mean(0))))


def per_token_average_cosine(e1, e2) -> float:
  """(1 / (L1 L2)) sum_i sum_j cos(e1_i, e2_j): the mean cosine over all token pairs."""
  e1, e2 = _as_2d(e1, 'e1'), _as_2d(e2, 'e2')
  _check_widths(e1, e2)
  return float(np.mean(_unit(e1) @ _unit(e2).T))


SIMILARITIES = {'per_token': per_token_average_cosine, 'avg_tokens': cosine_average_tokens}
DEFAULT_SIMILARITY = 'per_token'  # the paper's better one (80.0 vs 79.8 at k = 15)


def similarity_fn(name: str):
  if name not in SIMILARITIES:
    raise LibraryError(f'unknown similarity {name!r}; choose one of {", ".join(SIMILARITIES)}')
  return SIMILARITIES[name]


def similarity_matrix(targets: Sequence, sources: Sequence, similarity: str = DEFAULT_SIMILARITY
                      ) -> np.ndarray:
  """[len(targets), len(sources)] similarities of prompt arrays."""
  fn = similarity_fn(similarity)
  return np.array([[fn(t, s) for s in sources] for t in targets], np.float64)


# ---------------------------------------------------------------------------------------------
# The index.

def index_path(directory: str) -> str:
  return os.path.join(directory, INDEX)


def _empty_index() -> dict[str, Any]:
  return {'format': FORMAT, 'entries': {}}


def read_index(directory: str) -> dict[str, Any]:
  """The library's index; a one-line error when `directory` is not a library."""
  if not os.path.isdir(directory):
    raise LibraryError(f'{directory}: no such prompt library (the directory does not exist); '
                       'create one with `jaxprompt library add` or `jaxprompt spot sources`')
  path = index_path(directory)
  if not os.path.isfile(path):
    raise LibraryError(f'{directory}: not a prompt library (no {INDEX}); create one with '
                       '`jaxprompt library add` or `jaxprompt spot sources`')
  try:
    with open(path) as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    raise LibraryError(f'{path}: unreadable library index ({e})') from None
  if not isinstance(index, dict) or index.get('format') != FORMAT or not isinstance(
      index.get('entries'), dict):
    raise LibraryError(f'{path}: not a {FORMAT} index')
  return index


def _write_index(directory: str, index: Mapping[str, Any]) -> None:
  path = index_path(directory)
  tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  with open(tmp, 'w') as f:
    json.dump(index, f, indent=1, sort_keys=True, default=_jsonable)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)




@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
  """An exclusive fcntl lock on the library (blocks until the other writer is done)."""
  import fcntl
  with open(os.path.join(directory, LOCK), 'a+') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def create(directory: str) -> str:
  """Makes an empty library at `directory` (a new or empty directory); returns it."""
  directory = os.path.abspath(directory)
  if os.path.isfile(index_path(directory)):
    read_index(directory)
    return directory
  if os.path.isdir(directory) and [f for f in os.listdir(directory) if f != LOCK]:
    raise LibraryError(f'{directory}: exists, is not empty and is not a prompt library (no '
                       f'{INDEX}); choose a new directory')
  os.makedirs(os.path.join(directory, PROMPTS), exist_ok=True)
  os.makedirs(os.path.join(directory, EMBEDDINGS), exist_ok=True)
  with locked(directory):
    if not os.path.isfile(index_path(directory)):
      _write_index(directory, _empty_index())
  return directory


def entries(directory: str) -> dict[str, dict[str, Any]]:
  """{task: entry} of the library (each entry with `path` and `embedding_path` made absolute)."""
  directory = os.path.abspath(directory)
  out = {}
  for task, entry in read_index(directory)['entries'].items():
    e = dict(entry)
    e['path'] = os.path.join(directory, entry['file'])
    e['embedding_path'] = (os.path.join(directory, entry['embedding_file'])
                           if entry.get('embedding_file') else None)
    out[task] = e
  return out


def get_entry(directory: str, task: str) -> dict[str, Any]:
  """The entry of `task`; a one-line error naming the tasks the library holds otherwise."""
  all_entries = entries(directory)
  if task not in all_entries:
    import difflib
    close = difflib.get_close_matches(task, list(all_entries), n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else (
        f'; it holds {", ".join(sorted(all_entries)) or "no prompts yet"}')
    raise LibraryError(f'{directory}: the library has no prompt for task {task!r}{hint}')
  entry = all_entries[task]
  if not os.path.isfile(entry['path']):
    raise LibraryError(f'{directory}: the index names {entry["file"]} for task {task!r}, but '
                       'the file is missing; re-add the prompt with `jaxprompt library add '
                       '--replace`')
  return entry


def prompt_path(directory: str, task: str) -> str:
  """The prompt file of `task` in the library at `directory` (for `--init_from DIR:TASK`)."""
  return get_entry(directory, task)['path']


def source_prompt_path(spec: str) -> str | None:
  """`LIBRARY_DIR:TASK` -> the library's prompt file of TASK; None for any other spec (a prompt
  source resolver, registered with `jaxprompt.prompts.init`)."""
  directory, sep, task = spec.rpartition(':')
  if sep and directory and os.path.isdir(directory) and not os.path.exists(spec):
    return prompt_path(directory, task)
  return None


register_source_resolver(source_prompt_path)


def load_prompt(directory: str, task: str, width: int | None = None) -> np.ndarray:
  """The [P, d] prompt of `task`; with `width`, a width mismatch is an error naming both."""
  from jaxprompt.prompts.files import read_prompt
  entry = get_entry(directory, task)
  value = np.asarray(read_prompt(entry['path']).masked_value())
  _check_width(value, width, f'{directory}:{task}')
  return value


def load_embedding(directory: str, task: str, width: int | None = None) -> np.ndarray:
  """The task embedding of `task` (its prompt when the library recorded no embedding)."""
  from jaxprompt.prompts.files import read_prompt
  entry = get_entry(directory, task)
  path = entry['embedding_path'] or entry['path']
  if not os.path.isfile(path):
    raise LibraryError(f'{directory}: the index names {os.path.relpath(path, directory)} as the '
                       f'embedding of task {task!r}, but the file is missing')
  value = np.asarray(read_prompt(path).masked_value())
  _check_width(value, width, f'{directory}:{task} (embedding)')
  return value


def _check_width(value: np.ndarray, width: int | None, what: str) -> None:
  if width is not None and value.shape[-1] != width:
    raise LibraryError(f'{what}: prompt width {value.shape[-1]} does not match width {width}; '
                       'a prompt only fits a backbone of its own width')


# ---------------------------------------------------------------------------------------------
# Adding.

def _safe_name(task: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in task)


def add(directory: str, prompt, *, task: str | None = None, embedding=None,
        embedding_steps: int | None = None, replace: bool = False, backbone=None,
        metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Adds (or with `replace`, replaces) the prompt of a task; returns its entry.

  Args:
    directory: the library (created when it does not exist or is empty).
    prompt: a prompt file path (read and copied in; its metadata kept), or a [P, d] array.
    task: the task; the prompt file's own `task` when None.
    embedding: the task embedding: a prompt file path or a [L, d] array (optional).
    embedding_steps: the tuning steps after which the embedding was taken.
    replace: replace an existing entry of the task (otherwise an error).
    backbone: a `Backbone` (or path) the prompt was trained for, when the file does not say.
    metadata: more entry fields (steps, seed, metrics, init, source_run, ...): they override
      the prompt file's.
  """
  from jaxprompt.prompts.files import read_prompt, write_prompt
  meta: dict[str, Any] = {}
  if isinstance(prompt, (str, os.PathLike)):
    pf = read_prompt(str(prompt))
    value, meta = np.asarray(pf.masked_value()), dict(pf.metadata)
    meta.setdefault('source_file', os.path.abspath(str(prompt)))
  else:
    value = np.asarray(prompt, np.float32)
  if value.ndim != 2:
    raise LibraryError(f'a library prompt is one [P, d] prompt, got shape {value.shape} (a stack? '
                       'add each row under its task)')
  meta.update(metadata or {})
  if backbone is not None:
    meta.setdefault('backbone_fingerprint', getattr(backbone, 'fingerprint', None))
    meta.setdefault('backbone', getattr(backbone, 'name', str(backbone)))
  task = task or meta.get('task')
  if not task:
    raise LibraryError('the prompt file names no task; give one with --task')
  emb_value = None
  if embedding is not None:
    if isinstance(embedding, (str, os.PathLike)):
      epf = read_prompt(str(embedding))
      emb_value = np.asarray(epf.masked_value())
      embedding_steps = embedding_steps or epf.metadata.get('embedding_steps') or \
          epf.metadata.get('step')
    else:
      emb_value = np.asarray(embedding, np.float32)
    if emb_value.ndim != 2:
      raise LibraryError(f'a task embedding is [L, d], got shape {emb_value.shape}')
    if emb_value.shape[-1] != value.shape[-1]:
      raise LibraryError(f'task embedding width {emb_value.shape[-1]} does not match the prompt '
                         f'width {value.shape[-1]}')
  directory = create(directory)
  with locked(directory):
    index = read_index(directory)
    old = index['entries'].get(task)
    if old is not None and not replace:
      raise LibraryError(f'{directory}: already holds a prompt for task {task!r}; pass --replace '
                         '(replace=True) to replace it')
    stem = f'{_safe_name(task)}-{uuid.uuid4().hex[:8]}.safetensors'
    file = os.path.join(PROMPTS, stem)
    keep = {k: v for k, v in meta.items() if k not in ('format', 'length', 'width')}
    keep['task'] = task
    write_prompt(os.path.join(directory, file), value, **keep)
    embedding_file = None
    if emb_value is not None:
      embedding_file = os.path.join(EMBEDDINGS, stem)
      write_prompt(os.path.join(directory, embedding_file), emb_value, task=task,
                   kind='task_embedding', embedding_steps=embedding_steps,
                   backbone=meta.get('backbone'),
                   backbone_fingerprint=meta.get('backbone_fingerprint'))
    entry = dict(
        task=task, file=file, embedding_file=embedding_file, embedding_steps=embedding_steps,
        backbone=meta.get('backbone'), backbone_fingerprint=meta.get('backbone_fingerprint'),
        length=int(value.shape[0]), width=int(value.shape[1]),
        steps=meta.get('steps', meta.get('step')), seed=meta.get('seed'),
        metrics=meta.get('metrics'), init=meta.get('init'),
        source_run=meta.get('source_run'), method=meta.get('method'),
        added=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
    entry.update({k: v for k, v in (metadata or {}).items() if k not in entry})
    index['entries'][task] = entry
    _write_index(directory, index)
    if old is not None:  # only now that no index names them
      for key in ('file', 'embedding_file'):
        if old.get(key) and old[key] not in (file, embedding_file):
          with contextlib.suppress(OSError):
            os.remove(os.path.join(directory, old[key]))
  return entries(directory)[task]


def set_embedding(directory: str, task: str, embedding, embedding_steps: int | None = None
                  ) -> dict[str, Any]:
  """Records (or replaces) the task embedding of a task already in the library."""
  from jaxprompt.prompts.files import read_prompt
  entry = get_entry(directory, task)
  pf = read_prompt(entry['path'])
  meta = {k: v for k, v in entry.items() if k not in ('path', 'embedding_path', 'file',
                                                      'embedding_file', 'added')}
  return add(directory, np.asarray(pf.value), task=task, embedding=embedding,
             embedding_steps=embedding_steps, replace=True, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Listing and retrieval.

def describe(directory: str, backbone=None, width: int | None = None) -> list[dict[str, Any]]:
  """One row per entry, with `status`: 'ok', 'other backbone', 'width W != D' or 'missing file'.

  `backbone` is a `Backbone` or a fingerprint string; `width` the model width to check.
  """
  fingerprint = getattr(backbone, 'fingerprint', backbone)
  if backbone is not None and width is None and hasattr(backbone, 'module'):
    width = int(backbone.module.config.emb_dim)
  rows = []
  for task, e in sorted(entries(directory).items()):
    flags = []
    if not os.path.isfile(e['path']):
      flags.append('missing file')
    if e.get('embedding_path') and not os.path.isfile(e['embedding_path']):
      flags.append('missing embedding')
    if width is not None and e['width'] != width:
      flags.append(f'width {e["width"]} != {width}')
    if fingerprint and e.get('backbone_fingerprint') and e['backbone_fingerprint'] != fingerprint:
      flags.append('other backbone')
    rows.append(dict(e, status=', '.join(flags) or 'ok'))
  return rows


def rank(target, directory: str, similarity: str = DEFAULT_SIMILARITY, k: int | None = None,
         exclude: Sequence[str] = (), backbone=None) -> list[tuple[str, float]]:
  """The library's tasks by similarity of their task embeddings to `target` ([L, d] array or
  a prompt file), most similar first; `k` keeps the top k (an error if k exceeds the library).

  Entries for another backbone (by fingerprint, when `backbone` or the target file says) are
  left out with a note on stderr; a width mismatch is an error naming both widths.
  """
  from jaxprompt.prompts.files import read_prompt
  fn = similarity_fn(similarity)
  target_fp = getattr(backbone, 'fingerprint', backbone)
  if isinstance(target, (str, os.PathLike)):
    pf = read_prompt(str(target))
    value = np.asarray(pf.masked_value())
    target_fp = target_fp or pf.metadata.get('backbone_fingerprint')
    name = str(target)
  else:
    value, name = np.asarray(target), 'target embedding'
  if value.ndim != 2:
    raise LibraryError(f'{name}: a task embedding is [L, d], got shape {value.shape}')
  all_entries = {t: e for t, e in entries(directory).items() if t not in set(exclude)}
  if not all_entries:
    raise LibraryError(f'{directory}: the library holds no prompts to rank')
  widths = sorted({e['width'] for e in all_entries.values()})
  if value.shape[-1] not in widths:
    raise LibraryError(f'{name}: embedding width {value.shape[-1]} does not match the '
                       f'library\'s prompt width {"/".join(map(str, widths))}; embed the target '
                       'with the backbone the library was built for')
  skipped = [t for t, e in all_entries.items() if e['width'] != value.shape[-1] or (
      target_fp and e.get('backbone_fingerprint') and e['backbone_fingerprint'] != target_fp)]
  if skipped:
    print(f'library: left out {len(skipped)} prompt(s) of another backbone: '
          f'{", ".join(sorted(skipped))}', file=sys.stderr)
  candidates = [t for t in all_entries if t not in skipped]
  if k is not None:
    if k <= 0:
      raise LibraryError(f'k must be positive, got {k}')
    if k > len(candidates):
      raise LibraryError(f'k = {k} is larger than the library ({len(candidates)} usable '
                         f'prompts in {directory}); choose k <= {len(candidates)}')
  scored = [(t, fn(value, load_embedding(directory, t))) for t in candidates]
  scored.sort(key=lambda ts: -ts[1])
  return scored[:k] if k is not None else scored


# ---------------------------------------------------------------------------------------------
# The command line: `jaxprompt library list|add|show`.

def _add_arguments(parser) -> None:
  sub = parser.add_subparsers(dest='library_command', required=True)
  ls = sub.add_parser('list', help='the prompts of a library (other backbones flagged)')
  ls.add_argument('directory', help='the library directory')
  ls.add_argument('--backbone', default=None,
                  help="flag prompts not made for this backbone (a checkpoint or 'lab')")
  ls.add_argument('--json', action='store_true', help='print JSON')
  ad = sub.add_parser('add', help='add a prompt file to a library (created if new)')
  ad.add_argument('directory', help='the library directory')
  ad.add_argument('--prompt', required=True, help='a prompt file (.safetensors, .npy, PEFT dir, '
                  'prompt-tuning numpy_checkpoints/checkpoint_N or T5X checkpoint)')
  ad.add_argument('--task', default=None, help="the task (default: the prompt file's)")
  ad.add_argument('--embedding', default=None, help='a task-embedding prompt file')
  ad.add_argument('--embedding_steps', type=int, default=None,
                  help='tuning steps after which the embedding was taken')
  ad.add_argument('--replace', action='store_true', help="replace the task's existing prompt")
  sh = sub.add_parser('show', help="one task's entry")
  sh.add_argument('directory', help='the library directory')
  sh.add_argument('task', help='the task')
  sh.add_argument('--json', action='store_true', help='print JSON')


def _fmt_metrics(metrics) -> str:
  if not isinstance(metrics, dict):
    return '-'
  from jaxprompt.train.evaluation import primary_score
  try:
    return f'{primary_score(metrics):.4g}'
  except StopIteration:
    return '-'


def _run(args) -> int:
  if args.library_command == 'list':
    bb = None
    if args.backbone:
      from jaxprompt.checkpoints.backbone import load_backbone
      bb = load_backbone(args.backbone)
    rows = describe(args.directory, backbone=bb)
    if args.json:
      print(json.dumps(rows, default=_jsonable))
      return 0
    print(f'prompt library {os.path.abspath(args.directory)}: {len(rows)} prompt(s)')
    if rows:
      print(f'  {"task":<28} {"len":>4} {"width":>5} {"steps":>7} {"score":>7} {"emb":>5}  '
            f'{"backbone":<24} status')
      for r in rows:
        emb = str(r.get('embedding_steps') or '-') if r.get('embedding_file') else '-'
        print(f'  {r["task"]:<28} {r["length"]:>4} {r["width"]:>5} {str(r.get("steps")):>7} '
              f'{_fmt_metrics(r.get("metrics")):>7} {emb:>5}  '
              f'{str(r.get("backbone_fingerprint")):<24} {r["status"]}')
    return 0
  if args.library_command == 'add':
    entry = add(args.directory, args.prompt, task=args.task, embedding=args.embedding,
                embedding_steps=args.embedding_steps, replace=args.replace)
    print(f'added {entry["task"]} ({entry["length"]} x {entry["width"]}) to '
          f'{os.path.abspath(args.directory)}: {entry["file"]}')
    return 0
  entry = get_entry(args.directory, args.task)
  if args.json:
    print(json.dumps(entry, default=_jsonable))
    return 0
  print(f'{args.task} in {os.path.abspath(args.directory)}')
  for key in ('path', 'embedding_path', 'embedding_steps', 'length', 'width', 'steps', 'seed',
              'metrics', 'init', 'backbone', 'backbone_fingerprint', 'method', 'source_run',
              'added'):
    if entry.get(key) is not None:
      print(f'  {key:<20} {entry[key]}')
  return 0


def _commands():
  from jaxprompt.methods import Command
  return {'library': Command('the prompt library: list, add, show (SPoT)', _add_arguments,
                             _run)}


COMMANDS = _commands()


def read_source_prompt(spec: str, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """([p, d] prompt, metadata) of a prompt file, `LIBRARY_DIR:TASK`, or `random:D[:P]` (a
  N(0, 1) prompt of width D and length P (default 100), seeded: the no-information baseline)."""
  from jaxprompt.prompts.files import read_prompt
  if spec.startswith('random:'):
    parts = spec.split(':')[1:]
    try:
      d = int(parts[0])
      p = int(parts[1]) if len(parts) > 1 else 100
    except (ValueError, IndexError):
      raise LibraryError(f'source prompt {spec!r}: write random:WIDTH[:LENGTH]') from None
    rs = np.random.RandomState(seed)
    return rs.normal(size=(p, d)).astype(np.float32), {'backbone_fingerprint': 'random',
                                                       'task': spec}
  if not os.path.exists(spec) and ':' in spec:
    directory, _, task = spec.rpartition(':')
    entry = get_entry(directory, task)
    pf = read_prompt(entry['path'])
    meta = dict(pf.metadata)
    meta.setdefault('backbone_fingerprint', entry.get('backbone_fingerprint'))
    meta.setdefault('task', task)
  else:
    pf = read_prompt(spec)
    meta = dict(pf.metadata)
  value = np.asarray(pf.masked_value(), np.float32)
  if value.ndim != 2:
    raise LibraryError(f'{spec}: a source prompt is one [P, d] prompt, got {value.shape}')
  return value, meta


__all__ = ['COMMANDS', 'DEFAULT_SIMILARITY', 'LibraryError', 'SIMILARITIES', 'add',
           'cosine_average_tokens', 'create', 'describe', 'entries', 'get_entry', 'load_embedding',
           'load_prompt', 'locked', 'per_token_average_cosine', 'prompt_path', 'rank',
           'read_index', 'read_source_prompt', 'set_embedding', 'similarity_fn', 'similarity_matrix']
