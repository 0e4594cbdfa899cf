"""Interop with Hugging Face PEFT prompt-tuning adapters (`jaxprompt.checkpoints.peft`).

Both directions through the real libraries, on the tiny random T5.1.1 of test_peft_parity.py
(its helpers are imported, not copied):

  * a jaxprompt prompt file (with an XPrompt token mask) exported with `export_peft` and loaded
    by `peft.PeftModel.from_pretrained` gives jaxprompt's logits (masked prompt) to 1e-4;
  * a PEFT adapter with a random prompt, saved by PEFT's `save_pretrained`, read with
    `read_prompt(adapter_dir)` gives PEFT's logits in jaxprompt to 1e-4.

The rest needs neither torch nor peft: the exact round trip, the directory contract, errors.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from conftest import TINY_GATED, random_params
from safetensors.numpy import load_file, save_file

from jaxprompt.checkpoints import save_hf
from jaxprompt.checkpoints.peft import export_peft, read_peft_prompt
from jaxprompt.prompts.files import PromptFile, check_compatible, read_prompt, write_prompt

CONFIG = TINY_GATED.replace(dropout_rate=0.0)
ATOL = 1e-4
LENGTH = 4


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
  """The parity tests' tiny T5 (same seed and scale), written as a HF directory."""
  params = random_params(CONFIG, seed=5, std=0.2)
  directory = str(tmp_path_factory.mktemp('peft_interop_t5'))
  save_hf(params, CONFIG, directory)
  return params, directory


def _prompt(seed=7, shape=(LENGTH, CONFIG.emb_dim)):
  return np.random.default_rng(seed).uniform(-1.5, 1.5, shape).astype(np.float32)


def _masked_prompt_file(tmp_path, backbone_dir):
  """A prompt file as `tune` writes it, plus an XPrompt token mask and piece mask."""
  token_mask = np.array([1, 0, 1, 1], np.float32)
  piece_mask = np.ones((LENGTH, 4), np.float32)
  piece_mask[2, 1] = 0
  path = str(tmp_path / 'prompt_best.safetensors')
  write_prompt(path, _prompt(), token_mask=token_mask, piece_mask=piece_mask,
               backbone=backbone_dir, task='jaxprompt_lab_x', step=300, init='vocab',
               position='prefix', metrics={'accuracy': 0.75})
  return path


# ----------------------------------------------------------------------------- torch + PEFT


def _peft_logits(model, parity):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(input_ids=torch.tensor(parity.ENCODER_TOKENS, dtype=torch.long),
                 attention_mask=torch.tensor(parity.ENCODER_TOKENS > 0, dtype=torch.long),
                 decoder_input_ids=torch.tensor(parity.DECODER_INPUTS, dtype=torch.long)
                 ).logits.numpy()


@pytest.mark.torch
@pytest.mark.filterwarnings('ignore:.*is_gradient_checkpointing:FutureWarning')
def test_exported_prompt_gives_jaxprompt_logits_in_peft(backbone, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  import test_peft_parity as parity  # pylint: disable=g-import-not-at-top
  assert parity.CONFIG == CONFIG
  params, directory = backbone
  path = _masked_prompt_file(tmp_path, directory)
  masked = read_prompt(path).masked_value()
  assert not np.array_equal(masked, read_prompt(path).value)  # the masks matter here

  out = export_peft(path, str(tmp_path / 'adapter'))
  torch.manual_seed(0)
  base = transformers.T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, out).eval()
  config = model.peft_config['default']
  assert config.peft_type == peft.PeftType.PROMPT_TUNING
  assert (config.num_virtual_tokens, config.token_dim, config.num_transformer_submodules,
          config.num_layers, config.num_attention_heads) == (LENGTH, CONFIG.emb_dim, 1,
                                                             CONFIG.num_encoder_layers,
                                                             CONFIG.num_heads)
  assert config.base_model_name_or_path == directory
  np.testing.assert_array_equal(
      model.prompt_encoder['default'].embedding.weight.detach().numpy(), masked)

  ref = _peft_logits(model, parity)
  ours = parity.jax_logits(params, masked)
  valid = parity.VALID
  assert 1.0 < np.abs(ref[valid]).max() < 100.0
  diff = float(np.abs(ours[valid] - ref[valid]).max())
  print(f'jaxprompt -> PEFT: max |logit diff| {diff:.3g}')
  assert diff < ATOL
  # Guard: the prompt (and its mask) change PEFT's logits.
  assert np.abs(parity.jax_logits(params, read_prompt(path).value)[valid] - ref[valid]).max() > 1e-2


@pytest.mark.torch
@pytest.mark.filterwarnings('ignore:.*is_gradient_checkpointing:FutureWarning')
def test_peft_saved_prompt_gives_peft_logits_in_jaxprompt(backbone, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  import test_peft_parity as parity  # pylint: disable=g-import-not-at-top
  params, directory = backbone
  torch.manual_seed(3)
  base = transformers.T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
  config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM,
                                   num_virtual_tokens=LENGTH, num_transformer_submodules=1,
                                   prompt_tuning_init=peft.PromptTuningInit.RANDOM)
  model = peft.get_peft_model(base, config).eval()
  adapter = str(tmp_path / 'peft_adapter')
  model.save_pretrained(adapter)
  assert os.path.isfile(os.path.join(adapter, 'adapter_model.safetensors'))
  ref = _peft_logits(model, parity)

  pf = read_prompt(adapter)  # dispatches to read_peft_prompt
  assert pf.value.shape == (LENGTH, CONFIG.emb_dim) and pf.value.dtype == np.float32
  np.testing.assert_array_equal(pf.value,
                                model.prompt_encoder['default'].embedding.weight.detach().numpy())
  assert pf.metadata['backbone'] == directory
  assert pf.metadata['task_type'] == 'SEQ_2_SEQ_LM' and pf.metadata['init'] == 'RANDOM'
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    check_compatible(pf, CONFIG.emb_dim, directory, path=adapter)  # same backbone: no warning

  ours = parity.jax_logits(params, pf.masked_value())
  valid = parity.VALID
  assert 1.0 < np.abs(ref[valid]).max() < 100.0
  diff = float(np.abs(ours[valid] - ref[valid]).max())
  print(f'PEFT -> jaxprompt: max |logit diff| {diff:.3g}')
  assert diff < ATOL
  assert np.abs(parity.jax_logits(params, None)[valid] - ref[valid]).max() > 0.1


# ----------------------------------------------------------------------------- no torch


def test_round_trip_is_exact_and_keeps_metadata(backbone, tmp_path):
  _, directory = backbone
  path = _masked_prompt_file(tmp_path, directory)
  source = read_prompt(path)
  out = export_peft(source, str(tmp_path / 'adapter'))
  assert sorted(os.listdir(out)) == ['README.md', 'adapter_config.json',
                                     'adapter_model.safetensors']
  assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []  # no temp dirs left

  with open(os.path.join(out, 'adapter_config.json')) as f:
    config = json.load(f)
  assert config['peft_type'] == 'PROMPT_TUNING' and config['task_type'] == 'SEQ_2_SEQ_LM'
  assert (config['num_virtual_tokens'], config['token_dim'], config['num_transformer_submodules'],
          config['num_layers'], config['num_attention_heads']) == (
              LENGTH, CONFIG.emb_dim, 1, CONFIG.num_encoder_layers, CONFIG.num_heads)
  assert config['base_model_name_or_path'] == directory  # from the prompt's 'backbone'
  tensors = load_file(os.path.join(out, 'adapter_model.safetensors'))
  assert list(tensors) == ['prompt_embeddings']

  back = read_peft_prompt(out)
  assert back.value.dtype == np.float32
  np.testing.assert_array_equal(back.value, source.masked_value())
  assert back.token_mask is None and back.piece_mask is None
  assert back.metadata['backbone'] == directory
  assert back.metadata['format'] == 'peft' and back.metadata['masks_applied'] is True
  assert (back.metadata['task'], back.metadata['step'], back.metadata['init']) == (
      'jaxprompt_lab_x', 300, 'vocab')
  assert back.metadata['length'] == LENGTH and back.metadata['width'] == CONFIG.emb_dim
  np.testing.assert_array_equal(read_prompt(out).value, back.value)

  # An explicit base model wins; an empty existing directory is fine.
  (tmp_path / 'empty').mkdir()
  out2 = export_peft(path, str(tmp_path / 'empty'), base_model_name_or_path='google/t5-v1_1-small')
  with open(os.path.join(out2, 'adapter_config.json')) as f:
    config2 = json.load(f)
  assert config2['base_model_name_or_path'] == 'google/t5-v1_1-small'
  assert config2['num_layers'] is None  # not a local checkpoint: PEFT fills it at load time
  assert read_peft_prompt(out2).metadata['backbone'] == 'google/t5-v1_1-small'


def test_export_refuses_stack_existing_dir_and_wrong_width(backbone, tmp_path):
  _, directory = backbone
  stack = PromptFile(_prompt(shape=(2, LENGTH, CONFIG.emb_dim)), {})
  with pytest.raises(ValueError, match='stack of 2 prompts') as e:
    export_peft(stack, str(tmp_path / 'a'))
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'a')

  path = _masked_prompt_file(tmp_path, directory)
  out = export_peft(path, str(tmp_path / 'a'))
  with pytest.raises(FileExistsError) as e:
    export_peft(path, out)
  assert out in str(e.value) and 'overwrite=True' in str(e.value) and '\n' not in str(e.value)
  (tmp_path / 'a' / 'keep.txt').write_text('x')
  export_peft(PromptFile(_prompt(seed=9), {}), out, overwrite=True)
  assert not os.path.exists(tmp_path / 'a' / 'keep.txt')  # replaced as a whole
  np.testing.assert_array_equal(read_peft_prompt(out).value, _prompt(seed=9))
  assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []

  with pytest.warns(UserWarning, match="position 'suffix'"):
    export_peft(PromptFile(_prompt(), {'position': 'suffix'}), str(tmp_path / 'suffix'))

  wide = PromptFile(_prompt(shape=(LENGTH, 8)), {'backbone': directory})
  with pytest.raises(ValueError, match='does not match the base model'):
    export_peft(wide, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'b')


def _adapter(directory, config, prompt=None):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'adapter_config.json'), 'w') as f:
    json.dump(config, f)
  if prompt is not None:
    save_file({'prompt_embeddings': prompt}, os.path.join(directory, 'adapter_model.safetensors'),
              metadata={'format': 'pt'})
  return str(directory)


def test_read_errors_name_the_file(tmp_path):
  lora = _adapter(tmp_path / 'lora', {'peft_type': 'LORA', 'task_type': 'SEQ_2_SEQ_LM', 'r': 8},
                  _prompt())
  with pytest.raises(ValueError, match='only prompt-tuning adapters convert') as e:
    read_prompt(lora)
  assert os.path.join(lora, 'adapter_config.json') in str(e.value) and 'LORA' in str(e.value)
  assert '\n' not in str(e.value)

  config = {'peft_type': 'PROMPT_TUNING', 'task_type': 'SEQ_2_SEQ_LM', 'num_virtual_tokens': 4,
            'token_dim': 16, 'num_transformer_submodules': 1}
  missing = _adapter(tmp_path / 'missing', config)
  with pytest.raises(FileNotFoundError) as e:
    read_peft_prompt(missing)
  assert os.path.join(missing, 'adapter_model.safetensors') in str(e.value)
  assert '\n' not in str(e.value)
  (tmp_path / 'missing' / 'adapter_model.bin').write_bytes(b'not read')
  with pytest.raises(ValueError, match='pickle'):
    read_peft_prompt(missing)

  with pytest.raises(FileNotFoundError, match='adapter_config.json: missing'):
    read_peft_prompt(str(tmp_path))
  (tmp_path / 'plain').mkdir()
  with pytest.raises(ValueError, match='without adapter_config.json') as e:
    read_prompt(str(tmp_path / 'plain'))
  assert '\n' not in str(e.value)

  wrong = _adapter(tmp_path / 'wrong', config, _prompt(shape=(5, 16)))
  with pytest.raises(ValueError, match=r'shape \(5, 16\)'):
    read_peft_prompt(wrong)


def test_two_submodules_are_refused_unless_the_encoder_prompt_is_asked_for(tmp_path):
  """PEFT's seq2seq default (num_transformer_submodules=2) saves [2P, d]: encoder rows first,
  then the decoder's, which jaxprompt has no place for: refused, unless the Python API asks
  for the encoder rows alone."""
  rows = _prompt(shape=(2 * LENGTH, 16))
  adapter = _adapter(tmp_path / 'two', {
      'peft_type': 'PROMPT_TUNING', 'task_type': 'SEQ_2_SEQ_LM', 'num_virtual_tokens': LENGTH,
      'token_dim': 16, 'num_transformer_submodules': 2, 'prompt_tuning_init': 'TEXT',
      'prompt_tuning_init_text': 'Classify:', 'base_model_name_or_path': 't5-small'}, rows)
  with pytest.raises(ValueError, match='num_transformer_submodules=2') as e:
    read_prompt(adapter)
  assert '\n' not in str(e.value) and 'num_transformer_submodules=1' in str(e.value)
  pf = read_peft_prompt(adapter, encoder_only=True)
  np.testing.assert_array_equal(pf.value, rows[:LENGTH])
  assert 'dropped' in pf.metadata['decoder_prompt_dropped']
  assert pf.metadata['num_transformer_submodules'] == 2
  assert (pf.metadata['backbone'], pf.metadata['init'], pf.metadata['prompt_tuning_init_text']) == (
      't5-small', 'TEXT', 'Classify:')
