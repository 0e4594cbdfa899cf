"""Where a run's numbers go: a JSONL log, TensorBoard (clu writers) and a loss/metric plot."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np


class MetricsLog:
  """Appends `{'step', 'split', **metrics}` lines to metrics.jsonl and writes TensorBoard."""

  def __init__(self, model_dir: str, tensorboard: bool = True):
    self.path = os.path.join(model_dir, 'metrics.jsonl')
    self._writers = {}
    if tensorboard:
      from clu import metric_writers
      for split in ('train', 'eval'):
        self._writers[split] = metric_writers.create_default_writer(
            os.path.join(model_dir, split), just_logging=False, asynchronous=False)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'split': split, **scalars}) + '\n')
    if split in self._writers:
      self._writers[split].write_scalars(int(step), scalars)
      self._writers[split].flush()

  def truncate(self, step: int) -> None:
    """Drops the rows after `step` (a resumed run recomputes them) and a torn last line."""
    if not os.path.exists(self.path):
      return
    kept, torn = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          torn += 1
          continue
        if row.get('step', 0) <= step:
          kept.append(line if line.endswith('\n') else line + '\n')
    if torn:
      print(f'jaxprompt: warning: {self.path}: dropped {torn} torn line(s)', file=sys.stderr)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def close(self) -> None:
    for w in self._writers.values():
      w.close()


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(model_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_title(model_dir: str, shown: str | None) -> str:
  """'prompt_tuning on lab_has_dog: train loss and validation accuracy (%)', from the run's
  manifest (the run directory's name when it has none)."""
  try:
    with open(os.path.join(model_dir, 'manifest.json')) as f:
      manifest = json.load(f)
    what = f"{manifest.get('method', 'run')} on {manifest['task']}"
  except (OSError, ValueError, KeyError):
    what = os.path.basename(os.path.abspath(model_dir))
  return f'{what}: train loss' + (f' and {shown}' if shown else '')


def plot_run(model_dir: str, metric: str | None = None, path: str | None = None) -> str | None:
  """Training loss (per target token) and the validation metric against steps, as a PNG."""
  rows = read_metrics(model_dir)
  train = [r for r in rows if r['split'] == 'train' and 'loss_per_token' in r]
  evals = [r for r in rows if r['split'] == 'eval']
  if not train and not evals:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot([r['step'] for r in train], [r['loss_per_token'] for r in train], color='tab:blue',
            label='train loss / token')
  ax.set_xlabel('training step')
  ax.set_ylabel('train loss per target token (nats)', color='tab:blue')
  metric = metric or next((k for k in ('accuracy', 'loss_per_token') if evals and k in evals[0]),
                          None)
  shown = None
  if evals and metric and metric in evals[-1]:
    ax2 = ax.twinx()
    pts = [(r['step'], r[metric]) for r in evals if metric in r]
    shown = f'validation {metric}' + ('' if 'loss' in metric else ' (%)')
    ax2.plot(*zip(*pts), 'o-', color='tab:orange', label=shown)
    ax2.set_ylabel(shown, color='tab:orange')
  ax.set_title(plot_title(model_dir, shown), fontsize=10)
  fig.tight_layout()
  path = path or os.path.join(model_dir, 'training.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
