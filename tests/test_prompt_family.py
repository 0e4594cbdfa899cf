"""The prompt family: P-tuning, residual prompt tuning, MPT and ATTEMPT, against independent
numpy (float64) recomputations; their products read back like any prompt (or rebuild the
mixture); bad options fail in one line; and `jaxprompt compare` on a tiny backbone.

(The contract suite runs each method through the driver: resume, devices, eval = best;
tests/test_peft_family_parity.py compares P-tuning and MPT with HF PEFT.)
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.config import ConfigError
from jaxprompt.methods import get_method
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.prompts.files import read_prompt


def np64(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def numpy_layer_norm(x, scale, bias, eps=1e-5):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


# ----------------------------------------------------------------------------- P-tuning


def numpy_lstm(x, w_ih, w_hh, b_ih, b_hh, reverse=False):
  h = c = np.zeros(w_hh.shape[0])
  out = np.zeros((x.shape[0], w_hh.shape[0]))
  sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  for step in (reversed(range(x.shape[0])) if reverse else range(x.shape[0])):
    i, f, g, o = np.split(x[step] @ w_ih + b_ih + h @ w_hh + b_hh, 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    out[step] = h
  return out


def numpy_p_tuning(p):
  x = p['embedding']
  layers = sorted(k for k in p if k.startswith('lstm_') and k.endswith('_forward'))
  for i in range(len(layers)):
    x = np.concatenate([numpy_lstm(x, **p[f'lstm_{i}_forward']),
                        numpy_lstm(x, **p[f'lstm_{i}_backward'], reverse=True)], -1)
  mlp = sorted(k for k in p if k.startswith('mlp_'))
  for j, name in enumerate(mlp):
    x = x @ p[name]['kernel'] + p[name]['bias']
    if j < len(mlp) - 1:
      x = np.maximum(x, 0)
  return x


@pytest.mark.parametrize('encoder_type,layers', [('mlp', 2), ('lstm', 1), ('lstm', 3)])
def test_p_tuning_encoder_matches_a_float64_recomputation(encoder_type, layers):
  from jaxprompt.methods.p_tuning import PromptEncoder, encode
  params = PromptEncoder(6, 10, 4, encoder_type, layers).init(jax.random.PRNGKey(1))['params']
  if encoder_type == 'lstm':
    assert sum(k.startswith('lstm_') for k in params) == 2 * layers
  else:
    assert sorted(params) == ['embedding', 'mlp_0', 'mlp_1', 'mlp_2']  # always three layers
  np.testing.assert_allclose(np.asarray(encode(params)), numpy_p_tuning(np64(params)),
                             rtol=1e-5, atol=1e-6)


def test_p_tuning_product_is_the_plain_prompt_it_produces(tmp_path):
  from jaxprompt.checkpoints.peft import export_peft
  from jaxprompt.methods.p_tuning import PromptEncoder, encode
  m = get_method('p_tuning')
  trainable = PromptEncoder(4, 8, 5, 'lstm').init(jax.random.PRNGKey(2))['params']
  path = m.save_product(trainable, {}, str(tmp_path / 'prompt_best'), {'task': 't'})
  pf = read_prompt(path)
  assert pf.value.shape == (4, 8) and pf.metadata['method'] == 'p_tuning'
  np.testing.assert_allclose(pf.value, np.asarray(encode(trainable)), rtol=1e-6, atol=1e-7)
  plain = prompt_lib.prompt_tree(jnp.asarray(pf.value))
  _, prompt = m.eval_inputs(plain, {'backbone': None}, {})  # a product evaluates as a prompt
  np.testing.assert_array_equal(np.asarray(prompt), pf.value)
  adapter = export_peft(path, str(tmp_path / 'peft'))
  np.testing.assert_array_equal(read_prompt(adapter).value, pf.value)


def test_p_tuning_options_fail_in_one_line():
  from jaxprompt.methods.p_tuning import PTuningOptions
  with pytest.raises(ConfigError, match=r'--encoder_type'):
    PTuningOptions(encoder_type='gru')
  with pytest.raises(ConfigError, match=r'--encoder_hidden_size'):
    PTuningOptions(encoder_hidden_size=0)


# ----------------------------------------------------------------------------- residual


@pytest.mark.parametrize('per_token', [False, True])
def test_residual_prompt_matches_a_float64_recomputation(per_token):
  from jaxprompt.methods.residual_prompt import init_residual_mlp, residual_prompt
  rs = np.random.default_rng(0)
  prompt = rs.normal(0, 1, (5, 12)).astype(np.float32)
  mlp = init_residual_mlp(jax.random.PRNGKey(3), 5, 12, 7, per_token)
  mlp['norm']['scale'] = mlp['norm']['scale'] * 1.5
  mlp['norm']['bias'] = mlp['norm']['bias'] + 0.25
  trainable = {'prompt': jnp.asarray(prompt), 'mlp': mlp}
  p = np64(trainable)
  m = p['mlp']
  if per_token:
    assert m['down']['kernel'].shape == (5, 12, 7)
    h = np.maximum(np.einsum('pd,pdm->pm', p['prompt'], m['down']['kernel']) + m['down']['bias'],
                   0)
    y = np.einsum('pm,pmd->pd', h, m['up']['kernel']) + m['up']['bias']
  else:
    assert m['down']['kernel'].shape == (12, 7)
    y = np.maximum(p['prompt'] @ m['down']['kernel'] + m['down']['bias'], 0) @ m['up'][
        'kernel'] + m['up']['bias']
  want = p['prompt'] + numpy_layer_norm(y, m['norm']['scale'], m['norm']['bias'])
  got = np.asarray(residual_prompt(trainable))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the branch is layer-normalised (per token: mean = bias, std ~ scale) and skip-connected
  branch = got - prompt
  np.testing.assert_allclose(branch.mean(-1), 0.25, atol=1e-5)
  np.testing.assert_allclose(branch.std(-1), 1.5, rtol=1e-3)


def test_residual_prompt_trains_prompt_and_mlp_with_adamw_at_the_authors_rate():
  from jaxprompt.methods.residual_prompt import ResidualOptions
  m = get_method('residual_prompt')
  assert (m.learning_rate, m.weight_decay) == (0.3, 1e-5)
  assert ResidualOptions().bottleneck_size == 800 and ResidualOptions().residual_mlp == 'shared'
  with pytest.raises(ConfigError, match=r'--residual_mlp'):
    ResidualOptions(residual_mlp='separate')


# ----------------------------------------------------------------------------- MPT


def test_mpt_prompts_are_the_shared_prompt_times_rank_r_task_matrices():
  from jaxprompt.methods.multitask_prompt import mpt_inputs, task_prompts
  rs = np.random.default_rng(1)
  n, length, width, rank = 3, 4, 9, 2
  trainable = {'shared': rs.normal(0, 1, (length, width)),
               'task_cols': rs.normal(0, 1, (n, length, rank)),
               'task_rows': rs.normal(0, 1, (n, rank, width))}
  trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable)
  p = np64(trainable)
  stack = np.asarray(task_prompts(trainable))
  for k in range(n):
    w_k = p['task_cols'][k] @ p['task_rows'][k]
    assert np.linalg.matrix_rank(w_k) == rank
    np.testing.assert_allclose(stack[k], p['shared'] * w_k, rtol=1e-5, atol=1e-5)
  index = np.array([2, 2, 0, 1], np.int32)
  _, per_example = mpt_inputs(trainable, {'backbone': None}, {'task_index': jnp.asarray(index)})
  np.testing.assert_allclose(np.asarray(per_example), stack[index], rtol=1e-6, atol=1e-6)


def test_mpt_target_starts_from_a_source_product(tmp_path):
  from jaxprompt.methods.multitask_prompt import MPTOptions, source_init
  m = get_method('multitask_prompt')
  rs = np.random.default_rng(2)
  source = {'shared': jnp.asarray(rs.normal(0, 1, (4, 6)), jnp.float32),
            'task_cols': jnp.asarray(rs.normal(0, 1, (3, 4, 2)), jnp.float32),
            'task_rows': jnp.asarray(rs.normal(0, 1, (3, 2, 6)), jnp.float32)}
  path = m.save_product(source, {}, str(tmp_path / 'src'), {'tasks': ['a', 'b', 'c']})
  assert read_prompt(path).value.shape == (3, 4, 6)  # each task's prompt, a stack
  shared, cols, rows = source_init(path, 4, 6, 2, 2, 'average', None)
  np.testing.assert_array_equal(shared, np.asarray(source['shared']))
  np.testing.assert_allclose(cols[1], np.asarray(source['task_cols']).mean(0), rtol=1e-6)
  assert cols.shape == (2, 4, 2) and rows.shape == (2, 2, 6)  # one copy per target task
  _, cols, _ = source_init(path, 4, 6, 2, 1, 'exact', 'c')
  np.testing.assert_array_equal(cols[0], np.asarray(source['task_cols'])[2])
  with pytest.raises(ConfigError, match=r'--mpt_rank 2'):
    source_init(path, 4, 6, 3, 1, 'average', None)
  with pytest.raises(ConfigError, match=r'--prompt_length 4'):
    source_init(path, 5, 6, 2, 1, 'average', None)
  with pytest.raises(ConfigError, match=r'--mpt_init_task'):
    source_init(path, 4, 6, 2, 1, 'exact', 'z')
  with pytest.raises(ConfigError, match=r'--mpt_init_task'):
    MPTOptions(mpt_init='exact')
  trainable, _ = m.load_product(path, _Ctx(6))
  jax.tree_util.tree_map(np.testing.assert_array_equal, trainable, source)


class _Ctx:
  def __init__(self, width):
    self.width = width


# ----------------------------------------------------------------------------- ATTEMPT


def test_attempt_mixture_matches_a_float64_recomputation():
  from jaxprompt.methods.attempt import attempt_inputs, init_attention
  rs = np.random.default_rng(3)
  vocab, width, length, sources = 20, 8, 3, 2
  embedding = rs.normal(0, 1, (vocab, width)).astype(np.float32)
  tokens = np.array([[4, 7, 1, 0, 0], [9, 1, 0, 0, 0], [3, 3, 5, 8, 1]], np.int32)
  trainable = {'prompt': jnp.asarray(rs.normal(0, 1, (length, width)), jnp.float32),
               'attention': init_attention(jax.random.PRNGKey(4), width, 5)}
  frozen = {'backbone': {'token_embedder': {'embedding': jnp.asarray(embedding)}},
            'source_prompts': jnp.asarray(rs.normal(0, 1, (sources, length, width)), jnp.float32),
            'temperature': jnp.float32(0.7)}
  _, prompts = attempt_inputs(trainable, frozen, {'encoder_input_tokens': jnp.asarray(tokens)})
  assert prompts.shape == (3, length, width)  # one prompt per example

  p, f = np64(trainable), np64(frozen)
  a = p['attention']
  stack = np.concatenate([f['source_prompts'], p['prompt'][None]])
  for b in range(3):
    x = f['backbone']['token_embedder']['embedding'][tokens[b][tokens[b] > 0]].max(0)
    z = x @ a['w_down']
    h = numpy_layer_norm((z / (1 + np.exp(-z))) @ a['w_up'], a['norm_scale'], a['norm_bias'])
    scores = stack.max(1) @ h / 0.7
    weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    want = p['prompt'] + np.tensordot(weights, stack, axes=1)
    np.testing.assert_allclose(np.asarray(prompts[b]), want, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(prompts[0] - prompts[1])).max() > 1e-3  # input-conditioned


def test_attempt_sources_are_frozen_and_come_from_a_spot_library(tmp_path):
  from jaxprompt.methods import library as lib
  from jaxprompt.methods.attempt import AttemptOptions, source_specs
  rs = np.random.default_rng(5)
  directory = str(tmp_path / 'library')
  for task in ('src_a', 'src_b', 'target'):
    lib.add(directory, rs.normal(0, 1, (3, 8)).astype(np.float32), task=task)
  specs = source_specs(AttemptOptions(source_library=directory), ('target',), 8, 3)
  assert specs == [f'{directory}:src_a', f'{directory}:src_b']  # all but the run's own task
  specs = source_specs(AttemptOptions(source_library=directory, source_tasks='src_b'),
                       ('target',), 8, 3)
  assert specs == [f'{directory}:src_b']
  with pytest.raises(ConfigError, match=r'--source_tasks'):
    source_specs(AttemptOptions(source_library=directory, source_tasks='nope'), ('t',), 8, 3)
  with pytest.raises(ConfigError, match=r'--source_library'):
    source_specs(AttemptOptions(), ('t',), 8, 3)
  from jaxprompt.methods.attempt import load_source_prompts
  with pytest.raises(ConfigError, match=r'--prompt_length 3'):
    load_source_prompts([f'{directory}:src_a'], 0, 8, 5)
  # Gradients reach the target prompt and the attention module, never the sources (frozen).
  from jaxprompt.methods.attempt import attempt_inputs, init_attention
  sources = jnp.asarray(load_source_prompts(specs, 0, 8, 3))
  trainable = {'prompt': jnp.ones((3, 8)), 'attention': init_attention(jax.random.PRNGKey(0),
                                                                       8, 4)}
  frozen = {'backbone': {'token_embedder': {'embedding': jnp.asarray(rs.normal(0, 1, (10, 8)),
                                                                     jnp.float32)}},
            'source_prompts': sources, 'temperature': jnp.float32(math.e * 8)}
  batch = {'encoder_input_tokens': jnp.array([[2, 3, 1], [4, 1, 0]])}
  grads = jax.grad(lambda t: jnp.sum(attempt_inputs(t, frozen, batch)[1] ** 2))(trainable)
  assert float(jnp.abs(grads['attention']['w_down']).max()) > 0
  assert set(grads) == {'prompt', 'attention'}


def test_attempt_product_rebuilds_the_mixture(tmp_path):
  from jaxprompt.methods.attempt import attempt_inputs, init_attention
  m = get_method('attempt')
  rs = np.random.default_rng(6)
  trainable = {'prompt': jnp.asarray(rs.normal(0, 1, (3, 8)), jnp.float32),
               'attention': init_attention(jax.random.PRNGKey(1), 8, 4)}
  extras = {'source_prompts': jnp.asarray(rs.normal(0, 1, (2, 3, 8)), jnp.float32),
            'temperature': jnp.float32(2.5)}
  path = m.save_product(trainable, extras, str(tmp_path / 'prompt_best'), {'task': 't'})
  assert read_prompt(path).metadata['method'] == 'attempt'
  loaded, loaded_extras = m.load_product(path, _Ctx(8))
  embedding = {'token_embedder': {'embedding': jnp.asarray(rs.normal(0, 1, (10, 8)),
                                                           jnp.float32)}}
  batch = {'encoder_input_tokens': jnp.array([[2, 3, 1], [4, 1, 0]])}
  want = attempt_inputs(trainable, {'backbone': embedding, **extras}, batch)[1]
  got = attempt_inputs(loaded, {'backbone': embedding, **loaded_extras}, batch)[1]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- compare


@pytest.mark.slow  # four tiny runs and a reused pair (~90 s on 2 cores)
def test_compare_rows_and_table(tmp_path):
  import test_methods_contract as contract
  from jaxprompt.methods import compare as compare_lib
  from jaxprompt.model import Transformer, get_config, init_params
  info = contract._setup(str(tmp_path / 'data'))
  cfg = get_config('t5_1_1_tiny', vocab_size=info['vocab_size'], dropout_rate=0.0)
  backbone = (Transformer(cfg), init_params(cfg, 0))
  options = compare_lib.parse_set(['batch_size=8', 'eval_period=3', 'prompt_length=3',
                                   "feature_lengths={'inputs': 12, 'targets': 4}",
                                   'bottleneck_size=4'])
  with pytest.raises(ConfigError, match=r'--set nope'):
    compare_lib.compare(['prompt_tuning'], 'contract_a', backbone=backbone, seeds=[0],
                        train_steps=3, work_dir=str(tmp_path), options={'nope': 1})
  rows = compare_lib.compare(['prompt_tuning', 'residual_prompt'], 'contract_a',
                             backbone=backbone, seeds=[0, 1], train_steps=3,
                             work_dir=str(tmp_path / 'runs'), options=options)
  assert [r.method for r in rows] == ['prompt_tuning', 'residual_prompt']
  pt, res = rows
  assert pt.trainable_params == 3 * cfg.emb_dim
  assert res.trainable_params == 3 * cfg.emb_dim + (cfg.emb_dim * 4 + 4) + (
      4 * cfg.emb_dim + cfg.emb_dim) + 2 * cfg.emb_dim
  for r in rows:
    assert len(r.scores) == 2 and all(0.0 <= s <= 100.0 for s in r.scores)
    assert r.step_ms > 0 and r.peak_rss_mib > 50
    assert r.spread == pytest.approx(float(np.std(r.scores, ddof=1)))
    for seed in (0, 1):
      assert os.path.isfile(os.path.join(tmp_path, 'runs', r.method, f'seed_{seed}',
                                         'prompt_best.safetensors'))
  table = compare_lib.format_table(rows, 'contract_a', 3)
  assert 'residual_prompt' in table and f'{res.trainable_params:,}' in table
  assert f'{pt.mean:.2f} +- {pt.spread:.2f} (n=2)' in table
  del options['bottleneck_size']  # residual_prompt's own: refused when no method has it
  again = compare_lib.compare(['prompt_tuning'], 'contract_a', backbone=backbone, seeds=[0, 1],
                              train_steps=3, work_dir=str(tmp_path / 'runs'), options=options)
  assert again[0].scores == pt.scores  # finished runs are reused, not trained again
