"""Tests for jaxprompt.train.partitioning.

The golden sharding checks need 8 devices, and XLA fixes the CPU device count
when jax first initialises, so they run in a subprocess that executes this file
as a script with `--xla_force_host_platform_device_count=8`
(see `test_golden_sharding_on_8_fake_devices`).
"""

import logging
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze
from flax.linen import partitioning as nn_partitioning

from jaxprompt.train import partitioning

_REPO = pathlib.Path(__file__).resolve().parents[1]

_T5X_1D_RULES = [
    ('batch', 'data'), ('vocab', 'model'), ('embed', None), ('mlp', 'model'),
    ('heads', 'model'), ('kv', None), ('joined_kv', 'model'),
    ('relpos_buckets', None), ('abspos_buckets', None), ('length', None),
    ('layers', None), ('stack', None), ('mlp_activations', None),
    ('prompt', None), ('prompt_embed', None),
]

# A hand-built T5-shaped axes tree (leaves: logical axis names per param).
_AXES = {
    'token_embedder': {'embedding': ('vocab', 'embed')},
    'encoder': {
        'relpos_bias': {'rel_embedding': ('heads', 'relpos_buckets')},
        'prompt': {'prompt': {'prompt': ('prompt', 'prompt_embed')}},
        'layers_0': {
            'pre_attention_layer_norm': {'scale': ('embed',)},
            'attention': {'query': {'kernel': ('embed', 'joined_kv')},
                          'out': {'kernel': ('joined_kv', 'embed')}},
            'mlp': {'wi_0': {'kernel': ('embed', 'mlp')},
                    'wo': {'kernel': ('mlp', 'embed')}},
        },
    },
}


def _specs(shardings):
  return jax.tree.map(lambda s: tuple(s.spec), shardings)


# ---------------------------------------------------------------- rules


def test_standard_rules_match_t5x():
  assert partitioning.standard_logical_axis_rules() == _T5X_1D_RULES


@pytest.mark.parametrize('dims, embed', [
    ((2, 1), ['model']), ((1, 2), ['data']), ((2, 2), ['model', 'data'])])
def test_two_dimensional_variants(dims, embed):
  rules = partitioning.standard_logical_axis_rules(*dims)
  assert [m for name, m in rules if name == 'embed'] == embed
  without_embed = [r for r in rules if r[0] != 'embed']
  assert without_embed == [r for r in _T5X_1D_RULES if r[0] != 'embed']


def test_rules_reject_unknown_dims_and_append_extra():
  with pytest.raises(ValueError, match='parameter_partitioning_dims=3'):
    partitioning.standard_logical_axis_rules(1, 3)
  rules = partitioning.standard_logical_axis_rules(
      additional_rules=[('experts', 'data')])
  assert rules[-1] == ('experts', 'data')


def test_rules_from_config():
  from jaxprompt.config import ConfigError, RunConfig
  assert partitioning.rules_from_config(RunConfig()) == _T5X_1D_RULES
  two_d = dict(partitioning.rules_from_config(RunConfig(parameter_partitioning_dims=2)))
  assert two_d['embed'] == 'data'
  given = (('batch', 'data'), ('embed', 'model'), ('vocab', None))
  assert partitioning.rules_from_config(RunConfig(logical_axis_rules=given)) == list(given)
  for bad in [(('batch', 'expert'),), (('batch',),), ((1, 'data'),)]:
    with pytest.raises(ConfigError, match='logical_axis_rules .* is not a pair'):
      partitioning.rules_from_config(RunConfig(logical_axis_rules=bad))


def test_t5x_gin_spelling_and_flag_literals_become_run_options():
  """`partitioning.PjitPartitioner.*` and `partitioning.standard_logical_axis_rules.*` (T5X's
  gin) and `--logical_axis_rules` / `--model_parallel_submesh` literals reach RunConfig."""
  import gin
  from jaxprompt import cli
  from jaxprompt.config import RunConfig
  gin.clear_config()
  cli._register_configurables()
  run = cli.resolve_gin_file('runs/prompt_tune.gin')
  gin.parse_config_files_and_bindings([run], [
      "MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'x'", "INITIAL_CHECKPOINT_PATH = '/c'",
      'partitioning.PjitPartitioner.model_parallel_submesh = (1, 1, 1, 2)',
      'partitioning.PjitPartitioner.logical_axis_rules = '
      '@partitioning.standard_logical_axis_rules()',
      'partitioning.standard_logical_axis_rules.parameter_partitioning_dims = 2',
      'partitioning.PjitPartitioner.params_on_devices = True',  # T5X-only: accepted, no effect
      cli._binding('tune.num_partitions', '2')])
  options = partitioning.t5x_gin_options()
  assert options['model_parallel_submesh'] == (1, 1, 1, 2)
  assert options['parameter_partitioning_dims'] == 2
  config = RunConfig(**options)
  assert dict(partitioning.rules_from_config(config))['embed'] == 'data'
  assert gin.query_parameter('NUM_MICROBATCHES/macro.value') == 1
  # Flags are bound from their text as Python literals.
  gin.clear_config()
  cli._register_configurables()
  gin.parse_config([cli._binding('tune.logical_axis_rules', "(('batch', 'data'), ('mlp', None))"),
                    cli._binding('tune.model_parallel_submesh', '(1,1,1,2)')])
  assert gin.query_parameter('tune.logical_axis_rules') == (('batch', 'data'), ('mlp', None))
  assert gin.query_parameter('tune.model_parallel_submesh') == (1, 1, 1, 2)
  gin.clear_config()
  assert partitioning.t5x_gin_options() == {}


def _tpu_devices(topology: str) -> list:
  pytest.importorskip('libtpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(topology, 'tpu').devices)


def test_model_parallel_submesh_is_a_block_of_the_tpu_grid():
  """On TPU the `model` axis is an (x, y, z, core) block of the physical grid (compile-only
  devices of libtpu's topologies); skipped without libtpu."""
  from jaxprompt.config import ConfigError, RunConfig
  devices = _tpu_devices('v4:2x2x2')  # 8 chips x 2 cores
  where = lambda d: tuple(d.coords) + (d.core_on_chip,)
  for submesh in [(1, 1, 1, 2), (2, 1, 1, 1), (1, 2, 2, 1), (2, 2, 2, 2)]:
    mesh = partitioning.mesh_from_config(RunConfig(model_parallel_submesh=submesh), devices)
    size = int(np.prod(submesh))
    assert dict(mesh.shape) == {'data': 16 // size, 'model': size}
    for row in mesh.devices:
      coords = np.array([where(d) for d in row])
      spans = tuple(int(c) for c in coords.max(0) - coords.min(0) + 1)
      assert spans == submesh, (submesh, coords)  # one block of the grid
    assert len({d.id for d in mesh.devices.flat}) == 16
  with pytest.raises(ConfigError, match=r'does not tile .* grid \(2, 2, 2, 2\)'):
    partitioning.mesh_from_config(RunConfig(model_parallel_submesh=(1, 1, 3, 1)), devices)


# ---------------------------------------------------------------- 1 device


def test_make_mesh_single_device():
  mesh = partitioning.make_mesh()
  assert mesh.axis_names == ('data', 'model')
  assert dict(mesh.shape) == {'data': jax.device_count(), 'model': 1}
  with pytest.raises(ValueError, match='num_partitions'):
    partitioning.make_mesh(num_partitions=jax.device_count() + 1)


def test_hand_built_tree_specs():
  mesh = partitioning.make_mesh()
  specs = _specs(partitioning.logical_to_mesh_sharding(_AXES, mesh))
  layer = specs['encoder']['layers_0']
  assert specs['token_embedder']['embedding'] == ('model', None)
  assert layer['attention']['query']['kernel'] == (None, 'model')
  assert layer['attention']['out']['kernel'] == ('model', None)
  assert layer['mlp']['wo']['kernel'] == ('model', None)
  assert specs['encoder']['prompt']['prompt']['prompt'] == (None, None)


class _Dense(nn.Module):

  @nn.compact
  def __call__(self, x):
    kernel = nn_partitioning.param_with_axes(
        'kernel', nn.initializers.ones, (x.shape[-1], 6), axes=('embed', 'mlp'))
    scale = nn_partitioning.param_with_axes(
        'scale', nn.initializers.ones, (6,), axes=('embed',))
    return x @ kernel * scale


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Dense(name='wi')(x)


def test_flax_params_axes_collection_is_params_shaped():
  variables = jax.eval_shape(
      lambda: _Net().init(jax.random.PRNGKey(0), jnp.ones((1, 4))))
  axes = variables['params_axes']
  assert isinstance(axes['wi']['kernel_axes'], nn_partitioning.AxisMetadata)
  mesh = partitioning.make_mesh()
  for tree in (axes, freeze(axes), variables):
    shardings = partitioning.logical_to_mesh_sharding(
        tree, mesh, shapes=variables['params'])
    assert (jax.tree.structure(shardings)
            == jax.tree.structure(dict(variables['params'])))
    assert _specs(shardings) == {'wi': {'kernel': (None, 'model'),
                                        'scale': (None,)}}


def test_none_leaf_is_replicated_and_rank_is_checked():
  mesh = partitioning.make_mesh()
  shardings = partitioning.logical_to_mesh_sharding(
      {'a': None, 'b': ('batch',)}, mesh,
      shapes={'a': np.zeros((3, 3)), 'b': np.zeros((4,))})
  assert shardings['a'].is_fully_replicated
  with pytest.raises(ValueError, match='shape'):
    partitioning.logical_to_mesh_sharding(
        {'a': ('embed', 'mlp')}, mesh, shapes={'a': np.zeros((3,))})


def test_rules_naming_missing_mesh_axis_fail_clearly():
  with pytest.raises(ValueError, match='expert'):
    partitioning.logical_to_mesh_sharding(
        _AXES, partitioning.make_mesh(), rules=[('mlp', 'expert')])


def test_batch_and_replicated():
  mesh = partitioning.make_mesh()
  assert tuple(partitioning.batch_sharding(mesh).spec) == ('data',)
  assert partitioning.replicated(mesh).is_fully_replicated


def test_host_shard_info_single_host():
  assert partitioning.host_shard_info() == (0, 1)


def test_initialize_distributed_only_when_configured(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  assert partitioning.initialize_distributed() is False
  assert calls == []
  assert partitioning.initialize_distributed('10.0.0.1:1234', 4, 2) is True
  assert calls == [dict(coordinator_address='10.0.0.1:1234', num_processes=4,
                        process_id=2, heartbeat_timeout_seconds=30)]
  with pytest.raises(ValueError, match='coordinator_address'):
    partitioning.initialize_distributed(num_processes=4, process_id=1)


def _model_available():
  try:
    from jaxprompt.model import network  # noqa: F401
    return hasattr(network, 'params_axes') and hasattr(network, 'param_shapes')
  except ImportError:
    return False


@pytest.mark.skipif(not _model_available(), reason='jaxprompt.model missing')
def test_model_params_axes_cover_the_params_tree():
  from jaxprompt.model import get_config, network
  config = get_config('t5_1_1_tiny')
  axes = network.params_axes(config)
  shapes = network.param_shapes(config)
  shardings = partitioning.logical_to_mesh_sharding(
      axes, partitioning.make_mesh(), shapes=shapes)
  assert jax.tree.structure(shardings) == jax.tree.structure(dict(shapes))
  specs = _specs(shardings)
  assert specs['token_embedder']['embedding'] == ('model', None)
  q = specs['encoder']['layers_0']['attention']['query']['kernel']
  assert q == (None, 'model')


# ---------------------------------------------------------------- 8 devices


def _golden_checks():
  """Runs with 8 fake CPU devices (see the test below); raises on failure."""
  assert jax.device_count() == 8, jax.devices()
  mesh = partitioning.make_mesh(num_partitions=2)
  assert dict(mesh.shape) == {'data': 4, 'model': 2}

  # Hand-built tree, 1-D parameter sharding.
  specs = _specs(partitioning.logical_to_mesh_sharding(_AXES, mesh))
  layer = specs['encoder']['layers_0']
  assert layer['attention']['query']['kernel'] == (None, 'model')
  assert layer['mlp']['wi_0']['kernel'] == (None, 'model')
  assert specs['token_embedder']['embedding'] == ('model', None)
  assert specs['encoder']['relpos_bias']['rel_embedding'] == ('model', None)
  assert layer['pre_attention_layer_norm']['scale'] == (None,)
  prompt_axes = _AXES['encoder']['prompt']['prompt']['prompt']
  prompt = partitioning.logical_to_mesh_sharding(prompt_axes, mesh)
  assert prompt.is_fully_replicated

  # Placement on devices.
  emb = jax.device_put(
      jnp.zeros((96, 24)),
      partitioning.logical_to_mesh_sharding(('vocab', 'embed'), mesh))
  assert {s.data.shape for s in emb.addressable_shards} == {(48, 24)}
  batch = jax.device_put(jnp.zeros((8, 5), jnp.int32),
                         partitioning.batch_sharding(mesh))
  assert tuple(partitioning.batch_sharding(mesh).spec) == ('data',)
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 5)}
  rep = jax.device_put(jnp.zeros((20, 24)), partitioning.replicated(mesh))
  assert {s.data.shape for s in rep.addressable_shards} == {(20, 24)}

  # 2-D parameter sharding: embed takes whichever of model/data is free.
  for dims, want in [((1, 2), {'q': ('data', 'model'), 'emb': ('model', 'data'),
                               'scale': ('data',)}),
                     ((2, 2), {'q': ('data', 'model'), 'emb': ('model', 'data'),
                               'scale': ('model',)})]:
    rules = partitioning.standard_logical_axis_rules(*dims)
    got = _specs(partitioning.logical_to_mesh_sharding(
        {'q': ('embed', 'joined_kv'), 'emb': ('vocab', 'embed'),
         'scale': ('embed',)}, mesh, rules))
    assert got == want, (dims, got)

  # The run's mesh from its options: num_partitions, or T5X's submesh (its product, in device
  # order, on devices without a torus).
  from jaxprompt.config import ConfigError, RunConfig
  assert dict(partitioning.mesh_from_config(RunConfig(num_partitions=4)).shape) == {
      'data': 2, 'model': 4}
  sub = partitioning.mesh_from_config(RunConfig(model_parallel_submesh=(1, 1, 1, 2)))
  assert dict(sub.shape) == {'data': 4, 'model': 2}
  assert sub.devices.tolist() == partitioning.make_mesh(2).devices.tolist()
  for bad, match in [(dict(num_partitions=3), 'num_partitions .* does not divide the 8'),
                     (dict(model_parallel_submesh=(1, 1, 3, 1)), 'do not divide the 8'),
                     (dict(model_parallel_submesh=(1, 2)), 'give 4 positive sizes'),
                     (dict(model_parallel_submesh=(1, 1, 1, 2), num_partitions=4),
                      'makes 2 model partitions but num_partitions is 4')]:
    try:
      partitioning.mesh_from_config(RunConfig(**bad))
      raise AssertionError(f'{bad} was accepted')
    except ConfigError as e:
      assert re.search(match, str(e)) and '\n' not in str(e), str(e)

  # A dimension the mesh axis does not divide is replicated, not an error.
  odd = partitioning.logical_to_mesh_sharding(
      {'q': ('embed', 'joined_kv')}, mesh, shapes={'q': np.zeros((24, 15))})
  assert tuple(odd['q'].spec) == (None, None)
  jax.device_put(jnp.zeros((24, 15)), odd['q'])

  # The real model: params_axes from eval_shape of its init, sharded init.
  if _model_available():
    from jaxprompt.model import get_config, network
    for parts, config in [(2, get_config('t5_1_1_tiny')),
                          # 8-way model axis: 3 heads x 10, mlp 40, vocab 96
                          # are not all divisible by 8 and must fall back.
                          (8, get_config('t5_1_1_tiny', emb_dim=24, num_heads=3,
                                         head_dim=10, mlp_dim=40,
                                         vocab_size=96))]:
      mesh = partitioning.make_mesh(num_partitions=parts)
      shapes = network.param_shapes(config)
      shardings = partitioning.logical_to_mesh_sharding(
          network.params_axes(config), mesh, shapes=shapes)
      params = jax.jit(lambda: network.init_params(config),
                       out_shardings=shardings)()
      q = params['encoder']['layers_0']['attention']['query']['kernel']
      want = (None, 'model') if parts == 2 else (None, None)
      assert tuple(q.sharding.spec) == want, q.sharding
      emb = params['token_embedder']['embedding']
      assert tuple(emb.sharding.spec) == ('model', None), emb.sharding
      local = config.vocab_size // parts
      assert {s.data.shape for s in emb.addressable_shards} == {
          (local, config.emb_dim)}
  print('golden sharding checks passed')


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_golden_sharding_on_8_fake_devices():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(_REPO)] + [p for p in [env.get('PYTHONPATH')] if p])
  proc = subprocess.run([sys.executable, __file__], env=env, cwd=_REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'golden sharding checks passed' in proc.stdout
  assert 'not divisible' in proc.stderr  # the fallback is logged


if __name__ == '__main__':
  logging.basicConfig(level=logging.INFO)
  _golden_checks()
