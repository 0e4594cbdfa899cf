"""`jaxprompt infer` / `jaxprompt.infer` / `Predictor`: predictions equal evaluation's, a
mixed-task batch equals each task alone, resume after an interruption, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import data_helpers
from conftest import random_params
from jaxprompt import cli, inference
from jaxprompt.checkpoints import save_t5x_legacy
from jaxprompt.model import get_config
from jaxprompt.prompts.files import write_prompt

INPUTS_LENGTH, TARGETS_LENGTH, PROMPT_LENGTH = 16, 4, 3


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny backbone sensitive to its prompt, two labelled file tasks, two prompts each."""
  from jaxprompt.data import register_file_task
  root = tmp_path_factory.mktemp('infer')
  vocab = data_helpers.vocabulary()
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  ckpt = save_t5x_legacy(random_params(cfg, seed=5, std=0.5), str(root / 'backbone'), 3)
  rs = np.random.RandomState(0)
  words = data_helpers.WORDS
  files = {}
  for task, labels in (('infer_a', ['bad', 'good']), ('infer_b', ['no', 'yes', 'true'])):
    rows = [{'text': ' '.join(rs.choice(words, rs.randint(3, 14))), 'label': int(i % len(labels))}
            for i in range(40)]
    train = data_helpers.write_jsonl(root / f'{task}_train.jsonl', rows[:20])
    dev = data_helpers.write_jsonl(root / f'{task}_dev.jsonl', rows[20:])
    register_file_task(task, train, dev, input_column='text', label_column='label',
                       label_names=labels, vocabulary=vocab)
    files[task] = dev
  prompts = {}
  for i, task in enumerate(('infer_a', 'infer_b')):
    value = np.random.RandomState(10 + i).uniform(-3, 3, (PROMPT_LENGTH, cfg.emb_dim))
    prompts[task] = write_prompt(str(root / f'{task}.safetensors'), value.astype(np.float32),
                                 method='prompt_tuning', task=task)
  return dict(root=root, ckpt=ckpt, spm=data_helpers.spm_model_path(), files=files,
              prompts=prompts, vocab=vocab)


def _predictor(s, prompt, **kw):
  kw.setdefault('inputs_length', INPUTS_LENGTH)
  kw.setdefault('max_decode_length', TARGETS_LENGTH)
  kw.setdefault('batch_size', 4)
  return inference.Predictor(s['ckpt'], prompt, vocabulary=s['vocab'], **kw)


def _eval_predictions(s, task, mode):
  """What `jaxprompt eval` predicts, through the evaluation path itself."""
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.evaluate import load_product
  from jaxprompt.train import engine as engine_lib, evaluation
  bb = load_backbone(s['ckpt'])
  method, trainable, extras, _ = load_product(bb, s['prompts'][task], [task])
  eng, state = engine_lib.build_engine(bb.module, method.eval_inputs, None,
                                       {'backbone': bb.params, **extras}, trainable)
  data = evaluation.load_eval_data(task, 'validation',
                                   {'inputs': INPUTS_LENGTH, 'targets': TARGETS_LENGTH}, 4)
  return evaluation.Evaluator(eng, method.eval_inputs, task, data, mode).predictions(
      state.trainable)


@pytest.mark.parametrize('mode', ['rank', 'greedy'])
def test_predictions_equal_evaluation_on_a_task_and_on_its_file(setup, mode):
  s = setup
  reference = _eval_predictions(s, 'infer_b', mode)
  assert len(set(reference)) > 1  # the prompt and inputs matter: a check that could fail
  p = _predictor(s, s['prompts']['infer_b'], mode=mode)
  from_task = inference.infer(backbone=None, task='infer_b', predictor=p)
  assert [r['prediction'] for r in from_task] == reference
  # The same texts from the file: the same tokens (the data layer's convention), the same rows.
  from_file = inference.infer(backbone=None, input=s['files']['infer_b'], input_column='text',
                              predictor=p)
  assert [r['prediction'] for r in from_file] == reference
  assert all(set(r) >= {'text', 'label', 'prediction'} for r in from_file)
  if mode == 'rank':  # every label's log-likelihood, the prediction the best of them
    for r in from_file:
      assert set(r['scores']) == {'no', 'yes', 'true'}
      assert r['prediction'] == max(r['scores'], key=r['scores'].get)
      assert all(v < 0 for v in r['scores'].values())


def test_mixed_task_batches_equal_each_task_alone(setup, tmp_path):
  s = setup
  alone = {}
  for task in ('infer_a', 'infer_b'):
    p = _predictor(s, s['prompts'][task], mode='greedy')
    alone[task] = p.predict([r['text'] for r in _rows(s, task)])
  rows = [dict(r, task=t) for pair in zip(_rows(s, 'infer_a'), _rows(s, 'infer_b'))
          for t, r in zip(('infer_a', 'infer_b'), pair)]  # interleaved: every batch mixes
  mixed_file = data_helpers.write_jsonl(tmp_path / 'mixed.jsonl', rows)
  spec = ','.join(f'{t}={f}' for t, f in s['prompts'].items())
  out = tmp_path / 'mixed_pred.jsonl'
  assert cli.main(['infer', '--backbone', s['ckpt'], '--prompt', spec, '--input', mixed_file,
                   '--input_column', 'text', '--output', str(out), '--mode', 'greedy',
                   '--vocabulary', s['spm'], '--inputs_length', str(INPUTS_LENGTH),
                   '--max_decode_length', str(TARGETS_LENGTH), '--batch_size', '4']) == 0
  got = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['text'] for r in got] == [r['text'] for r in rows]  # input order, fields kept
  for task in ('infer_a', 'infer_b'):
    assert [r['prediction'] for r in got if r['task'] == task] == alone[task]
  # Rank classification over mixed tasks: each row among its own task's labels.
  p = _predictor(s, dict(s['prompts']), mode='rank')
  mixed = p.predict_rows([r['text'] for r in rows], [r['task'] for r in rows])
  for task, labels in (('infer_a', {'bad', 'good'}), ('infer_b', {'no', 'yes', 'true'})):
    ours = [r for r, row in zip(mixed, rows) if row['task'] == task]
    assert all(set(r['scores']) == labels for r in ours)
    assert [r['prediction'] for r in ours] == _eval_predictions(s, task, 'rank')


def _rows(s, task):
  return [json.loads(line) for line in open(s['files'][task])]


def test_an_interrupted_inference_resumes_to_the_rows_of_a_clean_run(setup, tmp_path,
                                                                      monkeypatch):
  s = setup
  p = _predictor(s, s['prompts']['infer_a'], mode='greedy')
  clean = tmp_path / 'clean.jsonl'
  inference.infer(backbone=None, input=s['files']['infer_a'], input_column='text',
                  output=str(clean), predictor=p)
  out = tmp_path / 'out.jsonl'
  real, calls = p.predict_batch, []

  def dies_on_the_third_batch(*args):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # a kill between batches
    return real(*args)

  monkeypatch.setattr(p, 'predict_batch', dies_on_the_third_batch)
  with pytest.raises(KeyboardInterrupt):
    inference.infer(backbone=None, input=s['files']['infer_a'], input_column='text',
                    output=str(out), predictor=p)
  partial = str(out) + inference.PARTIAL
  assert not out.exists() and len(open(partial).readlines()) == 8  # 2 batches of 4
  with open(partial, 'a') as f:
    f.write('{"text": "cut mid-li')  # a kill while a batch was being written
  # Without --resume the interrupted run is not overwritten.
  with pytest.raises(inference.InferenceError, match='--resume'):
    inference.infer(backbone=None, input=s['files']['infer_a'], input_column='text',
                    output=str(out), predictor=p)
  monkeypatch.setattr(p, 'predict_batch', real)
  calls.clear()
  counted = []
  monkeypatch.setattr(p, 'predict_batch', lambda *a: counted.append(1) or real(*a))
  inference.infer(backbone=None, input=s['files']['infer_a'], input_column='text',
                  output=str(out), predictor=p, resume=True)
  assert len(counted) == 3  # 20 rows in batches of 4: the 2 written batches are not redone
  assert out.read_text() == clean.read_text()
  assert not os.path.exists(partial) and not os.path.exists(str(out) + inference.PARTIAL_STATE)
  # A finished output is not overwritten without --overwrite.
  with pytest.raises(inference.InferenceError, match='--overwrite'):
    inference.infer(backbone=None, input=s['files']['infer_a'], input_column='text',
                    output=str(out), predictor=p)


def _cli_error(capsys, args) -> str:
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0, err
  return err


def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
  s = setup
  out = tmp_path / 'pred.jsonl'
  base = ['infer', '--backbone', s['ckpt'], '--vocabulary', s['spm'], '--output', str(out),
          '--inputs_length', str(INPUTS_LENGTH), '--max_decode_length', str(TARGETS_LENGTH)]
  prompt_a = ['--prompt', s['prompts']['infer_a']]
  err = _cli_error(capsys, base + prompt_a + ['--input', s['files']['infer_a']])
  assert "no column 'input'" in err and '--input_column' in err
  empty = data_helpers.write_jsonl(tmp_path / 'empty.jsonl', [{'input': 'a dog'}, {'input': ' '}])
  err = _cli_error(capsys, base + prompt_a + ['--input', empty])
  assert 'empty.jsonl:2' in err and 'empty' in err
  rows = data_helpers.write_jsonl(tmp_path / 'rows.jsonl', [{'input': 'a dog', 'task': 'infer_a'},
                                                            {'input': 'a cat', 'task': 'infer_c'}])
  spec = ','.join(f'{t}={f}' for t, f in s['prompts'].items())
  err = _cli_error(capsys, base + ['--prompt', spec, '--input', rows])
  assert 'infer_c' in err and 'infer_a, infer_b' in err
  wide = write_prompt(str(tmp_path / 'wide.safetensors'), np.zeros((3, 40), np.float32))
  err = _cli_error(capsys, base + ['--prompt', wide, '--input', rows])
  assert 'width 40' in err
  assert not out.exists() and not os.path.exists(str(out) + inference.PARTIAL)
  # Inputs over budget are cut, with one counted line on stderr.
  long = data_helpers.write_jsonl(tmp_path / 'long.jsonl',
                                  [{'input': ' '.join(['dog'] * 40)}, {'input': 'a cat'}])
  assert cli.main(base + prompt_a + ['--input', long, '--mode', 'greedy']) == 0
  err = capsys.readouterr().err
  assert '1 of 2 inputs were longer than 16 tokens' in err
  assert len(out.read_text().splitlines()) == 2


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(setup, tmp_path):
  """`jaxprompt infer` over 2 processes (jax.distributed, one CPU device each): every batch is
  split between them and process 0 writes; the file equals one process's on 2 devices."""
  import socket
  import subprocess
  import sys
  from conftest import devices_env
  s = setup
  main = 'import sys; from jaxprompt.cli import main; sys.exit(main(sys.argv[1:]))'

  def args(out):
    return [sys.executable, '-c', main, 'infer', '--backbone', s['ckpt'], '--prompt',
            s['prompts']['infer_b'], '--input', s['files']['infer_b'], '--input_column', 'text',
            '--output', str(out), '--mode', 'greedy', '--vocabulary', s['spm'],
            '--inputs_length', str(INPUTS_LENGTH), '--max_decode_length', str(TARGETS_LENGTH),
            '--batch_size', '4', '--no_progress']

  env = lambda n: devices_env(n, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  one = subprocess.run(args(tmp_path / 'one.jsonl'), env=env(2), capture_output=True, text=True,
                       timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{sock.getsockname()[1]}'
  procs = [subprocess.Popen(args(tmp_path / 'two.jsonl') + [
      '--coordinator_address', address, '--num_processes', '2', '--process_id', str(i)],
      env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  two = (tmp_path / 'two.jsonl').read_text()
  assert two == (tmp_path / 'one.jsonl').read_text() and len(two.splitlines()) == 20
