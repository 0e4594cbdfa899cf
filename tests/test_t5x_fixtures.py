"""Checkpoints written by T5X itself: both formats read the same, and the model reproduces
T5X's logits and loss on them (fixtures in `../shared/fixtures/t5x`, skipped when absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxprompt.checkpoints import flatten, infer_config, load_t5, read_params
from jaxprompt.checkpoints.inspect import describe
from jaxprompt.model import T5Config, compute_weighted_cross_entropy

MODELS = ['t5_1_1_tiny_gated', 't5_1_0_tiny_relu_tied']


@pytest.fixture(params=MODELS)
def model_dir(request, t5x_fixtures):
  return t5x_fixtures / request.param


def _t5x_config(model_dir) -> tuple[T5Config, dict]:
  with open(model_dir / 'config.json') as f:
    raw = json.load(f)
  return T5Config.from_dict(raw['t5x_T5Config']), raw


def test_legacy_and_orbax_agree(model_dir):
  config, raw = _t5x_config(model_dir)
  legacy, legacy_info = read_params(str(model_dir / 'legacy'))
  orbax, orbax_info = read_params(str(model_dir / 'orbax' / 'checkpoint_2'))
  assert legacy_info['format'] == 't5x_legacy' and orbax_info['format'] == 't5x_orbax'
  assert legacy_info['step'] == orbax_info['step'] == raw['step']
  assert legacy_info['config'] == orbax_info['config'] == config
  fl, fo = flatten(legacy), flatten(orbax)
  assert sorted(fl) == sorted(fo)
  for path in fl:
    np.testing.assert_array_equal(fl[path], fo[path], err_msg=str(path))
  # Without the config.json, the shapes alone give the same architecture.
  assert infer_config({p: v.shape for p, v in fl.items()}, 'here') == config.replace(
      dropout_rate=T5Config.dropout_rate)
  # Layer-norm scales were randomised: a reader that dropped them would read ones.
  assert not np.allclose(fl[('encoder', 'encoder_norm', 'scale')], 1.0)


@pytest.mark.parametrize('fmt', ['legacy', 'orbax'])
def test_reproduces_t5x_logits_and_loss(model_dir, fmt):
  config, raw = _t5x_config(model_dir)
  expected = np.load(model_dir / 'expected.npz')  # no pickle
  module, params = load_t5(str(model_dir / fmt))
  assert module.config == config
  logits = module.apply({'params': params}, expected['encoder_input_tokens'],
                        expected['decoder_input_tokens'], expected['decoder_target_tokens'],
                        enable_dropout=False)
  np.testing.assert_allclose(np.asarray(logits), expected['logits'], rtol=0, atol=1e-5)
  loss, _, _ = compute_weighted_cross_entropy(
      logits, expected['decoder_target_tokens'], expected['decoder_loss_weights'],
      label_smoothing=raw['label_smoothing'], z_loss=raw['z_loss'],
      loss_normalizing_factor=raw['loss_normalizing_factor'])
  np.testing.assert_allclose(float(loss), float(expected['loss']), rtol=1e-4)


def test_describe_fixture(model_dir):
  config, _ = _t5x_config(model_dir)
  for fmt in ('legacy', 'orbax'):
    d = describe(str(model_dir / fmt))
    assert d['config'] == config.to_dict()
    assert d['family'] == ('t5_1_1' if 'gated' in model_dir.name else 't5_1_0')
    assert d['config_source'].endswith('config.json') and d['step'] == 2
