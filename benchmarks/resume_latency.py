"""Resume latency: restoring the saved data position vs replaying the consumed batches.

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/resume_latency.py                 # 100 and 30,000
    python benchmarks/resume_latency.py --positions 100,3000 --json /tmp/r.json  # a quick look

For each position N it reads N training batches of a lab task (batch 32) once and saves the
pipeline's position as a run does at a checkpoint, then times, in fresh pipelines, (a) what a
resumed run costs now: build the pipeline and restore the saved position, and (b) what it cost
before: build the pipeline and replay N batches. Both then yield the same next batch (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from _harness import RESULTS, write_json


def measure(task: str, position: int, work: str) -> dict:
  import numpy as np
  from jaxprompt.data.features import get_dataset
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH

  def fresh():
    return get_dataset(task, SEQUENCE_LENGTH, 'train', 32, shuffle=True, seed=0, num_epochs=None)

  it = fresh()
  for _ in range(position):
    next(it)
  path = os.path.join(work, f'state_{position}')
  start = time.perf_counter()
  it.save(path)
  save_s = time.perf_counter() - start
  expected = next(it)['encoder_input_tokens']
  size = sum(os.path.getsize(os.path.join(work, f)) for f in os.listdir(work)
             if f.startswith(f'state_{position}'))

  start = time.perf_counter()
  restored = fresh()
  restored.restore(path)
  got = next(restored)['encoder_input_tokens']
  restore_s = time.perf_counter() - start

  start = time.perf_counter()
  replayed = fresh()
  for _ in range(position):
    next(replayed)
  got_replay = next(replayed)['encoder_input_tokens']
  replay_s = time.perf_counter() - start
  assert np.array_equal(got, expected) and np.array_equal(got_replay, expected)
  return dict(task=task, position=position, restore_s=round(restore_s, 3),
              replay_s=round(replay_s, 3), save_s=round(save_s, 3), state_bytes=size)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--positions', default='100,30000')
  parser.add_argument('--task', default='lab_has_dog')
  parser.add_argument('--json', default=os.path.join(RESULTS, 'resume_latency.json'))
  args = parser.parse_args()
  from jaxprompt.lab import register_lab_tasks
  register_lab_tasks()
  rows = []
  with tempfile.TemporaryDirectory() as work:
    for position in (int(p) for p in args.positions.split(',')):
      rows.append(measure(args.task, position, work))
      print(json.dumps(rows[-1]), flush=True)
  print('| position | restore s | replay s | save s | state KB |\n|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["position"]} | {r["restore_s"]} | {r["replay_s"]} | {r["save_s"]} | '
          f'{r["state_bytes"] // 1024} |')
  write_json(args.json, {'load_average': os.getloadavg(), 'rows': rows})


if __name__ == '__main__':
  main()
