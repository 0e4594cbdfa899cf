"""The `jaxprompt` command and the shipped gin files, end to end on files the test writes."""

import glob
import json
import os

import gin
import numpy as np
import pytest

import data_helpers
from jaxprompt import cli
from jaxprompt.checkpoints import save_t5x_legacy
from jaxprompt.model import get_config, init_params

GIN_DIR = os.path.join(os.path.dirname(cli.__file__), 'gin')
REQUIRED = ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'x'", "INITIAL_CHECKPOINT_PATH = '/c'",
            "PROMPT_FILE = '/p.safetensors'"]


def _register_configurables():
  gin.clear_config()
  cli._register_configurables()


@pytest.mark.parametrize('model_file', sorted(glob.glob(os.path.join(GIN_DIR, 'models', '*', '*'))))
def test_every_model_gin_file_parses_with_the_run_files(model_file):
  _register_configurables()
  gin.add_config_file_search_path(GIN_DIR)
  for run in ('runs/prompt_tune.gin', 'runs/model_tune.gin'):
    gin.clear_config()
    prompts = sorted(glob.glob(os.path.join(GIN_DIR, 'prompts', '*.gin')))
    gin.parse_config_files_and_bindings([model_file, run] + prompts[:1], REQUIRED)
    from jaxprompt.model import get_config as gc
    gc(gin.query_parameter('tune.config'))  # the named config exists
    assert gin.query_parameter('tune.model_dir') is not None


def test_every_prompt_gin_file_parses():
  _register_configurables()
  gin.add_config_file_search_path(GIN_DIR)
  for prompt_file in glob.glob(os.path.join(GIN_DIR, 'prompts', '*.gin')):
    gin.clear_config()
    gin.parse_config_files_and_bindings(['runs/prompt_tune.gin', prompt_file], REQUIRED)
    assert gin.query_parameter('tune.prompt_init') in ('class_labels', 'sampled_vocab', 'uniform',
                                                       'uniform_positive', 'file')


def test_gin_typo_is_one_line(capsys):
  code = cli.main(['tune', '--gin.tune.promt_length=5', '--model_dir', '/tmp/nope'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count('\n') == 0 and 'promt_length' in err and 'gin' in err


def test_missing_required_macro_is_one_line(capsys):
  code = cli.main(['tune', '--gin_file=runs/prompt_tune.gin', '--gin.MODEL_DIR=/tmp/nope'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count('\n') == 0 and 'REQUIRED' in err.upper()


def test_info_refuses_pickle(tmp_path, capsys):
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'\x80\x04')
  code = cli.main(['info', str(tmp_path)])
  err = capsys.readouterr().err.strip()
  assert code == 2 and 'safetensors' in err and err.count('\n') == 0


@pytest.fixture(scope='module')
def tiny_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  vocab = data_helpers.vocabulary()
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  ckpt = save_t5x_legacy(init_params(cfg, 0), str(root / 'backbone'), 3)
  rs = np.random.RandomState(0)
  words = data_helpers.WORDS
  rows = [{'text': ' '.join(rs.choice(words, 5)), 'label': int(i % 2)} for i in range(64)]
  train = data_helpers.write_jsonl(root / 'train.jsonl', rows[:48])
  dev = data_helpers.write_jsonl(root / 'dev.jsonl', rows[48:])
  return dict(root=root, ckpt=ckpt, train=train, dev=dev, spm=data_helpers.spm_model_path())


def test_tune_eval_info_end_to_end(tiny_setup, capsys):
  s = tiny_setup
  run = str(s['root'] / 'run')
  args = ['tune', '--backbone', s['ckpt'], '--model_dir', run, '--task', 'cli_task',
          '--train_file', s['train'], '--validation_file', s['dev'], '--input_column', 'text',
          '--label_column', 'label', '--label_names', 'bad,good', '--vocabulary', s['spm'],
          '--steps', '12', '--eval_period', '6', '--batch_size', '8', '--prompt_length', '3',
          '--inputs_length', '16', '--targets_length', '4', '--gin.DROPOUT_RATE=0.0']
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert 'validation before' in out and 'prompt (best)' in out
  manifest = json.load(open(os.path.join(run, 'manifest.json')))
  assert manifest['task'] == 'cli_task' and manifest['prompt_length'] == 3
  assert manifest['backbone_path'] == os.path.abspath(s['ckpt'])
  assert manifest['backbone'].startswith('sha256:')  # the fingerprint, checked on resume
  # The run directory now holds a run: a second start without --resume is refused ...
  assert cli.main(args) == 2
  err = capsys.readouterr().err  # a finished run is not resumed by accident
  assert 'finished' in err and 'new --model_dir' in err and '\n' not in err.strip()
  # ... and with --resume it continues (here: already finished) without error.
  assert cli.main(args + ['--resume']) == 0
  capsys.readouterr()
  # Only the prompt and optimizer state are checkpointed, never the backbone.
  sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(run, 'best'))
           for f in fs]
  assert sum(sizes) < 200_000
  prompt = os.path.join(run, 'prompt_best.safetensors')
  assert cli.main(['eval', '--task', 'cli_task', '--backbone', s['ckpt'], '--prompt', prompt,
                   '--vocabulary', s['spm'], '--inputs_length', '16', '--targets_length', '4',
                   '--json']) == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0.0 <= metrics['accuracy'] <= 100.0 and 'loss_per_token' in metrics
  assert cli.main(['info', prompt]) == 0
  info = capsys.readouterr().out
  assert 'length 3' in info and 'cli_task' in info
  assert cli.main(['info', run]) == 0  # a run directory describes the run
  info = capsys.readouterr().out
  assert 'prompt_tuning' in info and 'finished' in info and 'prompt_best.safetensors' in info
  assert cli.main(['info', s['ckpt'], '--json']) == 0
  d = json.loads(capsys.readouterr().out)
  assert d['format'] == 't5x_legacy' and d['family'] == 't5_1_1'


def test_prompt_ensemble_votes(tiny_setup):
  """Prompts [a, a, b] vote like a alone, [b, b, a] like b alone, and a and b disagree."""
  from jaxprompt.methods import get_method
  from jaxprompt.prompts import prompt_tree
  from jaxprompt.train import engine as engine_lib, evaluation
  from jaxprompt.checkpoints.backbone import load_backbone
  s = tiny_setup
  cli.setup_tasks(s['spm'], s['train'], s['dev'], 'cli_task', 'text', 'target', 'label',
                  ['bad', 'good'])
  module = load_backbone(s['ckpt']).module
  from conftest import random_params
  params = random_params(module.config, seed=5, std=0.5)  # sensitive to the prompt
  data = evaluation.load_eval_data('cli_task', 'validation', {'inputs': 16, 'targets': 4}, 8)
  single, ensemble = get_method('prompt_tuning'), get_method('prompt_ensemble')
  eng, _ = engine_lib.build_engine(module, single.model_inputs, None, {'backbone': params},
                                   prompt_tree(np.zeros((3, 32), np.float32)))

  def predict(prompt, mode='rank'):
    method = ensemble if prompt.ndim == 3 else single
    ev = evaluation.Evaluator(eng, method.eval_inputs, 'cli_task', data, mode,
                              ensemble=method.ensemble)
    return ev.predictions(prompt_tree(prompt))

  rs = np.random.RandomState(3)
  for mode in ('rank', 'greedy'):
    a, b = rs.uniform(-3, 3, (3, 32)), rs.uniform(-3, 3, (3, 32))
    pa, pb = predict(a, mode=mode), predict(b, mode=mode)
    assert pa != pb
    assert predict(np.stack([a, a, b]), mode) == pa
    assert predict(np.stack([b, b, a]), mode) == pb


def test_lab_report_refuses_unknown_targets_and_an_existing_report(tmp_path, capsys):
  # Both are checked before the backbone is built or anything is trained.
  assert cli.main(['lab', 'report', '--tasks', 'has_green,has_red']) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and 'has_red' in err and 'has_dog' in err
  report = tmp_path / 'report.json'
  report.write_text('{"earlier": "results"}')
  assert cli.main(['lab', 'report', '--out', str(report)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and '--overwrite' in err
  assert report.read_text() == '{"earlier": "results"}'


def test_shipped_gin_files_resolve_beside_user_folders_named_like_them(tmp_path, monkeypatch):
  """A user's `runs/`, `models/` and `prompts/` folders (the README's --model_dir runs/...) in the
  working directory *and* on sys.path are namespace packages to the import system; shipped gin
  files still resolve, by relative name through gin and through the CLI's resolution."""
  for folder in ('runs/has_dog', 'models', 'prompts'):
    (tmp_path / folder).mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  import importlib
  importlib.invalidate_caches()
  assert importlib.util.find_spec('runs') is not None  # the trap is set
  _register_configurables()
  gin.add_config_file_search_path(GIN_DIR)
  for run in ('runs/prompt_tune.gin', 'runs/xprompt.gin'):
    gin.clear_config()
    gin.parse_config_files_and_bindings(['models/t5_1_1/small.gin', run,
                                         'prompts/class_labels.gin'], REQUIRED)
    assert gin.query_parameter('MODEL_DIR/macro.value') == '/tmp/x'
    assert os.path.isfile(cli.resolve_gin_file(run))
