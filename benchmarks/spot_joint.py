"""SPoT source prompts: N lab source tasks trained jointly (one prompt stack, mixed-task batches)
vs one prompt-tuning run per task, side by side, same steps and the same per-task batch.

Each mode runs in its own child process (so its peak RSS is its own); the joint run's batch is
N x the per-task batch, sampled from the tasks at equal rates (per task: the per-task batch on
average). Reported: wall time of the whole mode (backbone load, compiles, validation included),
training examples/s in the steady state (from the runs' logged steps/s), peak RSS, and each
task's final validation score.

    python benchmarks/spot_joint.py                      # CI-sized: 4 tasks, 100 steps
    python benchmarks/spot_joint.py --tasks 8 --steps 300 --out benchmarks/results/spot_joint.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from _harness import emit_result, processor, run_child, write_json

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

DEFAULT_TASKS = ('has_red', 'count_colours', 'majority', 'first_word', 'more_colours_than_animals',
                 'filter_colours', 'has_blue', 'last_word')


def _steady_rate(model_dir: str, batch: int) -> float:
  """Training examples/s from the run's logged steps/s, leaving out the first (compile) row."""
  from jaxprompt.train.summaries import read_metrics
  rows = [r for r in read_metrics(model_dir) if r.get('split') == 'train']
  rates = [r['steps_per_sec'] for r in rows[1:]] or [r['steps_per_sec'] for r in rows]
  return float(sum(rates) / len(rates)) * batch if rates else float('nan')


def child(mode: str, tasks: list[str], steps: int, batch: int, work: str,
          max_eval: int) -> dict:
  from jaxprompt.lab import register_lab_tasks
  from jaxprompt.lab.tasks import seqio_name
  from jaxprompt.methods import spot
  from jaxprompt.tuning import tune
  register_lab_tasks()
  names = [seqio_name(t) for t in tasks]
  common = dict(train_steps=steps, eval_period=steps, log_period=max(steps // 10, 1),
                max_eval_examples=max_eval, progress=False, prompt_init='sampled_vocab', seed=0)
  start = time.perf_counter()
  scores, rates = {}, []
  if mode == 'joint':
    mixture = spot.register_tasks_mixture(names, rates=[1.0] * len(names))
    r = tune(mixture, backbone='lab', model_dir=os.path.join(work, 'joint'),
             method='prompt_stack', batch_size=batch * len(names), **common)
    for n in names:
      scores[n] = round(float(next(v for k, v in r.final_metrics.items()
                                   if k.startswith(n + '/') and not k.endswith(
                                       ('loss_per_token', 'token_accuracy')))), 2)
    rates.append(_steady_rate(r.model_dir, batch * len(names)))
    rate = rates[0]
  else:
    for n in names:
      r = tune(n, backbone='lab', model_dir=os.path.join(work, n), batch_size=batch, **common)
      scores[n] = round(float(r.final_metrics['score']), 2)
      rates.append(_steady_rate(r.model_dir, batch))
    rate = float(sum(rates) / len(rates))  # one run at a time: its own rate
  wall = time.perf_counter() - start
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(mode=mode, wall_s=round(wall, 2), train_examples=steps * batch * len(names),
              examples_per_s_overall=round(steps * batch * len(names) / wall, 1),
              examples_per_s_steady=round(rate, 1), peak_rss_mb=round(rss_mb, 1),
              final_validation=scores)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tasks', type=int, default=4, help='number of lab source tasks (max 8)')
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--batch', type=int, default=16, help='per-task batch')
  p.add_argument('--max_eval_examples', type=int, default=100)
  p.add_argument('--out', default=None, help='write the JSON here')
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  p.add_argument('--work', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  tasks = list(DEFAULT_TASKS[:args.tasks])
  if args.child:
    emit_result(child(args.child, tasks, args.steps, args.batch, args.work,
                      args.max_eval_examples))
    return {}
  from jaxprompt.lab import backbone
  backbone.build(progress=False)  # outside the timed children
  results = {}
  with tempfile.TemporaryDirectory(prefix='spot_joint_') as work:
    for mode in ('joint', 'separate'):
      results[mode] = run_child(
          [os.path.abspath(__file__), '--child', mode, '--tasks', str(args.tasks), '--steps',
           str(args.steps), '--batch', str(args.batch), '--max_eval_examples',
           str(args.max_eval_examples), '--work', os.path.join(work, mode)], what=f'{mode} run')
      print(json.dumps(results[mode]), flush=True)
  j, s = results['joint'], results['separate']
  n = len(tasks)
  summary = dict(
      tasks=tasks, steps=args.steps, per_task_batch=args.batch, n=n,
      speedup_wall=round(s['wall_s'] / j['wall_s'], 2),
      speedup_steady=round(j['examples_per_s_steady'] / s['examples_per_s_steady'], 2),
      goal=f'joint >= 0.8 * n = {0.8 * n:.1f}x faster (wall)',
      rss_ratio=round(j['peak_rss_mb'] / s['peak_rss_mb'], 2),
      cpu=processor(), cores=os.cpu_count(),
      load_average=os.getloadavg(), joint=j, separate=s)
  print(json.dumps({k: v for k, v in summary.items() if k not in ('joint', 'separate')}))
  if args.out:
    write_json(args.out, summary)
    print(f'written: {args.out}')
  return summary


if __name__ == '__main__':
  main()
