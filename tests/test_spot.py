"""SPoT: per-row optimizer exactness, source prompts many at once into a library, transfer via
--init_from LIBRARY:TASK, task embeddings and ranking, retrieval evaluation, the gin run files
and the notebook; all on tiny models."""

import glob
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_helpers
from conftest import TINY_GATED, images, random_params, run_notebook
from jaxprompt import cli
from jaxprompt.methods import library as lib, spot
from jaxprompt.model import Transformer
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.prompts.files import read_prompt, write_prompt
from jaxprompt.train import steps
from jaxprompt.train.optimizers import per_row, t5x_adafactor

GIN_DIR = os.path.join(os.path.dirname(cli.__file__), 'gin')
NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'colab' / 'spot.ipynb'


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs here rebuild the same tiny steps: let XLA reuse their compiled code."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)


def _batch(rs, n, vocab, length=6, targets=3):
  tokens = rs.randint(3, vocab, (n, length)).astype(np.int32)
  tgt = rs.randint(3, vocab, (n, targets)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], axis=1)
  return {'encoder_input_tokens': tokens, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': np.ones_like(tgt)}


def test_per_row_adafactor_gives_each_row_its_update_alone():
  """A stack step on a mixed batch == each row's own step on its sub-batch (dropout off), at
  every step, from the same parameters and optimizer statistics (Adafactor's second moments,
  update clipping, beta2 schedule and weight decay all stay per row)."""
  module = Transformer(TINY_GATED)
  frozen = {'backbone': random_params(TINY_GATED, seed=3)}
  n, p, d = 3, 4, TINY_GATED.emb_dim
  rs = np.random.RandomState(0)
  stack = rs.uniform(-0.5, 0.5, (n, p, d)).astype(np.float32)
  tx = t5x_adafactor()
  stack_step = jax.jit(steps.make_train_step(module, steps.prompt_stack_inputs, per_row(tx),
                                             dropout=False))
  row_step = jax.jit(steps.make_train_step(module, steps.prompt_inputs, tx, dropout=False))
  state = steps.init_state(prompt_lib.prompt_tree(jnp.asarray(stack)), per_row(tx))
  rng = jax.random.PRNGKey(0)
  for step in range(2):
    task_index = rs.permutation(np.repeat(np.arange(n), 3)).astype(np.int32)
    batch = _batch(rs, len(task_index), TINY_GATED.vocab_size)
    before = state
    state, _ = stack_step(state, frozen, dict(batch, task_index=task_index), rng)
    got = np.asarray(prompt_lib.get_prompt(state.trainable))
    for i in range(n):
      alone = steps.TrainState(before.step, prompt_lib.prompt_tree(  # row i and its statistics
          prompt_lib.get_prompt(before.trainable)[i]),
          jax.tree.map(lambda x, i=i: x[i], before.opt_state))
      alone, _ = row_step(alone, frozen, {k: v[task_index == i] for k, v in batch.items()}, rng)
      want = np.asarray(prompt_lib.get_prompt(alone.trainable))
      assert np.abs(want - np.asarray(prompt_lib.get_prompt(before.trainable))[i]).max() > 1e-3
      # Equal up to float32 rounding: the batch sums run in another order, and Adafactor's
      # g / sqrt(v) magnifies that on entries with a tiny v (measured: <= 2.3e-6 on updates of
      # ~0.3; the first step agrees to 6e-8).
      np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5)
      for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], state.opt_state)),
                      jax.tree.leaves(alone.opt_state)):
        a, b = np.asarray(a), np.asarray(b)  # squared gradients: rounding of tiny entries
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 * max(np.abs(b).max(), 1e-30))


def test_retrieval_evaluation_against_numpy():
  rs = np.random.RandomState(0)
  t, s = 4, 5
  scores, sim = rs.uniform(50, 90, (t, s)), rs.uniform(-1, 1, (t, s))
  base = rs.uniform(40, 80, t)
  ev = spot.retrieval_evaluation([f't{i}' for i in range(t)], [f's{j}' for j in range(s)],
                                 scores, sim, list(base))
  assert ev['ks'] == [1, 3, 5]  # 6, 9, 12, 15 capped at the library size
  for k in (1, 3, 5):
    want = np.mean([scores[i][np.argsort(-sim[i])[:k]].max() for i in range(t)])
    assert ev['best_of_top_k'][k] == pytest.approx(want)
  assert ev['best_of_top_k'][5] == pytest.approx(ev['oracle'])
  assert ev['oracle'] == pytest.approx(scores.max(1).mean())
  assert ev['no_transfer'] == pytest.approx(base.mean())
  for i in range(t):
    assert ev['pearson'][f't{i}'] == pytest.approx(np.corrcoef(sim[i], scores[i] - base[i])[0, 1])


def test_weighted_average_init(tmp_path):
  rs = np.random.RandomState(1)
  d = str(tmp_path / 'lib')
  a, b = rs.normal(size=(3, 8)), rs.normal(size=(3, 8))
  lib.add(d, a, task='a')
  lib.add(d, b, task='b')
  got = spot.weighted_average([('a', 0.6), ('b', 0.2)], d, k=2)
  np.testing.assert_allclose(got, 0.75 * a + 0.25 * b, rtol=1e-5)
  with pytest.raises(ValueError, match='k = 3 is larger'):
    spot.weighted_average([('a', 0.6), ('b', 0.2)], d, k=3)
  with pytest.raises(ValueError, match='sum to'):
    spot.weighted_average([('a', -0.6), ('b', 0.2)], d, k=2)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A tiny T5 checkpoint and three file tasks on the test vocabulary."""
  from jaxprompt.checkpoints import save_t5x_legacy
  from jaxprompt.data.files import register_file_task
  from jaxprompt.model import get_config, init_params
  root = tmp_path_factory.mktemp('spot')
  vocab = data_helpers.vocabulary()
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  ckpt = save_t5x_legacy(init_params(cfg, 0), str(root / 'backbone'), 3)
  rs = np.random.RandomState(0)
  tasks = []
  for k, words in enumerate((('good', 'great'), ('bad', 'awful'), ('dog', 'cat'))):
    rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 4)) + f' {words[i % 2]}',
             'label': int(i % 2)} for i in range(40)]
    train = data_helpers.write_jsonl(root / f'train{k}.jsonl', rows[:32])
    dev = data_helpers.write_jsonl(root / f'dev{k}.jsonl', rows[32:])
    name = f'spot_file_task{k}'
    register_file_task(name, train, dev, input_column='text', label_column='label',
                       label_names=['no', 'yes'], vocabulary=vocab)
    tasks.append(name)
  return dict(root=root, ckpt=ckpt, tasks=tasks, spm=data_helpers.spm_model_path(),
              train=train, dev=dev)


COMMON = dict(prompt_length=3, feature_lengths={'inputs': 12, 'targets': 3}, progress=False,
              dropout_rate=0.0)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_sources_library_transfer_and_ranking_end_to_end(tiny, capsys):
  from jaxprompt.tuning import tune
  root, tasks = tiny['root'], tiny['tasks']
  library = str(root / 'library')
  r = spot.train_sources(tasks[:2], library, tiny['ckpt'], str(root / 'sources'),
                         train_steps=4, batch_size=8, eval_period=2, embedding_steps=2,
                         keep_checkpoints=3, **COMMON)  # every checkpoint, to check rows against
  entries = lib.entries(library)
  assert sorted(entries) == sorted(tasks[:2])
  evals = spot.per_task_evals(r.model_dir, tasks[:2])
  for i, task in enumerate(tasks[:2]):
    e = entries[task]
    assert e['init'] == 'sampled_vocab' and e['embedding_steps'] == 2 and e['length'] == 3
    assert e['backbone_fingerprint'] == r.tune_result.backbone.fingerprint
    # Each task's row is taken at its own best validation (the initial one included, as for
    # the run's best), not the macro best.
    scored = [(s, spot._primary(m)) for s, m in evals[task]]
    best = max(sc for _, sc in scored)
    assert e['steps'] in [s for s, sc in scored if sc == best]
    row = spot.restore_stack(r.model_dir, e['steps'])[i]
    np.testing.assert_allclose(lib.load_prompt(library, task), row)
    np.testing.assert_allclose(lib.load_embedding(library, task),
                               spot.restore_stack(r.model_dir, 2)[i])
  target = tasks[2]
  # Task embedding of the target, ranked against the library; CLI rank and its errors.
  paths = spot.embed_tasks([target], tiny['ckpt'], str(root / 'embed_run'),
                           str(root / 'emb'), steps=2, batch_size=4, **COMMON)
  ranking = spot.rank(paths[target], library)
  assert sorted(t for t, _ in ranking) == sorted(tasks[:2])
  assert cli.main(['spot', 'rank', '--target', paths[target], '--library', library, '--json',
                   '--k', '2', '--weighted_average', str(root / 'wavg.safetensors')]) == 0
  out = json.loads(capsys.readouterr().out)
  assert [x['task'] for x in out['ranking']] == [t for t, _ in ranking]
  assert read_prompt(str(root / 'wavg.safetensors')).value.shape == (3, 32)
  narrow = str(root / 'narrow.safetensors')
  from jaxprompt.prompts.files import write_prompt
  write_prompt(narrow, np.zeros((3, 5)))
  for argv, needle in (
      (['spot', 'rank', '--target', narrow, '--library', library], 'width 5'),
      (['spot', 'rank', '--target', paths[target], '--library', library, '--k', '3'],
       'k = 3 is larger than the library'),
      (['spot', 'rank', '--target', paths[target], '--library', str(root / 'none')],
       'does not exist'),
      (['spot', 'sources', '--tasks', 'lab_no_such_task', '--library', library, '--backbone',
        tiny['ckpt'], '--steps', '2'], "unknown task 'lab_no_such_task'"),
      (['spot', 'sources', '--tasks', tasks[0], '--library', library, '--backbone',
        tiny['ckpt'], '--steps', '2'], '--replace'),
      (['spot', 'evaluate', '--results', str(root / 'none.json')], 'no such')):
    before = open(os.path.join(library, 'index.json')).read()
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and needle in err, err
    assert open(os.path.join(library, 'index.json')).read() == before


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_transfer_matrix_rows_start_from_their_own_init(tiny):
  root, tasks = tiny['root'], tiny['tasks']
  from jaxprompt.prompts.files import write_prompt
  src = write_prompt(str(root / 'src_a.safetensors'),
                     np.random.RandomState(0).normal(size=(3, 32)), overwrite=True)
  pairs = [('t2_cl', tasks[2], 'class_labels'), ('t2_a', tasks[2], src)]
  out = spot.transfer_matrix(pairs, tiny['ckpt'], str(root / 'matrix'), train_steps=2,
                             batch_size=4, eval_period=1, learning_rate=0.0, weight_decay=0.0,
                             **COMMON)
  stack = np.asarray(prompt_lib.get_prompt(out['tune_result'].trainable))
  from jaxprompt.prompts.files import read_prompt
  np.testing.assert_allclose(stack[1], read_prompt(src).value, atol=1e-6)
  assert set(out['rows']) == {'t2_cl', 't2_a'}
  assert all(len(r['curve']) == 3 for r in out['rows'].values())  # steps 0, 1, 2
  assert spot.steps_to_reach([(0, 10.0), (50, 60.0), (100, 70.0)], 55) == 50
  assert spot.steps_to_reach([(0, 10.0)], 55) is None


def test_evaluate_command_writes_table_csv_png(tmp_path, capsys):
  results = {'targets': ['x', 'y'], 'sources': ['a', 'b', 'c'],
             'scores': [[60, 70, 65], [50, 40, 55]], 'no_transfer': {'x': 55, 'y': 45},
             'similarity': [[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]]}
  path = tmp_path / 'r.json'
  path.write_text(json.dumps(results))
  out = str(tmp_path / 'eval')
  assert cli.main(['spot', 'evaluate', '--results', str(path), '--out', out, '--json']) == 0
  ev = json.loads(capsys.readouterr().out)
  assert ev['best_of_top_k']['1'] == pytest.approx((70 + 55) / 2)
  assert ev['oracle'] == pytest.approx((70 + 55) / 2) and ev['no_transfer'] == 50
  for ext in ('md', 'csv', 'png', 'json'):
    assert os.path.getsize(f'{out}.{ext}') > 0
  assert cli.main(['spot', 'evaluate', '--results', str(path), '--out', out]) == 2
  assert '--overwrite' in capsys.readouterr().err


@pytest.mark.parametrize('run_file', [  # one in the fast tier, the others in the full tier
    f if f.endswith('spot_source.gin') else pytest.param(f, marks=pytest.mark.slow)
    for f in sorted(glob.glob(os.path.join(GIN_DIR, 'runs', 'spot_*.gin')))])
def test_spot_gin_run_files_parse_and_run_one_step(run_file, tiny, capsys):
  """Each SPoT run file parses with the paper's settings and runs a step with overrides."""
  import gin
  name = os.path.relpath(run_file, GIN_DIR)
  root = tiny['root']
  library = str(root / 'gin_library')
  if not os.path.isdir(library):
    lib.add(library, np.random.RandomState(5).normal(size=(3, 32)), task='gin_source')
  prompt = f'{library}:gin_source'  # --init_from LIBRARY_DIR:TASK
  # The paper's settings as written.
  gin.clear_config()
  cli._register_configurables()
  target = 'target' in name
  source_binding = [f"SOURCE_PROMPT = '{prompt}'"] if target else []
  gin.parse_config_files_and_bindings([run_file], ["MODEL_DIR = '/tmp/x'",
                                                   "MIXTURE_OR_TASK_NAME = 't'",
                                                   "INITIAL_CHECKPOINT_PATH = '/c'"]
                                      + source_binding)
  assert gin.query_parameter('%BATCH_SIZE') == 32
  assert gin.query_parameter('%EVAL_PERIOD') == 500
  assert gin.query_parameter('%DROPOUT_RATE') == 0.1
  assert gin.query_parameter('%LEARNING_RATE') == 0.3
  assert gin.query_parameter('%PROMPT_LENGTH') == 100
  assert gin.query_parameter('%TRAIN_STEPS') == 2 ** 18
  if target:
    assert gin.query_parameter('tune.init_from') is not None
  else:
    assert gin.query_parameter('tune.prompt_init') == 'sampled_vocab'
  gin.clear_config()
  # One step on the tiny backbone with the CLI's overrides.
  task = 'cli_spot'
  args = ['tune', f'--gin_file={name}', '--backbone', tiny['ckpt'],
          '--model_dir', str(root / f'gin_{os.path.basename(name)}'), '--task', task,
          '--train_file', tiny['train'], '--validation_file', tiny['dev'], '--input_column',
          'text', '--label_column', 'label', '--label_names', 'no,yes', '--vocabulary',
          tiny['spm'], '--steps', '1', '--eval_period', '1', '--batch_size', '4',
          '--prompt_length', '3', '--inputs_length', '12', '--targets_length', '3',
          '--gin.DROPOUT_RATE=0.0']
  if target:  # no update: the final prompt must be the library's
    args += [f'--gin.SOURCE_PROMPT={prompt}', '--learning_rate', '0', '--weight_decay', '0']
  assert cli.main(args) == 0, capsys.readouterr().err
  assert 'prompt (best)' in capsys.readouterr().out
  if target:
    from jaxprompt.prompts.files import read_prompt
    final = read_prompt(str(root / f'gin_{os.path.basename(name)}' / 'prompt_final.safetensors'))
    np.testing.assert_allclose(final.value, lib.load_prompt(library, 'gin_source'), atol=1e-6)
    assert final.metadata['init'] == f'from {prompt}'


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
@pytest.mark.skipif(not NOTEBOOK.exists(), reason='colab/spot.ipynb not written yet')
def test_notebook_runs(tmp_path, monkeypatch, reduced_lab_cache):
  monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_STEPS', '20')
  monkeypatch.setenv('JAXPROMPT_NB_STEPS', '6')
  monkeypatch.setenv('JAXPROMPT_NB_WORK', str(tmp_path / 'work'))
  outputs, text = run_notebook(NOTEBOOK, tmp_path, timeout=600)
  assert 'library:' in text and 'ranked' in text and 'transfer' in text
  assert images(outputs) >= 1
  assert os.path.exists(tmp_path / 'work' / 'library' / 'index.json')


def test_lab_evidence_bad_targets_get_one_line_before_anything_loads(tmp_path, capsys):
  """(`spot lab` end to end, its files and its resume: tests/test_resume_stages.py.)"""
  argv = ['spot', 'lab', '--backbone', 'lab', '--sources', 'has_red,majority',
          '--work', str(tmp_path / 'work'), '--out', str(tmp_path / 'x')]
  for bad, needle in ((['--targets', 'no_such_task'], 'not lab tasks'),
                      (['--targets', 'majority'], 'both a source and a target')):
    assert cli.main(argv + bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and needle in err, err


@pytest.mark.slow  # two runs of the command: ~25 s idle
def test_sources_command_runs_as_documented_and_resumes_after_a_failure(tiny, monkeypatch,
                                                                          capsys):
  """`jaxprompt spot sources --library lib ...` (its run folder inside the new library) trains
  and writes the library; a run that failed after training (here: adding to the library) is
  run again as it was and finishes from its run folder, the task embeddings as first taken."""
  root, tasks = tiny['root'], tiny['tasks'][:2]
  library = str(root / 'doc_library')
  args = ['spot', 'sources', '--tasks', ','.join(tasks), '--library', library, '--backbone',
          tiny['ckpt'], '--steps', '4', '--batch_size', '8', '--eval_period', '2',
          '--embedding_steps', '2', '--prompt_length', '3', '--vocabulary', tiny['spm']]
  original_add = lib.add
  monkeypatch.setattr(lib, 'add', lambda *a, **k: (_ for _ in ()).throw(OSError('disk full')))
  assert cli.main(args) == 2
  assert 'disk full' in capsys.readouterr().err
  runs = glob.glob(os.path.join(library, 'runs', 'sources_*'))
  assert len(runs) == 1 and os.path.exists(os.path.join(runs[0], spot.EMBEDDINGS_FILE))
  first_embeddings = spot._load_stack(os.path.join(runs[0], spot.EMBEDDINGS_FILE))
  monkeypatch.setattr(lib, 'add', original_add)
  assert cli.main(args) == 0, capsys.readouterr().err
  assert sorted(lib.entries(library)) == sorted(tasks)
  for i, task in enumerate(tasks):
    np.testing.assert_array_equal(lib.load_embedding(library, task), first_embeddings[i])
  rows = [json.loads(line) for line in open(os.path.join(runs[0], 'metrics.jsonl'))]
  assert [r['step'] for r in rows if r['split'] == 'train'] == [2, 4]  # once each: not retrained
  assert cli.main(args) == 2 and 'already holds' in capsys.readouterr().err
