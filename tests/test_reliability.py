"""Faults a long run meets: a diverging learning rate, a torn log, a held run directory."""

import json
import os

import numpy as np
import pytest

from jaxprompt.train import checkpointing, loop
from test_methods_contract import _tune, world  # noqa: F401 - the shared tiny world fixture


def test_overflowing_learning_rate_never_saves_a_bad_state_and_resumes(world, tmp_path):  # noqa: F811
  """lr 1e39 with checkpoints every 5 steps and log rows every 10 (the measured case): the
  run stops naming the first bad step and the checkpoint truly kept, no checkpoint or best
  prompt is written from a bad state, and --resume with a sane rate continues from it."""
  run = str(tmp_path / 'run')
  with pytest.raises(loop.NonFiniteLossError) as e:
    _tune(world, 'prompt_tuning', run, learning_rate=1e39, eval_period=5, log_period=10,
          train_steps=20)
  assert 'at step 1:' in str(e.value) and '(step 0)' in str(e.value)
  assert checkpointing.Checkpointer(os.path.join(run, 'checkpoints')).all_steps() == [0]
  from jaxprompt.prompts.files import read_prompt
  best = read_prompt(os.path.join(run, 'prompt_best.safetensors'))
  assert np.isfinite(best.value).all() and best.metadata['step'] == 0
  result = _tune(world, 'prompt_tuning', run, learning_rate=0.3, eval_period=5, log_period=10,
                 train_steps=10, resume=True)
  assert result.step == 10 and np.isfinite(read_prompt(result.best_prompt_path).value).all()


def test_torn_metrics_line_is_dropped_with_a_warning(world, tmp_path, capfd):  # noqa: F811
  run = str(tmp_path / 'run')
  _tune(world, 'prompt_tuning', run, train_steps=4, eval_period=4)
  with open(os.path.join(run, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 9, "split": "tra')  # what a full disk or a kill leaves
  os.remove(os.path.join(run, 'summary.json'))
  capfd.readouterr()
  _tune(world, 'prompt_tuning', run, train_steps=8, eval_period=4, resume=True)
  assert 'torn line' in capfd.readouterr().err
  rows = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if r['split'] == 'train'] == list(range(1, 9))


def test_a_second_run_in_a_held_directory_is_refused(world, tmp_path):  # noqa: F811
  run = str(tmp_path / 'run')
  _tune(world, 'prompt_tuning', run, train_steps=2, eval_period=2)
  holder = checkpointing.RunLock(run).acquire()
  try:
    with pytest.raises(checkpointing.RunDirectoryError, match='in use by host'):
      _tune(world, 'prompt_tuning', run, train_steps=4, eval_period=2, resume=True)
  finally:
    holder.release()
