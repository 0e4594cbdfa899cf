"""The key/value prefix seam of the model and the `prefix_tuning` method (no torch here; the
PEFT parity is tests/test_peft_prefix_parity.py).

The seam is checked against an independent construction: a prefix whose keys and values are
the key/value projections of P extra positions must give, at the text positions, exactly what
those P positions in front of the text give (one-layer stacks, where the extra positions'
own hidden states are the layer input): encoder self-attention against an input prompt,
decoder self-attention against P extra decoder tokens, cross-attention against P extra
encoded positions. This fixes the mask (every query sees the prefix) and the relative
position bias (the prefix sits before the text) independently of HF.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_GATED, random_params

from jaxprompt.methods import get_method
from jaxprompt.methods.prefix_tuning import (Dims, PrefixEncoder, PrefixTuningOptions,
                                             dims_of_params, flat_prefix, prefixes_of)
from jaxprompt.model import Transformer, stack_layers
from jaxprompt.model import decoding
from jaxprompt.model.network import PromptInputs

ONE_LAYER = TINY_GATED.replace(num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)
CONFIG = TINY_GATED.replace(dropout_rate=0.0)  # 2 encoder, 3 decoder layers, 3 heads of 5
ENC = jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]], jnp.int32)
TGT = jnp.array([[11, 12, 13, 1], [14, 1, 0, 0]], jnp.int32)
DEC = jnp.pad(TGT[:, :-1], ((0, 0), (1, 0)))
VALID = np.asarray(TGT > 0)
P = 3


def kv_rows(params, path, x):
  """[B, P, d] hidden states -> [2, B, H, P, k]: the key and value projections of `path`."""
  attention = params
  for name in path:
    attention = attention[name]
  heads, head_dim = ONE_LAYER.num_heads, ONE_LAYER.head_dim

  def project(kernel):
    y = (x @ kernel).reshape(x.shape[:2] + (heads, head_dim))
    return jnp.swapaxes(y, 1, 2)

  return jnp.stack([project(attention['key']['kernel']), project(attention['value']['kernel'])])


def rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def test_encoder_prefix_equals_an_input_prompt_seen_by_one_layer():
  params = random_params(ONE_LAYER, seed=3)
  model = Transformer(ONE_LAYER)
  prompt = jnp.asarray(np.random.default_rng(0).normal(size=(P, ONE_LAYER.emb_dim)), jnp.float32)
  with_prompt = model.apply({'params': params}, ENC, enable_dropout=False, prompt=prompt,
                            method=Transformer.encode)[:, P:]
  layer = params['encoder']['layers_0']
  normed = rms_norm(jnp.broadcast_to(prompt, (2,) + prompt.shape),
                    layer['pre_attention_layer_norm']['scale'])
  prefix = kv_rows(params, ('encoder', 'layers_0', 'attention'), normed)[None]
  with_prefix = model.apply({'params': params}, ENC, enable_dropout=False,
                            prompt=PromptInputs(None, {'encoder': prefix}),
                            method=Transformer.encode)
  text = np.asarray(ENC > 0)  # a padding query sees nothing but the prompt / prefix: apart
  np.testing.assert_allclose(np.asarray(with_prefix)[text], np.asarray(with_prompt)[text],
                             atol=2e-5, rtol=1e-5)
  plain = model.apply({'params': params}, ENC, enable_dropout=False, method=Transformer.encode)
  assert np.abs(np.asarray(plain - with_prefix)).max() > 1e-2


def test_decoder_prefix_equals_earlier_decoder_tokens_seen_by_one_layer():
  params = random_params(ONE_LAYER, seed=4)
  model = Transformer(ONE_LAYER)
  extra = jnp.array([[20, 21, 22]] * 2, jnp.int32)
  targets = jnp.concatenate([extra, TGT], axis=1)
  inputs = jnp.concatenate([extra, DEC], axis=1)
  longer = model.apply({'params': params}, ENC, inputs, jnp.where(targets > 0, targets, 0),
                       enable_dropout=False)[:, P:]
  embedded = params['token_embedder']['embedding'][extra]
  layer = params['decoder']['layers_0']
  normed = rms_norm(embedded, layer['pre_self_attention_layer_norm']['scale'])
  prefix = kv_rows(params, ('decoder', 'layers_0', 'self_attention'), normed)[None]
  logits = model.apply({'params': params}, ENC, DEC, TGT, enable_dropout=False,
                       prompt=PromptInputs(None, {'decoder': prefix}))
  np.testing.assert_allclose(np.asarray(logits)[VALID], np.asarray(longer)[VALID], atol=2e-5,
                             rtol=1e-5)


def test_cross_prefix_equals_more_encoded_positions():
  params = random_params(ONE_LAYER, seed=5)
  model = Transformer(ONE_LAYER)
  encoded = model.apply({'params': params}, ENC, enable_dropout=False, method=Transformer.encode)
  extra = jnp.asarray(np.random.default_rng(1).normal(size=(2, P, ONE_LAYER.emb_dim)),
                      jnp.float32)
  # `decode` reads a prompt's length off `encoded`: P extra leading positions, all visible.
  longer = model.apply({'params': params}, jnp.concatenate([extra, encoded], 1), ENC, DEC, TGT,
                       enable_dropout=False, method=Transformer.decode)
  prefix = kv_rows(params, ('decoder', 'layers_0', 'encoder_decoder_attention'), extra)[None]
  logits = model.apply({'params': params}, encoded, ENC, DEC, TGT, enable_dropout=False,
                       prefixes={'cross': prefix}, method=Transformer.decode)
  np.testing.assert_allclose(np.asarray(logits)[VALID], np.asarray(longer)[VALID], atol=2e-5,
                             rtol=1e-5)


def random_prefixes(config, seed=0, batch=1):
  rng = np.random.default_rng(seed)
  shape = lambda layers: (layers, 2, batch, config.num_heads, P, config.head_dim)  # noqa: E731
  return {'encoder': jnp.asarray(rng.normal(size=shape(config.num_encoder_layers)), jnp.float32),
          'decoder': jnp.asarray(rng.normal(size=shape(config.num_decoder_layers)), jnp.float32),
          'cross': jnp.asarray(rng.normal(size=shape(config.num_decoder_layers)), jnp.float32)}


def test_no_prefix_leaves_the_model_as_it_was_and_bad_prefixes_are_refused():
  params = random_params(CONFIG, seed=6)
  model = Transformer(CONFIG)
  plain = model.apply({'params': params}, ENC, DEC, TGT, enable_dropout=False)
  empty = model.apply({'params': params}, ENC, DEC, TGT, enable_dropout=False,
                      prompt=PromptInputs(None, None))
  np.testing.assert_array_equal(plain, empty)
  bad = random_prefixes(CONFIG)
  bad['encoder'] = bad['encoder'][:1]
  with pytest.raises(ValueError, match=r'encoder prefixes of shape \(1, 2, 1, 3, 3, 5\)'):
    model.apply({'params': params}, ENC, DEC, TGT, enable_dropout=False,
                prompt=PromptInputs(None, bad))
  with pytest.raises(ValueError, match='the sites are encoder, decoder, cross'):
    model.apply({'params': params}, ENC, DEC, TGT, enable_dropout=False,
                prompt=PromptInputs(None, {'decoder_self': bad['decoder']}))


@pytest.mark.slow  # the full tier (27 s on 2 cores)
def test_scanned_and_rematerialised_stacks_take_prefixes_alike():
  params = random_params(CONFIG, seed=7)
  prefixes = random_prefixes(CONFIG, seed=1)
  model = Transformer(CONFIG)

  def loss(module, params, prefixes):
    logits = module.apply({'params': params}, ENC, DEC, TGT, enable_dropout=False,
                          prompt=PromptInputs(None, prefixes))
    return jnp.sum(jax.nn.log_softmax(logits) * VALID[..., None])

  ref, ref_grad = jax.value_and_grad(loss, argnums=2)(model, params, prefixes)
  scanned = model.clone(scan_layers=True, remat_policy='full')
  value, grad = jax.value_and_grad(loss, argnums=2)(scanned, stack_layers(params), prefixes)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  for site in prefixes:
    np.testing.assert_allclose(grad[site], ref_grad[site], atol=1e-4 * np.abs(
        ref_grad[site]).max())
  assert dims_of_params(stack_layers(params)) == dims_of_params(params) == Dims(2, 3, 3, 5)


def test_cached_decoding_and_ranking_see_the_prefixes():
  params = random_params(CONFIG, seed=8)
  model = Transformer(CONFIG)
  prompt = PromptInputs(None, random_prefixes(CONFIG, seed=2))
  out = decoding.greedy_decode(model, params, ENC, 4, prompt)
  forced = model.apply({'params': params}, ENC, jnp.pad(out[:, :-1], ((0, 0), (1, 0))),
                       jnp.ones_like(out), enable_dropout=False, prompt=prompt)
  np.testing.assert_array_equal(out, jnp.argmax(forced, -1))
  plain = model.apply({'params': params}, ENC, jnp.pad(out[:, :-1], ((0, 0), (1, 0))),
                      jnp.ones_like(out), enable_dropout=False)
  assert not np.array_equal(out, jnp.argmax(plain, -1))  # the prefixes change the answer
  ranked = decoding.rank_classify(model, params, ENC, TGT, prompt)  # [B, C] with C = 2 labels
  scored = decoding.score_sequences(model, params, jnp.repeat(ENC, 2, 0), jnp.tile(TGT, (2, 1)),
                                    prompt)
  np.testing.assert_allclose(np.asarray(ranked).ravel(), scored, rtol=1e-5)
  beams, _ = decoding.beam_search(model, params, ENC, 4, 1, prompt=prompt)
  np.testing.assert_array_equal(beams[:, 0], out)  # one beam is greedy
  # Three beams share each example's cross-attention cache (its prefix rows in front): each
  # beam's score is its own teacher-forced log-likelihood under the prefixes.
  beams, scores = decoding.beam_search(model, params, ENC, 4, 3, alpha=0.0, prompt=prompt)
  for beam in range(3):
    seqs = np.asarray(beams[:, beam])
    ll = decoding.score_sequences(model, params, ENC, seqs, prompt)
    np.testing.assert_allclose(scores[:, beam], ll, rtol=1e-4)


def test_peft_layout_reads_rows_4i_and_4i_plus_1_and_every_layer_reads_each_row_once():
  dims = Dims(2, 3, 3, 5)  # n = 3: 6 rows; decoder layers read (0, 1), (4, 5), (2, 3)
  rows = np.arange(6)[None, :, None].repeat(15, axis=2).reshape(1, -1).astype(np.float32)
  peft = prefixes_of(jnp.asarray(rows), 'peft', dims)
  assert set(peft) == {'decoder'} and peft['decoder'].shape == (3, 2, 1, 3, 1, 5)
  assert np.asarray(peft['decoder'])[:, :, 0, 0, 0, 0].tolist() == [[0, 1], [4, 5], [2, 3]]
  count = dims.rows('every_layer')  # 2 (2 + 2 * 3) = 16
  rows = np.arange(count)[None, :, None].repeat(15, axis=2).reshape(1, -1).astype(np.float32)
  every = prefixes_of(jnp.asarray(rows), 'every_layer', dims)
  seen = sorted(np.asarray(every[s])[:, :, 0, 0, 0, 0].ravel().tolist() for s in every)
  assert sorted(sum(seen, [])) == list(range(count))
  assert [every[s].shape[0] for s in ('encoder', 'decoder', 'cross')] == [2, 3, 3]
  with pytest.raises(ValueError, match='does not fit this backbone'):
    prefixes_of(jnp.zeros((1, 15 * 8)), 'peft', dims)


def test_projection_is_peft_prefix_encoder_shaped_and_options_are_checked():
  params = PrefixEncoder(4, 6, 15, True, 7).init(jax.random.PRNGKey(0))['params']
  assert params['embedding'].shape == (4, 15)
  assert params['transform_0']['kernel'].shape == (15, 7)
  assert params['transform_2']['kernel'].shape == (7, 90)
  x = np.tanh(params['embedding'] @ params['transform_0']['kernel'] + params['transform_0'][
      'bias']) @ params['transform_2']['kernel'] + params['transform_2']['bias']
  np.testing.assert_allclose(flat_prefix(params), x, rtol=1e-5, atol=1e-6)
  from jaxprompt.config import ConfigError
  with pytest.raises(ConfigError, match='prefix_layout'):
    PrefixTuningOptions(prefix_layout='deep')
  with pytest.raises(ConfigError, match='encoder_hidden_size'):
    PrefixTuningOptions(encoder_hidden_size=0)


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
def test_every_layer_tunes_evaluates_and_refuses_peft_export(scan, tmp_path):
  """The P-tuning v2 layout end to end through `tune` (scanned and remat too), the product
  evaluated to the best metric, and an export to PEFT refused with a one-line reason."""
  import data_helpers
  from jaxprompt import cli
  from jaxprompt.checkpoints.peft import export_peft
  from jaxprompt.evaluate import evaluate
  from jaxprompt.model import get_config, init_params
  from jaxprompt.tuning import tune
  vocab = data_helpers.vocabulary()
  rs = np.random.RandomState(0)
  rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 4)), 'label': int(i % 2)}
          for i in range(24)]
  train = data_helpers.write_jsonl(str(tmp_path / 'train.jsonl'), rows[:16])
  dev = data_helpers.write_jsonl(str(tmp_path / 'dev.jsonl'), rows[16:])
  cli.setup_tasks(data_helpers.spm_model_path(), train, dev, 'prefix_task', 'text', 'target',
                  'label', ['bad', 'good'])
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  backbone = (Transformer(cfg), init_params(cfg, 0))
  lengths = {'inputs': 12, 'targets': 4}
  result = tune('prefix_task', backbone=backbone, model_dir=str(tmp_path / 'run'),
                method='prefix_tuning', prefix_layout='every_layer', train_steps=4,
                eval_period=2, batch_size=8, prompt_length=2, feature_lengths=lengths,
                progress=False, scan_layers=scan, remat_policy='full' if scan else 'none')
  meta = json.loads(open(os.path.join(result.model_dir, 'manifest.json')).read())
  assert meta['method'] == 'prefix_tuning'
  product = result.best_prompt_path
  metrics = evaluate('prefix_task', backbone=backbone, prompt=product, feature_lengths=lengths,
                     batch_size=8)
  assert metrics['score'] == result.best_metrics['score']
  with pytest.raises(ValueError, match='layout .every_layer.*--prefix_layout peft'):
    export_peft(product, str(tmp_path / 'adapter'))
  assert not os.path.exists(tmp_path / 'adapter')


def test_product_reads_back_and_refuses_another_backbone(tmp_path):
  from jaxprompt.methods import Context
  method = get_method('prefix_tuning')
  params = random_params(CONFIG, seed=9)
  dims = dims_of_params(params)
  flat = np.random.default_rng(3).normal(size=(P, dims.rows('peft') * dims.token_dim))
  trainable = {'peft': {'embedding': jnp.asarray(flat, jnp.float32)}}
  path = method.save_product(trainable, {}, str(tmp_path / 'best'),
                             dict(prefix_layout='peft', **vars(dims)))
  assert path.endswith('.safetensors') and not os.path.exists(str(tmp_path / 'best.npy'))

  class Backbone:
    module, fingerprint, path = Transformer(CONFIG), None, None

  read, _ = method.load_product(path, Context(Backbone, '', (), None, None, None, None))
  a = method.model_inputs(read, {'backbone': params}, {})[1]
  b = method.model_inputs(trainable, {'backbone': params}, {})[1]
  np.testing.assert_array_equal(a.prefixes['decoder'], b.prefixes['decoder'])
  Backbone.module = Transformer(CONFIG.replace(num_heads=2))
  with pytest.raises(ValueError, match='use it with the backbone it was trained for'):
    method.load_product(path, Context(Backbone, '', (), None, None, None, None))
