"""Two processes on localhost (jax.distributed over gloo) train like one process with two
devices, write each run artefact once, and a lost process stops the others promptly."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
  one = tmp_path / 'one'
  subprocess.run([sys.executable, WORKER, str(one), str(tmp_path / 'one.json'), '-', '1', '0'],
                 env=_env(2), check=True, capture_output=True, timeout=900)
  two = tmp_path / 'two'
  address = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen([sys.executable, WORKER, str(two), str(tmp_path / 'two.json'),
                             address, '2', str(i)], env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a = json.loads((tmp_path / 'one.json').read_text())
  b = json.loads((tmp_path / 'two.json').read_text())
  assert (a['processes'], a['devices'], b['processes'], b['devices']) == (1, 2, 2, 2)
  np.testing.assert_allclose(np.asarray(b['prompt']), np.asarray(a['prompt']), atol=1e-5)
  assert b['best'] == a['best']
  rows = [json.loads(line) for line in open(two / 'run' / 'metrics.jsonl')]
  assert [r['step'] for r in rows if r['split'] == 'train'] == list(range(1, 7))  # one writer
  assert sorted(os.listdir(two / 'run' / 'data_state' / 'step_6')) == [
      'process_0.data-00000-of-00001', 'process_0.index', 'process_1.data-00000-of-00001',
      'process_1.index']


def test_a_lost_process_stops_the_others_with_one_line_and_the_run_resumes(tmp_path):
  """kill -9 of process 1 during training: process 0 exits within 60 s, its last line names the
  lost process; restarting both processes resumes from the last checkpoint and finishes."""
  import glob
  import time
  root, address = tmp_path / 'run', f'127.0.0.1:{_free_port()}'

  def start(steps, address):
    return [subprocess.Popen([sys.executable, WORKER, str(root), str(tmp_path / 'out.json'),
                              address, '2', str(i), str(steps)], env=_env(1),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]

  procs = start(100000, address)
  deadline = time.monotonic() + 900
  while not glob.glob(str(root / 'run' / 'checkpoints' / '3')):
    assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-3000:]
    time.sleep(0.5)
  procs[1].kill()
  killed = time.monotonic()
  _, err = procs[0].communicate(timeout=120)
  assert time.monotonic() - killed < 60 and procs[0].returncode != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith('jaxprompt: a process of this run was lost: process 1 of 2'), err[-3000:]
  assert '--resume' in last and 'Traceback' not in err
  procs[1].communicate()
  from jaxprompt.train.checkpointing import Checkpointer
  kept = max(Checkpointer(str(root / 'run' / 'checkpoints')).all_steps())
  procs = start(kept + 3, f'127.0.0.1:{_free_port()}')
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert f'from step {kept}' in outs[0][1]
  rows = [json.loads(line) for line in open(root / 'run' / 'metrics.jsonl')]
  steps = [r['step'] for r in rows if r['split'] == 'train']
  assert steps == sorted(set(steps)) and steps[-1] == kept + 3  # no duplicated rows
