"""Run directories: a manifest, Orbax checkpoints of what is trained, never the backbone.

Layout of a run directory (MODEL_DIR):
  manifest.json         what this run is: method, backbone path, task, config, versions
  checkpoints/<step>/   Orbax: {step, trainable, opt_state} + JSON {data position, metrics}
  best/<step>/          the checkpoint with the best validation metric so far
  metrics.jsonl, train/ & eval/ (TensorBoard), prompt files, loss plot
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

MANIFEST = 'manifest.json'
# Keys of the manifest that must agree for a run directory to be resumed.
# (`backbone` is the backbone's fingerprint; a method adds its own keys, see Method.identity.)
IDENTITY_KEYS = ('method', 'backbone', 'task', 'seed', 'batch_size')


class RunDirectoryError(ValueError):
  pass


LOCK = 'run.lock'


class RunLock:
  """One run holds a run directory: an exclusive `flock` on MODEL_DIR/run.lock, which names the
  holder (host, pid, start). The kernel drops the lock when the holder dies, so a lock left by a
  killed run is stale by construction and is taken over; a run that ends removes the file."""

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK)
    self._fd: int | None = None

  def acquire(self) -> 'RunLock':
    import fcntl
    import socket
    import time
    while True:
      try:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise unwritable(os.path.dirname(self.path), e) from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors='replace').strip() or 'another process'
        os.close(fd)
        raise RunDirectoryError(f'{os.path.dirname(self.path)}: in use by {holder}; wait for '
                                'that run to end, or give another --model_dir') from None
      try:  # the file a run that just ended removed is not the lock any more: open it anew
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, (f'host {socket.gethostname()}, pid {os.getpid()}, started '
                  f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n').encode())
    self._fd = fd
    return self

  def check(self) -> None:
    """Raises if another run holds the directory now; writes nothing (a probe: every process
    of a run checks before process 0 acquires)."""
    import fcntl
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except OSError:
      return  # no lock file: nobody holds it (an unreadable one shows when it is acquired)
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors='replace').strip() or 'another process'
      raise RunDirectoryError(f'{os.path.dirname(self.path)}: in use by {holder}; wait for that '
                              'run to end, or give another --model_dir') from None
    finally:
      os.close(fd)  # drops the probe's lock

  def release(self) -> None:
    if self._fd is not None:
      try:  # removed while held, so a finished run directory keeps no lock file
        os.unlink(self.path)
      except OSError:
        pass
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def prepare_run_dir(model_dir: str, manifest: dict[str, Any], resume: bool = True,
                    write: bool = True, identity_keys: tuple[str, ...] = IDENTITY_KEYS) -> bool:
  """Creates `model_dir` or checks it holds this same run. Returns True if it can be resumed.

  A directory that holds a different run (or files but no manifest) is refused: nothing
  already written is overwritten. Only the writer (process 0) creates the manifest.
  """
  path = os.path.join(model_dir, MANIFEST)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = [k for k in identity_keys if old.get(k) != json.loads(json.dumps(manifest.get(k),
                                                                         default=str))]
    if diff:
      changes = ', '.join(f'{k}: {old.get(k)!r} -> {manifest.get(k)!r}' for k in diff)
      raise RunDirectoryError(f'{model_dir}: holds a different run ({changes}); '
                              'give a new --model_dir')
    if not resume and os.path.exists(os.path.join(model_dir, 'summary.json')):
      raise RunDirectoryError(f'{model_dir}: holds this run, finished; give a new --model_dir to '
                              'run it again (or --resume with more --steps to train it further)')
    if not resume:
      raise RunDirectoryError(f'{model_dir}: holds this run already; pass --resume to continue '
                              'it or give a new --model_dir')
    return True
  if os.path.isdir(model_dir) and set(os.listdir(model_dir)) - {LOCK}:
    raise RunDirectoryError(f'{model_dir}: not empty and has no {MANIFEST}; give a new or empty '
                            '--model_dir')
  if not write:
    return False
  tmp = path + '.tmp'
  try:
    os.makedirs(model_dir, exist_ok=True)
    with open(tmp, 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
  except OSError as e:
    raise unwritable(model_dir, e) from None
  return False


def check_run_dir(model_dir: str, manifest: dict[str, Any], resume: bool,
                  identity_keys: tuple[str, ...] = IDENTITY_KEYS) -> bool:
  """May this run start in `model_dir`? Raises if not; returns True if it resumes. Writes
  nothing: every process of a run checks before process 0 holds the directory (`hold_run_dir`)."""
  resumable = prepare_run_dir(model_dir, manifest, resume, False, identity_keys)
  RunLock(model_dir).check()
  return resumable


def hold_run_dir(model_dir: str, manifest: dict[str, Any], resume: bool,
                 identity_keys: tuple[str, ...] = IDENTITY_KEYS) -> RunLock:
  """Takes the run's lock, then checks again under it and writes the manifest (process 0).
  Returns the held lock; on an error nothing is held."""
  lock = RunLock(model_dir).acquire()
  try:
    prepare_run_dir(model_dir, manifest, resume, True, identity_keys)
  except BaseException:
    lock.release()
    raise
  return lock


def data_state_path(model_dir: str, step: int, process: int) -> str:
  """Where the data pipeline's position after `step` batches is saved (one per process)."""
  return os.path.join(model_dir, 'data_state', f'step_{step}', f'process_{process}')


def data_state_exists(path: str) -> bool:
  return os.path.exists(path + '.index')


def prune_data_states(model_dir: str, keep_steps) -> None:
  """Deletes saved data positions of steps that no longer have a checkpoint."""
  import shutil
  root = os.path.join(model_dir, 'data_state')
  if not os.path.isdir(root):
    return
  keep = {f'step_{s}' for s in keep_steps}
  for name in os.listdir(root):
    if name not in keep:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class RunStorageError(OSError):
  """A checkpoint could not be written (disk full, read-only or unwritable directory)."""

  def __str__(self):
    return self.strerror or super().__str__()


_STORAGE_FAULTS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                   errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
                   errno.EPERM: 'operation not permitted'}


def unwritable(model_dir: str, error: OSError) -> OSError:
  """One line for a run directory that cannot be written at all."""
  fault = storage_fault(error) or (error.strerror or str(error)).lower()
  return RunStorageError(error.errno or errno.EIO, f'{model_dir}: {fault}; make the directory '
                         'writable, free space, or give another --model_dir')


def storage_fault(error: BaseException) -> str | None:
  """What went wrong, if `error` (or its cause) is a storage fault: OSError's errno, or the text
  TensorFlow's and Orbax's wrapped errors carry."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_FAULTS:
      return _STORAGE_FAULTS[error.errno]
    text = str(error).lower()
    for fault in _STORAGE_FAULTS.values():
      if fault in text:
        return fault
    error = error.__cause__ or error.__context__
  return None


def _size(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


def _mb(n: float) -> str:
  return f'{n / 2**20:.1f} MB'


def checkpoint_storage_error(error: BaseException, model_dir: str,
                             step: int) -> RunStorageError | None:
  """One line for a checkpoint write that failed on storage (None if it is another error):
  names the directory, the free space and what one checkpoint needs, and the step the run
  continues from. What the failed write left half-done is removed; finished checkpoints stay
  (with their data positions)."""
  fault = storage_fault(error)
  if fault is None:
    return None
  import shutil
  done = sorted(int(n) for n in _listdir(os.path.join(model_dir, 'checkpoints')) if n.isdigit())
  for d in ('checkpoints', 'best'):  # Orbax writes `<step>.orbax-checkpoint-tmp...`, renamed at the end
    for name in _listdir(os.path.join(model_dir, d)):
      if name.startswith(f'{step}.'):
        shutil.rmtree(os.path.join(model_dir, d, name), ignore_errors=True)
  if step not in done:  # the data position is written first: without its checkpoint, drop it
    shutil.rmtree(os.path.join(model_dir, 'data_state', f'step_{step}'), ignore_errors=True)
  kept = done[-1] if done else None
  then = (f'--resume continues from step {kept}' if kept is not None else
          'no checkpoint was written yet')
  if fault not in ('no space left on device', 'disk quota exceeded'):
    return RunStorageError(errno.EROFS if 'read-only' in fault else errno.EACCES,
                           f'{model_dir}: {fault} writing the checkpoint of step {step}; make the '
                           f'directory writable or give another --model_dir ({then})')
  need = ''
  if kept is not None:
    need = _mb(_size(os.path.join(model_dir, 'checkpoints', str(kept))) +
               _size(os.path.join(model_dir, 'data_state', f'step_{kept}')))
    need = f', a checkpoint needs about {need}'
  free = _mb(shutil.disk_usage(model_dir).free)
  return RunStorageError(errno.ENOSPC, f'{model_dir}: {fault} writing the checkpoint of step '
                         f'{step} ({free} free{need}); free some space, then {then}')


def _listdir(path: str) -> list[str]:
  return os.listdir(path) if os.path.isdir(path) else []


def read_manifest(model_dir: str) -> dict[str, Any]:
  with open(os.path.join(model_dir, MANIFEST)) as f:
    return json.load(f)


class _quiet_orbax:
  """Orbax logs a failed write from each of its threads (hundreds of lines on a full disk) and
  then raises it; the raised error is all the run needs."""

  def __enter__(self):
    import logging
    self._logger = logging.getLogger('absl')
    self._level = self._logger.level
    self._logger.setLevel(logging.CRITICAL)

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


class Checkpointer:
  """Orbax checkpoints of the train state (trainable + optimizer + step) and data position."""

  def __init__(self, directory: str, max_to_keep: int | None = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'meta'))

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    state = {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state}
    if step in self._manager.all_steps():
      return
    with _quiet_orbax():  # a failed write is raised here; its threads' tracebacks are noise
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def delete(self, step: int) -> None:
    self._manager.delete(step)

  def restore(self, state_like, step: int | None = None):
    """Restores into the structure (and shardings) of `state_like`; returns (state, meta)."""
    step = self.latest_step() if step is None else step
    target = {'step': state_like.step, 'trainable': state_like.trainable,
              'opt_state': state_like.opt_state}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    s = restored.state
    return type(state_like)(s['step'], s['trainable'], s['opt_state']), dict(restored.meta)

  def close(self) -> None:
    self._manager.close()
