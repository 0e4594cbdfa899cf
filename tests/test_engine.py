"""The engine contract: what trains, what stays frozen, sharding, resume, bad runs."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.model import Transformer, get_config, init_params
from jaxprompt.prompts import get_prompt, init_prompt, initializers
from jaxprompt.train import checkpointing, loop, steps
from jaxprompt.train.engine import build_engine
from jaxprompt.train.optimizers import t5x_adafactor
from conftest import devices_env

CFG = get_config('t5_1_1_tiny', dropout_rate=0.1)


def make_batch(position: int, batch: int = 8, vocab: int = 128) -> dict:
  rs = np.random.RandomState(1000 + position)
  enc = rs.randint(2, vocab, (batch, 6)).astype(np.int32)
  enc[0, 4:] = 0
  tgt = rs.randint(2, vocab, (batch, 3)).astype(np.int32)
  return {'encoder_input_tokens': enc, 'decoder_target_tokens': tgt,
          'decoder_input_tokens': np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
          'decoder_loss_weights': np.ones((batch, 3), np.float32)}


def batches_from(position: int, fail_at: int | None = None):
  while True:
    if fail_at is not None and position == fail_at:
      raise KeyboardInterrupt('simulated kill')
    yield make_batch(position)
    position += 1


@pytest.fixture(scope='module')
def backbone():
  return Transformer(CFG), init_params(CFG, 0)


def _prompt(length=4):
  return init_prompt(jax.random.PRNGKey(1), length, CFG.emb_dim, initializers.uniform())


def test_only_the_prompt_trains_and_the_backbone_is_untouched(backbone):
  module, params = backbone
  before = jax.tree_util.tree_map(np.array, params)
  eng, state = build_engine(module, steps.prompt_inputs, t5x_adafactor(), {'backbone': params},
                            _prompt())
  p0 = np.array(get_prompt(state.trainable))
  # Optimizer state exists for the prompt only.
  sizes = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  assert sizes <= 2 * p0.size + 10
  for i in range(3):
    state, metrics = eng.train_step(state, eng.frozen, eng.put_batch(make_batch(i)),
                                    jax.random.PRNGKey(0))
  assert int(state.step) == 3
  assert np.abs(np.array(get_prompt(state.trainable)) - p0).max() > 1e-3
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         jax.tree_util.tree_map(np.array, eng.frozen['backbone']))


def test_frozen_params_are_arguments_not_constants(backbone):
  module, params = backbone
  step = steps.make_train_step(module, steps.prompt_inputs, t5x_adafactor())
  state = steps.init_state(_prompt(), t5x_adafactor())
  hlo = jax.jit(step).lower(state, {'backbone': params}, make_batch(0),
                            jax.random.PRNGKey(0)).as_text()
  # Every backbone leaf arrives as an argument of the program; no weight is folded in as a constant.
  main = next(line for line in hlo.splitlines() if 'func.func public @main' in line)
  assert main.count('%arg') >= len(jax.tree_util.tree_leaves(params))
  big_constants = [line for line in hlo.splitlines()
                   if 'stablehlo.constant dense<' in line and 'tensor<128x32xf32>' in line]
  assert not big_constants


def test_grad_matches_finite_differences(backbone):
  module, params = backbone
  frozen = {'backbone': params}
  batch = make_batch(0)
  prompt = get_prompt(_prompt())

  @jax.jit
  def loss(p):
    logits = module.apply({'params': params}, batch['encoder_input_tokens'],
                          batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                          enable_dropout=False, prompt=p)
    from jaxprompt.model import compute_weighted_cross_entropy
    return compute_weighted_cross_entropy(logits, batch['decoder_target_tokens'],
                                        batch['decoder_loss_weights'], z_loss=1e-4)[0]

  g = jax.grad(loss)(prompt)
  rs = np.random.RandomState(0)
  for _ in range(3):
    i, j = rs.randint(prompt.shape[0]), rs.randint(prompt.shape[1])
    eps = 1e-2
    up = loss(prompt.at[i, j].add(eps))
    down = loss(prompt.at[i, j].add(-eps))
    np.testing.assert_allclose((up - down) / (2 * eps), g[i, j], rtol=2e-2, atol=2e-3)
  del frozen


@pytest.mark.slow  # the full tier: the fast tier's method contract runs model tuning
def test_model_tuning_runs_through_the_same_step(backbone):
  module, params = backbone
  eng, state = build_engine(module, steps.model_tuning_inputs, t5x_adafactor(1e-2), {}, params,
                            trainable_is_backbone=True)
  emb0 = np.array(params['token_embedder']['embedding'])
  state, _ = eng.train_step(state, eng.frozen, eng.put_batch(make_batch(0)), jax.random.PRNGKey(0))
  assert np.abs(np.array(state.trainable['token_embedder']['embedding']) - emb0).max() > 0


def test_prompt_stack_mixed_task_batches(backbone):
  module, params = backbone
  stack = init_prompt(jax.random.PRNGKey(0), 4, CFG.emb_dim, initializers.uniform(), num_prompts=3)
  assert get_prompt(stack).shape == (3, 4, CFG.emb_dim)
  batch = make_batch(0)
  batch['task_index'] = np.array([0, 1, 2, 0, 1, 2, 0, 1])
  eng, state = build_engine(module, steps.prompt_stack_inputs, t5x_adafactor(),
                            {'backbone': params}, stack, dropout=False)
  s0 = np.array(get_prompt(state.trainable))
  state, _ = eng.train_step(state, eng.frozen, eng.put_batch(batch), jax.random.PRNGKey(0))
  # Every task that appears in the batch moves; a task absent from the batch would not.
  moved = np.abs(np.array(get_prompt(state.trainable)) - s0).max(axis=(1, 2))
  assert (moved > 0).all()
  batch['task_index'] = np.zeros(8, np.int64)
  s1 = np.array(get_prompt(state.trainable))
  state, _ = eng.train_step(state, eng.frozen, eng.put_batch(batch), jax.random.PRNGKey(0))
  moved = np.abs(np.array(get_prompt(state.trainable)) - s1).max(axis=(1, 2))
  assert moved[0] > 0 and moved[1] < 1e-4 * 0.3 + 1e-5 * np.abs(s1[1]).max() * 10


def _run_loop(tmp_path, name, backbone, train_steps=30, fail_at=None):
  module, params = backbone
  eng, state = build_engine(module, steps.prompt_inputs, t5x_adafactor(), {'backbone': params},
                            _prompt())
  cfg = loop.LoopConfig(train_steps=train_steps, eval_period=10, log_period=5, progress=False)
  evaluate = lambda t: {'loss_per_token': float(eng.evaluate_batch(t, make_batch(-1))['loss'])}
  return loop.train_loop(eng.train_step, state, eng.frozen,
                         lambda pos: batches_from(pos, fail_at), jax.random.PRNGKey(7),
                         str(tmp_path / name), cfg, evaluate=evaluate, put_batch=eng.put_batch)


@pytest.mark.slow  # the full tier: the fast tier resumes a killed run in test_methods_contract
def test_killed_run_resumes_to_the_same_prompt(tmp_path, backbone):
  full = _run_loop(tmp_path, 'full', backbone)
  with pytest.raises(KeyboardInterrupt):
    _run_loop(tmp_path, 'killed', backbone, fail_at=17)  # last checkpoint at step 10
  assert checkpointing.Checkpointer(str(tmp_path / 'killed' / 'checkpoints')).latest_step() == 10
  resumed = _run_loop(tmp_path, 'killed', backbone)
  np.testing.assert_array_equal(np.array(get_prompt(full.state.trainable)),
                                np.array(get_prompt(resumed.state.trainable)))
  assert resumed.best_step == full.best_step
  rows = [json.loads(x) for x in open(tmp_path / 'full' / 'metrics.jsonl')]
  assert {r['split'] for r in rows} == {'train', 'eval'}
  assert os.path.exists(tmp_path / 'full' / 'training.png')


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tmp_path, backbone):
  module, params = backbone
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad['decoder']['logits_dense']['kernel'] = params['decoder']['logits_dense']['kernel'].at[0, 0].set(
      jnp.nan)
  eng, state = build_engine(module, steps.prompt_inputs, t5x_adafactor(), {'backbone': bad},
                            _prompt())
  p0 = np.array(get_prompt(state.trainable))
  cfg = loop.LoopConfig(train_steps=20, eval_period=10, log_period=5, progress=False)
  with pytest.raises(loop.NonFiniteLossError, match='non-finite loss'):
    loop.train_loop(eng.train_step, state, eng.frozen, batches_from, jax.random.PRNGKey(0),
                    str(tmp_path / 'nan'), cfg, put_batch=eng.put_batch)
  assert checkpointing.Checkpointer(str(tmp_path / 'nan' / 'checkpoints')).latest_step() is None
  del p0


@pytest.mark.parametrize('cause,accumulate', [('nan_in_backbone', 1), ('overflowing_update', 1),
                                              ('nan_in_backbone', 2)])
def test_nonfinite_step_leaves_the_state_unchanged(backbone, cause, accumulate):
  """Fails if the guard in the step is removed: the bad update would be applied (with gradient
  accumulation too: a non-finite microbatch poisons the sum)."""
  module, params = backbone
  frozen, lr = params, 0.3
  if cause == 'nan_in_backbone':
    frozen = jax.tree_util.tree_map(lambda x: x, params)
    kernel = params['decoder']['logits_dense']['kernel']
    frozen['decoder']['logits_dense']['kernel'] = kernel.at[0, 0].set(jnp.nan)
  else:  # finite loss and gradients, but the update overflows float32
    lr = 1e39
  eng, state = build_engine(module, steps.prompt_inputs, t5x_adafactor(learning_rate=lr),
                            {'backbone': frozen}, _prompt(), accumulate_steps=accumulate)
  before = np.array(get_prompt(state.trainable))
  opt_before = [np.array(x) for x in jax.tree_util.tree_leaves(state.opt_state)]
  state, metrics = eng.train_step(state, eng.frozen, eng.put_batch(make_batch(0)),
                                  jax.random.PRNGKey(0))
  assert bool(metrics['nonfinite'])
  assert int(state.step) == 0
  np.testing.assert_array_equal(np.array(get_prompt(state.trainable)), before)
  for a, b in zip(opt_before, jax.tree_util.tree_leaves(state.opt_state)):
    np.testing.assert_array_equal(a, np.array(b))


def _train(backbone, batches, accumulate, loss=steps.LossConfig(), dropout=False, rng=0):
  module, params = backbone
  eng, state = build_engine(module, steps.prompt_inputs, t5x_adafactor(), {'backbone': params},
                            _prompt(), loss=loss, dropout=dropout, accumulate_steps=accumulate)
  metrics = []
  for batch in batches:
    state, m = eng.train_step(state, eng.frozen, eng.put_batch(batch), jax.random.PRNGKey(rng))
    metrics.append(jax.device_get(m))
  return np.asarray(get_prompt(state.trainable)), metrics


def test_accumulated_microbatches_give_the_update_of_the_whole_batch(backbone):
  """4 microbatches of 2 = one batch of 8: the same Adafactor updates and summed metrics, with
  T5X's loss normalisation (a constant factor divides every microbatch's summed loss) and
  label smoothing; the reference is the unsplit step."""
  loss = steps.LossConfig(z_loss=1e-4, label_smoothing=0.1, loss_normalizing_factor=4.0)
  batches = [make_batch(i) for i in range(2)]
  batches[1]['decoder_loss_weights'][:3, 1:] = 0  # unequal weights across microbatches
  whole, whole_metrics = _train(backbone, batches, 1, loss)
  split, split_metrics = _train(backbone, batches, 4, loss)
  p0 = np.asarray(get_prompt(_prompt()))
  assert np.abs(whole - p0).max() > 1e-3  # it trained
  np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)
  for a, b in zip(split_metrics, whole_metrics):
    for key in ('loss', 'z_loss', 'weight_sum', 'num_correct', 'accuracy', 'grad_norm'):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  with pytest.raises(ValueError, match='does not split into 3 microbatches'):
    _train(backbone, batches[:1], 3)


@pytest.mark.slow  # the full tier (16 s on 2 cores)
def test_microbatch_dropout_is_deterministic(backbone):
  """Each microbatch draws its own dropout from (rng, step, microbatch): the same run twice is
  bit-identical, and dropout is on (the update differs from the dropout-free one)."""
  batches = [make_batch(0)]
  a, _ = _train(backbone, batches, 2, dropout=True)
  b, _ = _train(backbone, batches, 2, dropout=True)
  off, _ = _train(backbone, batches, 2, dropout=False)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - off).max() > 1e-6


def test_abstract_weights_lower_the_program_the_run_compiles(backbone):
  """`build_engine` on `jax.ShapeDtypeStruct` weights allocates nothing and lowers exactly the
  train and eval programs of the engine built on the real weights (prompt and model tuning)."""
  from jaxprompt.model.network import param_shapes
  from jaxprompt.train.engine import is_abstract
  module, params = backbone
  abstract_params = param_shapes(CFG)
  batch = make_batch(0)
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  rng = jax.random.PRNGKey(0)
  for inputs, frozen, trainable, is_backbone in [
      (steps.prompt_inputs, {'backbone': params}, _prompt(), False),
      (steps.model_tuning_inputs, {}, params, True)]:
    eng, state = build_engine(module, inputs, t5x_adafactor(), frozen, trainable,
                              trainable_is_backbone=is_backbone)
    live = {id(x) for x in jax.live_arrays()}
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      (frozen, trainable))
    if is_backbone:
      assert jax.tree_util.tree_structure(abstract[1]) == jax.tree_util.tree_structure(
          abstract_params)
    a_eng, a_state = build_engine(module, inputs, t5x_adafactor(), *abstract,
                                  trainable_is_backbone=is_backbone)
    new = [x for x in jax.live_arrays() if id(x) not in live]
    assert sum(x.size for x in new) < 16, [x.shape for x in new]  # no weight was allocated
    assert is_abstract(a_state) and (is_abstract(a_eng.frozen) or not frozen)
    assert all(x.sharding is not None for x in jax.tree_util.tree_leaves(a_state))
    a_batch = a_eng.abstract_batch(shapes)
    concrete = eng.lower_train(state, eng.put_batch(batch), rng).as_text()
    assert a_eng.lower_train(a_state, a_batch).as_text() == concrete
    assert (a_eng.lower_eval(a_state.trainable, a_batch).as_text() ==
            eng.lower_eval(state.trainable, eng.put_batch(batch)).as_text())


def test_run_directory_of_another_run_is_refused(tmp_path):
  d = str(tmp_path / 'run')
  m = {'method': 'prompt_tuning', 'backbone': '/a', 'task': 't', 'prompt_length': 5, 'seed': 0,
       'batch_size': 8}
  assert checkpointing.prepare_run_dir(d, m) is False
  assert checkpointing.prepare_run_dir(d, m, resume=True) is True
  with pytest.raises(checkpointing.RunDirectoryError, match='pass --resume'):
    checkpointing.prepare_run_dir(d, m, resume=False)
  with pytest.raises(checkpointing.RunDirectoryError, match="task: 't' -> 'u'"):
    checkpointing.prepare_run_dir(d, dict(m, task='u'))
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(checkpointing.RunDirectoryError, match='not empty'):
    checkpointing.prepare_run_dir(str(other), m)
  assert (other / 'notes.txt').read_text() == 'mine'


def test_one_run_holds_its_directory(tmp_path):
  d = str(tmp_path / 'run')
  holder = checkpointing.RunLock(d).acquire()
  with pytest.raises(checkpointing.RunDirectoryError, match=f'in use by host .*pid {os.getpid()}'):
    checkpointing.RunLock(d).acquire()
  holder.release()
  # A lock file left by a killed run (no process holds it) is stale: taken over.
  killed = subprocess.run([sys.executable, '-c', textwrap.dedent(f"""
      import os
      from jaxprompt.train.checkpointing import RunLock
      RunLock({d!r}).acquire()
      os._exit(9)  # dies holding it""")], capture_output=True, text=True, timeout=120)
  assert killed.returncode == 9
  assert 'pid' in open(os.path.join(d, 'run.lock')).read()
  checkpointing.RunLock(d).acquire().release()
  # The lock file alone does not make a fresh directory "not empty".
  m = {'method': 'prompt_tuning', 'backbone': 'x', 'task': 't', 'seed': 0, 'batch_size': 8}
  assert checkpointing.prepare_run_dir(d, m) is False


SHARDED = textwrap.dedent('''
    import json, sys, numpy as np, jax
    sys.path.insert(0, {tests!r})
    from test_engine import CFG, make_batch, _prompt
    from jaxprompt.model import Transformer, init_params
    from jaxprompt.train import partitioning, steps
    from jaxprompt.train.engine import build_engine
    from jaxprompt.train.optimizers import t5x_adafactor
    module, params = Transformer(CFG), init_params(CFG, 0)
    eng, state = build_engine(module, steps.prompt_inputs, t5x_adafactor(), {{'backbone': params}},
                              _prompt(), num_partitions={parts},
                              rules=partitioning.standard_logical_axis_rules(1, {dims}))
    losses = []
    for i in range(6):
      state, m = eng.train_step(state, eng.frozen, eng.put_batch(make_batch(i)),
                                jax.random.PRNGKey(3))
      losses.append(float(m['loss']))
    q = eng.frozen['backbone']['encoder']['layers_0']['attention']['query']['kernel']
    emb = eng.frozen['backbone']['token_embedder']['embedding']
    print(json.dumps({{'devices': jax.device_count(), 'losses': losses,
                      'query_spec': str(q.sharding.spec), 'embedding_spec': str(emb.sharding.spec),
                      'prompt': np.asarray(state.trainable['encoder']['prompt']['prompt']['prompt']).tolist()}}))
''')


def _run_devices(n: int, parts: int, dims: int = 1) -> dict:
  env = devices_env(n, TF_CPP_MIN_LOG_LEVEL='3')
  code = SHARDED.format(tests=os.path.dirname(__file__), parts=parts, dims=dims)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the full tier (56 s on 2 cores): 8 devices, 1-D and 2-D parameter sharding
def test_eight_device_sharded_training_follows_one_device():
  one = _run_devices(1, 1)
  eight = _run_devices(8, 2)
  assert eight['devices'] == 8 and eight['query_spec'] == "P(None, 'model')"
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=1e-4)
  np.testing.assert_allclose(eight['prompt'], one['prompt'], atol=1e-4)
  # 2-D parameter sharding (T5X's parameter_partitioning_dims=2): `embed` on `data` too.
  two_d = _run_devices(8, 2, dims=2)
  assert two_d['query_spec'] == "P('data', 'model')"
  assert two_d['embedding_spec'] == "P('model', 'data')"
  np.testing.assert_allclose(two_d['losses'], one['losses'], rtol=1e-4)
  np.testing.assert_allclose(two_d['prompt'], one['prompt'], atol=1e-4)
