"""Each method doc's lab commands, as written, from a fresh working folder; then part of the test
suite from the folder docs/spot.md's commands left (issue 21). The first `spot lab` and
`transfer lab` are then killed and resumed in a copy (tests/test_resume_stages.py's drills). And
the CLI's start-up says nothing a user need not see.

A command is taken from a doc's fenced blocks (continuation lines joined, comments dropped) and
its inline code spans. Skipped, each for a stated reason: a block or span naming `/ckpts` (the
paper-scale commands: real checkpoints), and synopses with placeholders (`LIB`, `CKPT`, `...`).
The rest run as the `jaxprompt` console script with the same argument strings; optional `[...]`
parts are run too. Where a command would take more than about a minute on 2 cores, a small-CI
override is appended (argparse and gin take the last value), listed in SMALL below; the lab
backbones are built at JAXPROMPT_LAB_STEPS steps, as the other lab tests do.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'jaxprompt')
LAB_STEPS = '20'
# What a CPU-only user need not see: libtpu probing for a TPU, TensorFlow's native start-up.
NOISE = ('Failed to find host bounds', 'TPU_WORKER_HOSTNAMES', 'Source Location Trace',
         'oneDNN', 'cudart_stub', 'cuInit', 'Logging before InitGoogle')
PLACEHOLDER = re.compile(r'(^|[\s=:,/])(LIB\w*|CKPT\w*|DIR|FILE|PROMPT_FILE|T\d|B|WORK|N)'
                         r'($|[\s,:/])|\.\.\.|\$|\|')

# Appended to a documented command (first words -> extra arguments) where, as written, it would
# take more than about a minute here. Everything else runs exactly as written.
SMALL = {
    ('spot', 'sources'): ['--steps', '20', '--eval_period', '10', '--embedding_steps', '10'],
    ('tune',): ['--steps', '10', '--eval_period', '5'],
    ('tune', '--gin_file=runs/xprompt.gin'): ['--gin.TRAIN_STEPS=10', '--gin.EVAL_PERIOD=5'],
    ('spot', 'embed'): ['--steps', '10'],
    ('spot', 'lab'): ['--sources', 'has_red,majority', '--targets', 'minority',
                      '--source_steps', '4', '--source_batch', '2', '--source_eval_period', '2',
                      '--embedding_steps', '2', '--target_steps', '4', '--target_batch', '2',
                      '--eval_period', '2', '--max_eval_examples', '4', '--top_k', '2'],
    ('prune',): ['--fractions', '0.3,0.6', '--importance_batches', '2',
                 '--max_eval_examples', '20'],
    ('lab', 'build'): ['--steps', LAB_STEPS],
    ('transfer', 'lab'): ['--tasks', 'has_red,majority,minority',
                          '--projector_train', 'has_red,majority',
                          '--steps', '4', '--steps_b', '4', '--per_task_batch', '2',
                          '--projector_steps', '4', '--distance_steps', '5', '--hidden', '16',
                          '--source_build_steps', LAB_STEPS, '--max_eval_examples', '8',
                          '--init_steps', '2', '--init_eval_period', '2',
                          '--init_targets', 'minority,majority,has_red'],
}


def _commands_of(text: str) -> list[str]:
  """The doc's `jaxprompt ...` commands, in order: each a whitespace-normalised string."""
  found = []  # (position, command)
  for block in re.finditer(r'```[a-z]*\n(.*?)```', text, re.S):
    body = block.group(1).replace('\\\n', ' ')
    for line in body.splitlines():
      line = re.sub(r'\s+#.*$', '', line).strip()
      line = re.sub(r'^(nice -n \d+ )?(\.venv/bin/)?', '', line)
      if line.startswith('jaxprompt '):
        found.append((block.start(), ' '.join(line.split()), '/ckpts' in body))
  prose = re.sub(r'```.*?```', lambda m: ' ' * len(m.group(0)), text, flags=re.S)
  for span in re.finditer(r'`((?:nice -n \d+ )?(?:\.venv/bin/)?jaxprompt [^`]*)`', prose):
    command = ' '.join(span.group(1).split())
    if ' --' in command:  # a command, not a command's name
      found.append((span.start(), command, '/ckpts' in command))
  return [(c, paper) for _, c, paper in sorted(found, key=lambda f: f[0])]


def lab_commands(doc: str) -> tuple[list[list[str]], list[tuple[str, str]]]:
  """(the doc's lab commands as argument lists, [(skipped command, why)])."""
  run, skipped = [], []
  for command, paper in _commands_of((REPO_ROOT / doc).read_text()):
    if paper:
      skipped.append((command, 'paper scale: a real checkpoint under /ckpts'))
    elif PLACEHOLDER.search(command.replace('[', ' ').replace(']', ' ')):
      skipped.append((command, 'a synopsis: its arguments are placeholders'))
    else:
      args = shlex.split(command.replace('[', '').replace(']', ''))
      run.append(args[1:])
  return run, skipped


def _small(args: list[str]) -> list[str]:
  """`args` with its SMALL override; a lab study's work folder kept in the test's folder."""
  if args[1:2] == ['lab'] and ('--work' not in args or
                               os.path.isabs(args[args.index('--work') + 1])):
    args = args + ['--work', f'{args[0]}_lab_work']
  for n in (2, 1):
    if tuple(args[:n]) in SMALL:
      return args + SMALL[tuple(args[:n])]
  return args


def _env(cache: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS')}
  # libtpu's lock file may be held by another process on this machine, which would hide its
  # start-up lines: let it load as it would on a machine of its own.
  env.update(JAXPROMPT_CACHE=cache, JAXPROMPT_LAB_STEPS=LAB_STEPS, ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  return env


def run_cli(args, cwd, env, timeout=900) -> subprocess.CompletedProcess:
  start = time.monotonic()
  done = subprocess.run([SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  print(f'{time.monotonic() - start:5.1f} s: jaxprompt {" ".join(args)}')  # shown on a failure
  assert done.returncode == 0, (args, done.stderr[-3000:])
  noise = [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)]
  assert not noise, (args, noise)
  return done


def _tests_from(work, env) -> None:
  """Part of the test suite, run from the folder the commands left (their `runs/`, `lib/`,
  `benchmarks/` ... are then on `python -m pytest`'s path)."""
  (work / 'tests').symlink_to(REPO_ROOT / 'tests')
  done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                         '-m', 'not slow', '-k', 'folders or agree or every_flag or lab_path',
                         'tests/test_newcomer.py'],
                        cwd=work, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:]


def _transfer_results(path) -> None:
  """`transfer.json` in the format docs/spot.md gives for `spot evaluate` (scores made up: the
  command's input, not a measurement)."""
  targets, sources = ['lab_has_green', 'lab_minority'], ['lab_has_red', 'lab_majority', 'x']
  rng = np.random.RandomState(0)
  path.write_text(json.dumps({
      'targets': targets, 'sources': sources,
      'scores': rng.uniform(40, 90, (2, 3)).round(1).tolist(),
      'no_transfer': {t: 50.0 for t in targets},
      'similarity': rng.uniform(-1, 1, (2, 3)).round(3).tolist()}))


DOCS = {
    'docs/spot.md': 5,
    'docs/xprompt.md': 2,
    'docs/transferability.md': 2,
}


def test_each_doc_lists_its_lab_commands():
  """The extraction finds the commands the docs show (a doc that gains one is walked too)."""
  for doc, count in DOCS.items():
    run, skipped = lab_commands(doc)
    assert len(run) >= count, (doc, run)
    assert all('/ckpts' not in ' '.join(a) for a in run)
    assert skipped, doc  # each also shows paper-scale commands or synopses, skipped
  run, _ = lab_commands('docs/spot.md')
  assert [a[:2] for a in run[:4]] == [['spot', 'sources'], ['tune', '--task'],
                                      ['spot', 'embed'], ['spot', 'rank']]


def _last(args: list[str], flag: str) -> str:
  """The value of `flag`'s last occurrence (argparse's, where a SMALL override repeats it)."""
  return args[max(i for i, a in enumerate(args) if a == flag) + 1]


@pytest.mark.slow  # runs each doc's lab commands (small CI settings): minutes
@pytest.mark.parametrize('doc', sorted(DOCS))
def test_a_docs_lab_commands_as_written_then_the_tests(doc, tmp_path, reduced_lab_cache,
                                                       monkeypatch, capsys):
  """The first `spot lab` and `transfer lab` run as written is then the unkilled reference of
  its resume drill (tests/test_resume_stages.py), which kills and reruns a copy of it."""
  import test_resume_stages as drills
  env = _env(reduced_lab_cache)
  work = tmp_path / 'work'
  work.mkdir()
  run, _ = lab_commands(doc)
  drilled = set()
  for args in run:
    if args[:2] == ['spot', 'evaluate']:
      _transfer_results(work / args[args.index('--results') + 1])
    args = _small(args)
    drill = args[0] if args[1:2] == ['lab'] and args[0] in ('spot', 'transfer') and \
        args[0] not in drilled else None
    if drill == 'transfer':
      # Backbone B built beforehand, so that the run and its drill both load it from the cache
      # (a run building it in-process scored the projector rows differently: issue 21's report).
      from jaxprompt.lab import transfer_report
      monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
      transfer_report.source_backbone(transfer_report.parser().parse_args(args[2:]))
    done = run_cli(args, work, env)
    if args[:2] == ['spot', 'rank']:
      assert 'lab_has_red' in done.stdout and 'lab_majority' in done.stdout
    if drill == 'spot':
      drills.spot_lab_drill(args, str(work), env, (done.stdout, work / _last(args, '--out')),
                            monkeypatch, capsys)
    if drill == 'transfer':
      drills.transfer_lab_drill(args, str(work), env, work / _last(args, '--out'))
    if drill:
      drilled.add(drill)
  assert drilled == {'docs/spot.md': {'spot'}, 'docs/transferability.md': {'transfer'}}.get(
      doc, set())
  if doc == 'docs/spot.md':
    assert json.loads((work / 'lib' / 'index.json').read_text())['entries'].keys() == {
        'lab_has_red', 'lab_count_colours', 'lab_majority'}
    assert (work / 'runs' / 'green' / 'prompt_best.safetensors').exists()
    # The tests from the folder the commands left (spot.md's leaves runs/, lib/, benchmarks/:
    # the folder names the other docs' commands leave too).
    _tests_from(work, env)
  if doc == 'docs/xprompt.md':
    assert (work / 'runs' / 'xp' / 'xprompt' / 'xprompt_best.safetensors').exists()


def test_cli_start_up_is_quiet_on_a_cpu_machine(tmp_path):
  """No libtpu TPU probing and no TensorFlow native start-up lines on stderr where there is no
  accelerator (libtpu installed as the `tpu` extra): `lab path`, `tune --help`, `info` of a
  checkpoint (which starts jax's backends)."""
  if not os.path.exists(SCRIPT):
    pytest.skip('the jaxprompt console script is not installed next to this Python')
  from jaxprompt import cli
  environ = {'JAX_PLATFORMS': 'tpu'}
  cli.skip_absent_tpu(['tune'], environ)
  assert environ['JAX_PLATFORMS'] == 'tpu'  # the user's choice stands
  from jaxprompt.checkpoints import save_t5x_orbax
  from jaxprompt.model import get_config, init_params
  save_t5x_orbax(init_params(get_config('t5_1_1_tiny'), 0), str(tmp_path / 'model'), 1)
  from jaxprompt.lab import backbone
  built = backbone.backbone_dir(int(LAB_STEPS), cache_dir=str(tmp_path / 'cache' / 'lab'))
  os.makedirs(built)
  (tmp_path / built / 'manifest.json').write_text('{}')  # `lab path` answers from the name
  env = _env(str(tmp_path / 'cache'))
  for args in (['lab', 'path'], ['tune', '--help'], ['info', 'model/checkpoint_1']):
    done = run_cli(args, tmp_path, env, timeout=300)
    if args == ['lab', 'path']:
      assert done.stdout.strip() == backbone.checkpoint_path(built, int(LAB_STEPS))
