"""The Method contract, tested over every registered method through the real run driver.

Each method runs on a tiny T5 and file tasks read through seqio (a mixture for methods that
train on mixed-task batches): only its trainable changes, a run killed between checkpoints and
resumed equals the uninterrupted run bit for bit (trainable and optimizer state) having run
only the remaining steps, its product evaluates to the run's recorded best metric exactly, and
1-device and 8-device runs agree. A new method is tested here by being registered.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import data_helpers
from jaxprompt import cli
from jaxprompt.methods import get_method, method_names
from jaxprompt.model import Transformer, get_config, init_params
from conftest import devices_env

METHODS = method_names()
# Resuming bit for bit (three runs) and evaluating the product (a second engine) per method:
# prompt tuning's in the fast tier, every other method's in the full tier.
FAST_TIER_RESUME = [m if m == 'prompt_tuning' else pytest.param(m, marks=pytest.mark.slow)
                    for m in METHODS]
# Only the trainable changes: one method of each kind (a prompt, prefixes in every layer, the
# backbone) in the fast tier, every other method's in the full tier (about 20 s each on 2 cores).
FAST_TIER_CONTRACT = [m if m in ('prompt_tuning', 'prefix_tuning', 'model_tuning') else
                      pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
STEPS, EVAL_PERIOD = 8, 4


def _setup(root: str) -> dict:
  """Vocabulary, two file tasks and their mixture (registered), and a tiny backbone config."""
  from jaxprompt.data.tasks import register_mixture
  vocab = data_helpers.vocabulary()
  rs = np.random.RandomState(0)
  for name, offset in (('contract_a', 0), ('contract_b', 1)):
    rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 4)), 'label': int((i + offset) % 2)}
            for i in range(40)]
    os.makedirs(root, exist_ok=True)
    train = data_helpers.write_jsonl(os.path.join(root, f'{name}_train.jsonl'), rows[:32])
    dev = data_helpers.write_jsonl(os.path.join(root, f'{name}_dev.jsonl'), rows[32:])
    cli.setup_tasks(data_helpers.spm_model_path(), train, dev, name, 'text', 'target', 'label',
                    ['bad', 'good'])
  register_mixture('contract_mix', ['contract_a', 'contract_b'], rates=[1.0, 1.0])
  return {'vocab_size': vocab.vocab_size}


def task_for(method: str) -> str:
  return 'contract_mix' if get_method(method).uses_task_index else 'contract_a'


def run_options(method: str, **extra) -> dict:
  options = dict(train_steps=STEPS, eval_period=EVAL_PERIOD, log_period=1, batch_size=8,
                 prompt_length=3, feature_lengths={'inputs': 12, 'targets': 4},
                 prompt_init='uniform', progress=False, dropout_rate=0.0)
  options.update(get_method(method).contract_options())
  options.update(extra)
  return options


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('contract'))
  info = _setup(root)
  cfg = get_config('t5_1_1_tiny', vocab_size=info['vocab_size'], dropout_rate=0.0)
  return dict(root=root, module=Transformer(cfg), params=init_params(cfg, 0))


_FULL_RUNS: dict = {}


def full_run(world, method, tmp_path_factory):
  """The uninterrupted run of `method`, shared by the tests below."""
  if method not in _FULL_RUNS:
    _FULL_RUNS[method] = _tune(world, method, str(tmp_path_factory.mktemp(method) / 'full'))
  return _FULL_RUNS[method]


def _tune(world, method, model_dir, **extra):
  from jaxprompt.tuning import tune
  return tune(task_for(method), backbone=(world['module'], world['params']),
              model_dir=model_dir, method=method, **run_options(method, **extra))


def _rows(model_dir):
  return [json.loads(line) for line in open(os.path.join(model_dir, 'metrics.jsonl'))]


@pytest.mark.parametrize('method', FAST_TIER_CONTRACT)
def test_only_the_trainable_changes(world, method, tmp_path_factory):
  before = jax.tree_util.tree_map(np.array, world['params'])
  m = get_method(method)
  result = full_run(world, method, tmp_path_factory)
  after = jax.tree_util.tree_map(np.array, world['params'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)  # never written to
  from jaxprompt.methods import Context
  from jaxprompt.tuning import make_context
  from jaxprompt.config import RunConfig
  import dataclasses
  fields = {f.name for f in dataclasses.fields(m.Options)}
  options = m.Options(**{k: v for k, v in m.contract_options().items() if k in fields})
  ctx = make_context(m, task_for(method), (world['module'], world['params']),
                     RunConfig(method=method, prompt_length=3, prompt_init='uniform'), options)
  assert isinstance(ctx, Context)
  initial, _ = m.init(jax.random.split(jax.random.PRNGKey(0))[0], ctx)
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                 initial, result.trainable)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.parametrize('method', FAST_TIER_RESUME)
def test_killed_run_resumes_bit_for_bit_running_only_the_rest(world, method, tmp_path,
                                                              tmp_path_factory, monkeypatch,
                                                              capfd):
  full = full_run(world, method, tmp_path_factory)
  killed = str(tmp_path / 'killed')
  _tune(world, method, killed, train_steps=6)  # checkpoints at 4 and 6 ...
  shutil.rmtree(os.path.join(killed, 'checkpoints', '6'))  # ... killed before the one at 6
  os.remove(os.path.join(killed, 'summary.json'))
  from jaxprompt.train import engine as engine_lib
  build, count = engine_lib.build_engine, []

  def counting_build(*args, **kwargs):
    eng, state = build(*args, **kwargs)
    step = eng.train_step

    def counted(*a):
      count.append(1)
      return step(*a)

    eng.train_step = counted
    return eng, state

  monkeypatch.setattr(engine_lib, 'build_engine', counting_build)
  capfd.readouterr()
  resumed = _tune(world, method, killed, resume=True)
  assert len(count) == STEPS - EVAL_PERIOD  # steps 5..8 only
  err = capfd.readouterr().err
  assert 'from step 4' in err and 'replaying' not in err  # the saved data position, O(1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.trainable, resumed.trainable)
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.opt_state, resumed.opt_state)
  assert resumed.best_step == full.best_step and resumed.best_metrics == full.best_metrics
  for run in (full.model_dir, killed):
    train_steps = [r['step'] for r in _rows(run) if r['split'] == 'train']
    assert train_steps == list(range(1, STEPS + 1))  # one row per step, none duplicated
    eval_steps = [r['step'] for r in _rows(run) if r['split'] == 'eval']
    assert eval_steps == [0, 4, 8]


@pytest.mark.parametrize('method', FAST_TIER_RESUME)  # a second engine per method
def test_product_evaluates_to_the_recorded_best_metric(world, method, tmp_path_factory):
  from jaxprompt.evaluate import evaluate
  result = full_run(world, method, tmp_path_factory)
  product = result.best_model_path or result.best_prompt_path
  assert product and os.path.exists(product)
  options = run_options(method)
  metrics = evaluate(task_for(method), backbone=(world['module'], world['params']),
                     prompt=product, feature_lengths=options['feature_lengths'], batch_size=8)
  assert metrics['score'] == result.best_metrics['score']
  np.testing.assert_allclose(metrics.get('loss_per_token', 0.0),
                             result.best_metrics.get('loss_per_token', 0.0), rtol=1e-6)
  # The resume identity is recorded and a changed run is refused without writing anything.
  manifest = json.load(open(os.path.join(result.model_dir, 'manifest.json')))
  assert manifest['method'] == method and manifest['backbone'].startswith('sha256:')


DEVICES = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {tests!r})
    import numpy as np, jax
    import test_methods_contract as t
    from jaxprompt.model import Transformer, get_config, init_params
    from jaxprompt.tuning import tune
    info = t._setup({root!r})
    cfg = get_config('t5_1_1_tiny', vocab_size=info['vocab_size'], dropout_rate=0.0)
    module, params = Transformer(cfg), init_params(cfg, 0)
    out = {{'devices': jax.device_count()}}
    for method in t.METHODS:
      r = tune(t.task_for(method), backbone=(module, params), model_dir={root!r} + '/' + method,
               method=method, num_partitions={parts}, eval_split=None,  # trainables compared
               **t.run_options(method, train_steps=4, eval_period=4))
      out[method] = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(r.trainable)][:4]
    print(json.dumps(out))
''')


def _on_devices(root: str, n: int, parts: int) -> dict:
  env = devices_env(n, TF_CPP_MIN_LOG_LEVEL='3')
  code = DEVICES.format(tests=os.path.dirname(__file__), root=root, parts=parts)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_one_and_eight_devices_agree_for_every_method(tmp_path):
  one = _on_devices(str(tmp_path / 'one'), 1, 1)
  eight = _on_devices(str(tmp_path / 'eight'), 8, 2)
  assert one['devices'] == 1 and eight['devices'] == 8
  for method in METHODS:
    for a, b in zip(one[method], eight[method]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-3,
                                 err_msg=method)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_the_design_docs_example_method_works_end_to_end(world, tmp_path):
  """docs/design.md's "How to add a method" block, executed: registered, trained, resumed,
  exported and evaluated without any other edit."""
  import pathlib
  import re
  from jaxprompt.evaluate import evaluate
  doc = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'design.md'
  (block,) = re.findall(r'```python\n(.*?)```', doc.read_text(), re.S)
  exec(compile(block, str(doc), 'exec'), {'__name__': 'gained_prompt_example'})  # noqa: S102
  m = get_method('gained_prompt')
  result = _tune(world, 'gained_prompt', str(tmp_path / 'run'), initial_gain=0.5)
  assert float(result.trainable['gain']) != 0.5  # the gain trained too
  metrics = evaluate('contract_a', backbone=(world['module'], world['params']),
                     prompt=result.best_prompt_path, feature_lengths={'inputs': 12, 'targets': 4},
                     batch_size=8)
  assert metrics['score'] == result.best_metrics['score']
  assert m.Options().initial_gain == 1.0


def test_metrics_log_has_one_unit_and_names_what_it_measures(world, tmp_path_factory):
  """Train rows' token accuracy and validation rows' metrics are all percentages (T5's
  convention): the train row says `token_accuracy`, as validation does, never a fraction."""
  result = full_run(world, 'prompt_tuning', tmp_path_factory)
  rows = _rows(result.model_dir)
  train = [r for r in rows if r['split'] == 'train']
  evals = [r for r in rows if r['split'] != 'train']
  assert train and evals
  for row in train:
    assert 'accuracy' not in row and 0.0 <= row['token_accuracy'] <= 100.0
  for row in evals:
    assert 0.0 <= row['token_accuracy'] <= 100.0 and 0.0 <= row['accuracy'] <= 100.0
