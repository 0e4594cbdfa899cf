"""`jaxprompt lab report xprompt` (jaxprompt/lab/xprompt_study.py) and its benchmark wrapper."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from jaxprompt import cli
from conftest import REPO_ROOT


def _wrapper():
  spec = importlib.util.spec_from_file_location('xprompt_lab', REPO_ROOT / 'benchmarks' /
                                                'xprompt_lab.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bad_arguments_get_one_line_naming_the_flag(tmp_path, capsys):
  out = str(tmp_path / 'x.json')
  for bad, needle in ((['--targets', 'no_such_task'], '--targets: no_such_task: not lab tasks'),
                      (['--targets', ','], '--targets: none given'),
                      (['--seeds', '0,x'], '--seeds: comma-separated integers'),
                      (['--fractions', '0.5,1.5'], '--fractions:'),
                      (['--steps', '0'], '--steps: at least 1')):
    assert cli.main(['lab', 'report', 'xprompt', '--out', out] + bad) == 2, bad
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, (bad, err)
  (tmp_path / 'x.md').write_text('kept')  # the table beside the report counts as written too
  assert cli.main(['lab', 'report', 'xprompt', '--out', out]) == 2
  assert 'x.md: already exists; pass --overwrite' in capsys.readouterr().err
  assert not os.path.exists(out) and (tmp_path / 'x.md').read_text() == 'kept'


def test_the_benchmark_script_writes_to_benchmarks_results_by_default(capsys):
  results = REPO_ROOT / 'benchmarks' / 'results' / 'xprompt_lab.json'
  if not results.exists():
    pytest.skip(f'{results} not in this checkout')
  before = results.read_bytes()
  assert _wrapper().main(['--seeds', '0']) == 2  # refuses to replace the recorded results
  assert f'{results}: already exists' in capsys.readouterr().err
  assert results.read_bytes() == before


@pytest.mark.slow  # the full tier: builds the reduced lab backbone, six short runs
def test_lab_report_xprompt_end_to_end(tmp_path, monkeypatch, capsys, reduced_lab_cache):
  """The smallest study: one target, one seed, one fraction, 10 steps; the report and its table
  hold every row the docs read, consistent with each other and with the pruning arithmetic."""
  monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
  monkeypatch.setenv('JAXPROMPT_LAB_STEPS', '20')
  out = str(tmp_path / 'res' / 'xprompt.json')
  argv = ['lab', 'report', 'xprompt', '--targets', 'minority', '--seeds', '0', '--steps', '10',
          '--fractions', '0.5', '--backbone', 'lab', '--no_cost', '--out', out,
          '--work', str(tmp_path / 'work')]
  assert cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out)  # stdout: the summary, as JSON
  report = json.loads(open(out).read())
  assert report['summary'] == summary
  assert list(report) == ['settings', 'targets', 'by_seed', 'summary', 'cost', 'minutes',
                          'machine', 'cpus']
  assert report['cost'] is None and report['settings']['fractions'] == [0.5]
  [row] = report['targets']
  assert row['target'] == 'minority' and row['seed'] == 0
  for kind in ('importance', 'random'):
    [pruned] = row[kind]['rows']
    # Half of 20 x 16 pieces go, half of them as whole tokens (token_share 0.5): 5 tokens.
    assert (pruned['kept_pieces'], pruned['kept_tokens']) == (160, 15)
    assert pruned['trainable_parameters'] == 160 * row['width'] // 16
    for key in ('test_before', 'test_after', 'val_before', 'val_after'):
      assert 0.0 <= pruned[key] <= 100.0
  t = report['summary']['minority']
  assert t['seeds'] == [0] and t['unpruned_test']['mean'] == row['unpruned_test']
  after = row['importance']['rows'][0]['test_after']
  assert t['0.5']['importance_after']['mean'] == after
  assert t['0.5']['importance_minus_random']['mean'] == pytest.approx(
      after - row['random']['rows'][0]['test_after'])
  assert report['by_seed']['0']['mean_unpruned_test'] == row['unpruned_test']
  table = open(str(tmp_path / 'res' / 'xprompt.md')).read().splitlines()
  assert len(table) == 2 + 3 and table[4].startswith('| minority | pruned 0.5 | 15 | ')
  assert cli.main(argv) == 2  # the report exists
  assert '--overwrite' in capsys.readouterr().err
