"""What a newcomer hit in their first hour: each case reproduced, each answer one true line."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxprompt import cli
from jaxprompt.config import RunConfig


def _err(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0, err
  assert 'In call to configurable' not in err and 'Traceback' not in err
  return err


def test_folders_named_like_packages_in_the_working_directory(tmp_path):
  """`runs/`, `models/`, `prompts/` or a `jaxprompt/` folder where the command runs used to
  crash gin's file lookup (or shadow the package) after the huge-page re-exec."""
  for name in ('runs', 'models', 'prompts', 'jaxprompt'):
    (tmp_path / name).mkdir()
  script = os.path.join(os.path.dirname(sys.executable), 'jaxprompt')
  if not os.path.exists(script):
    pytest.skip('the jaxprompt console script is not installed next to this Python')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES',
                                                          'JAXPROMPT_SYSTEM_MALLOC')}
  out = subprocess.run([script, 'tune', '--model_dir', str(tmp_path / 'runs' / 'x'),
                        '--gin_file', 'runs/prompt_tune.gin'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith('jaxprompt: error')]
  assert len(lines) == 1 and '--task' in lines[0], out.stderr[-2000:]
  assert 'Path not found' not in out.stderr and 'ImportError' not in out.stderr
  assert not (tmp_path / 'runs' / 'x').exists()


def test_reexec_keeps_interpreter_flags_and_leaves_the_cwd_off_the_path(monkeypatch):
  from jaxprompt import host
  code = ('import json; from jaxprompt import host; '
          'print(json.dumps(host.reexec_argv("jaxprompt.cli", ["tune"])))')
  out = subprocess.run([sys.executable, '-X', 'utf8', '-c', code], capture_output=True,
                       text=True, timeout=120)
  import json
  argv = json.loads(out.stdout.strip().splitlines()[-1])
  assert argv[0] == sys.executable and '-P' in argv and 'utf8' in argv[argv.index('-X') + 1]
  assert argv[argv.index('-P') + 1:] == ['-m', 'jaxprompt.cli', 'tune']
  # Only on the CPU backend.
  assert not host.huge_pages_env({'JAX_PLATFORMS': 'cuda', 'PATH': '/bin'})
  del monkeypatch


def test_relative_orbax_checkpoint_path(tmp_path, monkeypatch, capsys):
  from jaxprompt.checkpoints import load_t5, save_t5x_orbax
  from jaxprompt.model import get_config, init_params
  cfg = get_config('t5_1_1_tiny')
  save_t5x_orbax(init_params(cfg, 0), str(tmp_path / 'model'), 7)
  monkeypatch.chdir(tmp_path)
  module, params = load_t5('model/checkpoint_7')
  assert module.config.emb_dim == cfg.emb_dim
  assert cli.main(['info', 'model/checkpoint_7']) == 0
  assert 'Orbax' in capsys.readouterr().out


@pytest.mark.parametrize('args, names', [
    (['--prompt_length', '-5'], ['prompt_length', 'positive']),
    (['--gin.TRAIN_STEPS=abc'], ['train_steps', 'TRAIN_STEPS', 'integer']),
    (['--gin.BATCH_SIZE=('], ['batch_size', 'BATCH_SIZE']),
    (['--gin.TRAIN_STEP=5'], ['TRAIN_STEP', 'did you mean TRAIN_STEPS']),
    (['--gin.tune.prompt_lenght=5'], ['prompt_lenght', 'tune.prompt_length']),
    (['--prompt_init', 'sampled'], ['prompt_init', 'sampled_vocab']),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, capsys, args, names):
  run = tmp_path / 'run'
  code = cli.main(['tune', '--model_dir', str(run), '--task', 'lab_has_dog', '--backbone',
                   str(tmp_path / 'nowhere')] + args)
  err = _err(capsys)
  assert code == 2 and all(n in err for n in names), err
  assert not run.exists()  # nothing written: the corrected rerun is not refused


def test_missing_model_dir_names_the_flag(capsys):
  assert cli.main(['tune', '--task', 'lab_has_dog', '--backbone', 'lab']) == 2
  assert '--model_dir' in _err(capsys)


def test_unknown_task_names_close_matches(tmp_path, capsys):
  code = cli.main(['tune', '--model_dir', str(tmp_path / 'r'), '--task', 'lab_has_dgo',
                   '--backbone', str(tmp_path / 'nowhere')])
  err = _err(capsys)
  assert code == 2 and 'lab_has_dog' in err and not (tmp_path / 'r').exists()


def test_every_flag_has_help():
  parser = cli.build_parser()
  seen = 0
  for action in parser._subparsers._group_actions:  # noqa: SLF001
    for name, sub in action.choices.items():
      for a in sub._actions:  # noqa: SLF001
        if a.option_strings and a.help != '==SUPPRESS==' and '-h' not in a.option_strings:
          assert a.help, f'jaxprompt {name} {a.option_strings[0]} has no help'
          seen += 1
  assert seen > 40


def test_cli_gin_and_api_defaults_agree():
  """RunConfig is the one home of defaults: the run files bind the same values, and the CLI's
  flags default to "not given" (None), so neither can disagree with it."""
  import gin
  gin.clear_config()
  cli._register_configurables()  # noqa: SLF001
  defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
  for run_file in ('runs/prompt_tune.gin', 'runs/model_tune.gin'):
    gin.clear_config()
    gin.parse_config_files_and_bindings([cli.resolve_gin_file(run_file)],
                                        ["MODEL_DIR = 'm'", "MIXTURE_OR_TASK_NAME = 't'",
                                         "INITIAL_CHECKPOINT_PATH = 'c'"])
    bound = gin.get_bindings('tune')
    checked = 0
    for name, value in bound.items():
      if name in defaults and name != 'method':  # the run file's own method
        assert value == defaults[name], f'{run_file}: tune.{name} = {value!r}, ' \
                                        f'RunConfig says {defaults[name]!r}'
        checked += 1
    assert checked >= 12
  gin.clear_config()
  tune_parser = cli.build_parser()._subparsers._group_actions[0].choices['tune']  # noqa: SLF001
  for a in tune_parser._actions:  # noqa: SLF001
    if a.option_strings and a.dest in defaults and a.dest != 'resume':
      assert a.default is None, f'--{a.dest} defaults to {a.default!r}; leave it to RunConfig'
  assert RunConfig().resume is False  # the CLI's --resume is off by default too
  # The task's own lengths fill what the user left, then the paper's.
  from jaxprompt.data.tasks import TASK_DEFAULTS
  from jaxprompt.tuning import resolve_config
  TASK_DEFAULTS['newcomer_task'] = {'feature_lengths': {'inputs': 10, 'targets': 9},
                                    'prompt_length': 10, 'train_steps': 300, 'eval_period': 50}
  import seqio
  seqio.TaskRegistry.remove('newcomer_task')
  seqio.TaskRegistry.add('newcomer_task', seqio.FunctionDataSource(lambda split, shuffle_files: None, ['train']),
                         output_features={})
  try:
    c = resolve_config(RunConfig(feature_lengths={'inputs': 12}), 'newcomer_task')
    assert c.feature_lengths == {'inputs': 12, 'targets': 9} and c.prompt_length == 10
    # the task's own schedule, the paper's where the task says nothing, a flag over both
    assert (c.train_steps, c.eval_period, c.batch_size) == (300, 50, 32)
    c = resolve_config(RunConfig(train_steps=7, batch_size=4), 'newcomer_task')
    assert (c.train_steps, c.eval_period, c.batch_size) == (7, 50, 4)
  finally:
    seqio.TaskRegistry.remove('newcomer_task')
    del TASK_DEFAULTS['newcomer_task']


def test_lab_tasks_carry_a_schedule_of_minutes():
  """`jaxprompt tune --task lab_has_green --backbone lab` (docs/spot.md) runs the lab's own
  300 steps, validating every 50, not the paper's 30,000; a real task keeps the paper's."""
  from jaxprompt.data.tasks import TASK_DEFAULTS
  from jaxprompt.lab.tasks import LAB_SCHEDULE
  from jaxprompt.tuning import resolve_config
  from jaxprompt.lab import register_lab_tasks
  register_lab_tasks()
  assert TASK_DEFAULTS['lab_has_green']['train_steps'] == LAB_SCHEDULE['train_steps'] == 300
  c = resolve_config(RunConfig(), 'lab_has_green')
  assert (c.train_steps, c.eval_period, c.batch_size) == (300, 50, 32)


def test_export_to_peft_from_the_command_line(tmp_path, capsys):
  from jaxprompt.prompts.files import read_prompt, write_prompt
  value = np.random.RandomState(0).normal(size=(4, 8)).astype(np.float32)
  prompt = write_prompt(str(tmp_path / 'p.safetensors'), value, task='t')
  out = str(tmp_path / 'adapter')
  assert cli.main(['export', '--to', 'peft', '--prompt', prompt, '--out', out]) == 0
  capsys.readouterr()
  np.testing.assert_array_equal(read_prompt(out).value, value)
  assert cli.main(['export', '--to', 'peft', '--prompt', prompt, '--out', out]) == 2
  assert 'overwrite' in _err(capsys)
  assert cli.main(['info', out]) == 0
  assert 'length 4' in capsys.readouterr().out


def test_a_model_gin_file_binds_the_backbone_config(tmp_path, capsys):
  """The model gin files bind `tune.config`: a real-checkpoint command gets as far as reading
  the checkpoint (here: absent), not an "unknown option" error."""
  code = cli.main(['tune', '--gin_file=models/t5_1_1/small.gin',
                   '--gin_file=runs/prompt_tune.gin', '--model_dir', str(tmp_path / 'r'),
                   '--task', 'lab_has_dog', '--backbone', str(tmp_path / 'ckpt')])
  err = _err(capsys)
  assert code == 2 and 'no such file or directory' in err and 'ckpt' in err, err


@pytest.mark.parametrize('lab_steps', [None, 7])
def test_lab_path_answers_without_loading_tensorflow(tmp_path, lab_steps):
  """`jaxprompt lab path` prints a cached backbone's path from the cache's name alone (it took
  12 s and 950 MB when it loaded TensorFlow and seqio to print a path); with
  $JAXPROMPT_LAB_STEPS it names the backbone `--backbone lab` uses (it built the full one)."""
  code = textwrap.dedent(f'''
      import os, sys
      os.environ['JAXPROMPT_CACHE'] = {str(tmp_path)!r}
      os.environ.pop('JAXPROMPT_LAB_STEPS', None)
      if {lab_steps!r}:
        os.environ['JAXPROMPT_LAB_STEPS'] = str({lab_steps!r})
      from jaxprompt.lab import backbone
      out = backbone.backbone_dir({lab_steps!r})
      os.makedirs(out)
      open(os.path.join(out, 'manifest.json'), 'w').write('{{}}')
      from jaxprompt import cli
      assert cli.main(['lab', 'path']) == 0
      heavy = sorted(m for m in ('tensorflow', 'seqio', 'orbax') if m in sys.modules)
      print('HEAVY', heavy)
  ''')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'HEAVY []' in done.stdout, done.stdout
  assert str(tmp_path) in done.stdout
  from jaxprompt.lab.backbone import BUILD_STEPS
  assert f'_{lab_steps or BUILD_STEPS}steps_' in done.stdout


@pytest.mark.slow  # builds a reduced lab backbone and tunes 300 steps: a few minutes
def test_the_readme_next_steps_then_the_tests_from_the_same_folder(tmp_path, reduced_lab_cache):
  """The README's "Next steps" as written, from a fresh working folder (their `runs/` folder
  is then a namespace package on `python -m pytest`'s path), then part of the test suite from
  that same folder: all pass. `lab report sources` (18 min on 2 cores) is left out; the methods
  backbone is built at JAXPROMPT_LAB_STEPS, the smaller setting the tests use."""
  import re
  from conftest import REPO_ROOT
  text = (REPO_ROOT / 'README.md').read_text()
  block = text.split('## Next steps on the lab', 1)[1].split('```', 2)[1]
  commands = [re.sub(r'\s+#.*$', '', line).split()[1:] for line in block.splitlines()
              if line.startswith('.venv/bin/jaxprompt')]
  assert [c[:2] for c in commands][:3] == [['tune', '--task'], ['eval', '--task'],
                                          ['info', 'runs/has_dog']]
  env = dict(os.environ, JAXPROMPT_CACHE=reduced_lab_cache, JAXPROMPT_LAB_STEPS='20')
  work = tmp_path / 'work'
  work.mkdir()
  for args in commands:
    if args[:3] == ['lab', 'report', 'sources']:
      continue
    done = subprocess.run([sys.executable, '-m', 'jaxprompt.cli', *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (args, done.stderr[-2000:])
  assert (work / 'runs' / 'has_dog' / 'prompt_best.safetensors').exists()
  (work / 'tests').symlink_to(REPO_ROOT / 'tests')
  done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                         '-m', 'not slow', 'tests/test_newcomer.py'],
                        cwd=work, env=env, capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stdout[-3000:]
