"""google-research/prompt-tuning's prompt files as prompt inputs (jaxprompt.prompts.prompt_tuning_files).

The tests write a prompt-tuning run's model directory in the repository's layout:
  MODEL_DIR/numpy_checkpoints/checkpoint_N/encoder.prompt.prompt.prompt   np.save to a file
      object (no .npy suffix), as the repository's Checkpointer.save_numpy writes it;
  MODEL_DIR/checkpoint_N/   a T5X checkpoint (legacy or Orbax, jaxprompt's writers), the prompt
      at encoder/prompt/prompt/prompt beside the frozen weights.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import TINY_GATED, random_params

from jaxprompt import artefacts, cli
from jaxprompt.checkpoints import save_t5x_legacy, save_t5x_orbax
from jaxprompt.prompts.files import read_prompt, write_prompt
from jaxprompt.prompts.init import source_prompt

WIDTH = TINY_GATED.emb_dim


def _prompt(seed, length=4, width=WIDTH):
  return np.random.default_rng(seed).uniform(-2, 2, (length, width)).astype(np.float32)


def _numpy_checkpoint(model_dir, step, value):
  """What prompt_tuning.train.utils.Checkpointer.save_numpy writes for step `step`."""
  folder = os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{step}')
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'encoder.prompt.prompt.prompt'), 'wb') as f:
    np.save(f, value)
  return folder


def _with_prompt(params, value):
  return dict(params, encoder=dict(params['encoder'], prompt={'prompt': {'prompt': value}}))


def test_numpy_checkpoints_are_prompt_inputs(tmp_path):
  model_dir = str(tmp_path / 'runs' / 'x')
  first, last = _prompt(1), _prompt(2)
  step_10 = _numpy_checkpoint(model_dir, 10, first)
  _numpy_checkpoint(model_dir, 1200, last)
  os.makedirs(os.path.join(model_dir, 'numpy_checkpoints', 'checkpoint_1300.tmp-17'))  # unfinished
  assert sorted(os.listdir(step_10)) == ['encoder.prompt.prompt.prompt']  # no suffix, as written

  pf = read_prompt(step_10)
  np.testing.assert_array_equal(pf.value, first)
  assert pf.metadata['step'] == 10 and pf.metadata['format'] == 'prompt-tuning numpy checkpoint'
  assert pf.metadata['source'] == os.path.join(step_10, 'encoder.prompt.prompt.prompt')
  assert pf.metadata['param'] == 'encoder/prompt/prompt/prompt'
  np.testing.assert_array_equal(
      read_prompt(os.path.join(step_10, 'encoder.prompt.prompt.prompt')).value, first)
  latest = read_prompt(os.path.join(model_dir, 'numpy_checkpoints'))  # its latest whole step
  np.testing.assert_array_equal(latest.value, last)
  assert latest.metadata['step'] == 1200

  # --init_from and library add read it like any prompt file.
  np.testing.assert_array_equal(source_prompt(step_10, WIDTH, length=4), first)
  from jaxprompt.methods import library
  library.add(str(tmp_path / 'lib'), step_10, task='sst2')
  np.testing.assert_array_equal(read_prompt(library.prompt_path(str(tmp_path / 'lib'), 'sst2')
                                            ).value, first)
  # info says what it is and where it came from.
  d = artefacts.describe(step_10)
  assert d['kind'] == 'prompt' and d['format'] == 'prompt-tuning numpy checkpoint'
  assert d['source'].endswith('checkpoint_10/encoder.prompt.prompt.prompt') and d['step'] == 10


def test_t5x_checkpoints_of_a_prompt_tuning_run_are_prompt_inputs(tmp_path, capsys):
  params = random_params(TINY_GATED, seed=2)
  value = _prompt(3)
  legacy = save_t5x_legacy(_with_prompt(params, value), str(tmp_path / 'legacy'), 7)
  orbax = save_t5x_orbax(_with_prompt(params, value), str(tmp_path / 'orbax'), 8)
  for ckpt, fmt, step in ((legacy, 't5x_legacy', 7), (orbax, 't5x_orbax', 8)):
    pf = read_prompt(ckpt)
    np.testing.assert_array_equal(pf.value, value)
    assert (pf.metadata['format'], pf.metadata['step'], pf.metadata['param']) == (
        f'{fmt} checkpoint', step, 'encoder/prompt/prompt/prompt')
  np.testing.assert_array_equal(source_prompt(legacy, WIDTH, length=4), value)
  assert cli.main(['info', legacy]) == 0
  out = capsys.readouterr().out
  assert 'encoder/prompt/prompt/prompt (4, 16): a prompt input' in out


def test_folders_without_a_prompt_are_one_line_errors(tmp_path):
  empty = tmp_path / 'runs' / 'x' / 'numpy_checkpoints' / 'checkpoint_5'
  empty.mkdir(parents=True)
  (empty / 'notes.txt').write_text('x')
  for path in (empty, empty.parent):
    with pytest.raises(ValueError, match='numpy checkpoint folder without a prompt') as e:
      read_prompt(str(path))
    assert '\n' not in str(e.value) and 'encoder.prompt.prompt.prompt' in str(e.value)
  backbone = save_t5x_legacy(random_params(TINY_GATED), str(tmp_path / 'backbone'), 1)
  with pytest.raises(ValueError, match='T5X checkpoint without prompt params') as e:
    read_prompt(backbone)
  assert '\n' not in str(e.value)
  from jaxprompt.methods import library
  out = str(tmp_path / 'lib')
  with pytest.raises(ValueError, match='without a prompt'):
    library.add(out, str(empty), task='t')
  assert not os.path.exists(out)  # nothing written
  bad = tmp_path / 'pickled' / 'numpy_checkpoints' / 'checkpoint_1'
  bad.mkdir(parents=True)
  (bad / 'encoder.prompt.prompt.prompt').write_bytes(b'\x80\x04not numpy')
  with pytest.raises(ValueError, match='not a plain numpy array'):
    read_prompt(str(bad))


@pytest.mark.slow
def test_eval_reads_a_prompt_tuning_run(tmp_path, capsys):
  """`jaxprompt eval --prompt runs/x/numpy_checkpoints/checkpoint_N` (and the run's T5X
  checkpoint, backbone and prompt in one) give the metrics of the same prompt as a file."""
  import data_helpers
  from jaxprompt.model import get_config
  vocab = data_helpers.vocabulary()
  config = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  params = random_params(config, seed=5, std=0.5)
  value = _prompt(4, length=3, width=config.emb_dim)
  backbone = save_t5x_legacy(params, str(tmp_path / 'pretrained'), 1)
  model_dir = str(tmp_path / 'runs' / 'x')
  run_ckpt = save_t5x_legacy(_with_prompt(params, value), model_dir, 40)
  folder = _numpy_checkpoint(model_dir, 40, value)
  reference = write_prompt(str(tmp_path / 'prompt.safetensors'), value)
  rs = np.random.RandomState(0)
  rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 5)), 'label': int(i % 2)}
          for i in range(24)]
  train = data_helpers.write_jsonl(tmp_path / 'train.jsonl', rows[:8])
  dev = data_helpers.write_jsonl(tmp_path / 'dev.jsonl', rows[8:])
  spm = data_helpers.spm_model_path()
  cli.setup_tasks(spm, train, dev, 'pt_files_task', 'text', 'target', 'label', ['bad', 'good'])

  def evaluate(backbone_path, prompt):
    flags = ['--prompt', prompt] if prompt else []
    assert cli.main(['eval', '--task', 'pt_files_task', '--backbone', backbone_path, *flags,
                     '--vocabulary', spm, '--inputs_length', '16', '--targets_length', '4',
                     '--json']) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  expected = evaluate(backbone, reference)
  assert evaluate(backbone, folder) == expected
  assert evaluate(run_ckpt, run_ckpt) == expected  # the frozen weights beside the prompt
