"""The frozen backbone in less memory: rematerialised layers, bf16 frozen weights, scanned stacks.

None of them may change the parameter tree a checkpoint holds, nor (beyond float rounding) the
numbers: each is checked against the plain float32, unrolled, no-remat model.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.model import (Transformer, cast_frozen, get_config, init_params, loss_and_metrics,
                             stack_layers, unstack_layers)
from jaxprompt.model import decoding
from jaxprompt.model.network import param_shapes, params_axes

POLICIES = ('none', 'minimal', 'full')


def _paths(tree):
  from jaxprompt.checkpoints import flatten
  return flatten(tree).items()


def _batch(cfg, batch=3, length=9, targets=5, prompt_length=4, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, cfg.vocab_size, (batch, length)).astype(np.int32)
  enc[1, -3:] = 0  # padding
  tgt = rng.integers(2, cfg.vocab_size, (batch, targets)).astype(np.int32)
  tgt[2, -2:] = 0
  dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
  prompt = jnp.asarray(rng.normal(0, 0.5, (prompt_length, cfg.emb_dim)), jnp.float32)
  return dict(enc=enc, dec=dec, tgt=tgt), prompt


def _loss_and_grads(module, params, batch, prompt, dropout_seed=None):
  """T5X loss and its gradients w.r.t. the prompt and the backbone, one jitted program."""
  rngs = {} if dropout_seed is None else {'dropout': jax.random.PRNGKey(dropout_seed)}

  def loss(prompt, params):
    logits = module.apply({'params': params}, batch['enc'], batch['dec'], batch['tgt'],
                          enable_dropout=dropout_seed is not None, prompt=prompt, rngs=rngs)
    value, _ = loss_and_metrics(logits, batch['tgt'], (batch['tgt'] > 0).astype(jnp.float32))
    return value

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(prompt, params)
  return float(value), np.asarray(grads[0]), jax.tree_util.tree_map(np.asarray, grads[1])


@pytest.fixture(scope='module')
def tiny():
  cfg = get_config('t5_1_1_tiny', dropout_rate=0.1)
  return cfg, init_params(cfg, 0)


# ---- remat ----

@pytest.mark.parametrize('policy', POLICIES)
def test_remat_keeps_the_parameter_tree_and_axes(policy):
  cfg = get_config('t5_1_1_tiny')
  variables = jax.eval_shape(lambda: Transformer(cfg, remat_policy=policy).init(
      jax.random.PRNGKey(0), *(jnp.ones((1, 1), jnp.int32),) * 3, enable_dropout=False))
  plain_shapes, plain_axes = param_shapes(cfg), params_axes(cfg)
  assert jax.tree_util.tree_structure(variables['params']) == jax.tree_util.tree_structure(
      plain_shapes)
  for (path, got), (_, want) in zip(_paths(variables['params']), _paths(plain_shapes)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype), path
  assert ({p: a.names for p, a in _paths(variables['params_axes'])} ==
          {p: a.names for p, a in _paths(plain_axes)})


def test_remat_tree_is_the_t5x_checkpoints(t5x_fixtures):
  """A checkpoint T5X wrote applies to every remat/scan variant (its leaves, one for one)."""
  from jaxprompt.checkpoints import flatten, read_params
  model_dir = t5x_fixtures / 't5_1_1_tiny_gated'
  params, info = read_params(str(model_dir / 'legacy'))
  cfg = info['config']
  want = {p: np.shape(v) for p, v in flatten(params).items()}
  for policy in POLICIES:
    module = Transformer(cfg, remat_policy=policy)
    got = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *(jnp.ones((1, 1), jnp.int32),)
                                             * 3, enable_dropout=False))['params']
    assert {p: s.shape for p, s in _paths(got)} == want
  stacked = {p: s.shape for p, s in _paths(stack_layers(param_shapes(cfg)))}
  assert stacked == {p: s.shape for p, s in _paths(param_shapes(cfg, scan_layers=True))}


@pytest.fixture(scope='module')
def no_remat_with_dropout(tiny):
  cfg, params = tiny
  batch, prompt = _batch(cfg)
  return _loss_and_grads(Transformer(cfg), params, batch, prompt, dropout_seed=7)


@pytest.mark.parametrize('policy', [pytest.param('minimal', marks=pytest.mark.slow), 'full'])
def test_remat_equals_no_remat_with_dropout(tiny, no_remat_with_dropout, policy):
  """Loss and gradients (prompt and backbone) with dropout on, against no remat.

  Not bit-exact: remat recomputes the same forward, but XLA fuses the recomputed region with
  the backward pass differently, so float32 sums may round differently (measured: loss
  equal, gradients within ~1e-7 relative). The dropout masks are the same draws (the layers'
  rng paths do not change), so a mask difference would show as an O(1) error.
  """
  cfg, params = tiny
  batch, prompt = _batch(cfg)
  ref = no_remat_with_dropout
  got = _loss_and_grads(Transformer(cfg, remat_policy=policy), params, batch, prompt,
                        dropout_seed=7)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         got[2], ref[2])


def test_unknown_remat_policy_is_a_clear_error(tiny):
  cfg, params = tiny
  batch, _ = _batch(cfg)
  with pytest.raises(ValueError, match="remat_policy 'dots'.*none, minimal, full"):
    Transformer(cfg, remat_policy='dots').apply({'params': params}, batch['enc'], batch['dec'],
                                                batch['tgt'], enable_dropout=False)


# ---- scanned layers ----

def test_scanned_tree_stacks_layers_on_a_leading_layers_axis():
  cfg = get_config('t5_1_1_tiny')
  shapes, axes = param_shapes(cfg, scan_layers=True), params_axes(cfg, scan_layers=True)
  plain = param_shapes(cfg)
  assert set(shapes['encoder']) == {'layers', 'relpos_bias', 'encoder_norm'}
  assert 'logits_dense' in shapes['decoder'] and 'layers_0' not in shapes['decoder']
  for stack, count in (('encoder', cfg.num_encoder_layers), ('decoder', cfg.num_decoder_layers)):
    layer_0 = dict(_paths(plain[stack]['layers_0']))
    scanned = dict(_paths(shapes[stack]['layers']))
    assert set(scanned) == set(layer_0)
    for path, s in scanned.items():
      assert s.shape == (count,) + layer_0[path].shape, (stack, path)
  names = {p: a.names for p, a in _paths(axes)}
  assert names[('encoder', 'layers', 'attention', 'query', 'kernel_axes')] == (
      'layers', 'embed', 'joined_kv')
  assert names[('decoder', 'layers', 'mlp', 'wo', 'kernel_axes')] == ('layers', 'mlp', 'embed')
  assert names[('decoder', 'relpos_bias', 'rel_embedding_axes')] == ('heads', 'relpos_buckets')


def test_stack_unstack_round_trip(tiny):
  _, params = tiny
  stacked = stack_layers(params)
  assert stacked['encoder']['layers']['mlp']['wi_0']['kernel'].shape[0] == 2
  np.testing.assert_array_equal(stacked['decoder']['layers']['mlp']['wo']['kernel'][1],
                                params['decoder']['layers_1']['mlp']['wo']['kernel'])
  back = unstack_layers(stacked)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  numpy_tree = jax.tree_util.tree_map(np.asarray, params)  # numpy stays numpy
  assert isinstance(stack_layers(numpy_tree)['encoder']['layers']['mlp']['wo']['kernel'],
                    np.ndarray)
  with pytest.raises(ValueError, match='scanned already'):
    stack_layers(stacked)
  gap = {**params, 'encoder': {k: v for k, v in params['encoder'].items() if k != 'layers_0'}}
  with pytest.raises(ValueError, match='not numbered'):
    stack_layers(gap)


@pytest.mark.parametrize('policy', [pytest.param('none', marks=pytest.mark.slow), 'full'])
def test_scanned_equals_unrolled(tiny, policy):
  """Loss, prompt gradient and every backbone gradient (unstacked) of the scanned model equal
  the unrolled model's to float32 rounding (the same arithmetic in a loop; XLA may fuse the
  loop body differently). Dropout off: a scan splits the dropout rng per layer, so its masks
  are other draws than the unrolled layers' (both are valid dropout)."""
  cfg, params = tiny
  batch, prompt = _batch(cfg)
  ref = _loss_and_grads(Transformer(cfg), params, batch, prompt)
  got = _loss_and_grads(Transformer(cfg, remat_policy=policy, scan_layers=True),
                        stack_layers(params), batch, prompt)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         unstack_layers(got[2]), ref[2])


@pytest.mark.slow
def test_scanned_dropout_is_on_and_deterministic(tiny):
  cfg, params = tiny
  batch, prompt = _batch(cfg)
  module, stacked = Transformer(cfg, scan_layers=True), stack_layers(params)
  off = _loss_and_grads(module, stacked, batch, prompt)[0]
  on = [_loss_and_grads(module, stacked, batch, prompt, dropout_seed=s)[0] for s in (1, 1, 2)]
  assert on[0] == on[1] != on[2] and abs(on[0] - off) > 1e-3


@pytest.mark.slow
def test_scanned_decoding_equals_unrolled(tiny):
  cfg, params = tiny
  batch, prompt = _batch(cfg)
  plain, scanned = Transformer(cfg), Transformer(cfg, scan_layers=True, remat_policy='minimal')
  stacked = stack_layers(params)
  np.testing.assert_array_equal(
      decoding.greedy_decode(scanned, stacked, batch['enc'], 5, prompt=prompt),
      decoding.greedy_decode(plain, params, batch['enc'], 5, prompt=prompt))
  seqs, scores = decoding.beam_search(scanned, stacked, batch['enc'], 5, num_beams=3,
                                      prompt=prompt)
  want_seqs, want_scores = decoding.beam_search(plain, params, batch['enc'], 5, num_beams=3,
                                                prompt=prompt)
  np.testing.assert_array_equal(seqs, want_seqs)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


@pytest.mark.slow
def test_remat_in_a_scan_keeps_less_for_the_backward_pass():
  """Compiled (CPU, 1 device) temporaries of the prompt-gradient program, scanned stacks.

  Measured (d=64, mlp 256, 4+4 layers, batch 8 x 138 tokens): none 73.7 MB, minimal 31.3 MB,
  full 21.7 MB. Unrolled, XLA's CPU scheduler hoists the recomputation and keeps little of the
  saving (66.9 / 62.1 / 62.3 MB); the TPU and GPU compilers schedule for memory (see
  `jaxprompt plan`).
  """
  cfg = get_config('t5_1_1_tiny', emb_dim=64, mlp_dim=256, num_encoder_layers=4,
                   num_decoder_layers=4)
  shapes = param_shapes(cfg, scan_layers=True)
  args = (shapes, jax.ShapeDtypeStruct((10, 64), jnp.float32),
          jax.ShapeDtypeStruct((8, 128), jnp.int32), jax.ShapeDtypeStruct((8, 8), jnp.int32),
          jax.eval_shape(lambda: jax.random.PRNGKey(0)))

  def temp_bytes(policy):
    module = Transformer(cfg, remat_policy=policy, scan_layers=True)

    def prompt_grad(params, prompt, enc, dec, rng):
      return jax.grad(lambda p: jnp.sum(module.apply(
          {'params': params}, enc, dec, dec, prompt=p, rngs={'dropout': rng})))(prompt)

    return jax.jit(prompt_grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

  none, minimal, full = (temp_bytes(p) for p in POLICIES)
  assert full < minimal < none / 1.5


# ---- bf16 frozen weights ----

def test_cast_frozen_casts_floating_leaves_only():
  tree = {'w': np.ones((2, 3), np.float32), 'j': jnp.ones((2,), jnp.float32),
          'i': np.arange(3), 's': jax.ShapeDtypeStruct((4,), jnp.float32)}
  cast = cast_frozen(tree, 'bfloat16')
  assert isinstance(cast['w'], np.ndarray) and cast['w'].dtype == jnp.bfloat16
  assert isinstance(cast['j'], jax.Array) and cast['j'].dtype == jnp.bfloat16
  assert cast['i'].dtype == tree['i'].dtype and cast['s'].dtype == jnp.bfloat16
  assert cast_frozen(tree, 'float32')['w'] is tree['w']  # nothing to do: no copy
  with pytest.raises(ValueError, match="param_dtype 'float16' is not one of float32, bfloat16"):
    cast_frozen(tree, 'float16')


def _bf16_errors(cfg, params, batch, prompt):
  """{(weights, activations): (loss rel. error, logits max error / max |logit|, prompt-grad
  rel. norm error)} against float32 weights and activations."""
  def run(params, activations):
    module = Transformer(cfg.replace(dtype=activations))

    def loss(prompt, params):  # params an argument: captured, XLA would fold 77M constants
      logits = module.apply({'params': params}, batch['enc'], batch['dec'], batch['tgt'],
                            enable_dropout=False, prompt=prompt)
      value, _ = loss_and_metrics(logits, batch['tgt'], (batch['tgt'] > 0).astype(jnp.float32))
      return value, logits

    (value, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(prompt, params)
    assert grad.dtype == jnp.float32  # the trainable's gradient stays float32
    return float(value), np.asarray(logits, np.float32), np.asarray(grad)

  ref_loss, ref_logits, ref_grad = run(params, 'float32')
  real = np.broadcast_to((batch['tgt'] > 0)[..., None], ref_logits.shape)
  out = {}
  bf16 = cast_frozen(params, 'bfloat16')
  for activations in ('float32', 'bfloat16'):
    value, logits, grad = run(bf16, activations)
    out[activations] = (abs(value - ref_loss) / abs(ref_loss),
                        np.abs(logits - ref_logits)[real].max() / np.abs(ref_logits).max(),
                        np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad))
  return out


@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_1_0_tiny'])
def test_bf16_weights_work_with_both_activation_dtypes(name):
  """Every param use casts (embedding, norms, relpos, attention, MLP, the float32 head or the
  tied float32 `attend`), so bf16 weights run with float32 and bfloat16 activations; the
  errors are bf16-sized: nonzero and small. (Tolerances at real shapes: the slow test below.)"""
  cfg = get_config(name, dropout_rate=0.0)
  params = init_params(cfg, 0)
  batch, prompt = _batch(cfg)

  def logits(params, activations):
    module = Transformer(cfg.replace(dtype=activations))
    out = jax.jit(lambda p: module.apply({'params': p}, batch['enc'], batch['dec'], batch['tgt'],
                                         enable_dropout=False, prompt=prompt))(params)
    assert out.dtype == jnp.float32  # both heads compute in float32
    return np.asarray(out)

  ref = logits(params, 'float32')
  bf16 = cast_frozen(params, 'bfloat16')
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
  for activations in ('float32', 'bfloat16'):
    err = np.abs(logits(bf16, activations) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, activations


@pytest.mark.slow
def test_bf16_weights_tolerance_at_t5_1_1_small_shapes():
  """bf16 frozen weights against float32 on T5.1.1-small shapes (77M params, vocab 32128; T5X
  initialisers), batch 4 x (20 prompt + 48 input tokens with padding), 8 targets.

  Measured (seeds 0 and 1), against float32 weights and activations:
    bf16 weights, float32 activations: loss rel. error 8.7e-6 / 1.6e-4, logits max error
      0.63% / 0.56% of max |logit|, prompt gradient rel. norm error 1.1% / 1.0%;
    bf16 weights, bf16 activations: 3.1e-5 / 4.4e-4, 1.40% / 1.33%, 2.6% / 2.4% (float32
      weights with bf16 activations: 7.6e-6 / 4.0e-4, 1.41% / 1.35%, 2.6% / 2.4%: the
      activations dominate, bf16 weights add little).
  The bounds are about twice the measured values.
  """
  cfg = get_config('t5_1_1_small', dropout_rate=0.0)
  params = init_params(cfg, 0)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 32000, (4, 48)).astype(np.int32)
  enc[:, -5:] = 0
  enc[:, -6] = 1
  tgt = rng.integers(2, 32000, (4, 8)).astype(np.int32)
  tgt[:, -2:] = 0
  tgt[:, -3] = 1
  dec = np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], 1)
  embedding = np.asarray(params['token_embedder']['embedding'])
  prompt = jnp.asarray(embedding[rng.integers(0, 5000, 20)])
  errors = _bf16_errors(cfg, params, dict(enc=enc, dec=dec, tgt=tgt), prompt)
  loss_err, logits_err, grad_err = errors['float32']
  assert loss_err < 4e-4 and 0 < logits_err < 0.013 and 0 < grad_err < 0.022
  loss_err, logits_err, grad_err = errors['bfloat16']
  assert loss_err < 1e-3 and 0 < logits_err < 0.03 and 0 < grad_err < 0.05


# ---- the run driver ----

def test_model_tuning_with_bf16_weights_is_refused_in_one_line(tmp_path):
  from jaxprompt.config import ConfigError
  from jaxprompt.tuning import tune
  with pytest.raises(ConfigError) as e:
    tune('nope_task', backbone='/nonexistent', model_dir=str(tmp_path / 'r'),
         method='model_tuning', param_dtype='bfloat16')
  assert '\n' not in str(e.value) and '--param_dtype' in str(e.value)
  assert not (tmp_path / 'r').exists()


def test_hold_backbone_casts_stacks_and_keeps_the_identity(tiny):
  """What the run driver does to the loaded backbone before placing it."""
  from jaxprompt.checkpoints.backbone import Backbone, fingerprint
  from jaxprompt.config import RunConfig
  from jaxprompt.methods import Context, get_method
  from jaxprompt.prompts.prompt import prompt_tree
  from jaxprompt.tuning import hold_backbone
  cfg, params = tiny
  bb = Backbone(Transformer(cfg), params, None, fingerprint(cfg, params))
  config = RunConfig(param_dtype='bfloat16', scan_layers=True, remat_policy='full')
  ctx = Context(bb, 't', ('t',), None, None, config, None)
  prompt = prompt_tree(jnp.ones((3, cfg.emb_dim), jnp.bfloat16))  # e.g. from a bf16 embedding
  held, trainable = hold_backbone(get_method('prompt_tuning'), ctx, prompt)
  module, frozen = held.backbone.module, held.backbone.params
  assert (module.scan_layers, module.remat_policy, module.config) == (True, 'full', cfg)
  assert held.backbone.fingerprint == bb.fingerprint and 'layers' in frozen['encoder']
  assert {x.dtype for x in jax.tree_util.tree_leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree_util.tree_leaves(trainable)} == {jnp.dtype(jnp.float32)}
  model_ctx = Context(bb, 't', ('t',), None, None, RunConfig(scan_layers=True), None)
  _, model = hold_backbone(get_method('model_tuning'), model_ctx, params)
  assert model['decoder']['layers']['mlp']['wo']['kernel'].dtype == jnp.float32
  jax.tree_util.tree_map(np.testing.assert_array_equal, unstack_layers(model), params)



def test_stacking_a_runs_own_weights_frees_each_layer_as_it_goes(tiny):
  """With `release` (a backbone the run read from a path), each unrolled layer is deleted once
  its stacked leaf exists: the weights are held once, not twice; the stack is the same.
  Without it (a caller's arrays) nothing is touched."""
  from jaxprompt.checkpoints.backbone import Backbone, fingerprint
  from jaxprompt.config import RunConfig
  from jaxprompt.methods import Context, get_method
  from jaxprompt.prompts.prompt import prompt_tree
  from jaxprompt.tuning import hold_backbone
  cfg, params = tiny
  expected = stack_layers(jax.tree_util.tree_map(np.asarray, params))
  for release in (False, True):
    own = jax.tree_util.tree_map(jnp.array, params)  # fresh arrays, as a load makes
    bb = Backbone(Transformer(cfg), own, None, fingerprint(cfg, params))
    ctx = Context(bb, 't', ('t',), None, None, RunConfig(scan_layers=True), None)
    held, _ = hold_backbone(get_method('prompt_tuning'), ctx,
                            prompt_tree(jnp.ones((3, cfg.emb_dim))), release=release)
    jax.tree_util.tree_map(np.testing.assert_array_equal, held.backbone.params, expected)
    layer = own['encoder']['layers_0']['attention']['query']['kernel']
    assert layer.is_deleted() is release
    assert not own['token_embedder']['embedding'].is_deleted()  # not a layer: kept

def _write_task(root):
  import data_helpers
  from jaxprompt import cli
  rows = [{'text': ' '.join(np.random.RandomState(i).choice(data_helpers.WORDS, 4)),
           'label': i % 2} for i in range(24)]
  train = data_helpers.write_jsonl(str(root / 'train.jsonl'), rows[:16])
  dev = data_helpers.write_jsonl(str(root / 'dev.jsonl'), rows[16:])
  cli.setup_tasks(data_helpers.spm_model_path(), train, dev, 'remat_scan_task', 'text',
                  'target', 'label', ['bad', 'good'])
  return data_helpers.vocabulary().vocab_size


@pytest.mark.slow
def test_tune_with_remat_scan_and_bf16_weights(tmp_path):
  """Through the run driver: remat + scan give the plain run's prompt (float tolerance); bf16
  weights train a float32 prompt close to it; model tuning with scanned layers saves an
  unrolled T5X checkpoint that loads as the trained weights."""
  from jaxprompt.checkpoints import load_t5
  from jaxprompt.prompts.prompt import get_prompt
  from jaxprompt.tuning import tune
  vocab_size = _write_task(tmp_path)
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab_size, dropout_rate=0.0)
  backbone = (Transformer(cfg), init_params(cfg, 0))
  options = dict(train_steps=4, eval_period=4, batch_size=4, prompt_length=3,
                 feature_lengths={'inputs': 12, 'targets': 4}, prompt_init='uniform',
                 progress=False, dropout_rate=0.0)

  def prompt_of(name, **extra):
    result = tune('remat_scan_task', backbone=backbone, model_dir=str(tmp_path / name),
                  **options, **extra)
    manifest = json.load(open(tmp_path / name / 'manifest.json'))
    assert manifest['config'].get('remat_policy', 'none') == extra.get('remat_policy', 'none')
    return np.asarray(get_prompt(result.trainable)), result

  plain, plain_result = prompt_of('plain')
  scanned, scanned_result = prompt_of('scanned', remat_policy='full', scan_layers=True)
  assert scanned_result.backbone.module.scan_layers
  np.testing.assert_allclose(scanned, plain, rtol=1e-4, atol=1e-5)
  bf16, bf16_result = prompt_of('bf16', param_dtype='bfloat16', remat_policy='minimal')
  assert bf16.dtype == np.float32 and not np.array_equal(bf16, plain)
  np.testing.assert_allclose(bf16, plain, atol=0.05)
  assert bf16_result.backbone.fingerprint == plain_result.backbone.fingerprint

  model = tune('remat_scan_task', backbone=backbone, model_dir=str(tmp_path / 'model'),
               method='model_tuning', scan_layers=True,
               **{k: v for k, v in options.items() if k not in ('prompt_length', 'prompt_init')})
  module, saved = load_t5(model.best_model_path)
  assert 'layers_1' in saved['encoder'] and not module.scan_layers
  best = model.trainable if model.best_step == options['train_steps'] else backbone[1]
  assert jax.tree_util.tree_structure(saved) == jax.tree_util.tree_structure(backbone[1])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), saved,
                         jax.tree_util.tree_map(np.asarray, best))
