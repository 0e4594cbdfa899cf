"""XPrompt: masks as a prompt mapping, importance, hierarchical pruning, rewinding, `prune`."""

import csv
import json
import os
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_helpers
from conftest import TINY_GATED, images, random_params, run_notebook
from jaxprompt import cli
from jaxprompt.checkpoints import save_t5x_legacy
from jaxprompt.config import ConfigError
from jaxprompt.methods import xprompt as xp
from jaxprompt.model import Transformer, get_config, init_params
from jaxprompt.prompts.files import read_prompt, write_prompt

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- importance: finite differences and the closed form ----

def _tiny_batch(rs, batch=3, length=6, targets=3, vocab=70):
  tokens = rs.randint(2, vocab, (batch, length)).astype(np.int32)
  tgt = rs.randint(2, vocab, (batch, targets)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
  return {'encoder_input_tokens': tokens, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': np.ones_like(tgt, np.float32)}


@pytest.mark.parametrize('layout', [pytest.param('contiguous', marks=pytest.mark.slow), 'strided'])
def test_mask_gradient_matches_finite_differences_and_closed_form(layout):
  module, params = Transformer(TINY_GATED), random_params(TINY_GATED)
  rs = np.random.RandomState(0)
  m, d, k = 4, TINY_GATED.emb_dim, 4
  prompt = rs.normal(0, 1, (m, d)).astype(np.float32)
  batch = _tiny_batch(rs)
  frozen = {'backbone': params, 'piece_index': xp.piece_index(d, k, layout)}
  grad_fn = xp.make_mask_gradient(module)
  ones = {'token': jnp.ones((m,)), 'piece': jnp.ones((m, k))}
  g = jax.jit(grad_fn)(ones, prompt, frozen, batch)
  loss = jax.jit(grad_fn.loss_fn)
  # Five-point finite differences of the float32 loss (summed, ~44 here): h = 1e-2 keeps the
  # round-off small and the O(h^4) truncation negligible.
  h = 1e-2
  errors = []
  for name, shape in (('token', (m,)), ('piece', (m, k))):
    for idx in [np.unravel_index(i, shape) for i in range(0, int(np.prod(shape)), 3)][:6]:
      def at(step):
        e = np.zeros(shape, np.float32)
        e[idx] = step
        return float(loss(dict(ones, **{name: ones[name] + e}), prompt, frozen, batch))
      fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
      errors.append(abs(fd - float(g[name][idx])) / (abs(float(g[name][idx])) + 0.1))
  print('finite differences: max error / (|grad| + 0.1):', max(errors))
  assert max(errors) < 5e-3, max(errors)
  # Closed form: dL/dgamma_i = <dL/dp_i, p_i>; dL/dzeta_ij = the same sum over piece j's dims.
  gp = np.asarray(jax.grad(lambda p: grad_fn.loss_fn(ones, p, frozen, batch))(prompt))
  np.testing.assert_allclose(np.asarray(g['token']), (gp * prompt).sum(-1), rtol=1e-4, atol=1e-5)
  per_piece = np.stack([(gp * prompt)[:, frozen['piece_index'] == j].sum(-1) for j in range(k)], 1)
  np.testing.assert_allclose(np.asarray(g['piece']), per_piece, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g['piece']).sum(-1), np.asarray(g['token']), rtol=1e-4,
                             atol=1e-5)


def _example_losses(module, params, prompt, k):
  """An independent per-example loss: one example's batch through the model with the prompt
  masked by contiguous pieces (np.repeat), T5X's summed token loss (z-loss 1e-4) of that example."""
  from jaxprompt.model import loss_and_metrics
  width = prompt.shape[1] // k

  @jax.jit
  def loss(token, piece, example):
    p = prompt * token[:, None] * jnp.repeat(piece, width, axis=1)
    logits = module.apply({'params': params}, example['encoder_input_tokens'],
                          example['decoder_input_tokens'], example['decoder_target_tokens'],
                          enable_dropout=False, prompt=p)
    return loss_and_metrics(logits, example['decoder_target_tokens'],
                            example['decoder_loss_weights'], z_loss=1e-4)[0]

  return loss


def _per_example_fd(loss, token, piece, examples, h=2e-3):
  """Five-point finite differences of each example's loss w.r.t. every mask entry:
  ({'token': [n, m], 'piece': [n, m, k]}) for the n examples."""
  out = {'token': [], 'piece': []}
  for ex in examples:
    for name, base in (('token', token), ('piece', piece)):
      g = np.zeros(base.shape)
      for idx in np.ndindex(base.shape):
        def at(step):
          moved = {'token': token, 'piece': piece}
          e = np.zeros(base.shape, np.float32)
          e[idx] = step
          moved[name] = base + e
          return float(loss(moved['token'], moved['piece'], ex))
        g[idx] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
      out[name].append(g)
  return {k: np.stack(v) for k, v in out.items()}


def test_importance_is_the_mean_of_per_example_absolute_gradients():
  """I = E_x |dL(x)/dmask| (the paper's eq. 3) against per-example finite differences, over
  batches of 4 (one with a padding row, which must not count), at partly pruned masks; the
  per-batch form |dL(batch)/dmask| is another number on the same data."""
  from jaxprompt.checkpoints.backbone import load_backbone
  module, params = Transformer(TINY_GATED), random_params(TINY_GATED)
  bb = load_backbone((module, params))
  rs = np.random.RandomState(2)
  m, k = 3, 2
  prompt = rs.normal(0, 1, (m, TINY_GATED.emb_dim)).astype(np.float32)
  batches = [dict(_tiny_batch(rs, batch=4), example_mask=np.ones(4, np.int32)) for _ in range(3)]
  batches[2]['decoder_loss_weights'][3] = 0.0  # a padding row
  batches[2]['example_mask'][3] = 0
  token = np.ones(m, np.float32)
  piece = np.ones((m, k), np.float32)
  piece[1, 0] = 0.0  # scored at the current masks, as every pruning round is
  examples = [{key: v[i:i + 1] for key, v in b.items() if key != 'example_mask'}
              for b in batches for i in range(4) if b['example_mask'][i]]
  assert len(examples) == 11
  fd = _per_example_fd(_example_losses(module, params, prompt, k), token, piece, examples)
  scorer = lambda **kw: xp.Scorer(bb, prompt, None, None, None, pieces=k, batches=3,  # noqa
                                  batch_source=batches, **kw)
  got = scorer().scores(token, piece)  # the default: per example, absolute
  for name in ('token', 'piece'):
    expect = np.abs(fd[name]).mean(0)
    err = np.abs(got[name] - expect) / (expect + 0.1)
    print(name, 'per example vs finite differences: max error / (I + 0.1):', err.max())
    assert err.max() < 5e-3, (name, got[name], expect)
  signed = scorer(kind='signed').scores(token, piece)
  per_batch = scorer(per='batch').scores(token, piece)
  for name in ('token', 'piece'):
    expect = np.abs(fd[name]).mean(0)
    np.testing.assert_allclose(signed[name], -fd[name].mean(0), atol=5e-3 * (
        np.abs(fd[name]).mean() + 0.1))
    # The per-batch form: |sum of a batch's gradients|, averaged over batches (finite
    # differences of the batch loss are sums of the examples'): far from the per-example form.
    sizes = np.cumsum([0, 4, 4, 3])
    batch_fd = np.mean([np.abs(fd[name][a:b].sum(0)) for a, b in zip(sizes, sizes[1:])], 0)
    err = np.abs(per_batch[name] - batch_fd) / (batch_fd + 0.1)
    assert err.max() < 5e-3, (name, per_batch[name], batch_fd)
    gap = np.abs(per_batch[name] - expect) / (expect + 0.1)
    print(name, 'per batch vs per example: max relative gap', gap.max())
    assert gap.max() > 0.2, (name, per_batch[name], expect)


def test_masks_with_a_batch_axis_give_one_prompt_per_example():
  rs = np.random.RandomState(3)
  m, d, k, b = 4, 8, 4, 3
  value = rs.normal(size=(m, d)).astype(np.float32)
  tokens = (rs.uniform(size=(b, m)) > 0.3).astype(np.float32)
  pieces = (rs.uniform(size=(b, m, k)) > 0.3).astype(np.float32)
  for layout in ('contiguous', 'strided'):
    extras = xp.mask_extras(np.ones(m), np.ones((m, k)), layout, d, drop_pruned=True)
    extras['kept_tokens'] = np.array([0, 2, 3], np.int32)
    batched = dict(extras, backbone=None, token_mask=jnp.asarray(tokens),
                   piece_mask=jnp.asarray(pieces))
    got = np.asarray(xp.masked_inputs(xp.prompt_lib.prompt_tree(value), batched, None)[1])
    assert got.shape == (b, 3, d)
    for i in range(b):
      one = dict(extras, backbone=None, token_mask=tokens[i], piece_mask=pieces[i])
      np.testing.assert_array_equal(
          got[i], np.asarray(xp.masked_inputs(xp.prompt_lib.prompt_tree(value), one, None)[1]))


# ---- pruning schedule ----

def test_hierarchical_masks_nested_exact_and_keep_one_token():
  m, k = 20, 16
  fractions = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)
  masks = xp.hierarchical_masks(m, k, fractions, xp.random_scores(0), token_share=0.5)
  prev = None
  for f in fractions:
    token, piece = masks[f]
    live = piece * token[:, None]
    assert int(live.sum()) == m * k - round(f * m * k)
    assert (token > 0).sum() >= 1 and live.sum() >= 1
    assert np.all(live[token == 0] == 0)
    if prev is not None:
      assert np.all(live <= prev)  # nested
    prev = live
  token, piece = masks[0.5]
  assert (token == 0).sum() >= 2  # whole tokens were pruned first
  # only tokens: token_share 1 prunes whole tokens as far as whole tokens fit
  t, p = xp.hierarchical_masks(10, 4, [0.5], xp.random_scores(1), token_share=1.0)[0.5]
  assert (t == 0).sum() == 5 and np.all(p[t == 1] == 1)
  # importance order: the lowest-scored token goes first
  score = lambda tok, pc: {'token': np.arange(4.0), 'piece': np.ones((4, 2))}  # noqa: E731
  t, _ = xp.hierarchical_masks(4, 2, [0.25], score, token_share=1.0)[0.25]
  assert t.tolist() == [0, 1, 1, 1]
  # fraction of (almost) everything keeps one piece of one token
  t, p = xp.hierarchical_masks(3, 2, [0.999], xp.random_scores(2))[0.999]
  assert (p * t[:, None]).sum() == 1


def test_tokens_are_pruned_strictly_by_rank():
  """A token whose live pieces exceed the round's token budget ends the token step: the next,
  more important token is not pruned in its place; the remainder goes to pieces."""
  token_scores = np.array([0.0, 1.0, 2.0, 3.0])
  piece_scores = np.full((4, 4), 9.0)
  piece_scores[1, 0], piece_scores[2, 1] = 0.0, 1.0  # round 1 leaves tokens 1, 2 with 3 pieces
  score = lambda tok, pc: {'token': token_scores, 'piece': piece_scores}  # noqa: E731
  masks = xp.hierarchical_masks(4, 4, [2 / 16, 5 / 16], score, token_share=1.0)
  token, piece = masks[2 / 16]
  assert token.tolist() == [1, 1, 1, 1] and piece.sum(-1).tolist() == [4, 3, 3, 4]
  token, piece = masks[5 / 16]  # budget 3: token 0 (4 live pieces) does not fit
  assert token.tolist() == [1, 1, 1, 1], token  # token 1 (3 pieces, more important) is kept
  assert (piece * token[:, None]).sum() == 11


def _token_step_rounds(calls, masks, fractions):
  """(token scores, alive before, alive after the token step) of each round, from the recorded
  score calls of `hierarchical_masks` with token_share 1 (every round scores tokens first; a
  piece call follows iff pieces remain to prune, and then prunes at least one)."""
  alive = lambda t, p: set(xp.kept_tokens(t, p).tolist())  # noqa: E731
  rounds, i = [], 0
  for f in fractions:
    t0, p0, s = calls[i]
    end = masks[f]
    i += 1
    after = end
    if i < len(calls) and not (np.array_equal(calls[i][0], end[0]) and
                               np.array_equal(calls[i][1], end[1])):
      after = calls[i][:2]  # this round's piece call: the masks right after the token step
      i += 1
    rounds.append((s, alive(t0, p0), alive(*after)))
  assert i == len(calls)
  return rounds


@pytest.mark.parametrize('seed', range(4))
def test_no_kept_token_ranks_below_a_token_pruned_in_the_same_round(seed):
  rs = np.random.RandomState(seed)
  calls = []

  def score(token, piece):  # fresh scores every call, as re-scoring at new masks gives
    s = {'token': rs.uniform(size=token.shape), 'piece': rs.uniform(size=piece.shape)}
    calls.append((token.copy(), piece.copy(), s['token']))
    return s

  fractions = (0.07, 0.15, 0.26, 0.4, 0.55, 0.7, 0.85)
  masks = xp.hierarchical_masks(12, 8, fractions, score, token_share=1.0)
  pruned_any = 0
  for s, before, after in _token_step_rounds(calls, masks, fractions):
    pruned = before - after
    pruned_any += len(pruned)
    if pruned:
      assert max(s[list(pruned)]) <= min(s[list(after)]), (s, before, after)
  assert pruned_any >= 3


def test_options_and_bad_input_are_one_clear_error():
  with pytest.raises(ConfigError, match='between 0 and 1'):
    xp.XPromptOptions(prune_fractions=(0.2, 1.0))
  with pytest.raises(ConfigError, match='between 0 and 1'):
    xp.check_fractions('0,0.5')
  assert xp.XPromptOptions(prune_fractions='0.5,0.1').prune_fractions == (0.1, 0.5)
  with pytest.raises(ConfigError, match='piece_layout'):
    xp.XPromptOptions(piece_layout='diagonal')
  with pytest.raises(ConfigError, match='importance_per.*example, batch'):
    xp.XPromptOptions(importance_per='examples')
  with pytest.raises(ValueError, match='do not divide the prompt width 32'):
    xp.piece_index(32, 5)
  assert xp.piece_index(8, 4, 'contiguous').tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  assert xp.piece_index(8, 4, 'strided').tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_prompt_file_masks_round_trip_and_mismatch(tmp_path):
  rs = np.random.RandomState(0)
  value = rs.normal(size=(4, 8)).astype(np.float32)
  token = np.array([1, 0, 1, 1], np.float32)
  piece = (rs.uniform(size=(4, 4)) > 0.3).astype(np.float32)
  for layout in ('contiguous', 'strided'):
    idx = xp.piece_index(8, 4, layout)
    mask = xp.element_mask(token, piece, idx)
    path = str(tmp_path / f'{layout}.safetensors')
    write_prompt(path, value * mask, method='xprompt', **xp.file_masks(token, piece, layout),
                 xprompt=xp.product_meta(token, piece, layout, 8, False))
    pf = read_prompt(path)
    t, p, lay = xp.read_masks(pf, path)
    assert lay == layout and np.array_equal(t, token) and np.array_equal(p, piece)
    np.testing.assert_array_equal(pf.masked_value(), value * mask)  # what transfer init reads
    trainable, extras = xp.XPrompt().from_prompt_file(pf, path)
    np.testing.assert_array_equal(np.asarray(xp.masked_inputs(trainable, dict(
        extras, backbone=None), None)[1]), value * mask)
  bad = str(tmp_path / 'bad.safetensors')
  write_prompt(bad, value, token_mask=np.ones(3), piece_mask=np.ones((4, 4)))
  with pytest.raises(ValueError, match='token mask of shape'):
    xp.read_masks(read_prompt(bad), bad)
  bad2 = str(tmp_path / 'bad2.safetensors')
  write_prompt(bad2, value, piece_mask=np.ones((4, 3)))
  with pytest.raises(ValueError, match='does not divide'):
    xp.read_masks(read_prompt(bad2), bad2)


# ---- end to end on a tiny backbone and a file task ----

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('xprompt')
  vocab = data_helpers.vocabulary()
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  ckpt = save_t5x_legacy(init_params(cfg, 0), str(root / 'backbone'), 3)
  rs = np.random.RandomState(0)
  rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 5)), 'label': int(i % 2)}
          for i in range(64)]
  train = data_helpers.write_jsonl(root / 'train.jsonl', rows[:48])
  dev = data_helpers.write_jsonl(root / 'dev.jsonl', rows[48:])
  spm = data_helpers.spm_model_path()
  cli.setup_tasks(spm, train, dev, task_name='xp_task', input_column='text',
                  label_column='label', label_names=['bad', 'good'])
  common = dict(feature_lengths={'inputs': 16, 'targets': 4}, batch_size=8, prompt_length=4,
                progress=False)
  return dict(root=root, ckpt=ckpt, spm=spm, train=train, dev=dev, common=common,
              width=cfg.emb_dim)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_pruned_entries_stay_zero_through_training_resume_and_export(tiny):
  from jaxprompt import evaluate, tune
  from jaxprompt.checkpoints.peft import export_peft, read_peft_prompt
  root, d = tiny['root'], tiny['width']
  token = np.array([1, 0, 1, 1], np.float32)
  piece = np.ones((4, 4), np.float32)
  piece[0, 1] = piece[2, 3] = 0
  masks = str(root / 'masks.safetensors')
  write_prompt(masks, np.ones((4, d)), method='xprompt',
               **xp.file_masks(token, piece, 'contiguous'),
               xprompt=xp.product_meta(token, piece, 'contiguous', d, False))
  mask = xp.element_mask(token, piece, xp.piece_index(d, 4))
  run = str(root / 'masked')
  opts = dict(tiny['common'], method='xprompt', masks=masks, pieces=4, prompt_init='uniform',
              weight_decay=0.1, learning_rate=0.3, eval_period=3, seed=3)
  r1 = tune('xp_task', backbone=tiny['ckpt'], model_dir=run, train_steps=3, **opts)
  r2 = tune('xp_task', backbone=tiny['ckpt'], model_dir=run, train_steps=6, resume=True, **opts)
  assert r2.step == 6
  for r in (r1, r2):
    value = np.asarray(jax.device_get(r.trainable['encoder']['prompt']['prompt']['prompt']))
    assert np.all(value[mask == 0] == 0.0)  # exactly zero, with weight decay, after resume
    assert np.all(value[mask == 1] != 0.0)
  first = np.asarray(jax.device_get(r1.trainable['encoder']['prompt']['prompt']['prompt']))
  assert not np.allclose(first[mask == 1], np.asarray(
      jax.device_get(r2.trainable['encoder']['prompt']['prompt']['prompt']))[mask == 1])
  for path in (r2.prompt_path, r2.best_prompt_path):
    pf = read_prompt(path)
    assert pf.metadata['method'] == 'xprompt'
    assert np.array_equal(pf.token_mask, token) and np.array_equal(pf.piece_mask, piece)
    assert np.all(pf.value[mask == 0] == 0.0)
    assert np.all(np.load(path.replace('.safetensors', '.npy'))[mask == 0] == 0.0)
  out = export_peft(r2.best_prompt_path, str(root / 'peft'))
  assert np.all(read_peft_prompt(out).value[mask == 0] == 0.0)
  metrics = evaluate.evaluate('xp_task', backbone=tiny['ckpt'], prompt=r2.best_prompt_path,
                              feature_lengths={'inputs': 16, 'targets': 4})
  assert 'score' in metrics or 'accuracy' in metrics
  assert '3/4 tokens kept' in cli_info(r2.best_prompt_path)
  # drop_pruned: the pruned token leaves the sequence; loss differs from the zero-vector one
  _, extras = xp.XPrompt().load_product(r2.best_prompt_path, _ctx(tiny))
  extras_drop = xp.mask_extras(token, piece, 'contiguous', d, drop_pruned=True)
  tr = xp.XPrompt().from_prompt_file(read_prompt(r2.best_prompt_path), 'p')[0]
  assert xp.masked_inputs(tr, dict(extras_drop, backbone=None), None)[1].shape == (3, d)
  assert xp.masked_inputs(tr, dict(extras, backbone=None), None)[1].shape == (4, d)


def _ctx(tiny):
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.methods import Context
  return Context(load_backbone(tiny['ckpt']), 'xp_task', ('xp_task',), None, None, None, None)


def cli_info(path):
  import contextlib
  import io
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert cli.main(['info', path]) == 0
  return buf.getvalue()


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_prune_command_end_to_end_resume_and_bad_input(tiny, capsys):
  from jaxprompt import tune
  root = tiny['root']
  stage1 = tune('xp_task', backbone=tiny['ckpt'], model_dir=str(root / 'stage1'),
                method='xprompt', pieces=4, prune_fractions=(0.25, 0.5), train_steps=4,
                eval_period=4, **tiny['common'])
  out = str(root / 'pruned')
  args = ['prune', '--prompt', stage1.best_prompt_path, '--task', 'xp_task', '--backbone',
          tiny['ckpt'], '--out', out, '--importance_batches', '2', '--vocabulary', tiny['spm']]
  # bad input: one line, nothing written
  for extra, words in ((['--fractions', '0.5,1.2'], 'between 0 and 1'),
                       (['--pieces', '5'], 'do not divide')):
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count('\n') == 0, err
    assert not os.path.exists(out)
  assert cli.main(args) == 0
  text = capsys.readouterr().out
  assert 'val before' in text and 'chosen: fraction' in text
  rows = list(csv.DictReader(open(os.path.join(out, 'prune.csv'))))
  assert [float(r['fraction']) for r in rows] == [0.0, 0.25, 0.5]
  assert [int(r['kept_pieces']) for r in rows] == [16, 12, 8]  # 4 tokens x 4 pieces
  assert int(rows[2]['trainable_parameters']) == 8 * tiny['width'] // 4
  assert os.path.getsize(os.path.join(out, 'masks.png')) > 1000
  best = read_prompt(os.path.join(out, 'xprompt_best.safetensors'))
  assert best.metadata['method'] == 'xprompt' and best.piece_mask is not None
  m25 = read_prompt(os.path.join(out, 'masks', 'f250.safetensors'))
  m50 = read_prompt(os.path.join(out, 'masks', 'f500.safetensors'))
  live = lambda pf: pf.piece_mask * pf.token_mask[:, None]  # noqa: E731
  assert np.all(live(m50) <= live(m25))  # nested
  # rewinding: the surviving entries started from the stage-1 values
  stage1_value = read_prompt(stage1.best_prompt_path).value
  np.testing.assert_array_equal(m50.value, stage1_value * xp.element_mask(
      m50.token_mask, m50.piece_mask, xp.piece_index(tiny['width'], 4)))
  # resumable: a killed prune (here: the second fraction's row lost) redoes only that fraction
  state = json.load(open(os.path.join(out, 'prune.json')))
  done = state['rows'].pop('f500')
  json.dump(state, open(os.path.join(out, 'prune.json'), 'w'))
  mtime = os.path.getmtime(os.path.join(out, 'f250', 'summary.json'))
  assert cli.main(args) == 0
  assert 'resuming the prune' in capsys.readouterr().err
  assert os.path.getmtime(os.path.join(out, 'f250', 'summary.json')) == mtime
  assert json.load(open(os.path.join(out, 'prune.json')))['rows']['f500']['val_after'] == \
      done['val_after']
  # another setting in the same directory is refused
  assert cli.main(args + ['--fractions', '0.3']) == 2
  assert 'another setting' in capsys.readouterr().err
  # a prompt of another width is refused before anything is written
  other = str(root / 'wide.safetensors')
  write_prompt(other, np.ones((4, 2 * tiny['width'])))
  assert cli.main(['prune', '--prompt', other, '--task', 'xp_task', '--backbone', tiny['ckpt'],
                   '--out', str(root / 'wide'), '--vocabulary', tiny['spm']]) == 2
  assert 'does not match the model width' in capsys.readouterr().err
  assert not os.path.exists(root / 'wide')
  # eval honours the chosen masks (method read from the file)
  assert cli.main(['eval', '--task', 'xp_task', '--backbone', tiny['ckpt'], '--prompt',
                   os.path.join(out, 'xprompt_best.safetensors'), '--vocabulary', tiny['spm'],
                   '--inputs_length', '16', '--targets_length', '4', '--json']) == 0
  assert 'accuracy' in capsys.readouterr().out


def test_gin_run_file_parses_and_runs_one_step(tiny, capsys):
  run = str(tiny['root'] / 'gin_run')
  code = cli.main(['tune', '--gin_file=runs/xprompt.gin', f'--gin.MODEL_DIR={run!r}',
                   "--gin.MIXTURE_OR_TASK_NAME='xp_task'",
                   f"--gin.INITIAL_CHECKPOINT_PATH={tiny['ckpt']!r}",
                   f"--gin.VOCABULARY={tiny['spm']!r}", '--gin.TRAIN_STEPS=1',
                   '--gin.EVAL_PERIOD=1', '--gin.PROMPT_LENGTH=4', '--gin.XPROMPT_PIECES=4',
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}",
                   '--gin.BATCH_SIZE=8', '--gin.tune.progress=False'])
  assert code == 0, capsys.readouterr().err
  manifest = json.load(open(os.path.join(run, 'manifest.json')))
  assert manifest['method'] == 'xprompt' and manifest['batch_size'] == 8
  assert manifest['options']['pieces'] == 4
  assert manifest['options']['prune_fractions'] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
  gin.clear_config()
  cli._register_configurables()
  gin.parse_config_files_and_bindings([cli.resolve_gin_file('runs/xprompt.gin')], [
      "MODEL_DIR = '/x'", "MIXTURE_OR_TASK_NAME = 'x'", "INITIAL_CHECKPOINT_PATH = '/c'"])
  assert gin.query_parameter('%PROMPT_LENGTH') == 20
  assert gin.query_parameter('%BATCH_SIZE') == 16
  assert gin.query_parameter('%LEARNING_RATE') == 0.3
  assert gin.query_parameter('%XPROMPT_PIECES') == 16
  assert gin.query_parameter('tune.weight_decay') == 1e-5
  assert gin.query_parameter('tune.prompt_init') == 'sampled_vocab'
  gin.clear_config()


@pytest.mark.slow  # builds a (reduced) lab backbone in a fresh cache: minutes on 2 loaded cores
def test_notebook_runs(tmp_path, monkeypatch, reduced_lab_cache):
  monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_STEPS', '20')
  monkeypatch.setenv('JAXPROMPT_NB_IMPORTANCE_BATCHES', '2')
  monkeypatch.setenv('JAXPROMPT_NB_TUNE_STEPS', '6')
  monkeypatch.setenv('JAXPROMPT_NB_FRACTIONS', '0.5')
  monkeypatch.setenv('JAXPROMPT_NB_RUN_DIR', str(tmp_path / 'run'))
  outputs, text = run_notebook(REPO / 'colab' / 'xprompt.ipynb', tmp_path, timeout=600)
  assert 'val before' in text and 'importance pass' in text
  assert images(outputs) >= 2
