"""Multi-stage commands resume after a kill (issue 21): `spot lab`, `transfer lab` and
`project train`, each on a tiny lab setting, killed (SIGKILL) in the middle of a later stage's
run, then run again as they were. The rerun finishes, reuses the finished stages, continues the
killed run (no step trained twice), and ends with the products of an unkilled run.

The unkilled `spot lab` and `transfer lab` runs are docs/spot.md's and docs/transferability.md's
own commands, run by tests/test_docs_walk.py, which then runs the drills here on them."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'jaxprompt')
pytestmark = [pytest.mark.slow,  # each command runs three times (unkilled, killed, rerun)
              pytest.mark.skipif(not os.path.exists(SCRIPT),
                                 reason='the jaxprompt console script is not installed')]


@pytest.fixture
def env(reduced_lab_cache):
  return dict(os.environ, JAXPROMPT_CACHE=reduced_lab_cache, JAXPROMPT_LAB_STEPS='20')


def run(args, cwd, env) -> subprocess.CompletedProcess:
  done = subprocess.run([SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=1200)
  assert done.returncode == 0, (args, done.stderr[-3000:])
  return done


def run_and_kill(args, cwd, env, pattern: str) -> None:
  """Starts the command and SIGKILLs it as soon as a file matching `pattern` (under `cwd`)
  exists: in the middle of that stage's run."""
  proc = subprocess.Popen([SCRIPT, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True)
  deadline = time.time() + 1200
  while not glob.glob(os.path.join(cwd, pattern)):
    assert proc.poll() is None, (f'ended before {pattern} appeared',
                                 proc.stderr.read().decode()[-3000:])
    assert time.time() < deadline
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stderr.close()


def train_steps(run_dir) -> list[int]:
  rows = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
  return [r['step'] for r in rows if r.get('split') == 'train']


def without_times(value):
  """The results with wall times, paths and per-run settings left out."""
  if isinstance(value, dict):
    return {k: without_times(v) for k, v in value.items()
            if not any(w in k for w in ('seconds', 'minutes', 'settings', 'path', 'work'))}
  if isinstance(value, list):
    return [without_times(v) for v in value]
  return value


def check_spot_lab_products(text: str, out) -> None:
  """What an unkilled `spot lab` (sources has_red, majority; target minority) prints and writes:
  its table, the result files, one row per transfer source and the retrieval evaluation."""
  assert '| minority |' in text and 'Retrieval evaluation (shared' in text
  for suffix in ('', '_retrieval_shared', '_retrieval_independent'):
    for ext in ('json', 'csv', 'md', 'png'):
      assert os.path.getsize(f'{out}{suffix}.{ext}') > 0, (suffix, ext)
  res = json.loads(open(f'{out}.json').read())
  row = res['targets']['minority']
  # 3 prompt-tuning / generic rows, 2 weighted averages, 2 sources: equal budgets in one run.
  assert res['settings']['transfer_rows'] == 7
  assert set(row['by_source']) == {'has_red', 'majority'}
  assert row['oracle']['score'] == max(row['by_source'].values())
  assert set(row['best_retrieved']) == {'shared', 'independent'}
  assert row['model_tuning'] is not None and 'gap_closed' in row
  assert row['same_skill']['sources'] == ['majority']
  assert row['unrelated']['sources'] == ['has_red']
  assert {'shared/per_token', 'shared_delta/per_token', 'independent/avg_tokens'} <= set(
      res['retrieval'])
  # A target whose independent weighted average is undefined (top-k similarities summing to
  # <= 0, as minority's did on the `methods` backbone) is reported with '-', not a KeyError.
  from jaxprompt.lab import spot_study
  row['weighted_average'].pop('independent', None)
  row['gap_closed'].pop('weighted_average_independent', None)
  row['pt_short'] = True
  other = dict(row, gap_closed=dict(row['gap_closed'], weighted_average_independent=0.5))
  res['targets'] = {'other': other, 'minority': row}  # the undefined one second
  table = spot_study.format_lab_evidence(res)
  assert '| minority |' in table and '| other |' in table and 'weighted_average_independent' in table


def spot_lab_drill(args, cwd, env, reference, monkeypatch, capsys) -> None:
  """`spot lab` `args` (sources has_red, majority; target minority, 4 target steps), already run
  unkilled (`reference`: (its output, its --out)): its products checked; run again in another
  work folder, killed in the middle of the transfer stage and rerun; then refused when finished,
  and with --overwrite it reuses all five stages."""
  text, reference_out = reference
  check_spot_lab_products(text, reference_out)
  argv = list(args) + ['--work', 'drill', '--out', 'drill_results']
  run_and_kill(argv, cwd, env, 'drill/transfer/checkpoints/2')
  done = run(argv, cwd, env)
  said = done.stdout + done.stderr
  for stage in ('sources', 'generic', 'embeddings'):
    assert f'{stage}: reusing' in said, said[-3000:]
  assert 'transfer: reusing' not in said and 'transfer from step 2' in said
  assert train_steps(os.path.join(cwd, 'drill', 'transfer')) == [2, 4]  # step 2 not trained twice
  got = json.loads(open(os.path.join(cwd, 'drill_results.json')).read())
  want = json.loads(open(f'{reference_out}.json').read())
  assert without_times(got['targets']) == without_times(want['targets'])
  assert without_times(got['retrieval']) == without_times(want['retrieval'])
  # Finished: the same command is refused (one line, nothing overwritten); with --overwrite it
  # reuses all five stages and writes the same rows.
  from jaxprompt import cli
  monkeypatch.chdir(cwd)
  for key in ('JAXPROMPT_CACHE', 'JAXPROMPT_LAB_STEPS'):
    monkeypatch.setenv(key, env[key])
  capsys.readouterr()
  assert cli.main(argv) == 2 and '--overwrite' in capsys.readouterr().err
  assert cli.main(argv + ['--overwrite']) == 0
  assert capsys.readouterr().out.count(': reusing ') == 5  # sources ... transfer, model tuning
  again = json.loads(open(os.path.join(cwd, 'drill_results.json')).read())
  assert again['targets']['minority']['by_source'] == got['targets']['minority']['by_source']


def transfer_lab_drill(args, cwd, env, reference_out) -> None:
  """`transfer lab` `args` (4 projector steps), already run unkilled with its results at
  `reference_out` (backbone B built before it): run again in another work folder without the
  init stage, killed in the middle of the task projector's run and rerun."""
  argv = list(args) + ['--skip', 'init', '--work', 'drill', '--out', 'drill.json']
  run_and_kill(argv, cwd, env, 'drill/projector_task_run/checkpoints/2')
  done = run(argv, cwd, env)
  said = done.stdout + done.stderr
  for stage in ('library_a', 'zero_shot', 'library_b'):
    assert f'{stage}: reusing' in said, said[-3000:]
  assert train_steps(os.path.join(cwd, 'drill', 'projector_task_run')) == [1, 2, 3, 4]
  got = json.loads(open(os.path.join(cwd, 'drill.json')).read())
  want = json.loads(open(reference_out).read())
  for part in ('zero_shot', 'spearman', 'projector'):
    assert part in want, part
    assert without_times(got[part]) == without_times(want[part]), part


def test_project_train_resumes_after_a_kill(tmp_path, env):
  run(['spot', 'sources', '--tasks', 'lab_has_red,lab_majority,lab_minority', '--library', 'lib',
       '--backbone', 'lab', '--steps', '2', '--batch_size', '6', '--eval_period', '2'],
      tmp_path, env)

  def argv(out):
    return ['project', 'train', '--objective', 'task', '--tasks', 'lab_has_red,lab_majority',
            '--source_library', 'lib', '--target_backbone', 'lab', '--out', out, '--steps', '6',
            '--batch_size', '4', '--eval_period', '2', '--hidden', '16',
            '--max_eval_examples', '8']
  run(argv('reference.safetensors'), tmp_path, env)
  run_and_kill(argv('proj.safetensors'), tmp_path, env, 'proj_run/checkpoints/2')
  assert not (tmp_path / 'proj.safetensors').exists()
  run(argv('proj.safetensors'), tmp_path, env)
  assert train_steps(tmp_path / 'proj_run') == [2, 4, 6]
  from safetensors.numpy import load_file
  got, want = load_file(tmp_path / 'proj.safetensors'), load_file(tmp_path / 'reference.safetensors')
  assert got.keys() == want.keys() and any(k.startswith('projector/') for k in got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Finished: the same command again is refused (one line), nothing overwritten.
  again = subprocess.run([SCRIPT, *argv('proj.safetensors')], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 2 and '--overwrite' in again.stderr
