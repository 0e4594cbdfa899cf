"""`jaxprompt compare`: several methods on one task, backbone, step budget and set of seeds.

    jaxprompt compare --methods prompt_tuning,p_tuning,residual_prompt --task T --backbone B \
        --seeds 0,1,2 --steps 300 [--set NAME=VALUE ...] [--work DIR] [--json]

Each method is trained once per seed through the one run driver (`tuning.tune`), every run
with the same task, backbone, steps, batch size, validation period and prompt length; each
method keeps its own default optimizer and learning rate unless `--set learning_rate=...`
says otherwise. One table comes out, a row per method:

* best validation score: mean and sample standard deviation over seeds (the run's `score`,
  the task's first metric, at the run's best validation);
* trainable parameters (the method's trainable pytree; frozen sources and masks not counted);
* train step time: the median over every logged step of every seed (one row per step; the
  median leaves out the first step's compilation and the pauses for validation);
* peak memory: the process's peak resident set size while the method's runs ran (sampled
  every 20 ms; the process also holds what earlier methods left behind, so the first method
  pays for the backbone), and the accelerator's peak bytes where the platform reports them.

`--set NAME=VALUE` sets a run option (any `RunConfig` field, for every method) or a method's own
option (for the methods that have it), e.g. `--set source_library=LIB` for attempt.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
from typing import Any, Sequence

import numpy as np

from jaxprompt.config import ConfigError, RunConfig
from jaxprompt.methods import Command, get_method


@dataclasses.dataclass
class Row:
  method: str
  scores: list[float]
  trainable_params: int
  step_ms: float | None
  peak_rss_mib: float
  device_peak_mib: float | None = None

  @property
  def mean(self) -> float:
    return float(np.mean(self.scores))

  @property
  def spread(self) -> float:
    return float(np.std(self.scores, ddof=1)) if len(self.scores) > 1 else 0.0

  def as_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), score_mean=self.mean, score_std=self.spread)


class PeakRSS:
  """The process's peak resident set size (MiB) while the `with` block runs (sampled)."""

  def __init__(self, period: float = 0.02):
    self.period, self.peak = period, 0.0
    self._stop = threading.Event()

  @staticmethod
  def now_mib() -> float:
    try:
      with open('/proc/self/status') as f:
        for line in f:
          if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024.0
    except OSError:
      pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

  def _sample(self):
    while not self._stop.wait(self.period):
      self.peak = max(self.peak, self.now_mib())

  def __enter__(self):
    self.peak = self.now_mib()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.now_mib())


def device_peak_mib() -> float | None:
  """The first device's peak bytes in use (GPU / TPU), None where not reported (CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2 ** 20


def step_seconds(model_dir: str) -> list[float]:
  """Seconds per train step of each logged train row of a run (metrics.jsonl)."""
  from jaxprompt.train.summaries import read_metrics
  return [1.0 / r['steps_per_sec'] for r in read_metrics(model_dir)
          if r.get('split') == 'train' and r.get('steps_per_sec')]


def count_parameters(tree) -> int:
  import jax
  return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
  """The `--set` options that apply to `method`: RunConfig fields and its own Options."""
  run = {f.name for f in dataclasses.fields(RunConfig)}
  own = {f.name for f in dataclasses.fields(get_method(method).Options)}
  return {k: v for k, v in options.items() if k in run or k in own}


def check_options(methods: Sequence[str], options: dict[str, Any]) -> None:
  run = {f.name for f in dataclasses.fields(RunConfig)}
  known = run.union(*({f.name for f in dataclasses.fields(get_method(m).Options)}
                      for m in methods))
  unknown = sorted(set(options) - known)
  if unknown:
    raise ConfigError(f'--set {unknown[0]}: neither a run option nor an option of '
                      f'{", ".join(methods)}')


def compare(methods: Sequence[str], task: str, *, backbone, seeds: Sequence[int],
            train_steps: int, work_dir: str, options: dict[str, Any] | None = None,
            log=sys.stderr) -> list[Row]:
  """Trains each of `methods` once per seed on `task` (same backbone, steps and options);
  returns a `Row` per method. `work_dir/METHOD/seed_S` holds each run (a finished run there is
  resumed, so it is not trained again)."""
  from jaxprompt.tuning import tune
  options = dict(options or {})
  methods = list(methods)
  for m in methods:
    get_method(m)  # every name checked before anything runs
  check_options(methods, options)
  if not seeds:
    raise ConfigError('--seeds: give at least one seed')
  rows = []
  for method in methods:
    scores, steps, params = [], [], 0
    with PeakRSS() as rss:
      for seed in seeds:
        model_dir = os.path.join(work_dir, method, f'seed_{seed}')
        print(f'compare: {method}, seed {seed} -> {model_dir}', file=log)
        run = dict(dict(progress=False), **options_for(method, options))
        run.update(seed=seed, train_steps=train_steps, log_period=1,
                   resume=os.path.exists(os.path.join(model_dir, 'manifest.json')))
        result = tune(task, backbone=backbone, model_dir=model_dir, method=method, **run)
        if not result.best_metrics:
          raise ValueError(f'{method}: the run validated nothing; set eval_period <= steps')
        scores.append(float(result.best_metrics['score']))
        steps += step_seconds(model_dir)
        params = count_parameters(result.trainable)
    rows.append(Row(method, scores, params, 1e3 * statistics.median(steps) if steps else None,
                    rss.peak, device_peak_mib()))
  return rows


def format_table(rows: Sequence[Row], task: str, steps: int) -> str:
  head = (f'{"method":<18} {"best validation score":>24} {"trainable":>11} {"step ms":>9} '
          f'{"peak RSS MiB":>13}')
  device = any(r.device_peak_mib is not None for r in rows)
  if device:
    head += f' {"device MiB":>11}'
  lines = [f'{task}, {steps} steps: best validation score (mean +- sd over seeds)', head,
           '-' * len(head)]
  for r in rows:
    score = (f'{r.mean:.2f} +- {r.spread:.2f} (n={len(r.scores)})' if len(r.scores) > 1
             else f'{r.mean:.2f} (n=1)')  # one seed has no spread
    step = '-' if r.step_ms is None else f'{r.step_ms:.1f}'
    line = (f'{r.method:<18} {score:>24} {r.trainable_params:>11,} {step:>9} '
            f'{r.peak_rss_mib:>13,.0f}')
    if device:
      line += f' {"-" if r.device_peak_mib is None else f"{r.device_peak_mib:,.0f}":>11}'
    lines.append(line)
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# The command line.

def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
  """['NAME=VALUE', ...] -> {NAME: value} (Python literals where they parse, else text)."""
  out = {}
  for item in items or ():
    name, sep, text = item.partition('=')
    if not sep or not name.strip():
      raise ConfigError(f'--set {item!r}: write NAME=VALUE')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    out[name.strip()] = value
  return out


def _add_arguments(p) -> None:
  p.add_argument('--methods', required=True,
                 help='comma-separated registered methods (e.g. prompt_tuning,p_tuning)')
  p.add_argument('--task', required=True, help='seqio task (or mixture) every method trains on')
  p.add_argument('--backbone', required=True, help="checkpoint, or 'lab' for the lab's")
  p.add_argument('--seeds', default='0', help='comma-separated seeds (default 0)')
  p.add_argument('--steps', type=int, required=True, help='train steps of every run')
  p.add_argument('--batch_size', type=int, default=None, help="default: the task's own")
  p.add_argument('--eval_period', type=int, default=None, help="default: the task's own")
  p.add_argument('--prompt_length', type=int, default=None, help="default: the task's own")
  p.add_argument('--set', action='append', default=[], metavar='NAME=VALUE',
                 help='a run option (all methods) or a method option (the methods that have '
                      'it); repeatable')
  p.add_argument('--work', default=None,
                 help='keep the runs here (default: a temporary directory); finished runs in it '
                      'are reused')
  p.add_argument('--json', action='store_true', help='print the rows as JSON')


def _run(args) -> int:
  from jaxprompt.data import setup_tasks
  setup_tasks()  # the TFDS tasks and the lab's
  methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  try:
    seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  except ValueError:
    raise ConfigError(f'--seeds {args.seeds!r}: comma-separated integers') from None
  options = parse_set(args.set)
  for name in ('batch_size', 'eval_period', 'prompt_length'):
    if getattr(args, name) is not None:
      options[name] = getattr(args, name)
  work = args.work or tempfile.mkdtemp(prefix='jaxprompt_compare_')
  rows = compare(methods, args.task, backbone=args.backbone, seeds=seeds,
                 train_steps=args.steps, work_dir=work, options=options)
  if args.json:
    print(json.dumps([r.as_dict() for r in rows], indent=1))
  else:
    print(format_table(rows, args.task, args.steps))
    print(f'runs: {work}')
  return 0


COMMANDS = {'compare': Command('several methods on one task, backbone, step budget and seeds: '
                               'one table', _add_arguments, _run)}

__all__ = ['COMMANDS', 'PeakRSS', 'Row', 'compare', 'count_parameters', 'format_table',
           'parse_set', 'step_seconds']
