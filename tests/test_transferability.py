"""Transferability (Su et al. 2022): indicators vs direct numpy, ON's activation masks vs a hand
computation on a tiny model, the batched zero-shot matrix vs `evaluate`, bad input, the CLI."""

import os

import numpy as np
import pytest

import data_helpers
from conftest import TINY_GATED, TINY_RELU, images, random_params, run_notebook
from jaxprompt import cli
from jaxprompt.methods import library as lib
from jaxprompt.methods import transferability as tr
from jaxprompt.model import Transformer


def _cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embedding_indicators_match_direct_numpy():
  rs = np.random.RandomState(0)
  p1, p2 = rs.normal(size=(4, 6)), rs.normal(size=(4, 6))
  assert tr.concat_cosine(p1, p2) == pytest.approx(_cos(p1.ravel(), p2.ravel()), abs=1e-12)
  dist = np.sqrt(np.sum((p1.ravel() - p2.ravel()) ** 2))
  assert tr.concat_euclidean(p1, p2) == pytest.approx(1 / (1 + dist), abs=1e-12)
  p3 = rs.normal(size=(3, 6))  # E_avg takes prompts of different lengths
  want = np.mean([[_cos(a, b) for b in p3] for a in p1])
  assert tr.avg_cosine(p1, p3) == pytest.approx(want, abs=1e-12)
  assert tr.avg_cosine(p1, p3) == lib.per_token_average_cosine(p1, p3)  # the library's, reused
  mean_dist = np.mean([[np.linalg.norm(a - b) for b in p3] for a in p1])
  assert tr.avg_euclidean(p1, p3) == pytest.approx(1 / (1 + mean_dist), abs=1e-9)
  assert tr.concat_cosine(p1, p1) == pytest.approx(1.0) and tr.concat_euclidean(p1, p1) == 1.0
  with pytest.raises(tr.TransferError, match='lengths differ: 4 vs 3'):
    tr.concat_cosine(p1, p3)
  with pytest.raises(tr.TransferError, match='widths differ: 6 vs 5'):
    tr.avg_euclidean(p1, rs.normal(size=(4, 5)))
  with pytest.raises(tr.TransferError, match='widths differ'):
    tr.avg_cosine(p1, rs.normal(size=(4, 5)))


def test_overlap_rate_and_matrix_match_sets():
  rs = np.random.RandomState(1)
  masks = rs.rand(4, 50) > 0.5
  m = tr.overlap_matrix(masks)
  for i in range(4):
    for j in range(4):
      a = {k for k in range(50) if masks[i, k]}
      b = {k for k in range(50) if masks[j, k]}
      want = len(a & b) / np.sqrt(len(a) * len(b))
      assert m[i, j] == pytest.approx(want, abs=1e-6)
      assert tr.overlap_rate(masks[i], masks[j]) == pytest.approx(want, abs=1e-12)
  assert tr.overlap_rate(np.zeros(5, bool), masks[0, :5]) == 0.0


def _rmsnorm(x, scale):
  return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * scale


@pytest.mark.parametrize('config', [TINY_GATED, TINY_RELU], ids=['gated', 'relu'])
def test_activation_masks_match_a_hand_computation(config):
  """With layer 0's attention outputs zeroed, its FFN reads the RMS-normed embedding (encoder:
  the prompt and the filler token; decoder: the start token 0), so the pre-activation is
  rmsnorm(x) * scale @ wi_0 (wi for ReLU) in numpy."""
  params = random_params(config, seed=3)
  enc0, dec0 = params['encoder']['layers_0'], params['decoder']['layers_0']
  enc0['attention']['out']['kernel'] = np.zeros_like(enc0['attention']['out']['kernel'])
  for name in ('self_attention', 'encoder_decoder_attention'):
    dec0[name]['out']['kernel'] = np.zeros_like(dec0[name]['out']['kernel'])
  rs = np.random.RandomState(4)
  prompts = rs.normal(size=(5, 3, config.emb_dim)).astype(np.float32)
  masks = tr.activation_masks((Transformer(config), params), prompts, filler=7, batch_size=2)
  assert len(masks.layers) == config.num_encoder_layers + config.num_decoder_layers
  assert masks.names[0] == 'encoder/layers_0' and masks.names[-1].startswith('decoder/')
  emb = params['token_embedder']['embedding']
  wi = 'wi_0' if len(config.mlp_activations) > 1 else 'wi'
  x = np.concatenate([prompts, np.broadcast_to(emb[7], (5, 1, config.emb_dim))], axis=1)
  want_enc = _rmsnorm(x, enc0['pre_mlp_layer_norm']['scale']) @ enc0['mlp'][wi]['kernel'] > 0
  np.testing.assert_array_equal(masks.layers[0], want_enc)  # [n, P + 1, mlp]
  want_dec = _rmsnorm(emb[0], dec0['pre_mlp_layer_norm']['scale']) @ dec0['mlp'][wi]['kernel'] > 0
  k = config.num_encoder_layers
  np.testing.assert_array_equal(masks.layers[k], np.broadcast_to(want_dec, (5, config.mlp_dim)))
  assert 0.05 < masks.layers[0].mean() < 0.95  # not a degenerate mask
  # one batch or many: the same masks
  again = tr.activation_masks((Transformer(config), params), prompts, filler=7, batch_size=5)
  for a, b in zip(masks.layers, again.layers):
    np.testing.assert_array_equal(a, b)
  on = tr.on_matrices(masks)
  total = k + config.num_decoder_layers
  assert set(on) == {'on'} | {f'on_layers_{s + 1}-{min(s + 3, total)}' for s in range(0, total, 3)}
  a1, a2 = masks.flat()[0], masks.flat()[1]
  assert on['on'][0, 1] == pytest.approx(tr.overlap_rate(a1, a2), abs=1e-6)
  assert on['on'][0, 0] == pytest.approx(1.0)


def test_activation_masks_bad_input():
  params = random_params(TINY_GATED)
  bb = (Transformer(TINY_GATED), params)
  with pytest.raises(tr.TransferError, match='width 8 does not match the backbone width 16'):
    tr.activation_masks(bb, np.zeros((2, 3, 8)))
  with pytest.raises(tr.TransferError, match='differ in shape'):
    tr.activation_masks(bb, [np.zeros((3, 16)), np.zeros((4, 16))])


def test_library_with_mixed_widths_is_refused(tmp_path, capsys):
  d = str(tmp_path / 'lib')
  rs = np.random.RandomState(0)
  lib.add(d, rs.normal(size=(3, 8)), task='a')
  lib.add(d, rs.normal(size=(3, 12)), task='b')
  with pytest.raises(tr.TransferError, match=r'mixes prompt widths \(width 8: a; width 12: b\)'):
    tr.library_prompts(d)
  before = sorted(os.listdir(tmp_path))
  assert cli.main(['transfer', 'indicators', '--library', d, '--out',
                   str(tmp_path / 'ind')]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'mixes prompt widths' in err[0]
  assert sorted(os.listdir(tmp_path)) == before  # nothing written
  names, prompts, _ = tr.library_prompts(d, ['a'])
  assert names == ['a'] and prompts[0].shape == (3, 8)


def test_correlations_over_off_diagonal_pairs():
  tasks = ['a', 'b', 'c', 'd']
  rs = np.random.RandomState(2)
  ref = rs.normal(size=(4, 4))
  ind = {'same': ref.copy(), 'neg': -ref}
  corr = tr.indicator_correlations(ind, tasks, {'zero_shot': (ref, tasks, tasks)})
  assert corr['same']['zero_shot'] == pytest.approx(1.0)
  assert corr['neg']['zero_shot'] == pytest.approx(-1.0)
  assert corr['same']['zero_shot_pairs'] == 12
  from scipy.stats import spearmanr
  x, y = rs.normal(size=10), rs.normal(size=10)
  assert tr.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
  assert tr.spearman([1, 1, 1], [1, 2, 3]) is None
  assert 'same' in tr.format_correlations(corr)


# ---------------------------------------------------------------------------------------------
# The zero-shot matrix on a tiny model and two file tasks.

@pytest.fixture(scope='module')
def tiny_world(tmp_path_factory):
  from jaxprompt.model import get_config, init_params
  root = tmp_path_factory.mktemp('transfer')
  vocab = data_helpers.vocabulary()
  rs = np.random.RandomState(0)
  for name, offset in (('transfer_a', 0), ('transfer_b', 1)):
    rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 4)), 'label': int((i + offset) % 2)}
            for i in range(30)]
    train = data_helpers.write_jsonl(str(root / f'{name}_train.jsonl'), rows[:20])
    dev = data_helpers.write_jsonl(str(root / f'{name}_dev.jsonl'), rows[20:])
    cli.setup_tasks(data_helpers.spm_model_path(), train, dev, name, 'text', 'target', 'label',
                    ['bad', 'good'])
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  module, params = Transformer(cfg), init_params(cfg, 0)
  library = str(root / 'lib')
  for i, task in enumerate(['transfer_a', 'transfer_b', 'extra']):
    lib.add(library, rs.normal(0, 3, size=(3, cfg.emb_dim)), task=task)
  return dict(root=root, backbone=(module, params), library=library)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_zero_shot_matrix_equals_evaluating_each_pair(tiny_world):
  from jaxprompt.evaluate import evaluate
  lengths = {'inputs': 12, 'targets': 4}
  tm = tr.zero_shot_matrix(tiny_world['library'], tiny_world['backbone'],
                           ['transfer_a', 'transfer_b'], feature_lengths=lengths, batch_size=8,
                           progress=False)
  assert tm.sources == ['extra', 'transfer_a', 'transfer_b'] and tm.scores.shape == (3, 2)
  for i, s in enumerate(tm.sources):
    for j, t in enumerate(tm.targets):
      want = evaluate(t, backbone=tiny_world['backbone'],
                      prompt=lib.prompt_path(tiny_world['library'], s),
                      feature_lengths=lengths, batch_size=8)['score']
      assert tm.scores[i, j] == want, (s, t)
  assert tm.own == {'transfer_a': tm.scores[1, 0], 'transfer_b': tm.scores[2, 1]}
  np.testing.assert_allclose(tm.relative[:, 0], tm.scores[:, 0] / tm.scores[1, 0])


def test_matrix_needs_each_targets_own_prompt(tiny_world, tmp_path, capsys):
  with pytest.raises(tr.TransferError, match="no own prompt-tuning score for transfer_c"):
    tr.zero_shot_matrix(tiny_world['library'], tiny_world['backbone'],
                        ['transfer_a', 'transfer_c'])
  out = str(tmp_path / 'm')
  assert cli.main(['transfer', 'matrix', '--library', tiny_world['library'], '--backbone',
                   '/nonexistent', '--tasks', 'transfer_a,transfer_c', '--out', out]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'no own prompt-tuning score for transfer_c' in err[0]
  assert not os.listdir(tmp_path)


def test_indicators_command_writes_table_and_heatmaps(tiny_world, tmp_path, capsys):
  tasks = ['extra', 'transfer_a', 'transfer_b']
  rs = np.random.RandomState(5)
  matrix = str(tmp_path / 'zs.csv')
  tr.write_matrix_csv(matrix, rs.rand(3, 3), tasks, tasks)
  out = str(tmp_path / 'ind')
  assert cli.main(['transfer', 'indicators', '--library', tiny_world['library'],
                   '--matrix', matrix, '--out', out]) == 0
  text = capsys.readouterr().out
  assert 'avg_cosine' in text and 'concat_euclidean' in text
  for name in ('concat_cosine', 'avg_euclidean'):
    assert os.path.isfile(f'{out}_{name}.png') and os.path.isfile(f'{out}_{name}.csv')
  m, rows, cols = tr.read_matrix_csv(f'{out}_avg_cosine.csv')
  assert rows == tasks and m[0, 1] == pytest.approx(
      lib.per_token_average_cosine(lib.load_prompt(tiny_world['library'], 'extra'),
                                   lib.load_prompt(tiny_world['library'], 'transfer_a')), abs=1e-5)
  # again without --overwrite: refused, one line
  assert cli.main(['transfer', 'indicators', '--library', tiny_world['library'],
                   '--matrix', matrix, '--out', out]) != 0
  assert 'already exists' in capsys.readouterr().err


NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'colab',
                        'transferability.ipynb')


@pytest.mark.slow  # builds two reduced lab backbones in a fresh cache: minutes on 2 loaded cores
def test_notebook_runs(tmp_path, monkeypatch, reduced_lab_cache):
  monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_STEPS', '20')
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_B_STEPS', '20')
  monkeypatch.setenv('JAXPROMPT_NB_STEPS', '4')
  monkeypatch.setenv('JAXPROMPT_NB_PROJECTOR_STEPS', '4')
  monkeypatch.setenv('JAXPROMPT_NB_EVAL', '16')
  monkeypatch.setenv('JAXPROMPT_NB_WORK', str(tmp_path / 'work'))
  outputs, text = run_notebook(NOTEBOOK, tmp_path, timeout=900)
  assert 'zero-shot matrix 6x6' in text and 'concat_cosine' in text and 'held out' in text
  assert images(outputs) >= 3
  for name in ('zero_shot.csv', 'projector_task.safetensors', 'projector_distance.safetensors'):
    assert os.path.isfile(tmp_path / 'work' / name)


def test_transfer_lab_command_passes_its_options_to_the_report(capsys):
  from jaxprompt import cli
  with pytest.raises(SystemExit) as e:
    cli.main(['transfer', 'lab', '-h'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: jaxprompt transfer lab') and '--projector_steps' in out
  with pytest.raises(SystemExit) as e:
    cli.main(['transfer', 'lab', '--steps', 'x'])
  assert e.value.code == 2 and "--steps: invalid int value: 'x'" in capsys.readouterr().err
