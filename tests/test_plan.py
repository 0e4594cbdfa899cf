"""`jaxprompt plan`: the memory it reports is the compiled program of the run's own step."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxprompt import cli, plan as plan_lib

SHAPES = dict(batch_size=8, inputs_length=6, targets_length=3, prompt_length=4)


def _concrete_memory(parts: int = 1, dims: int = 1) -> dict:
  """The real step's own figures: the engine on real weights (tiny T5), its train step
  lowered for real arrays and compiled, `memory_analysis()`; plus the bytes its arguments
  hold on one device, summed from the arrays' shards (an independent count)."""
  from jaxprompt.model import Transformer, get_config, init_params
  from jaxprompt.prompts import prompt as prompt_lib
  from jaxprompt.train import partitioning, steps
  from jaxprompt.train.engine import build_engine
  from jaxprompt.train.optimizers import t5x_adafactor
  config = get_config('t5_1_1_tiny', dtype='bfloat16')
  b, n_in, n_t, p = (SHAPES[k] for k in ('batch_size', 'inputs_length', 'targets_length',
                                         'prompt_length'))
  prompt = prompt_lib.prompt_tree(np.ones((p, config.emb_dim), np.float32))
  eng, state = build_engine(Transformer(config), steps.prompt_inputs,
                            t5x_adafactor(learning_rate=0.3, weight_decay_rate=1e-5),
                            {'backbone': init_params(config, 0)}, prompt,
                            mesh=partitioning.make_mesh(parts),
                            rules=partitioning.standard_logical_axis_rules(1, dims))
  tokens = lambda n: np.ones((b, n), np.int32)
  batch = eng.put_batch({'encoder_input_tokens': tokens(n_in), 'decoder_input_tokens': tokens(n_t),
                         'decoder_target_tokens': tokens(n_t), 'decoder_loss_weights': tokens(n_t)})
  rng = jax.random.PRNGKey(0)
  stats = eng.lower_train(state, batch, rng).compile().memory_analysis()
  device = eng.mesh.devices.flat[0]
  held = sum(s.data.nbytes for x in jax.tree_util.tree_leaves((state, eng.frozen, batch, rng))
             for s in x.addressable_shards if s.device == device)
  return dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
              temporaries=stats.temp_size_in_bytes, alias=stats.alias_size_in_bytes, held=held)


def _check(row: dict, real: dict) -> None:
  for key in ('arguments', 'outputs', 'temporaries', 'alias'):
    assert row[key] == real[key], (key, row, real)
  assert row['arguments'] == real['held']  # every argument byte is a real array's shard
  assert row['total'] == row['arguments'] + row['outputs'] + row['temporaries'] - row['alias']


def test_plan_reports_the_memory_of_the_compiled_train_step(tmp_path, capsys):
  """`jaxprompt plan` (abstract weights, nothing allocated) gives exactly the memory analysis of
  the train step compiled on real weights, and the table names it; fit judged on a budget."""
  out = tmp_path / 'plan.json'
  args = ['plan', '--model', 'models/t5_1_1/tiny.gin', '--target', 'cpu:1', '--steps', 'train',
          '--device_memory', '1MB', '--out', str(out), '--dtype', 'bfloat16']
  for key, value in SHAPES.items():
    args += [f'--{key}', str(value)]
  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  assert 'compiled by XLA:CPU' in printed and "not a GPU's compiler" in printed
  result = json.loads(out.read_text())
  assert result['devices'] == 1 and result['device_memory'] == 10**6
  (row,) = result['rows']
  assert row['mesh'] == [1, 1] and row['step'] == 'train'
  _check(row, _concrete_memory())
  assert row['fits'] is (row['total'] <= 10**6)
  # the backbone's share: its float32 weights, all on the one device and host
  from jaxprompt.model import get_config, init_params
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(init_params(
      get_config('t5_1_1_tiny'), 0)))
  assert row['backbone_per_device'] == row['backbone_per_host'] == weights
  assert 'backbone held:' in printed
  assert cli.main(args) == 2  # --out is never overwritten
  assert 'exists' in capsys.readouterr().err


def test_plan_options_fail_in_one_line():
  assert plan_lib.parse_memory('80GB') == 80 * 10**9
  assert plan_lib.parse_memory('95GiB') == 95 * 2**30
  assert plan_lib.candidate_meshes(8) == [(8, 1), (4, 2), (2, 4), (1, 8)]
  assert plan_lib._tpu_topology('v3-8') == ('v3:2x2', {})
  assert plan_lib._tpu_topology('v4-16') == ('v4:2x2x2', {})
  assert plan_lib._tpu_topology('v3-32') == ('v3:4x4', {})
  assert plan_lib._tpu_topology('v5p-2') == ('v5p:1x1x1', {'chips_per_host_bounds': (1, 1, 1)})
  h100 = os.path.join(os.path.dirname(plan_lib.__file__), 'gpu_targets', 'h100.txtpb')
  assert plan_lib.gpu_target('h100') == (h100, '1x1x1')
  assert plan_lib.gpu_target('h100:8') == (h100, '1x1x8')
  assert plan_lib.gpu_target('h100:2x8') == (h100, '1x2x8')
  assert [plan_lib.gpu_target(t) for t in ('v3-8', 'v4:2x2x2', 'cpu:2')] == [None] * 3
  for call, match in [
      (lambda: plan_lib.gpu_target('mine.txtpb:2'), 'no GPU target config file mine.txtpb'),
      (lambda: plan_lib.gpu_target('a100:0'), 'at least 1'),
      (lambda: plan_lib.parse_memory('lots'), 'device_memory'),
      (lambda: plan_lib.target_devices('v9x-3'), '--target v9x-3'),
      (lambda: plan_lib.target_devices(f'cpu:{jax.device_count() + 1}'), 'XLA_FLAGS'),
      (lambda: plan_lib.resolve_model('t5_9_9_huge'), '--model t5_9_9_huge'),
      (lambda: plan_lib.plan('t5_1_1_tiny', method='xprompt', **SHAPES), '--method xprompt'),
      (lambda: plan_lib.plan('t5_1_1_tiny', accumulate_steps=3, **SHAPES), 'accumulate_steps'),
      (lambda: plan_lib.plan('t5_1_1_tiny', meshes=[(2, 2)], **SHAPES), '--meshes'),
  ]:
    with pytest.raises(plan_lib.PlanError, match=match) as e:
      call()
    assert '\n' not in str(e.value)


def test_plan_reads_a_checkpoints_config_without_its_weights(t5x_fixtures):
  expected = json.loads((t5x_fixtures / 't5_1_1_tiny_gated' / 'config.json').read_text())
  for kind in ('legacy', 'orbax'):
    config = plan_lib.resolve_model(str(t5x_fixtures / 't5_1_1_tiny_gated' / kind))
    for key in ('emb_dim', 'num_heads', 'head_dim', 'mlp_dim', 'num_decoder_layers'):
      assert getattr(config, key) == expected['t5x_T5Config'][key], (kind, key)
  assert plan_lib.resolve_model('models/t5_1_1/xxl.gin').emb_dim == 4096


def test_out_of_hbm_is_a_row_not_a_failure():
  """libtpu refuses to compile a program that does not fit; its message becomes the row."""
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (25.44G) exceeds available HBM (15.48G).')

  class Lowered:
    def as_text(self):
      return 'module @train {}'

    def compile(self):
      raise RuntimeError(message)

  row = plan_lib._compile(Lowered(), (2, 4), 'train', 16 * 2**30)
  assert row.temporaries == int(25.44 * 2**30) and row.device_memory == int(15.48 * 2**30)
  assert row.fits is False and row.total is None and row.arguments is None
  assert 'out of HBM' in plan_lib.format_row(row)


EIGHT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {tests!r})
    import test_plan
    from jaxprompt import plan
    _, rows = plan.plan('t5_1_1_tiny', target='cpu:8', meshes=[(2, 4)], steps=['train'],
                        parameter_partitioning_dims=2, dtype='bfloat16', **test_plan.SHAPES)
    print(json.dumps({{'row': rows[0].to_dict(), 'real': test_plan._concrete_memory(4, 2)}}))
''')


@pytest.mark.slow
def test_plan_on_eight_devices_matches_the_sharded_step():
  """On a (2, 4) mesh with 2-D parameter sharding, per-device figures equal the real step's."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', EIGHT.format(tests=os.path.dirname(__file__))],
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  _check(result['row'], result['real'])


def test_tpu_targets_are_the_devices_jax_sees_on_cloud_tpu():
  """v4 and v5p run megacore (one device per chip, the chip's HBM), v3 one device per core;
  v4's per-core mode on request, named. Skipped without libtpu (CI installs the [tpu] extra)."""
  pytest.importorskip('libtpu')
  seen = {t: plan_lib.target_devices(t) for t in ('v4-16', 'v3-8', 'v5p-8')}
  assert {t: (len(x.devices), x.device_memory) for t, x in seen.items()} == {
      'v4-16': (8, 32 * 2**30), 'v3-8': (8, 16 * 2**30), 'v5p-8': (4, 95 * 2**30)}
  assert 'megacore' in seen['v4-16'].name and 'per_core' in seen['v3-8'].name
  assert plan_lib.candidate_meshes(len(seen['v4-16'].devices)) == [(8, 1), (4, 2), (2, 4), (1, 8)]
  per_core = plan_lib.target_devices('v4-16', mode='per_core')
  assert (len(per_core.devices), per_core.device_memory) == (16, 16 * 2**30)
  with pytest.raises(plan_lib.PlanError, match='--tpu_mode megacore'):
    plan_lib.target_devices('v3-8', mode='megacore')


GPU_PLAN = '''
import json
from jaxprompt import plan as plan_lib
shapes = {shapes}
cpu, (cpu_row,) = plan_lib.plan('t5_1_1_tiny', steps=['train'], **shapes)
gpu, rows = plan_lib.plan('t5_1_1_tiny', target='h100:2', meshes=[(2, 1), (1, 2)], **shapes)
print(json.dumps(dict(compiler=gpu.compiler, memory=gpu.device_memory, cpu=cpu_row.to_dict(),
                      rows=[dict(r.to_dict(), mesh=list(r.mesh)) for r in rows])))
'''


def test_plan_for_a_gpu_compiles_with_xla_gpu():
  """XLA:GPU's compiler with no GPU (jax's CUDA plugin, the gpu-plan extra; skipped without
  it): a tiny T5 on two H100s. The budget is jax's default pool (0.75 of the driver's 81559
  MiB); one GPU of a (2, 1) mesh holds the same argument bytes as one CPU device holds the
  whole (unsharded) run's arguments minus half the batch, and every compile fits."""
  if not plan_lib.has_cuda_plugin():
    pytest.skip("jax's CUDA plugin is not installed (pip install 'jaxprompt[gpu-plan]')")
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, '-c', GPU_PLAN.format(shapes=SHAPES)], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['compiler'] == 'XLA:GPU (NVIDIA H100 80GB HBM3), ahead of time'
  assert result['memory'] == int(81559 * 2**20 * 0.75)
  rows = {(tuple(r['mesh']), r['step']): r for r in result['rows']}
  assert set(rows) == {((2, 1), 'train'), ((2, 1), 'eval'), ((1, 2), 'train'), ((1, 2), 'eval')}
  assert all(r['fits'] and r['temporaries'] > 0 for r in rows.values())
  # model parallelism splits the backbone: fewer argument bytes per GPU than data parallelism
  assert rows[(1, 2), 'train']['arguments'] < rows[(2, 1), 'train']['arguments']
  held = {m: (rows[m, 'train']['backbone_per_device'], rows[m, 'train']['backbone_per_host'])
          for m in ((2, 1), (1, 2))}
  assert held[(2, 1)][0] == held[(2, 1)][1] == held[(1, 2)][1] > held[(1, 2)][0]
  # data parallelism holds everything the one-device run holds but half the batch (int32)
  batch = SHAPES['batch_size'] * (SHAPES['inputs_length'] + 3 * SHAPES['targets_length']) * 4
  assert rows[(2, 1), 'train']['arguments'] == result['cpu']['arguments'] - batch // 2


@pytest.mark.slow
def test_plan_for_a_tpu_topology():
  """libtpu's compiler, no TPU: a tiny T5 on v3-8 (16 GiB per core) fits on every mesh, and each
  device holds at least its shard of the arguments (TPU layouts pad). Skipped without libtpu."""
  pytest.importorskip('libtpu')
  target, rows = plan_lib.plan('t5_1_1_tiny', target='v3-8', meshes=[(4, 2), (8, 1)], **SHAPES)
  assert len(target.devices) == 8 and target.device_memory == 16 * 2**30
  assert 'libtpu (TPU v3)' in target.compiler
  assert [(r.mesh, r.step) for r in rows] == [((4, 2), 'train'), ((4, 2), 'eval'),
                                              ((8, 1), 'train'), ((8, 1), 'eval')]
  assert all(r.fits and r.compiler_error is None and r.temporaries > 0 for r in rows)
  train = {r.mesh: r for r in rows if r.step == 'train'}
  assert train[(4, 2)].alias > 0  # the donated state is reused
  # model-parallel halves the backbone's big matrices: fewer argument bytes per device
  assert train[(4, 2)].arguments < train[(8, 1)].arguments


# ---- plan compiles the program tune runs ------------------------------------------------------

class _FirstStep(Exception):
  """Stops a run once its first step's program is captured."""


def tune_first_step(root, method: str = 'prompt_tuning', **options) -> dict:
  """Runs `jaxprompt.tune` up to its first train step and returns that step's program: the
  fingerprint and `memory_analysis()` of the engine's train step lowered for the state, the
  first batch and the step's dropout key the loop hands it. The backbone is a tiny T5 in memory
  (random weights) on a file task; `options` are tune's."""
  import data_helpers
  from jaxprompt import cli, tuning
  from jaxprompt.model import Transformer, get_config, init_params
  rows = [{'text': ' '.join(np.random.RandomState(i).choice(data_helpers.WORDS, 4)),
           'label': i % 2} for i in range(16)]
  os.makedirs(root, exist_ok=True)
  train = data_helpers.write_jsonl(os.path.join(root, 'train.jsonl'), rows)
  cli.setup_tasks(data_helpers.spm_model_path(), train, None, 'plan_task', 'text', 'target',
                  'label', ['bad', 'good'])
  cfg = get_config('t5_1_1_tiny', vocab_size=data_helpers.vocabulary().vocab_size)
  captured = {}

  def first_step(train_step, state, frozen, batches, rng, *args, put_batch, **kwargs):
    eng = train_step.__self__
    assert frozen is eng.frozen
    lowered = eng.lower_train(state, put_batch(next(batches(0))), jax.random.fold_in(rng, 0))
    stats = lowered.compile().memory_analysis()
    captured.update(fingerprint=plan_lib.fingerprint(lowered),
                    arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                    temporaries=stats.temp_size_in_bytes, alias=stats.alias_size_in_bytes,
                    mesh=[int(eng.mesh.shape['data']), int(eng.mesh.shape['model'])])
    raise _FirstStep

  real = tuning.loop.train_loop
  tuning.loop.train_loop = first_step
  try:
    tuning.tune('plan_task', backbone=(Transformer(cfg), init_params(cfg, 0)),
                model_dir=os.path.join(root, 'run'), method=method, eval_split=None,
                progress=False, **options)
  except _FirstStep:
    pass
  finally:
    tuning.loop.train_loop = real
  assert captured, 'the run reached no train step'
  return dict(captured, config=cfg)


def plan_matches_tune(root, method: str = 'prompt_tuning', meshes=None, **options) -> dict:
  """`plan` for the same run (task, tune's options), its train row next to tune's first step."""
  real = tune_first_step(root, method, **options)
  cfg = real.pop('config')
  target, (row,) = plan_lib.plan(cfg, target=f'cpu:{jax.device_count()}', steps=['train'],
                                 task='plan_task', method=method, meshes=meshes, **options)
  assert target.settings['method'] == method
  return {'real': real, 'plan': dict(row.to_dict(), mesh=list(row.mesh))}


def _same_program(result: dict) -> None:
  real, row = result['real'], result['plan']
  for key in ('fingerprint', 'mesh', 'arguments', 'outputs', 'temporaries', 'alias'):
    assert row[key] == real[key], (key, row, real)


RUN = dict(batch_size=4, prompt_length=3, feature_lengths={'inputs': 6, 'targets': 3})


def test_plan_compiles_the_program_tune_runs(tmp_path):
  """P-tuning with remat, scanned bf16 weights, bf16 activations and 2 microbatches: plan's
  train program (its StableHLO and memory) is the one the run driver compiles at its first
  step."""
  options = dict(RUN, remat_policy='full', scan_layers=True, param_dtype='bfloat16',
                 dtype='bfloat16', accumulate_steps=2, z_loss=1e-3, dropout_rate=0.2)
  _same_program(plan_matches_tune(str(tmp_path), 'p_tuning', **options))


# (method, options, meshes) on 4 CPU devices: dtypes, remat policies, scan, param dtypes,
# microbatches, (data, model) meshes, a submesh, loss settings, prompt position and dropout.
CASES = [
    ('prompt_tuning', dict(dtype='bfloat16'), [(4, 1)]),
    ('prompt_tuning', dict(remat_policy='minimal', num_partitions=2,
                           parameter_partitioning_dims=2, label_smoothing=0.1,
                           prompt_position='suffix'), None),
    ('prefix_tuning', dict(model_parallel_submesh=(1, 1, 1, 2), scan_layers=True,
                           param_dtype='bfloat16', prefix_layout='every_layer'), None),
    ('p_tuning', dict(num_partitions=4, remat_policy='full', accumulate_steps=2,
                      encoder_type='lstm'), None),
    ('model_tuning', dict(num_partitions=2, scan_layers=True, remat_policy='full'), None),
]
FOUR = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {tests!r})
    import test_plan
    results = [test_plan.plan_matches_tune({root!r} + '/' + str(i), method, meshes, **dict(test_plan.RUN, **options))
               for i, (method, options, meshes) in enumerate(test_plan.CASES)]
    print(json.dumps(results))
''')


@pytest.mark.slow
def test_plan_compiles_the_program_tune_runs_on_four_devices(tmp_path):
  """Each option set of `CASES` on a 4-device mesh: plan's program is tune's."""
  from conftest import devices_env
  out = subprocess.run([sys.executable, '-c', FOUR.format(tests=os.path.dirname(__file__),
                                                          root=str(tmp_path))],
                       env=devices_env(4, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert [r['plan']['mesh'] for r in results] == [[4, 1], [2, 2], [2, 2], [1, 4], [2, 2]]
  for result in results:
    _same_program(result)
