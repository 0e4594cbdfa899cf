"""The kill -9 drill: runs killed at random moments and while checkpoints are being written,
resumed until they finish, compared with an uninterrupted run.

    python benchmarks/kill_drill.py                       # 10 runs x 3 kills, ~15 min on 2 cores
    python benchmarks/kill_drill.py --runs 2 --kills 1    # the small setting the tests run

Each run is `tests/multihost_worker.py` in one process: prompt tuning of the tests' tiny T5 on
their tiny task, a checkpoint every 3 steps, `resume=True`. A run is killed (SIGKILL) `--kills`
times, alternately at a random moment of its training and the moment a checkpoint write is
seen in progress (an Orbax temporary directory or a new data position), then restarted each
time and finally left to finish. Reported: resumes, finals bit-identical to the uninterrupted
run (and the largest difference), duplicated metrics rows, temporary files left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests',
                      'multihost_worker.py')
TEMPORARY = ('.tmp', 'orbax-checkpoint-tmp', '_temp')


def _env() -> dict:
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
              TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')


def _start(root: str, out: str, steps: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, WORKER, root, out, '-', '1', '0', str(steps)],
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _write_marks(run: str) -> set[str]:
  """Signs of checkpoint writes in progress: Orbax temporary directories, and data positions
  saved for steps whose checkpoint is not there yet (the data position is written first)."""
  marks = set()
  for sub in ('checkpoints', 'best'):
    d = os.path.join(run, sub)
    if os.path.isdir(d):
      marks |= {f'{sub}/{n}' for n in os.listdir(d) if 'orbax-checkpoint-tmp' in n}
  states, ckpts = os.path.join(run, 'data_state'), os.path.join(run, 'checkpoints')
  if os.path.isdir(states):
    done = set(os.listdir(ckpts)) if os.path.isdir(ckpts) else set()
    marks |= {n for n in os.listdir(states) if n.split('_', 1)[1] not in done}
  return marks


def _leftovers(run: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(r, n), run) for r, ds, fs in os.walk(run)
                for n in ds + fs if any(t in n for t in TEMPORARY))


def _duplicates(run: str) -> int:
  steps = [json.loads(line)['step'] for line in open(os.path.join(run, 'metrics.jsonl'))
           if '"train"' in line]
  return len(steps) - len(set(steps))


def _finish(proc: subprocess.Popen, what: str) -> None:
  _, err = proc.communicate(timeout=1800)
  if proc.returncode != 0:
    raise RuntimeError(f'{what} failed ({proc.returncode}): {err[-2000:]}')


def drill(runs: int = 10, kills: int = 3, steps: int = 30, seed: int = 0,
          work: str | None = None) -> dict:
  """Runs the drill; returns the counts and the per-run records."""
  rng = random.Random(seed)
  work = work or tempfile.mkdtemp(prefix='kill_drill_')
  reference_out = os.path.join(work, 'reference.json')
  started = time.monotonic()
  ref = _start(os.path.join(work, 'reference'), reference_out, steps)
  while not os.path.isdir(os.path.join(work, 'reference', 'run', 'checkpoints', '0')):
    time.sleep(0.05)
    if ref.poll() is not None:
      break
  training_started = time.monotonic()
  _finish(ref, 'the uninterrupted run')
  train_seconds = time.monotonic() - training_started
  reference = np.asarray(json.load(open(reference_out))['prompt'], np.float32)

  records = []
  for r in range(runs):
    root, out = os.path.join(work, f'run{r}'), os.path.join(work, f'run{r}.json')
    run = os.path.join(root, 'run')
    kinds, resumes = [], 0
    for k in range(kills):
      # A checkpoint-aimed kill first: it always lands (the run writes checkpoint 0 at once),
      # where a random one may come after a short run has finished.
      kind = 'random' if (r + k) % 2 else 'checkpoint'
      proc = _start(root, out, steps)
      while not os.path.isdir(os.path.join(run, 'checkpoints')) and proc.poll() is None:
        time.sleep(0.05)
      if kind == 'random':
        deadline = time.monotonic() + rng.uniform(0, train_seconds)
        while time.monotonic() < deadline and proc.poll() is None:
          time.sleep(0.01)
      else:
        stale = _write_marks(run)  # what an earlier kill left: not this attempt's writes
        while proc.poll() is None and not _write_marks(run) - stale:
          time.sleep(0.002)
      if proc.poll() is None:
        proc.kill()
        kinds.append(kind)
      proc.communicate()
      resumes += 1
    _finish(_start(root, out, steps), f'run {r} after its kills')
    final = np.asarray(json.load(open(out))['prompt'], np.float32)
    records.append(dict(run=r, kills=kinds, restarts=resumes,
                        identical=bool(np.array_equal(final, reference)),
                        max_abs_diff=float(np.abs(final - reference).max()),
                        duplicate_rows=_duplicates(run), leftovers=_leftovers(run)))
  summary = dict(runs=runs, steps=steps, kills=sum(len(r['kills']) for r in records),
                 kills_at_checkpoints=sum(r['kills'].count('checkpoint') for r in records),
                 resumed=sum(r['restarts'] for r in records),
                 identical_finals=sum(r['identical'] for r in records),
                 duplicate_rows=sum(r['duplicate_rows'] for r in records),
                 leftover_files=sum(len(r['leftovers']) for r in records),
                 minutes=(time.monotonic() - started) / 60, load_average=os.getloadavg(),
                 records=records)
  return summary


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--runs', type=int, default=10)
  p.add_argument('--kills', type=int, default=3, help='kills per run before it may finish')
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None, help='write the results here')
  args = p.parse_args(argv)
  work = tempfile.mkdtemp(prefix='kill_drill_')
  try:
    result = drill(args.runs, args.kills, args.steps, args.seed, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(f"{result['runs']} runs, {result['kills']} kills ({result['kills_at_checkpoints']} during "
        f"checkpoint writes), {result['resumed']} restarts: {result['identical_finals']}/"
        f"{result['runs']} finals bit-identical, {result['duplicate_rows']} duplicated log rows, "
        f"{result['leftover_files']} temporary files left ({result['minutes']:.1f} min)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
