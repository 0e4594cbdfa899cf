"""Prompt recycling (Lester et al. 2022): the recyclers against their closed forms in numpy, the
shared-vocabulary check, the product's provenance and width, bad input, the CLI end to end."""

import json
import os

import numpy as np
import pytest

from jaxprompt import cli
from jaxprompt.methods import recycling as rc
from jaxprompt.prompts.files import check_compatible, read_prompt, write_prompt


def _embeddings(tokens, d_a, d_b, seed=0):
  rs = np.random.RandomState(seed)
  return (rs.normal(size=(tokens, d_a)).astype(np.float32),
          rs.normal(size=(tokens, d_b)).astype(np.float32),
          rs.normal(size=(3, d_a)).astype(np.float32))


@pytest.mark.parametrize('tokens', [40, 5])  # more tokens than d_A (least squares), fewer (min norm)
def test_linear_is_least_squares_and_lincomb_its_closed_form(tokens):
  ea, eb, p = _embeddings(tokens, 8, 6)
  e64, b64, p64 = (x.astype(np.float64) for x in (ea, eb, p))
  w = np.linalg.lstsq(e64, b64, rcond=None)[0]
  linear, info = rc.recycle_prompt(p, ea, eb, 'linear')
  np.testing.assert_allclose(linear, p64 @ w, rtol=1e-5, atol=1e-5)
  assert info['fit_error'] == pytest.approx(np.linalg.norm(e64 @ w - b64) / np.linalg.norm(b64))
  # lin-comb: the prompt as a combination X of A's embeddings, the same X of B's
  x = np.linalg.lstsq(e64.T, p64.T, rcond=None)[0].T  # [P, T]
  lincomb, info = rc.recycle_lincomb(p, ea, eb)[0], rc.recycle_prompt(p, ea, eb, 'lincomb')[1]
  np.testing.assert_allclose(lincomb, x @ b64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lincomb, p64 @ np.linalg.pinv(e64) @ b64, rtol=1e-5, atol=1e-5)
  assert info['fit_error'] == pytest.approx(np.linalg.norm(x @ e64 - p64) / np.linalg.norm(p64))
  # ... which is the linear recycler's map pinv(E_A) E_B (docs/transferability.md)
  np.testing.assert_allclose(lincomb, linear, rtol=1e-4, atol=1e-4)
  outside = np.linalg.norm(p64 - p64 @ np.linalg.pinv(e64) @ e64) / np.linalg.norm(p64)
  assert info['prompt_outside_vocab_span'] == pytest.approx(outside, abs=1e-6)
  assert (outside < 1e-6) == (tokens >= 8)


def test_mlp_recycler_learns_the_map():
  ea, _, p = _embeddings(200, 8, 6, seed=1)
  m = np.random.RandomState(2).normal(size=(8, 6)).astype(np.float32) / 3
  out, info = rc.recycle_prompt(p, ea, ea @ m, 'mlp', steps=600, learning_rate=1e-2,
                                batch_size=50, seed=0)
  assert info['fit_error'] < 0.1 and info['hidden'] == 24
  assert np.linalg.norm(out - p @ m) / np.linalg.norm(p @ m) < 0.2
  params = rc.fit_mlp(ea, ea @ m, steps=600, learning_rate=1e-2, batch_size=50, seed=0)
  np.testing.assert_array_equal(out, np.asarray(rc.mlp_apply(params, p)))  # seeded


@pytest.fixture(scope='module')
def backbones(tmp_path_factory):
  """Tiny checkpoints A (width 16) and B (width 12), the lab's SentencePiece model beside each:
  ({name: path}, {name: loaded Backbone}, the model)."""
  import shutil
  import sentencepiece as spm
  from conftest import TINY_GATED, random_params
  from jaxprompt import checkpoints
  from jaxprompt.lab.tasks import train_lab_vocabulary
  root = tmp_path_factory.mktemp('recycling')
  vocab = train_lab_vocabulary(str(root / 'lab.model'))
  rows = -(-spm.SentencePieceProcessor(model_file=vocab).get_piece_size() // 8) * 8 + 8
  out = {}
  for name, width, seed in (('a', 16, 0), ('b', 12, 1)):
    cfg = TINY_GATED.replace(vocab_size=rows, emb_dim=width)
    folder = str(root / name)
    checkpoints.save_hf(random_params(cfg, seed), cfg, folder)
    shutil.copy(vocab, os.path.join(folder, rc.VOCABULARY_FILE))
    out[name] = folder
  from jaxprompt.checkpoints.backbone import load_backbone
  return out, {k: load_backbone(v) for k, v in out.items()}, vocab


def test_cli_recycles_with_provenance_onto_b_only(backbones, tmp_path, capsys):
  import sentencepiece as spm
  ckpt, loaded, vocab = backbones
  a, b = loaded['a'], loaded['b']
  prompt = np.random.RandomState(3).normal(size=(4, 16)).astype(np.float32)
  src = write_prompt(str(tmp_path / 'p.safetensors'), prompt, task='lab_has_red',
                     backbone=a.name, backbone_fingerprint=a.fingerprint)
  out = str(tmp_path / 'on_b.safetensors')
  assert cli.main(['project', 'recycle', '--source_backbone', ckpt['a'], '--target_backbone',
                   ckpt['b'], '--prompt', src, '--recycler', 'linear', '--out', out]) == 0, \
      capsys.readouterr().err
  assert 'fit error' in capsys.readouterr().out
  pf = read_prompt(out)
  # the regular pieces: the lab's words (ids 3..), no pad/EOS/UNK, sentinel or padding rows
  sp = spm.SentencePieceProcessor(model_file=vocab)
  ids = np.arange(3, sp.get_piece_size())
  ea = np.asarray(a.params['token_embedder']['embedding'], np.float64)[ids]
  eb = np.asarray(b.params['token_embedder']['embedding'], np.float64)[ids]
  np.testing.assert_allclose(pf.value, prompt @ np.linalg.lstsq(ea, eb, rcond=None)[0],
                             rtol=1e-4, atol=1e-5)
  m = pf.metadata
  assert (m['backbone_fingerprint'], m['source_fingerprint']) == (b.fingerprint, a.fingerprint)
  assert m['recycled_from'] == src and m['task'] == 'lab_has_red' and m['method'] == 'prompt_tuning'
  r = m['recycling']
  assert r['recycler'] == 'linear' and r['num_tokens'] == len(ids) and 0 < r['fit_error'] < 1
  check_compatible(pf, b.module.config.emb_dim, b)
  with pytest.raises(ValueError, match='width 12 does not match the model width 16'):
    check_compatible(pf, a.module.config.emb_dim, a)
  # the API with a window of the vocabulary and the other recyclers
  value, meta = rc.recycle(a, b, src, 'lincomb', num_tokens=5, token_offset=2)
  np.testing.assert_allclose(value, prompt @ np.linalg.pinv(ea[2:7]) @ eb[2:7], rtol=1e-4,
                             atol=1e-5)
  assert meta['recycling']['num_tokens'] == 5


def test_bad_input_is_one_line_and_writes_nothing(backbones, tmp_path, capsys):
  import dataclasses
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.model import Transformer
  from conftest import random_params
  ckpt, loaded, _ = backbones
  a, b = loaded['a'], loaded['b']
  more_rows = b.module.config.replace(vocab_size=b.module.config.vocab_size + 8)
  c = load_backbone((Transformer(more_rows), random_params(more_rows, 2)))
  (tmp_path / 'd').mkdir()
  (tmp_path / 'd' / rc.VOCABULARY_FILE).write_bytes(b'another vocabulary')
  d = dataclasses.replace(b, path=str(tmp_path / 'd'))  # B's rows, another vocabulary file
  rs = np.random.RandomState(4)
  good = write_prompt(str(tmp_path / 'good.safetensors'), rs.normal(size=(4, 16)))
  narrow = write_prompt(str(tmp_path / 'narrow.safetensors'), rs.normal(size=(4, 12)))
  other = write_prompt(str(tmp_path / 'other.safetensors'), rs.normal(size=(4, 16)),
                       backbone_fingerprint='sha256:zzz')
  out = str(tmp_path / 'out.safetensors')
  before = sorted(os.listdir(tmp_path))
  for target, prompt, message in [(c, good, f'{more_rows.vocab_size}: recycling needs two backbones of'),
                                  (d, good, 'the vocabularies differ'),
                                  (b, narrow, 'prompt width 12, but the source backbone'),
                                  (b, other, 'a prompt of backbone sha256:zzz')]:
    with pytest.raises(rc.RecyclingError, match=message):
      rc.recycle(a, target, prompt, out=out)
  assert cli.main(['project', 'recycle', '--source_backbone', ckpt['a'], '--target_backbone',
                   ckpt['b'], '--prompt', narrow, '--out', out]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'prompt width 12' in err[0], err
  assert sorted(os.listdir(tmp_path)) == before
  # an existing --out is kept unless --overwrite
  with open(out, 'w') as f:
    f.write('keep')
  with pytest.raises(rc.RecyclingError, match='already exists'):
    rc.recycle(ckpt['a'], ckpt['b'], good, out=out)
  with open(out) as f:
    assert f.read() == 'keep'
