"""One verdict for every process of a multi-host run, whatever order they arrive in.

Processes reach the same point of a run seconds apart (on a pod, as a rule). A decision each
makes from the file system (does MODEL_DIR hold this run? which checkpoint is the latest? is
this stage done?) must therefore be made by all of them *before* any of them writes, and then
acted on as one verdict; and what process 0 writes must exist before the others read it:

    check = lambda: checkpointing.prepare_run_dir(model_dir, manifest, resume, write=False)
    resumable = agreement.same(f'{model_dir}: the run directory', check)  # all check, then agree
    lock = agreement.by_writer('hold the run directory', hold)          # process 0 writes; all wait

Each call exchanges a small JSON verdict through the coordination service's key-value store of
`jax.distributed` (no device collective, nothing to compile), so every call is also a barrier.
A check that raises on one process raises on every process, with the same exception type and
message, so no process is left waiting in a collective for a peer that has stopped. On one
process every call simply runs its function.

Every process must make the same calls in the same order (like collectives): calls are numbered,
and a process that reaches call k under another name than process 0 is an error naming both.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from typing import Any, Callable, Protocol, TypeVar

T = TypeVar('T')

# How long a process waits for the others at one call. A peer that died is reported by
# `partitioning.PeerWatch` or jax's heartbeat long before; this bounds a peer that hangs.
WAIT_S = 30 * 60
_PREFIX = 'jaxprompt/agree'
# The hint of a disagreement about files.
SHARED_STORAGE = ('every process of a run must see the same files: put the run directory on '
                  'storage all its hosts share')


class DisagreementError(RuntimeError):
  """The processes of a run saw different things (e.g. MODEL_DIR not on shared storage), or
  reached different calls (a bug: one verdict per call, in the same order everywhere)."""


class Store(Protocol):
  """A key-value store every process of the run reaches (jax's coordination service)."""

  def set(self, key: str, value: str) -> None: ...

  def get(self, key: str, timeout_s: float) -> str:
    """The value of `key`, waiting up to `timeout_s` for it to be set (TimeoutError after)."""


class Processes:
  """This process's view of the run's processes: `index` of `count`, talking through `store`."""

  def __init__(self, store: Store | None, index: int = 0, count: int = 1,
               wait_s: float = WAIT_S):
    self.store, self.index, self.count, self.wait_s = store, index, count, wait_s
    self._calls = itertools.count()
    self._lock = threading.Lock()

  def each(self, name: str, check: Callable[[], T]) -> T:
    """Runs `check` on every process and returns this process's result once every process has
    run it; if it raised anywhere, raises the lowest-numbered process's error everywhere."""
    return self._exchange(name, check, share=False)[0]

  def same(self, name: str, check: Callable[[], T], hint: str = '') -> T:
    """`each` for a check whose JSON result every process must share (what it sees on disk):
    returns it, or raises `DisagreementError` naming what two processes saw, then `hint`."""
    mine, verdicts = self._exchange(name, check, share=True)
    values = [json.dumps(v['value'], sort_keys=True) for v in verdicts]
    for i, value in enumerate(values):
      if value != values[0]:
        raise DisagreementError(f'{name}: process 0 of {self.count} sees {values[0]}, process '
                                f'{i} sees {value}' + (f'; {hint}' if hint else ''))
    return mine

  def by_writer(self, name: str, write: Callable[[], T], share: bool = False) -> T | None:
    """Process 0 runs `write`; the others wait until it has, then go on (or raise its error).
    Returns `write`'s result on process 0, and elsewhere None, or its JSON copy with `share`."""
    if self.count == 1:
      return write()
    call = self._next(name)
    if self.index == 0:
      verdict, result, error = _run(write, name, share)
      self.store.set(f'{call}/0', json.dumps(verdict))
      _raise_first([verdict], error, 0)
      return result
    verdict = self._read(call, 0, name)
    _raise_first([verdict], None, self.index)
    return verdict.get('value')

  def barrier(self, name: str) -> None:
    """Returns once every process has reached it."""
    self.each(name, lambda: None)

  def _exchange(self, name: str, check: Callable[[], T], share: bool) -> tuple[T, list[dict]]:
    if self.count == 1:
      value = check()
      return value, [{'value': value}]
    call = self._next(name)
    verdict, mine, error = _run(check, name, share)
    self.store.set(f'{call}/{self.index}', json.dumps(verdict))
    verdicts = [verdict if i == self.index else self._read(call, i, name)
                for i in range(self.count)]
    _raise_first(verdicts, error, self.index)
    return mine, verdicts

  def _next(self, name: str) -> str:
    with self._lock:
      return f'{_PREFIX}/{next(self._calls)}'

  def _read(self, call: str, i: int, name: str) -> dict:
    try:
      verdict = json.loads(self.store.get(f'{call}/{i}', self.wait_s))
    except TimeoutError:
      raise DisagreementError(f'{name}: process {i} of {self.count} did not get there within '
                              f'{self.wait_s:.0f} s; is it stuck? (its log says where)') from None
    if verdict['name'] != name:
      raise DisagreementError(f'the processes of this run diverged: process {self.index} of '
                              f'{self.count} is at {name!r}, process {i} at '
                              f'{verdict["name"]!r}')
    return verdict


def _run(fn: Callable[[], Any], name: str, share: bool) -> tuple[dict, Any, Exception | None]:
  """(the verdict to publish, `fn`'s result, the error it raised) of running `fn` here."""
  try:
    result = fn()
  except Exception as e:  # noqa: BLE001 - every process raises it (see _raise_first)
    return {'name': name, 'ok': False, 'error': _describe(e)}, None, e
  verdict = {'name': name, 'ok': True}
  if share:
    verdict['value'] = json.loads(json.dumps(result, default=str))
  return verdict, result, None


def _describe(e: BaseException) -> dict:
  args = e.args
  if isinstance(e, OSError) and e.filename is not None:
    args = (e.errno, e.strerror, e.filename)
  if not all(isinstance(a, (str, int, float)) for a in args):
    args = (str(e),)
  return {'type': f'{type(e).__module__}:{type(e).__qualname__}', 'args': list(args),
          'message': str(e)}


def _raise_first(verdicts: list[dict], mine: Exception | None, index: int) -> None:
  """Raises the lowest-numbered process's error: this process's own exception if it is that
  process, else the same type with the same message."""
  for i, verdict in enumerate(verdicts):
    if not verdict['ok']:
      if i == index and mine is not None:
        raise mine
      raise _rebuild(verdict['error'])


def _rebuild(error: dict) -> Exception:
  """The exception another process raised: its type (when this process has it loaded) and
  message; else a RuntimeError with the message."""
  module, _, qualname = error['type'].partition(':')
  cls: Any = sys.modules.get(module)
  for part in qualname.split('.'):
    cls = getattr(cls, part, None)
  if isinstance(cls, type) and issubclass(cls, Exception):
    for args in (error['args'], [error['message']]):
      try:
        e = cls(*args)
      except Exception:  # noqa: BLE001 - a constructor of another shape
        continue
      if str(e) == error['message']:
        return e
  return RuntimeError(error['message'])


class _JaxStore:
  """`Store` over `jax.distributed`'s coordination service."""

  def __init__(self, client):
    self._client = client

  def set(self, key: str, value: str) -> None:
    self._client.key_value_set(key, value)

  def get(self, key: str, timeout_s: float) -> str:
    try:
      return self._client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001 - jax raises its runtime error for a deadline
      if 'DEADLINE_EXCEEDED' in str(e) or 'timed out' in str(e).lower():
        raise TimeoutError(str(e)) from None
      raise


_processes: Processes | None = None


def processes() -> Processes:
  """The processes of this run: over `jax.distributed` once it is initialised, else just this
  one (without touching jax's backends, so `jax.distributed.initialize` may still follow)."""
  global _processes
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:
    return Processes(None)
  if _processes is None or _processes.store._client is not client:
    import jax
    _processes = Processes(_JaxStore(client), jax.process_index(), jax.process_count())
  return _processes


def each(name: str, check: Callable[[], T]) -> T:
  """`Processes.each` for this run's processes."""
  return processes().each(name, check)


def same(name: str, check: Callable[[], T], hint: str = '') -> T:
  """`Processes.same` for this run's processes."""
  return processes().same(name, check, hint)


def by_writer(name: str, write: Callable[[], T], share: bool = False) -> T | None:
  """`Processes.by_writer` for this run's processes."""
  return processes().by_writer(name, write, share)


def barrier(name: str) -> None:
  """`Processes.barrier` for this run's processes."""
  processes().barrier(name)
