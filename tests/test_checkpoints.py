"""Readers and writers of T5 backbones: round trips in every format, detection, errors."""

from __future__ import annotations

import json
import os

import jax
import msgpack
import numpy as np
import pytest
from conftest import TINY_GATED, TINY_RELU, random_params

from jaxprompt import checkpoints
from jaxprompt.checkpoints import (CheckpointError, expected_shapes, flatten, hf, infer_config,
                                   load_t5, read_params, t5x_legacy)
from jaxprompt.checkpoints.inspect import describe, format_description
from jaxprompt.model import get_config
from jaxprompt.model.network import param_shapes


def assert_same_params(a, b):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    assert np.asarray(fb[path]).dtype == np.float32, path
    np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


# ----------------------------------------------------------------------------- the tree


@pytest.mark.parametrize('config', [TINY_GATED, TINY_RELU, get_config('t5_1_0_small')],
                         ids=['gated', 'relu', 't5_1_0_small'])
def test_expected_shapes_match_the_network(config):
  network = {p: tuple(s.shape) for p, s in flatten(param_shapes(config)).items()}
  assert network == expected_shapes(config)


def test_t5_1_1_small_has_76961152_params_in_190_leaves():
  config = get_config('t5_1_1_small')
  shapes = expected_shapes(config)
  assert (sum(int(np.prod(s)) for s in shapes.values()), len(shapes)) == (76_961_152, 190)
  network = jax.tree_util.tree_leaves(param_shapes(config))  # jax.eval_shape: nothing allocated
  assert (sum(int(np.prod(s.shape)) for s in network), len(network)) == (76_961_152, 190)
  d = describe('t5_1_1_small')
  assert (d['num_params'], d['num_leaves'], d['family']) == (76_961_152, 190, 't5_1_1')


@pytest.mark.parametrize('config', [TINY_GATED, TINY_RELU], ids=['gated', 'relu'])
def test_infer_config_from_shapes(config):
  assert infer_config(expected_shapes(config), 'here') == config


# ----------------------------------------------------------------------------- T5X legacy


@pytest.mark.parametrize('inline', [False, True], ids=['zarr', 'inline'])
def test_legacy_round_trip(tmp_path, tiny_params, inline):
  config, params = tiny_params
  ckpt = checkpoints.save_t5x_legacy(params, tmp_path, step=7, inline=inline)
  zarr_dirs = [n for n in os.listdir(ckpt) if n.startswith('target.')]
  assert len(zarr_dirs) == (0 if inline else len(expected_shapes(config)))
  for path in (ckpt, os.path.join(ckpt, 'checkpoint'), tmp_path):
    restored, info = read_params(str(path))
    assert_same_params(params, restored)
    assert (info['format'], info['step'], info['config']) == ('t5x_legacy', 7, config)
    assert info['config_source'] == 'parameter shapes'


def test_legacy_file_layout_is_t5x(tmp_path):
  ckpt = checkpoints.save_t5x_legacy(random_params(TINY_GATED), tmp_path, step=3)
  contents = t5x_legacy.read_msgpack(os.path.join(ckpt, 'checkpoint'))
  assert contents['version'] == 3 and int(contents['optimizer']['state']['step']) == 3
  spec = contents['optimizer']['target']['encoder']['layers_0']['attention']['query']['kernel']
  assert spec['driver'] == 'zarr' and spec['kvstore'] == {
      'driver': 'file', 'path': 'target.encoder.layers_0.attention.query.kernel/'}
  with open(os.path.join(ckpt, 'target.encoder.layers_0.attention.query.kernel', '.zarray')) as f:
    zarray = json.load(f)
  assert zarray['compressor']['id'] == 'gzip' and zarray['shape'] == [16, 15]


def test_legacy_model_dir_uses_latest_step(tmp_path):
  old, new = random_params(TINY_GATED, seed=5), random_params(TINY_GATED, seed=6)
  checkpoints.save_t5x_legacy(old, tmp_path, step=9)
  checkpoints.save_t5x_legacy(new, tmp_path, step=10)
  os.makedirs(tmp_path / 'checkpoint_11.tmp-123')  # an unfinished save is ignored
  restored, info = read_params(str(tmp_path))
  assert info['step'] == 10
  assert_same_params(new, restored)


def test_legacy_old_style_gcs_spec_is_read_locally(tmp_path):
  params = random_params(TINY_RELU)
  ckpt = checkpoints.save_t5x_legacy(params, tmp_path, step=1)
  file = os.path.join(ckpt, 'checkpoint')
  contents = t5x_legacy.read_msgpack(file)

  def old_style(tree):
    if 'driver' in tree:  # tensorstore < 0.1.14 wrote the path at the top level
      return {'driver': 'zarr', 'dtype': tree['dtype'], 'metadata': tree['metadata'],
              'kvstore': {'driver': 'gcs', 'bucket': t5x_legacy.DUMMY_BUCKET},
              'path': tree['kvstore']['path'].rstrip('/')}
    return {k: old_style(v) for k, v in tree.items()}

  contents['optimizer']['target'] = old_style(contents['optimizer']['target'])
  with open(file, 'wb') as f:
    f.write(msgpack.packb(contents, default=t5x_legacy._ext_default, use_bin_type=True))
  restored, _ = read_params(ckpt)
  assert_same_params(params, restored)


def test_legacy_bfloat16_and_chunked_inline_arrays(tmp_path, monkeypatch):
  import ml_dtypes
  params = random_params(TINY_GATED)
  bf16 = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  ckpt = checkpoints.save_t5x_legacy(bf16, tmp_path / 'zarr', step=1)
  restored, info = read_params(ckpt)
  assert info['dtypes'] == {'bfloat16': len(expected_shapes(TINY_GATED))}
  assert_same_params(jax.tree_util.tree_map(lambda x: x.astype(np.float32), bf16), restored)
  monkeypatch.setattr(t5x_legacy, '_MAX_INLINE_BYTES', 256)  # force flax-style chunking
  ckpt = checkpoints.save_t5x_legacy(params, tmp_path / 'chunked', step=1, inline=True)
  with open(os.path.join(ckpt, 'checkpoint'), 'rb') as f:
    raw = msgpack.unpackb(f.read(), raw=False)
  assert '__msgpack_chunked_array__' in raw['optimizer']['target']['token_embedder']['embedding']
  restored, _ = read_params(ckpt)
  assert_same_params(params, restored)


def test_prompt_params_are_skipped(tmp_path):
  params = random_params(TINY_GATED)
  with_prompt = dict(params, encoder=dict(params['encoder'], prompt={
      'prompt': {'prompt': np.ones((4, 16), np.float32)}}))
  ckpt = checkpoints.save_t5x_legacy(with_prompt, tmp_path, step=1)
  restored, info = read_params(ckpt)
  assert info['skipped'] == ['encoder/prompt/prompt/prompt']
  assert_same_params(params, restored)


# ----------------------------------------------------------------------------- T5X Orbax


def test_orbax_round_trip(tmp_path, tiny_params):
  config, params = tiny_params
  ckpt = checkpoints.save_t5x_orbax(params, tmp_path, step=4)
  assert ckpt == str(tmp_path / 'checkpoint_4')
  assert os.path.isdir(os.path.join(ckpt, 'state'))
  for path in (ckpt, os.path.join(ckpt, 'state'), tmp_path):
    restored, info = read_params(str(path))
    assert_same_params(params, restored)
    assert (info['format'], info['step'], info['config']) == ('t5x_orbax', 4, config)


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize('sharded', [False, True], ids=['single', 'sharded'])
def test_hf_round_trip(tmp_path, tiny_params, sharded):
  config, params = tiny_params
  checkpoints.save_hf(params, config, tmp_path, sharded=sharded)
  names = sorted(os.listdir(tmp_path))
  if sharded:
    assert hf.INDEX in names and sum(n.endswith('.safetensors') for n in names) >= 2
  else:
    assert names == ['config.json', 'model.safetensors']
  headers = hf._headers(hf.safetensors_files(str(tmp_path)))
  assert ('lm_head.weight' in headers) == (not config.logits_via_embedding)
  restored, info = read_params(str(tmp_path))
  assert_same_params(params, restored)
  assert (info['format'], info['config']) == ('hf', config.replace(dropout_rate=0.1))


def _rewrite_hf(directory, config_changes=None, tensors_changes=None):
  from safetensors.numpy import load_file, save_file
  file = os.path.join(directory, 'model.safetensors')
  tensors = load_file(file)
  tensors.update(tensors_changes or {})
  save_file({k: v for k, v in tensors.items() if v is not None}, file, metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json')) as f:
    cfg = json.load(f)
  cfg.update(config_changes or {})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({k: v for k, v in cfg.items() if v is not None}, f)
  return tensors


def test_hf_tying_rules(tmp_path):
  params = random_params(TINY_RELU)
  d = TINY_RELU.emb_dim
  # transformers 4.x tied save: lm_head.weight present and equal to shared.weight.
  checkpoints.save_hf(params, TINY_RELU, tmp_path / 'a')
  tensors = _rewrite_hf(tmp_path / 'a', tensors_changes={'lm_head.weight': np.asarray(
      params['token_embedder']['embedding'])})
  restored, info = read_params(str(tmp_path / 'a'))
  assert info['config'].logits_via_embedding
  assert_same_params(params, restored)
  # transformers 5.x untied save: tie_word_embeddings true but scale_decoder_outputs false.
  lm_head = np.random.default_rng(123).normal(size=tensors['shared.weight'].shape)
  _rewrite_hf(tmp_path / 'a', {'tie_word_embeddings': True, 'scale_decoder_outputs': False},
              {'lm_head.weight': lm_head.astype(np.float32)})
  restored, info = read_params(str(tmp_path / 'a'))
  assert not info['config'].logits_via_embedding
  np.testing.assert_array_equal(restored['decoder']['logits_dense']['kernel'],
                                lm_head.astype(np.float32).T)
  # scaled output but a distinct lm_head: the d**-0.5 is folded into the untied kernel.
  _rewrite_hf(tmp_path / 'a', {'scale_decoder_outputs': True})
  restored, info = read_params(str(tmp_path / 'a'))
  assert not info['config'].logits_via_embedding
  np.testing.assert_allclose(restored['decoder']['logits_dense']['kernel'],
                             lm_head.astype(np.float32).T * d**-0.5, rtol=1e-6)
  # an embedding larger than the tokenizer vocabulary keeps every row.
  checkpoints.save_hf(random_params(TINY_GATED.replace(vocab_size=96)),
                      TINY_GATED.replace(vocab_size=96), tmp_path / 'b')
  _, info = read_params(str(tmp_path / 'b'))
  assert info['config'].vocab_size == 96


def test_load_t5_builds_the_module(tmp_path, tiny_params):
  config, params = tiny_params
  checkpoints.save_hf(params, config, tmp_path)
  for given in (None, config, config.replace(dropout_rate=0.0)):
    module, loaded = load_t5(str(tmp_path), config=given)
    assert module.config.emb_dim == config.emb_dim
    assert isinstance(loaded['token_embedder']['embedding'], jax.Array)
  tokens = np.array([[3, 4, 5, 1, 0]], np.int32)
  logits = module.apply({'params': loaded}, tokens, tokens[:, :3], tokens[:, :3],
                        enable_dropout=False)
  assert logits.shape == (1, 3, config.vocab_size) and np.isfinite(logits).all()


def test_load_t5_accepts_a_config_name(tmp_path):
  config = get_config('t5_1_1_tiny')
  checkpoints.save_t5x_legacy(random_params(config), tmp_path, step=1)
  module, _ = load_t5(str(tmp_path), config='t5_1_1_tiny')
  assert module.config == config


# ----------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
  with pytest.raises(CheckpointError, match='no such file or directory'):
    read_params(str(tmp_path / 'nope'))


def test_error_unknown_layout(tmp_path):
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(CheckpointError, match='unknown checkpoint layout') as e:
    read_params(str(tmp_path))
  assert str(tmp_path) in str(e.value) and '\n' not in str(e.value)
  (tmp_path / 'checkpoint').write_bytes(b'\xc1 not msgpack')
  with pytest.raises(CheckpointError, match='not a T5X msgpack checkpoint'):
    read_params(str(tmp_path))


def test_error_pytorch_bin_refused(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not even read')
  for path in (tmp_path, tmp_path / 'pytorch_model.bin'):
    with pytest.raises(CheckpointError, match='refusing a PyTorch pickle') as e:
      load_t5(str(path))
    assert 'safetensors' in str(e.value) and '\n' not in str(e.value)


def test_error_shape_mismatch_names_path_expected_found(tmp_path):
  checkpoints.save_t5x_legacy(random_params(TINY_GATED), tmp_path, step=1)
  with pytest.raises(CheckpointError) as e:
    load_t5(str(tmp_path), config=TINY_GATED.replace(mlp_dim=32))
  message = str(e.value)
  assert 'encoder/layers_0/mlp/wi_0/kernel' in message
  assert 'expected (16, 32)' in message and 'found (16, 24)' in message
  assert str(tmp_path) in message
  with pytest.raises(CheckpointError, match='missing parameter decoder/layers_3/'):
    load_t5(str(tmp_path), config=TINY_GATED.replace(num_decoder_layers=4))
  with pytest.raises(CheckpointError, match='unexpected parameter decoder/layers_2/'):
    load_t5(str(tmp_path), config=TINY_GATED.replace(num_decoder_layers=2))
  with pytest.raises(CheckpointError, match='unexpected parameter decoder/logits_dense/kernel'):
    load_t5(str(tmp_path), config=TINY_GATED.replace(logits_via_embedding=True))


def test_error_missing_zarr_array(tmp_path):
  import shutil
  ckpt = checkpoints.save_t5x_legacy(random_params(TINY_GATED), tmp_path, step=1)
  shutil.rmtree(os.path.join(ckpt, 'target.decoder.decoder_norm.scale'))
  with pytest.raises(CheckpointError, match='decoder/decoder_norm/scale') as e:
    read_params(ckpt)
  assert 'target.decoder.decoder_norm.scale' in str(e.value)


def test_error_orbax_corrupt(tmp_path):
  ckpt = checkpoints.save_t5x_orbax(random_params(TINY_RELU), tmp_path, step=1)
  with open(os.path.join(ckpt, 'state', '_METADATA'), 'w') as f:
    f.write('{not json')
  with pytest.raises(CheckpointError, match='cannot read the Orbax metadata') as e:
    read_params(str(tmp_path))
  assert os.path.join(ckpt, 'state') in str(e.value) and '\n' not in str(e.value)


def test_error_hf_files(tmp_path):
  checkpoints.save_hf(random_params(TINY_GATED), TINY_GATED, tmp_path / 'a', sharded=True)
  first = min(n for n in os.listdir(tmp_path / 'a') if n.endswith('.safetensors'))
  os.remove(tmp_path / 'a' / first)
  with pytest.raises(CheckpointError, match=f'missing shard.*{first}|{first}.*missing shard'):
    read_params(str(tmp_path / 'a'))
  checkpoints.save_hf(random_params(TINY_GATED), TINY_GATED, tmp_path / 'b')
  os.remove(tmp_path / 'b' / 'config.json')
  with pytest.raises(CheckpointError, match='config.json: missing'):
    read_params(str(tmp_path / 'b'))
  checkpoints.save_hf(random_params(TINY_GATED), TINY_GATED, tmp_path / 'c')
  _rewrite_hf(tmp_path / 'c', {'relative_attention_num_buckets': 64})
  with pytest.raises(CheckpointError, match='relative_attention_num_buckets=64'):
    read_params(str(tmp_path / 'c'))
  _rewrite_hf(tmp_path / 'c', {'relative_attention_num_buckets': 32, 'd_ff': 30})
  with pytest.raises(CheckpointError, match=r'shape mismatch for .*DenseReluDense.wi_0.weight'):
    read_params(str(tmp_path / 'c'))
  _rewrite_hf(tmp_path / 'c', {'d_ff': 24, 'feed_forward_proj': 'gelu'})
  with pytest.raises(CheckpointError, match="feed_forward_proj 'gelu' has no T5X equivalent"):
    read_params(str(tmp_path / 'c'))


# ----------------------------------------------------------------------------- describe


def test_describe_every_format(tmp_path):
  params = random_params(TINY_RELU)
  dirs = {
      't5x_legacy': checkpoints.save_t5x_legacy(params, tmp_path / 'legacy', step=2),
      't5x_orbax': checkpoints.save_t5x_orbax(params, tmp_path / 'orbax', step=2),
      'hf': checkpoints.save_hf(params, TINY_RELU, tmp_path / 'hf'),
  }
  shapes = expected_shapes(TINY_RELU)
  for fmt, path in dirs.items():
    d = describe(str(path))
    assert d['format'] == fmt and d['family'] == 't5_1_0'
    assert d['num_params'] == sum(int(np.prod(s)) for s in shapes.values())
    assert d['num_leaves'] == len(shapes) and d['dtypes'] == {'float32': len(shapes)}
    text = format_description(d)
    assert f'{d["num_params"]:,} in {len(shapes)} leaves' in text and 't5_1_0' in text
