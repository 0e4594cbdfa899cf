"""The activation dtype (RunConfig.dtype, --dtype, gin ACTIVATION_DTYPE, network.T5Config.dtype):
T5X's bfloat16 program on T5X's own checkpoints, and bfloat16 runs that train a float32 prompt."""

from __future__ import annotations

import glob
import json
import os
import re

import jax
import numpy as np
import pytest

import data_helpers
from jaxprompt import cli
from jaxprompt.checkpoints.backbone import load_backbone
from jaxprompt.config import ConfigError, RunConfig
from jaxprompt.model import compute_weighted_cross_entropy

FIXTURES = ('t5_1_1_tiny_gated', 't5_1_0_tiny_relu_tied')
GIN_DIR = os.path.join(os.path.dirname(cli.__file__), 'gin')
REQUIRED = ["MODEL_DIR = 'm'", "MIXTURE_OR_TASK_NAME = 't'", "INITIAL_CHECKPOINT_PATH = 'c'"]


@pytest.mark.parametrize('name', FIXTURES)
def test_bfloat16_forward_of_t5x_checkpoints_is_near_t5x_float32(name, t5x_fixtures):
  """T5X's checkpoints run with bfloat16 activations stay near T5X's own float32 logits.

  Measured 2026-12-07 (2-core CPU, jax 0.10.2), both fixtures, legacy and Orbax alike: max
  |logit - T5X's| 0.057 (gated) / 0.051 (relu, tied) for logits up to 3.6 / 4.3; the loss
  within 1.1e-3 / 1.8e-4 relative; the same argmax at every target position. The float32 path
  matches to 1.6e-6 (test_t5x_fixtures). Tolerances: twice those (0.12 abs, 2.5e-3 relative)."""
  model = t5x_fixtures / name
  expected = np.load(model / 'expected.npz')  # no pickle
  raw = json.loads((model / 'config.json').read_text())
  bb = load_backbone(str(model / 'legacy'), activation_dtype='bfloat16')
  assert bb.module.config.dtype == 'bfloat16'
  fp32 = load_backbone(str(model / 'legacy'))
  assert fp32.module.config.dtype == 'float32' and bb.fingerprint == fp32.fingerprint
  logits = np.asarray(jax.jit(lambda p, *batch: bb.module.apply(
      {'params': p}, *batch, enable_dropout=False))(
          bb.params, expected['encoder_input_tokens'], expected['decoder_input_tokens'],
          expected['decoder_target_tokens']))
  assert logits.dtype == np.float32  # T5X's logits layer computes in float32
  diff = np.abs(logits - expected['logits']).max()
  assert 1e-3 < diff < 0.12, diff  # really bfloat16 (float32 is within 2e-6), and near T5X's
  weighted = expected['decoder_loss_weights'] > 0
  np.testing.assert_array_equal(logits.argmax(-1)[weighted],
                                expected['logits'].argmax(-1)[weighted])
  loss, _, _ = compute_weighted_cross_entropy(
      logits, expected['decoder_target_tokens'], expected['decoder_loss_weights'],
      label_smoothing=raw['label_smoothing'], z_loss=raw['z_loss'],
      loss_normalizing_factor=raw['loss_normalizing_factor'])
  np.testing.assert_allclose(float(loss), float(expected['loss']), rtol=2.5e-3)


def test_option_is_checked_and_named():
  assert RunConfig().dtype is None and RunConfig(dtype='bfloat16').dtype == 'bfloat16'
  with pytest.raises(ConfigError, match=r"--dtype, gin ACTIVATION_DTYPE\): unknown value "
                                        r"'float16'") as e:
    RunConfig(dtype='float16')
  assert '\n' not in str(e.value)


def _gin_options(files, bindings=()):
  import gin
  gin.clear_config()
  cli._register_configurables()  # noqa: SLF001
  gin.parse_config_files_and_bindings([cli.resolve_gin_file(f) for f in files],
                                      REQUIRED + list(bindings))
  try:
    return cli.model_config_options(), gin.get_bindings('tune').get('dtype')
  finally:
    gin.clear_config()


@pytest.mark.parametrize('model_file', sorted(glob.glob(os.path.join(GIN_DIR, 'models', '*',
                                                                     '*.gin'))))
def test_shipped_model_files_compute_as_t5x(model_file):
  """The shipped T5 model files run bfloat16 activations as T5X's (`network.T5Config.dtype`);
  the test-sized tiny ones stay float32; ACTIVATION_DTYPE (--dtype) overrides either."""
  name = os.path.relpath(model_file, GIN_DIR)
  options, dtype = _gin_options([name, 'runs/prompt_tune.gin'])
  config = options.get('config')
  assert dtype is None  # the run file leaves it to the model
  if name.endswith('tiny.gin'):
    assert config is None  # binds no network.T5Config field: the named config, float32
  else:
    assert config.dtype == 'bfloat16'
    # only the dtype changed: the named config otherwise
    from jaxprompt.model import get_config
    assert config.replace(dtype='float32') == get_config(config_name(model_file))
  _, dtype = _gin_options([name, 'runs/prompt_tune.gin'], ["ACTIVATION_DTYPE = 'float32'"])
  assert dtype == 'float32'  # RunConfig.dtype, applied over the model's (test below)


def config_name(model_file: str) -> str:
  return re.search(r"^tune\.config = '([^']+)'", open(model_file).read(), re.M).group(1)


def test_t5x_spelling_without_a_model_file():
  """`network.T5Config.dtype` alone (no model file naming a config) is the run's dtype unless
  ACTIVATION_DTYPE says; another field without a named config is a one-line usage error."""
  bf16 = ["network.T5Config.dtype = 'bfloat16'"]
  assert _gin_options(['runs/prompt_tune.gin'], bf16)[0] == {'dtype': 'bfloat16'}
  assert _gin_options(['runs/prompt_tune.gin'], bf16 + ["ACTIVATION_DTYPE = 'float32'"]) == (
      {}, 'float32')
  options, _ = _gin_options(['runs/prompt_tune.gin'], ["tune.config = 't5_1_1_small'",
                                                       'network.T5Config.float32_attention_logits'
                                                       ' = True'] + bf16)
  assert options['config'].float32_attention_logits and options['config'].dtype == 'bfloat16'
  with pytest.raises(cli.UsageError, match='network.T5Config.emb_dim: no model gin file'):
    _gin_options(['runs/prompt_tune.gin'], ['network.T5Config.emb_dim = 8'])


def test_run_dtype_replaces_the_backbones_whatever_its_source(tiny_params):
  from jaxprompt.model import Transformer
  config, params = tiny_params
  bf16 = load_backbone((Transformer(config.replace(dtype='bfloat16')), params))
  back = load_backbone(bf16, activation_dtype='float32')
  assert back.module.config == config and bf16.module.config.dtype == 'bfloat16'
  assert back.fingerprint == load_backbone((Transformer(config), params)).fingerprint


@pytest.fixture(scope='module')
def tiny_task(tmp_path_factory):
  """A tiny T5.1.1 checkpoint and a file task on the test vocabulary."""
  from jaxprompt.checkpoints import save_t5x_legacy
  from jaxprompt.data.files import register_file_task
  from jaxprompt.model import get_config, init_params
  root = tmp_path_factory.mktemp('dtype')
  vocab = data_helpers.vocabulary()
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  ckpt = save_t5x_legacy(init_params(cfg, 0), str(root / 'backbone'), 1)
  rs = np.random.RandomState(0)
  rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 4)) + (' good' if i % 2 else ' bad'),
           'label': i % 2} for i in range(24)]
  train = data_helpers.write_jsonl(root / 'train.jsonl', rows[:16])
  dev = data_helpers.write_jsonl(root / 'dev.jsonl', rows[16:])
  register_file_task('dtype_task', train, dev, input_column='text', label_column='label',
                     label_names=['no', 'yes'], vocabulary=vocab)
  return dict(root=root, ckpt=ckpt, train=train, dev=dev)


def _spy_on_the_train_step(monkeypatch) -> list:
  """The StableHLO text of the first train step a run compiles (lowered before it runs)."""
  from jaxprompt.train import engine
  texts, step = [], engine.Engine.train_step

  def spy(self, state, frozen, batch, rng):
    if not texts:
      lowered = self.lower_train(state, batch, rng)
      texts.append((lowered.as_text(), lowered.out_info))
    return step(self, state, frozen, batch, rng)
  monkeypatch.setattr(engine.Engine, 'train_step', spy)
  return texts


def _dots(text: str) -> list[str]:
  return [line for line in text.splitlines() if 'dot_general' in line]


def test_gin_activation_dtype_compiles_a_bfloat16_step(tiny_task, monkeypatch, capsys):
  """`--gin.ACTIVATION_DTYPE="'bfloat16'"` as in T5X: the compiled train step's matmuls are
  bfloat16 (the float32 prompt's and the loss's float32), the prompt file float32."""
  from jaxprompt.prompts.files import read_prompt
  texts = _spy_on_the_train_step(monkeypatch)
  run = tiny_task['root'] / 'gin_run'
  code = cli.main(['tune', '--gin_file=runs/prompt_tune.gin', '--backbone', tiny_task['ckpt'],
                   '--model_dir', str(run), '--task', 'dtype_task', '--steps', '2',
                   '--eval_period', '2', '--batch_size', '4', '--prompt_length', '3',
                   '--inputs_length', '12', '--targets_length', '3',
                   "--gin.ACTIVATION_DTYPE='bfloat16'", '--gin.tune.eval_split=None'])
  assert code == 0, capsys.readouterr().err
  text, out_info = texts[0]
  dots = _dots(text)
  assert dots and sum('bf16' in d for d in dots) >= len(dots) // 2, dots
  state_out, metrics_out = out_info
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state_out.trainable))
  assert metrics_out['loss'].dtype == np.float32
  manifest = json.loads((run / 'manifest.json').read_text())
  assert manifest['t5_config']['dtype'] == 'bfloat16' and manifest['config']['dtype'] == 'bfloat16'
  assert read_prompt(str(run / 'prompt_final.safetensors')).value.dtype == np.float32


def test_python_api_dtype_trains_a_float32_prompt(tiny_task, monkeypatch):
  """`tune(dtype='bfloat16')`: the backbone computes in bfloat16, the prompt and its Adafactor
  state stay float32 and move; without the option the API's default stays float32."""
  import jaxprompt
  texts = _spy_on_the_train_step(monkeypatch)
  result = jaxprompt.tune('dtype_task', backbone=tiny_task['ckpt'],
                          model_dir=str(tiny_task['root'] / 'api_run'), dtype='bfloat16',
                          train_steps=3, eval_period=3, batch_size=4, prompt_length=3,
                          feature_lengths={'inputs': 12, 'targets': 3}, progress=False,
                          prompt_init='uniform', eval_split=None)
  assert result.backbone.module.config.dtype == 'bfloat16'
  assert any('bf16' in d for d in _dots(texts[0][0]))
  floats = [x for x in jax.tree.leaves((result.trainable, result.opt_state))
            if np.issubdtype(x.dtype, np.floating)]
  assert all(x.dtype == np.float32 and np.all(np.isfinite(x)) for x in floats)
  # Adafactor's second moments of the prompt: finite gradients reached it
  assert any(np.abs(x).sum() > 0 for x in jax.tree.leaves(result.opt_state)
             if np.issubdtype(x.dtype, np.floating) and x.ndim >= 1)
  from jaxprompt.prompts.files import read_prompt
  assert read_prompt(result.prompt_path).value.dtype == np.float32
  assert result.final_metrics is None  # no validation here (eval_split=None): a cheaper run
  assert RunConfig().dtype is None  # the API default: the checkpoint config's own, float32
