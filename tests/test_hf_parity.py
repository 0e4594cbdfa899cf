"""Parity with Hugging Face transformers' PyTorch T5 on weights written by `save_hf`.

T5X masks padded decoder *query* rows and HF does not, so logits are compared where
`decoder_target_tokens > 0` only.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_GATED, TINY_RELU, random_params

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jaxprompt.checkpoints import flatten, load_t5, save_hf  # noqa: E402

pytestmark = pytest.mark.torch

from conftest import DECODER_INPUTS, ENCODER_TOKENS, TARGETS  # noqa: E402 - the parity batch


def hf_logits(directory) -> np.ndarray:
  model = transformers.T5ForConditionalGeneration.from_pretrained(
      str(directory), dtype=torch.float32).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ENCODER_TOKENS, dtype=torch.long),
                attention_mask=torch.tensor(ENCODER_TOKENS > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(DECODER_INPUTS, dtype=torch.long))
  return out.logits.numpy()


@pytest.mark.parametrize('config', [TINY_GATED, TINY_RELU], ids=['t5_1_1_gated', 't5_1_0_tied'])
@pytest.mark.parametrize('sharded', [False, True], ids=['single', 'sharded'])
def test_logits_match_transformers(tmp_path, config, sharded):
  params = random_params(config, seed=3, std=0.3)
  save_hf(params, config, tmp_path, sharded=sharded)
  expected = hf_logits(tmp_path)
  module, loaded = load_t5(str(tmp_path))
  assert module.config == config.replace(dropout_rate=module.config.dropout_rate)
  for path, value in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(flatten(loaded)[path]), value, err_msg=str(path))
  logits = np.asarray(module.apply({'params': loaded}, ENCODER_TOKENS, DECODER_INPUTS, TARGETS,
                                   enable_dropout=False))
  valid = TARGETS > 0
  assert 1.0 < np.abs(expected[valid]).max() < 100.0  # O(1-10) logits, not a degenerate test
  np.testing.assert_allclose(logits[valid], expected[valid], rtol=0, atol=1e-4)


def test_reference_is_not_trivially_matched(tmp_path):
  """Guards the comparison: other weights give clearly different HF logits."""
  save_hf(random_params(TINY_GATED, seed=3), TINY_GATED, tmp_path / 'a')
  save_hf(random_params(TINY_GATED, seed=4), TINY_GATED, tmp_path / 'b')
  valid = TARGETS > 0
  assert np.abs(hf_logits(tmp_path / 'a')[valid] - hf_logits(tmp_path / 'b')[valid]).max() > 0.1


def _hf_greedy(model, steps: int, eos_id: int) -> np.ndarray:
  """transformers' greedy generate, without the start token, padded with 0 to `steps`."""
  # use_cache=False: transformers 5.23 sizes its decoder cache by the *encoder* depth and
  # fails when num_decoder_layers > num_layers.
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.tensor(ENCODER_TOKENS, dtype=torch.long),
        attention_mask=torch.tensor(ENCODER_TOKENS > 0, dtype=torch.long),
        max_new_tokens=steps, do_sample=False, num_beams=1, decoder_start_token_id=0,
        eos_token_id=eos_id, pad_token_id=0, use_cache=False).numpy()[:, 1:]
  return np.pad(out, ((0, 0), (0, steps - out.shape[1])))


@pytest.mark.parametrize('config,seed', [(TINY_GATED, 6), (TINY_RELU, 8)],
                         ids=['t5_1_1_gated', 't5_1_0_tied'])
def test_greedy_decoding_matches_transformers(tmp_path, config, seed):
  from jaxprompt.model import decoding
  steps = 8
  save_hf(random_params(config, seed=seed), config, tmp_path)
  model = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  module, params = load_t5(str(tmp_path))
  expected = _hf_greedy(model, steps, eos_id=1)
  ours = np.asarray(decoding.greedy_decode(module, params, ENCODER_TOKENS, steps))
  np.testing.assert_array_equal(ours, expected)
  # Random weights rarely emit EOS: stop on a token a row emits mid-sequence instead, so the
  # stopping and the zero padding after it are compared too.
  row, pos = next((r, p) for r in range(len(expected)) for p in range(1, steps)
                  if expected[r, p] > 1 and expected[r, p] not in expected[r, :p])
  eos = int(expected[row, pos])
  expected = _hf_greedy(model, steps, eos_id=eos)
  assert expected[row, pos] == eos and not expected[row, pos + 1:].any()
  ours = np.asarray(decoding.greedy_decode(module, params, ENCODER_TOKENS, steps, eos_id=eos))
  np.testing.assert_array_equal(ours, expected)
