"""Faults a long run meets: a diverging learning rate, a torn log, a held run directory."""

import json
import os

import numpy as np
import pytest

from jaxprompt.train import checkpointing, loop
from test_methods_contract import _tune, world  # noqa: F401 - the shared tiny world fixture


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
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


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
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


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_a_finite_but_exploding_trainable_is_stopped_as_diverged(world, tmp_path):  # noqa: F811
  """lr 1e30 (the measured case): the prompt stays finite (~1e30) while its gradients vanish,
  so no non-finite check fires; the run stops as diverged at the first such step and keeps
  the initial prompt as the best, never the exploded one."""
  run = str(tmp_path / 'run')
  with pytest.raises(loop.DivergedError) as e:
    _tune(world, 'prompt_tuning', run, learning_rate=1e30, eval_period=5, log_period=10,
          train_steps=20)
  assert 'diverged at step 1:' in str(e.value) and '(step 0)' in str(e.value)
  assert checkpointing.Checkpointer(os.path.join(run, 'checkpoints')).all_steps() == [0]
  from jaxprompt.prompts.files import read_prompt
  best = read_prompt(os.path.join(run, 'prompt_best.safetensors'))
  assert best.metadata['step'] == 0 and np.abs(best.value).max() < 1e3
  # The check is a setting: switched off, the same rate trains on (and the prompt explodes).
  other = _tune(world, 'prompt_tuning', str(tmp_path / 'off'), learning_rate=1e30,
                eval_period=5, log_period=10, train_steps=5, max_norm_growth=None)
  assert other.step == 5


@pytest.fixture
def small_disk(tmp_path):
  """A real file system of 6 MB (tmpfs), to fill or to make read-only; skips where mounting
  is not permitted (a non-root user, a locked-down container)."""
  import subprocess
  mount = tmp_path / 'disk'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=6m', 'tmpfs', str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  yield mount
  subprocess.run(['umount', '-l', str(mount)], capture_output=True)


def _size(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_a_full_disk_stops_with_one_line_and_keeps_the_earlier_checkpoints(world, small_disk,
                                                                           tmp_path, capfd):  # noqa: F811
  """The disk fills up between two checkpoints: one line naming the directory, the free space
  and what a checkpoint needs; no Orbax/TensorFlow tracebacks; the half-written checkpoint is
  removed, the earlier ones restore; after freeing space --resume finishes the run."""
  probe = str(tmp_path / 'probe')  # how much the run writes up to step 4, and per checkpoint
  _tune(world, 'prompt_tuning', probe, train_steps=4, eval_period=4)
  at_4 = _size(probe)
  per_checkpoint = _size(os.path.join(probe, 'checkpoints', '4')) + _size(
      os.path.join(probe, 'data_state', 'step_4'))
  run = str(small_disk / 'run')
  filler = small_disk / 'filler'
  import shutil
  free = shutil.disk_usage(small_disk).free
  filler.write_bytes(b'\0' * max(0, free - at_4 - per_checkpoint // 2 - 64 * 1024))
  capfd.readouterr()
  with pytest.raises(checkpointing.RunStorageError) as e:
    _tune(world, 'prompt_tuning', run, train_steps=12, eval_period=4)
  message = str(e.value)
  assert '\n' not in message and run in message and 'no space left on device' in message
  assert 'free' in message and 'continues from step' in message
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'ERROR:absl' not in err
  kept = checkpointing.Checkpointer(os.path.join(run, 'checkpoints')).all_steps()
  assert kept and max(kept) >= 4 and not [
      n for n in os.listdir(os.path.join(run, 'checkpoints')) if 'tmp' in n]
  assert f'step {max(kept)}' in message
  filler.unlink()
  result = _tune(world, 'prompt_tuning', run, train_steps=12, eval_period=4, resume=True)
  assert result.step == 12


def test_a_read_only_run_directory_is_one_line(world, small_disk):  # noqa: F811
  import subprocess
  run = str(small_disk / 'run')
  _tune(world, 'prompt_tuning', run, train_steps=2, eval_period=2)
  subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
  with pytest.raises(OSError) as e:
    _tune(world, 'prompt_tuning', run, train_steps=4, eval_period=2, resume=True)
  assert '\n' not in str(e.value) and run in str(e.value) and 'read-only' in str(e.value)
  assert '--model_dir' in str(e.value)


@pytest.mark.slow  # the drill's small setting: a minute or two; benchmarks/kill_drill.py runs the full one
def test_the_kill_drill_resumes_killed_runs_bit_for_bit(tmp_path):
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
  import kill_drill
  result = kill_drill.drill(runs=1, kills=2, steps=9, work=str(tmp_path))
  assert result['kills'] >= 1 and result['resumed'] == 2
  assert result['identical_finals'] == 1, result['records']
  assert result['duplicate_rows'] == 0 and result['leftover_files'] == 0, result['records']


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_a_stack_keeps_each_tasks_best_row_through_a_kill(world, tmp_path):  # noqa: F811
  """prompt_stack's after_validation hook: each task's row at that task's own best validation
  (not the run's macro best), the same after a kill and resume as uninterrupted."""
  import shutil
  from jaxprompt.methods import prompt_stack
  from jaxprompt.train.summaries import read_metrics
  from test_methods_contract import task_for
  task = task_for('prompt_stack')
  full = str(tmp_path / 'full')
  options = dict(train_steps=12, eval_period=2, keep_checkpoints=10, learning_rate=3.0)
  _tune(world, 'prompt_stack', full, **options)
  rows, records = prompt_stack.best_rows(full)
  evals = [r for r in read_metrics(full) if r['split'] == 'eval']
  from jaxprompt.data.tasks import member_tasks
  members = list(member_tasks(task))
  assert sorted(records) == sorted(members)
  for i, t in enumerate(members):
    curve = [(prompt_stack.selection_value(prompt_stack.task_metrics(r, members)[t], 'score'),
              -r['step']) for r in evals]
    best_value, neg_step = max(curve)
    assert (records[t]['value'], records[t]['step']) == (best_value, -neg_step)
    from jaxprompt.methods.spot import restore_stack
    np.testing.assert_array_equal(rows[i], restore_stack(full, records[t]['step'])[i])
  killed = str(tmp_path / 'killed')
  _tune(world, 'prompt_stack', killed, **dict(options, train_steps=8))
  shutil.rmtree(os.path.join(killed, 'checkpoints', '8'))  # killed before its checkpoint at 8
  os.remove(os.path.join(killed, 'summary.json'))
  _tune(world, 'prompt_stack', killed, **options, resume=True)
  again, again_records = prompt_stack.best_rows(killed)
  np.testing.assert_array_equal(again, rows)
  assert {t: r['step'] for t, r in again_records.items()} == {
      t: r['step'] for t, r in records.items()}


def test_a_run_without_validation_trains_checkpoints_and_keeps_its_final_prompt(world, tmp_path):  # noqa: F811
  """eval_split=None (the lab backbone's pretraining): no evaluator is built or run, the
  checkpoints and the final product are written, and there is no best."""
  run = str(tmp_path / 'run')
  result = _tune(world, 'prompt_tuning', run, train_steps=4, eval_period=2, eval_split=None)
  rows = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  assert rows and {r['split'] for r in rows} == {'train'}
  assert result.best_step is None and result.best_prompt_path is None
  assert os.path.exists(result.prompt_path) and result.step == 4
  assert checkpointing.Checkpointer(os.path.join(run, 'checkpoints')).all_steps()[-1] == 4
