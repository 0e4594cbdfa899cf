"""What a newcomer still tripped on (issue 33): each case reproduced, each answer one true line."""

import argparse
import json
import os
import pathlib
import re
import time
import types

import numpy as np
import pytest

from jaxprompt import cli

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and err.startswith('jaxprompt: error: '), err
  assert 'usage:' not in err and 'Traceback' not in err
  return err


def _subcommands(parser, path=()):
  """(argv prefix, parser) of every leaf (sub)command of the `jaxprompt` parser."""
  subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  if not subs:
    yield path, parser
  for action in subs:
    for name, child in action.choices.items():
      yield from _subcommands(child, path + (name,))


def _study_parsers():
  """The lab's studies parse their own options (`jaxprompt lab report STUDY`, the aliases)."""
  import importlib
  for argv in [('lab', 'report', s) for s in cli.LAB_STUDIES] + list(cli.STUDY_ALIASES):
    study = cli._lab_study(list(argv))
    module = importlib.import_module(study[0])
    build = getattr(module, 'build_parser', None) or module.parser
    yield argv, build(study[2])


def _typo_cases():
  seen = []
  for argv, parser in list(_subcommands(cli.build_parser())) + list(_study_parsers()):
    args = []
    for a in parser._actions:  # what the command requires, so only the typo is wrong
      if a.required and a.option_strings:
        args += [a.option_strings[0]] + ([str(next(iter(a.choices)))] if a.choices else ['1'])
      elif a.required or (not a.option_strings and a.nargs in (None, '?')):
        args.append(str(next(iter(a.choices))) if a.choices else 'x')
    longs = [s for a in parser._actions for s in a.option_strings
             if s.startswith('--') and s != '--help' and a.help != argparse.SUPPRESS]
    flag = max(longs, key=len)  # the longest option, one letter dropped from its middle
    typo = flag[:len(flag) // 2 + 1] + flag[len(flag) // 2 + 2:]
    seen.append(pytest.param(list(argv) + args, typo, flag, id='_'.join(argv)))
  return seen


@pytest.mark.parametrize('argv, typo, flag', _typo_cases())
def test_a_typod_flag_is_one_line_naming_the_close_match(capsys, argv, typo, flag):
  with pytest.raises(SystemExit) as e:
    cli.main(argv + [typo, '0.3'])
  assert e.value.code == 2
  err = _one_error_line(capsys)
  assert f'unrecognized argument {typo}; did you mean ' in err and flag in err, err


def test_the_issues_typos(capsys):
  for typo, flag in (('--learing_rate', '--learning_rate'), ('--prompt_lenght', '--prompt_length')):
    with pytest.raises(SystemExit):
      cli.main(['tune', '--task', 'lab_has_dog', '--backbone', 'lab', '--steps', '50', typo,
                '0.3', '--model_dir', 'runs/bad_flag'])
    assert _one_error_line(capsys) == (f'jaxprompt: error: unrecognized argument {typo}; '
                                       f'did you mean {flag}?')
  assert not os.path.exists('runs/bad_flag')


def test_lab_report_announces_the_file_it_writes_before_starting(tmp_path, monkeypatch, capsys):
  from jaxprompt.lab import backbone

  def stop(**kwargs):
    raise RuntimeError('stopped before building')

  monkeypatch.setattr(backbone, 'build', stop)
  monkeypatch.chdir(tmp_path)
  for what, default in (('sources', 'lab_sources.json'), ('transfer', 'lab_transfer.json'),
                        ('targets', 'lab_report.json')):
    assert cli.main(['lab', 'report', what]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f'lab report{"" if what == "targets" else " " + what}: writes ' \
                     f'{tmp_path / default} at the end', err
    assert err[1] == 'jaxprompt: error: stopped before building'
    # --help names the same default
    help_text = ' '.join(cli.build_parser()._subparsers._group_actions[0].choices['lab']
                         ._subparsers._group_actions[0].choices['report'].format_help().split())
    assert default in help_text
  assert os.listdir(tmp_path) == []


def test_readme_states_no_exact_test_counts():
  """Counts go stale with every test added (the README said 473 / 86, 452 / 82 were collected)."""
  assert not re.findall(r'\b\d+ tests\b', README.read_text())


def test_the_methods_backbone_claim_is_the_measured_spread():
  """README's Status states the `methods` backbone's sources as measured on every recorded
  machine (benchmarks/results/lab_sources_methods*.json), lowest first, not one machine's bar."""
  results = sorted(README.parent.glob('benchmarks/results/lab_sources_methods*.json'))
  assert len(results) >= 2
  prefixed, ratio = [], []
  for path in results:
    rows = json.loads(path.read_text())['sources']
    goal = {k: v for k, v in rows.items() if k not in ('parity', 'copy', 'reverse')}
    prefixed.append(min(r['prefixed'] for r in goal.values()))
    ratio.append(min(r['ratio'] for r in goal.values()))
  status = next(line for line in README.read_text().splitlines() if line.startswith('| lab '))
  assert f'{min(prefixed):.1f}' in status and f'{min(ratio):.2f}' in status, status
  assert f'{len(results)} machines' in status, status


def test_a_prompt_of_another_backbone_is_one_plain_warning_then_evaluates(tmp_path, monkeypatch,
                                                                         capsys):
  from jaxprompt import evaluate as evaluate_lib
  from jaxprompt.methods import Context, get_method
  from jaxprompt.prompts.files import write_prompt
  prompt = write_prompt(str(tmp_path / 'p.safetensors'), np.ones((3, 8)), backbone='/ckpt/a',
                        backbone_fingerprint='sha256:aaaa')
  b = types.SimpleNamespace(module=types.SimpleNamespace(config=types.SimpleNamespace(emb_dim=8)),
                            fingerprint='sha256:bbbb', name='/ckpt/b', path='/ckpt/b')

  def fake_evaluate(task, *, backbone, prompt, **kwargs):  # loads the product as eval does
    get_method('prompt_tuning').load_product(prompt, Context(b, task, (task,), *[None] * 4))
    return {'accuracy': 50.0}

  monkeypatch.setattr(evaluate_lib, 'evaluate', fake_evaluate)
  assert cli.main(['eval', '--task', 'lab_has_dog', '--backbone', '/ckpt/b', '--prompt',
                   prompt]) == 0
  out = capsys.readouterr()
  assert out.err.strip() == (f'jaxprompt: warning: {prompt}: prompt was trained for backbone '
                             '/ckpt/a (sha256:aaaa), now used with /ckpt/b (sha256:bbbb)')
  assert 'accuracy' in out.out and '50.0000' in out.out


def test_the_demo_summary_gives_best_and_final():
  from jaxprompt.lab.demo import summary_line
  from jaxprompt.tuning import TuneResult
  result = TuneResult('run', 300, 200, {'accuracy': 95.5}, {'accuracy': 51.0},
                      {'step': 300, 'accuracy': 80.5}, None, None, None)
  line = summary_line('lab_has_green', result)
  assert '51.0%' in line and '95.5% best (step 200' in line and '80.5% final (step 300)' in line


def test_a_finished_run_keeps_no_lock_and_a_rerun_says_it_is_finished(tmp_path):
  from jaxprompt.train import checkpointing
  run = str(tmp_path / 'run')
  manifest = {'method': 'prompt_tuning', 'backbone': 'x', 'task': 't', 'seed': 0,
              'batch_size': 8}
  lock = checkpointing.hold_run_dir(run, manifest, resume=False)
  assert os.path.exists(os.path.join(run, checkpointing.LOCK))
  lock.release()  # as tuning does when the run ends
  assert os.listdir(run) == ['manifest.json']
  with pytest.raises(checkpointing.RunDirectoryError, match='pass --resume'):
    checkpointing.check_run_dir(run, manifest, resume=False)  # stopped, not finished
  with open(os.path.join(run, 'summary.json'), 'w') as f:
    json.dump({'step': 4, 'train_steps': 4}, f)
  with pytest.raises(checkpointing.RunDirectoryError) as e:
    checkpointing.check_run_dir(run, manifest, resume=False)
  assert 'finished' in str(e.value) and 'new --model_dir' in str(e.value)
  assert 'pass --resume to continue' not in str(e.value)
  # One holder at a time still, across a release that removes the file.
  first = checkpointing.RunLock(run).acquire()
  with pytest.raises(checkpointing.RunDirectoryError, match='in use'):
    checkpointing.RunLock(run).acquire()
  first.release()
  checkpointing.RunLock(run).acquire().release()


def test_the_bar_counts_steps_that_ran(tmp_path, monkeypatch):
  """Steps run slower than they are dispatched (jax dispatches asynchronously): the bar must
  count a step once it has run (one more may be in flight), not when it was dispatched."""
  import jax
  import jax.numpy as jnp
  import tqdm.auto
  from jaxprompt.train import loop
  from jaxprompt.train.steps import TrainState

  @jax.jit
  def heavy(x):  # milliseconds on a CPU core, far more than a dispatch
    for _ in range(4):
      x = jnp.tanh(x @ x)
    return x

  outputs, counted = [], []

  def train_step(state, frozen, batch, rng):
    y = heavy(state.trainable)
    outputs.append(y)
    one = jnp.float32(1.0)
    return TrainState(state.step + 1, y, ()), {
        'loss': jnp.sum(y), 'weight_sum': one, 'num_correct': one, 'z_loss': one,
        'grad_norm': one, 'trainable_norm': one, 'nonfinite': jnp.bool_(False)}

  class Bar:
    def __init__(self, *args, initial=0, **kwargs):
      self.n = initial

    def update(self, n):
      self.n += n
      counted.append((self.n, sum(bool(y.is_ready()) for y in outputs)))

    def set_postfix(self, **kwargs):
      pass

    def close(self):
      pass

  monkeypatch.setattr(tqdm.auto, 'tqdm', Bar)
  x = jnp.full((128, 128), 0.01, jnp.float32)
  heavy(x).block_until_ready()
  config = loop.LoopConfig(train_steps=12, eval_period=12, log_period=12, progress=True,
                           keep_checkpoints=1)
  loop.train_loop(train_step, TrainState(jnp.int32(0), x, ()), (),
                  lambda pos: iter([{}] * 20), jax.random.PRNGKey(0), str(tmp_path / 'r'), config)
  assert [n for n, _ in counted] == list(range(1, 13))
  assert all(ran >= n - 1 for n, ran in counted), counted


def test_info_of_a_missing_path_names_every_kind_it_takes(capsys):
  assert cli.main(['info', 'runs/nope']) == 2
  err = _one_error_line(capsys)
  for kind in ('run directory', 'prompt file', 'PEFT adapter', 'library', 'checkpoint'):
    assert kind in err, err


def test_compare_prints_no_spread_for_one_seed():
  from jaxprompt.methods.compare import Row, format_table
  table = format_table([Row('prompt_tuning', [80.0], 100, 1.0, 10.0),
                        Row('model_tuning', [70.0, 72.0], 1000, 2.0, 20.0)], 'task', 10)
  one, two = table.splitlines()[-2:]
  assert '80.00 (n=1)' in one and '+-' not in one
  assert '71.00 +- 1.41 (n=2)' in two


def test_eval_of_a_file_that_is_no_prompt_says_so(capsys):
  assert cli.main(['eval', '--task', 'lab_has_dog', '--backbone', 'lab', '--prompt',
                   str(README)]) == 2
  err = _one_error_line(capsys)
  assert err == (f'jaxprompt: error: {README}: not a prompt file (expected .safetensors, .npy '
                 'or a PEFT adapter folder)')
