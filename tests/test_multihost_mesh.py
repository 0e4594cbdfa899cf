"""Model parallelism across processes: 2 processes x 4 devices on a (data 2, model 4) mesh with
2-D parameter sharding (`embed` on `data`, so a weight's shards span both processes) train the
same prompt as 1 process with 8 devices on the same mesh.

    python test_multihost_mesh.py ROOT OUT COORDINATOR|- NUM_PROCESSES PROCESS_ID   (one worker)
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_multihost import _env, _free_port  # noqa: E402

MESH = dict(num_partitions=4, parameter_partitioning_dims=2)


def worker(root: str, out: str, coordinator: str | None, num_processes: int, process_id: int):
  import jax
  from jaxprompt.model import Transformer, get_config, init_params
  from jaxprompt.train.partitioning import initialize_distributed
  initialize_distributed(coordinator, num_processes if coordinator else None,
                         process_id if coordinator else None)
  import test_methods_contract as t
  info = t._setup(os.path.join(root, f'data_{process_id}'))
  cfg = get_config('t5_1_1_tiny', vocab_size=info['vocab_size'], dropout_rate=0.0)
  from jaxprompt.tuning import tune
  r = tune('contract_a', backbone=(Transformer(cfg), init_params(cfg, 0)),
           model_dir=os.path.join(root, 'run'), method='prompt_tuning',
           **t.run_options('prompt_tuning', train_steps=4, eval_period=2, **MESH))
  query = r.backbone.params['encoder']['layers_0']['attention']['query']['kernel']
  if jax.process_index() == 0:
    prompt = np.asarray(jax.device_get(r.trainable['encoder']['prompt']['prompt']['prompt']))
    with open(out, 'w') as f:
      json.dump({'processes': jax.process_count(), 'devices': jax.device_count(),
                 'mesh': dict(query.sharding.mesh.shape), 'spec': list(query.sharding.spec),
                 'prompt': prompt.tolist(), 'best': r.best_metrics}, f)


@pytest.mark.slow
def test_two_processes_with_model_parallelism_equal_one_process(tmp_path):
  one = subprocess.run([sys.executable, __file__, str(tmp_path / 'one'), str(tmp_path / 'one.json'),
                        '-', '1', '0'], env=_env(8), capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  address = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path / 'two'),
                             str(tmp_path / 'two.json'), address, '2', str(i)], env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a = json.loads((tmp_path / 'one.json').read_text())
  b = json.loads((tmp_path / 'two.json').read_text())
  assert (a['processes'], a['devices'], b['processes'], b['devices']) == (1, 8, 2, 8)
  for run in (a, b):
    assert run['mesh'] == {'data': 2, 'model': 4}
    assert run['spec'] == ['data', 'model']  # query kernel: embed on data, heads on model
  np.testing.assert_allclose(np.asarray(b['prompt']), np.asarray(a['prompt']), atol=1e-5)
  assert b['best'].keys() == a['best'].keys()
  for key in a['best']:
    np.testing.assert_allclose(b['best'][key], a['best'][key], rtol=1e-5, err_msg=key)


if __name__ == '__main__':
  worker(sys.argv[1], sys.argv[2], None if sys.argv[3] == '-' else sys.argv[3],
         int(sys.argv[4]), int(sys.argv[5]))
