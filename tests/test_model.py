"""The T5 itself: tree and axes, the prompt seam, cached decoding, the loss against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.model import (Transformer, compute_weighted_cross_entropy, get_config, init_params,
                             loss_and_metrics)
from jaxprompt.model import decoding, layers
from jaxprompt.model.network import param_shapes, params_axes


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def test_t5_1_1_small_tree_matches_t5x():
  shapes = dict(_paths(param_shapes(get_config('t5_1_1_small'))))
  assert len(shapes) == 190
  assert sum(int(np.prod(s.shape)) for s in shapes.values()) == 76_961_152
  assert shapes[('decoder', 'logits_dense', 'kernel')].shape == (512, 32128)
  assert shapes[('encoder', 'layers_0', 'attention', 'query', 'kernel')].shape == (512, 384)
  assert shapes[('encoder', 'relpos_bias', 'rel_embedding')].shape == (6, 32)
  assert all(s.dtype == jnp.float32 for s in shapes.values())


def test_logical_axes_are_t5x():
  axes = params_axes(get_config('t5_1_1_tiny'))
  names = {p: a.names for p, a in _paths(axes)}
  assert names[('token_embedder', 'embedding_axes')] == ('vocab', 'embed')
  assert names[('encoder', 'layers_0', 'attention', 'query', 'kernel_axes')] == ('embed',
                                                                                 'joined_kv')
  assert names[('encoder', 'layers_0', 'attention', 'out', 'kernel_axes')] == ('joined_kv',
                                                                               'embed')
  assert names[('decoder', 'layers_1', 'mlp', 'wi_1', 'kernel_axes')] == ('embed', 'mlp')
  assert names[('decoder', 'relpos_bias', 'rel_embedding_axes')] == ('heads', 'relpos_buckets')
  assert names[('decoder', 'logits_dense', 'kernel_axes')] == ('embed', 'vocab')
  assert names[('encoder', 'encoder_norm', 'scale_axes')] == ('embed',)


def test_t5_1_0_family_is_relu_and_tied():
  shapes = dict(_paths(param_shapes(get_config('t5_1_0_tiny'))))
  assert ('decoder', 'logits_dense', 'kernel') not in shapes
  assert ('encoder', 'layers_0', 'mlp', 'wi', 'kernel') in shapes
  assert ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel') not in shapes


def test_relative_position_buckets_closed_form():
  # Bidirectional, 32 buckets: |d| < 8 exact; sign picks the half; far distances saturate.
  rel = np.arange(-200, 201)
  b = layers.relative_position_bucket(rel, True, 32, 128)
  assert b[200] == 0 and b[201] == 17 and b[199] == 1  # 0, +1 (memory after query), -1
  assert b[0] == 15 and b[-1] == 31
  causal = layers.relative_position_bucket(rel, False, 32, 128)
  assert (causal[rel > 0] == 0).all() and causal[200 - 15] == 15 and causal[0] == 31


@pytest.fixture(scope='module')
def tiny():
  cfg = get_config('t5_1_1_tiny', dropout_rate=0.0)
  return Transformer(cfg), init_params(cfg, 0)


def _batch(seed=0, b=3, le=7, ld=5, vocab=128):
  rs = np.random.RandomState(seed)
  enc = rs.randint(2, vocab, (b, le)).astype(np.int32)
  enc[1, 4:] = 0
  tgt = rs.randint(2, vocab, (b, ld)).astype(np.int32)
  tgt[2, 3:] = 0
  dec = np.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  return enc, dec, tgt


def test_prompt_seam_prefix_equals_concatenated_embeddings(tiny):
  module, params = tiny
  enc, dec, tgt = _batch()
  prompt = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
  with_prompt = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False,
                             prompt=prompt)
  plain = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False)
  assert np.abs(with_prompt - plain).max() > 1e-3  # the prompt changes the output
  # A prompt made of real token embeddings equals prepending those tokens to the input.
  ids = np.array([5, 9, 11, 40])
  token_prompt = params['token_embedder']['embedding'][ids]
  a = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False, prompt=token_prompt)
  b = module.apply({'params': params}, np.concatenate([np.tile(ids, (3, 1)), enc], 1), dec, tgt,
                   enable_dropout=False)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # Per-example prompts [B, P, d]: row i equals running example i with its own [P, d] prompt.
  stack = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 32))
  batched = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False, prompt=stack)
  for i in range(3):
    one = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False, prompt=stack[i])
    np.testing.assert_allclose(batched[i], one[i], atol=1e-5)


def test_prompt_positions_after_bos_and_suffix(tiny):
  module, params = tiny
  enc, dec, tgt = _batch()
  enc[1, 4:] = 5  # no padding so the suffix sits right after the text
  ids = np.array([7, 8])
  emb = params['token_embedder']['embedding'][ids]
  for position, tokens in ((1, np.concatenate([enc[:, :1], np.tile(ids, (3, 1)), enc[:, 1:]], 1)),
                           (-1, np.concatenate([enc, np.tile(ids, (3, 1))], 1))):
    a = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False, prompt=emb,
                     prompt_position=position)
    b = module.apply({'params': params}, tokens, dec, tgt, enable_dropout=False)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_sown_ffn_pre_activations(tiny):
  module, params = tiny
  enc, dec, tgt = _batch()
  _, state = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False,
                          mutable=['intermediates'])
  pre = state['intermediates']['encoder']['layers_0']['mlp']['mlp_pre_activation'][0]
  x = np.asarray(pre)
  assert x.shape == (3, 7, 64)
  plain = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False)
  assert not isinstance(plain, tuple)  # nothing recorded unless asked


def test_sown_ffn_pre_activations_equal_a_hand_computation(tiny):
  """With layer 0's attention outputs zeroed, the FFN input of layer 0 is the RMS-normed
  (prompted) embedding, so its first projection can be computed by hand in numpy."""
  module, params = tiny
  params = jax.tree_util.tree_map(np.array, params)
  params['encoder']['layers_0']['attention']['out']['kernel'][:] = 0
  for name in ('self_attention', 'encoder_decoder_attention'):
    params['decoder']['layers_0'][name]['out']['kernel'][:] = 0
  enc, dec, tgt = _batch()
  prompt = np.random.RandomState(4).normal(size=(2, 32)).astype(np.float32)
  _, state = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False,
                          prompt=prompt, mutable=['intermediates'])
  emb = params['token_embedder']['embedding']

  def by_hand(x, layer):
    normed = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6)
    return (normed * layer['pre_mlp_layer_norm']['scale']) @ layer['mlp']['wi_0']['kernel']

  enc_x = np.concatenate([np.broadcast_to(prompt, (3, 2, 32)), emb[enc]], axis=1)
  got = np.asarray(state['intermediates']['encoder']['layers_0']['mlp']['mlp_pre_activation'][0])
  np.testing.assert_allclose(got, by_hand(enc_x, params['encoder']['layers_0']), atol=1e-5)
  got = np.asarray(state['intermediates']['decoder']['layers_0']['mlp']['mlp_pre_activation'][0])
  np.testing.assert_allclose(got, by_hand(emb[dec], params['decoder']['layers_0']), atol=1e-5)


def test_dropout_is_active_only_when_enabled():
  cfg = get_config('t5_1_1_tiny', dropout_rate=0.3)
  module, params = Transformer(cfg), init_params(cfg, 0)
  enc, dec, tgt = _batch()
  a = module.apply({'params': params}, enc, dec, tgt, enable_dropout=True,
                   rngs={'dropout': jax.random.PRNGKey(0)})
  b = module.apply({'params': params}, enc, dec, tgt, enable_dropout=True,
                   rngs={'dropout': jax.random.PRNGKey(1)})
  c = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False)
  d = module.apply({'params': params}, enc, dec, tgt, enable_dropout=False)
  assert np.abs(a - b).max() > 1e-3
  np.testing.assert_array_equal(c, d)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_cached_decoding_matches_teacher_forcing(tiny):
  module, params = tiny
  enc, _, _ = _batch()
  prompt = 0.3 * jax.random.normal(jax.random.PRNGKey(3), (3, 32))
  out = np.asarray(decoding.greedy_decode(module, params, enc, 8, prompt=prompt))
  dec_in = np.pad(out[:, :-1], ((0, 0), (1, 0)))
  logits = module.apply({'params': params}, enc, dec_in, np.ones_like(out), enable_dropout=False,
                        prompt=prompt)
  am = np.argmax(np.asarray(logits), -1)
  for i in range(3):
    n = list(out[i]).index(1) + 1 if 1 in out[i] else 8
    np.testing.assert_array_equal(am[i, :n], out[i, :n])
  # Scores are the teacher-forced log-likelihoods of the greedy outputs.
  scores = decoding.score_sequences(module, params, enc, out, prompt=prompt)
  lp = jax.nn.log_softmax(logits)
  manual = [float(sum(lp[i, t, out[i, t]] for t in range(8) if out[i, t] > 0)) for i in range(3)]
  np.testing.assert_allclose(scores, manual, rtol=1e-5)


def test_a_cached_step_reads_the_encoder_keys_from_the_cache(tiny):
  """The encoder's keys/values are projected once, into the cache: a step given another
  `encoded` of the same shape gives the same logits (the greedy and beam tests check the
  numbers against teacher forcing)."""
  module, params = tiny
  enc, _, _ = _batch()
  encoded = decoding._encode(module, params, enc, None, 0)
  cache = decoding.init_cache(module, params, encoded, enc, 4)
  assert any('cached_cross_key' in jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_leaves_with_path(cache))
  token = np.zeros((enc.shape[0], 1), np.int32)
  step = lambda e: decoding._step_logits(module, params, cache, e, enc, token, 4, 0)[0]  # noqa
  np.testing.assert_array_equal(step(encoded), step(jnp.zeros_like(encoded)))


def test_beam_search_width_one_is_greedy_and_beams_are_sorted(tiny):
  module, params = tiny
  enc, _, _ = _batch()
  greedy = decoding.greedy_decode(module, params, enc, 6)
  seqs, scores = decoding.beam_search(module, params, enc, 6, num_beams=1, alpha=0.0)
  np.testing.assert_array_equal(seqs[:, 0], greedy)
  seqs, scores = decoding.beam_search(module, params, enc, 6, num_beams=3, alpha=0.6)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)
  # Each returned beam's score is its own length-normalised log-likelihood.
  seqs = np.asarray(seqs)
  for beam in range(3):
    ll = np.asarray(decoding.score_sequences(module, params, enc, seqs[:, beam]))
    lengths = (seqs[:, beam] > 0).sum(1)
    np.testing.assert_allclose(scores[:, beam], ll / ((5.0 + lengths) / 6.0) ** 0.6, rtol=1e-4)


def test_rank_classification_matches_sequence_scores(tiny):
  module, params = tiny
  enc, _, _ = _batch()
  labels = np.array([[10, 1, 0], [20, 21, 1]], np.int32)
  scores = decoding.rank_classify(module, params, enc, labels)
  for c in range(2):
    ref = decoding.score_sequences(module, params, enc, np.tile(labels[c], (3, 1)))
    np.testing.assert_allclose(scores[:, c], ref, rtol=1e-5, atol=1e-5)


def _np_loss(logits, targets, weights, ls, z):
  v = logits.shape[-1]
  total = 0.0
  for b in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      x = logits[b, t].astype(np.float64)
      lse = np.log(np.exp(x - x.max()).sum()) + x.max()
      q = np.full(v, ls / (v - 1))
      q[targets[b, t]] = 1 - ls
      ce = -(q * (x - lse)).sum()
      const = -((1 - ls) * np.log(1 - ls) + ls * np.log(ls / (v - 1) + 1e-20)) if ls else 0.0
      total += weights[b, t] * (ce - const + z * lse ** 2)
  return total


@pytest.mark.parametrize('ls,z', [(0.0, 0.0), (0.0, 1e-4), (0.1, 1e-4)])
def test_loss_matches_closed_form(ls, z):
  rs = np.random.RandomState(0)
  logits = rs.randn(2, 4, 11).astype(np.float32) * 3
  targets = rs.randint(0, 11, (2, 4))
  weights = (rs.rand(2, 4) > 0.3).astype(np.float32)
  loss, zl, ws = compute_weighted_cross_entropy(logits, targets, weights, ls, z)
  np.testing.assert_allclose(loss, _np_loss(logits, targets, weights, ls, z), rtol=1e-5)
  assert float(ws) == weights.sum()
  normalised, _, _ = compute_weighted_cross_entropy(logits, targets, weights, ls, z, 4.0)
  np.testing.assert_allclose(normalised, loss / 4.0, rtol=1e-6)
  _, metrics = loss_and_metrics(logits, targets, weights, label_smoothing=ls, z_loss=z)
  correct = ((logits.argmax(-1) == targets) * weights).sum()
  assert float(metrics['num_correct']) == correct


def test_bfloat16_activations_stay_close_to_float32():
  cfg = get_config('t5_1_1_tiny', dropout_rate=0.0)
  params = init_params(cfg, 0)
  enc, dec, tgt = _batch()
  f32 = Transformer(cfg).apply({'params': params}, enc, dec, tgt, enable_dropout=False)
  bf16 = Transformer(cfg.replace(dtype='bfloat16')).apply({'params': params}, enc, dec, tgt,
                                                           enable_dropout=False)
  assert bf16.dtype == jnp.float32  # the untied head computes in float32
  err = np.abs(np.asarray(bf16) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
  assert 0 < err < 0.05


def test_bad_prompt_width_is_a_clear_error(tiny):
  module, params = tiny
  enc, dec, tgt = _batch()
  with pytest.raises(ValueError, match='does not fit'):
    module.apply({'params': params}, enc, dec, tgt, enable_dropout=False,
                 prompt=jnp.zeros((4, 16)))


def test_named_configs():
  assert get_config('t5_1_0_base').mlp_dim == 3072
  assert get_config('t5_1_0_11B').num_heads == 128
  assert get_config('mt5_xl').vocab_size == 250112
  assert get_config('t5_1_1_xxl').emb_dim == 4096
  with pytest.raises(ValueError, match='unknown T5 config'):
    get_config('t5_1_1_huge')
