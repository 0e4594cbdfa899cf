"""One process of the multi-host tests (tests/test_multihost.py): tiny prompt-tuning runs.

    python multihost_worker.py ROOT OUT COORDINATOR|- NUM_PROCESSES PROCESS_ID [STEPS]
        [--delay S] [--check_delay S] [--fresh] [--scenario SEED]

One run of STEPS steps in ROOT/run (resumed if it is there, unless `--fresh`), after sleeping
`--delay` s, and `--check_delay` s more just before the run directory is checked: the window
between the run's last collective and its check, where a late host met what process 0 had
already written (issue 20); a delay at start-up is absorbed by the first collective.

`--scenario SEED` runs `SCENARIO` instead, each run with a random check delay (0 to MAX_DELAY_S
s, drawn from SEED, the process and the run; none for process 0 in the first run, so that the
others come after it); each process writes OUT.PROCESS_ID: a record per run.
"""

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

# (run directory, train steps, resume): a fresh run; the same again without --resume (refused
# on every process alike); resumed to more steps; --resume in a new directory (starts fresh).
SCENARIO = (('a', 6, False), ('a', 6, False), ('a', 9, True), ('b', 3, True))
MAX_DELAY_S = 2.5


def main(root: str, out: str, coordinator: str | None, num_processes: int, process_id: int,
         train_steps: int = 6, delay: float = 0.0, resume: bool = True,
         check_delay: float = 0.0, scenario: int | None = None):
  import numpy as np
  import jax
  from jaxprompt.model import Transformer, get_config, init_params
  from jaxprompt.train.partitioning import initialize_distributed
  initialize_distributed(coordinator, num_processes if coordinator else None,
                         process_id if coordinator else None)
  import test_methods_contract as t
  info = t._setup(os.path.join(root, f'data_{process_id}'))
  cfg = get_config('t5_1_1_tiny', vocab_size=info['vocab_size'], dropout_rate=0.0)
  backbone = (Transformer(cfg), init_params(cfg, 0))
  from jaxprompt.tuning import tune

  def one_run(name, steps, resume):
    r = tune('contract_a', backbone=backbone, model_dir=os.path.join(root, name),
             method='prompt_tuning',
             **t.run_options('prompt_tuning', train_steps=steps, eval_period=3, resume=resume))
    prompt = np.asarray(jax.device_get(r.trainable['encoder']['prompt']['prompt']['prompt']))
    return r, prompt.tolist()

  if scenario is None:
    time.sleep(delay)
    if check_delay:
      _delay_run_dir_check(check_delay)
    r, prompt = one_run('run', train_steps, resume)
    if jax.process_index() == 0:
      with open(out, 'w') as f:
        json.dump({'processes': jax.process_count(), 'devices': jax.device_count(),
                   'prompt': prompt, 'best': r.best_metrics, 'step': r.step}, f)
    return
  records = []
  for k, (name, steps, resume) in enumerate(SCENARIO):
    draw = random.Random(f'{scenario}/{process_id}/{k}')
    if coordinator:  # the first run: process 0 first, as issue 20 met it; then any order
      _delay_run_dir_check(0.0 if k == 0 and process_id == 0 else
                           draw.uniform(0.0 if k else 1.0, MAX_DELAY_S))
    try:
      t0 = time.process_time()
      r, prompt = one_run(name, steps, resume)
      print(f'run {k}: {time.process_time() - t0:.1f} s of CPU', file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the test compares every process's error
      records.append({'error': f'{type(e).__name__}: {e}'.replace(root, 'ROOT')})
      continue
    # What process 0 wrote at the end exists on every process once its run returns.
    products = [os.path.exists(os.path.join(root, name, f)) for f in ('summary.json',
                                                                       'prompt_final.safetensors')]
    records.append({'step': r.step, 'prompt': prompt, 'best': r.best_metrics,
                    'products': products, 'final_path': r.prompt_path})
  import resource
  usage = resource.getrusage(resource.RUSAGE_SELF)
  print(f'process {process_id}: {usage.ru_utime + usage.ru_stime:.1f} s of CPU', file=sys.stderr)
  with open(f'{out}.{process_id}', 'w') as f:
    json.dump({'processes': jax.process_count(), 'devices': jax.device_count(),
               'runs': records}, f)


def _delay_run_dir_check(seconds: float) -> None:
  """Sleeps before the next check of a run directory (once)."""
  from jaxprompt.train import checkpointing
  check = checkpointing.prepare_run_dir

  def late(*args, **kwargs):
    checkpointing.prepare_run_dir = check
    time.sleep(seconds)
    return check(*args, **kwargs)

  checkpointing.prepare_run_dir = late


if __name__ == '__main__':
  p = argparse.ArgumentParser()
  p.add_argument('root')
  p.add_argument('out')
  p.add_argument('coordinator')
  p.add_argument('num_processes', type=int)
  p.add_argument('process_id', type=int)
  p.add_argument('steps', type=int, nargs='?', default=6)
  p.add_argument('--delay', type=float, default=0.0)
  p.add_argument('--check_delay', type=float, default=0.0)
  p.add_argument('--fresh', action='store_true')
  p.add_argument('--scenario', type=int, default=None)
  a = p.parse_args()
  main(a.root, a.out, None if a.coordinator == '-' else a.coordinator, a.num_processes,
       a.process_id, a.steps, a.delay, not a.fresh, a.check_delay, a.scenario)
