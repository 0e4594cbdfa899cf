"""One process of the multi-host test (tests/test_multihost.py): a tiny prompt-tuning run."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main(root: str, out: str, coordinator: str | None, num_processes: int, process_id: int,
         train_steps: int = 6):
  import numpy as np
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
           **t.run_options('prompt_tuning', train_steps=train_steps, eval_period=3, resume=True))
  if jax.process_index() == 0:
    prompt = np.asarray(jax.device_get(r.trainable['encoder']['prompt']['prompt']['prompt']))
    with open(out, 'w') as f:
      json.dump({'processes': jax.process_count(), 'devices': jax.device_count(),
                 'prompt': prompt.tolist(), 'best': r.best_metrics}, f)


if __name__ == '__main__':
  coordinator = sys.argv[3] if sys.argv[3] != '-' else None
  main(sys.argv[1], sys.argv[2], coordinator, int(sys.argv[4]), int(sys.argv[5]),
       *(int(a) for a in sys.argv[6:7]))
