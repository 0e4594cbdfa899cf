"""`save_t5x_orbax` writes Orbax's own layout, a bounded group of arrays at a time (issue 25).

Fast: the output restores bit-identically through plain Orbax (no jaxprompt code) and through
jaxprompt's readers, and its files and array metadata follow the real T5X fixture. Full tier:
the write's peak RSS stays within 0.2x of the tree above the tree and the runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, T5X_FIXTURES, TINY_GATED, random_params

from jaxprompt import checkpoints
from jaxprompt.checkpoints import flatten, t5x_orbax
from jaxprompt.checkpoints.leaves import read_whole

FIXTURE = T5X_FIXTURES / 't5_1_1_tiny_gated' / 'orbax' / 'checkpoint_2'


def assert_bit_identical(want, got):
  want, got = flatten(want), flatten(got)
  assert sorted(want) == sorted(got)
  for path, value in want.items():
    restored = np.asarray(got[path])
    assert (restored.dtype, restored.shape) == (value.dtype, value.shape), path
    assert restored.tobytes() == value.tobytes(), path


def test_restores_bit_identically_through_orbax_and_jaxprompt(tmp_path):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  params = random_params(TINY_GATED, seed=5)
  ckpt = checkpoints.save_t5x_orbax(params, tmp_path / 'f32', step=3)
  state = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, 'state'))  # Orbax alone
  assert_bit_identical(params, state['target'])
  assert int(state['state']['step']) == 3
  restored, info = checkpoints.read_params(ckpt)
  assert_bit_identical(params, restored)
  assert (info['format'], info['step'], info['config']) == ('t5x_orbax', 3, TINY_GATED)

  halves = {p: np.asarray(v, jnp.bfloat16) for p, v in flatten(params).items()}  # dtype kept
  ckpt = checkpoints.save_t5x_orbax(checkpoints.unflatten(halves), tmp_path / 'bf16', step=1)
  assert_bit_identical(halves, flatten(ocp.PyTreeCheckpointer().restore(
      os.path.join(ckpt, 'state'))['target']))
  assert_bit_identical(halves, {p: read_whole(leaf) for p, leaf in t5x_orbax.leaves(ckpt).items()})
  _, placed, _ = checkpoints.load_checkpoint(ckpt, dtype='bfloat16')
  assert_bit_identical(halves, flatten(placed))


def zarr_metadata(state_dir, name):
  import tensorstore as ts
  use_ocdbt, use_zarr3 = t5x_orbax._layout(str(state_dir))  # pylint: disable=protected-access
  store = ts.open(t5x_orbax.array_spec(str(state_dir), name, use_ocdbt, use_zarr3)).result()
  return store.spec().to_json()['metadata']


@pytest.mark.skipif(not FIXTURE.is_dir(), reason='the real T5X fixtures are not here')
def test_layout_matches_the_t5x_fixture(tmp_path):
  params = random_params(TINY_GATED, seed=6)
  state = os.path.join(checkpoints.save_t5x_orbax(params, tmp_path, step=2), 'state')
  ours, theirs = (json.load(open(os.path.join(d, '_METADATA'))) for d in (state, FIXTURE / 'state'))
  assert ({k: v for k, v in ours.items() if k != 'tree_metadata'}
          == {k: v for k, v in theirs.items() if k != 'tree_metadata'})
  target = lambda m: {k for k in m['tree_metadata'] if k.startswith("('target',")}
  assert target(ours) == target(theirs)  # the same params tree as T5X's
  for required in ('manifest.ocdbt', 'ocdbt.process_0/manifest.ocdbt', 'commit_success.txt'):
    assert os.path.isfile(os.path.join(state, required)), required
  for name in ('target.token_embedder.embedding', 'target.encoder.layers_0.mlp.wi_0.kernel',
               'target.decoder.decoder_norm.scale'):
    mine, real = zarr_metadata(state, name), zarr_metadata(FIXTURE / 'state', name)
    assert mine['chunks'] == mine['shape']  # one chunk per array, as a one-process save
    assert {k: v for k, v in mine.items() if k not in ('shape', 'chunks')} == {
        k: v for k, v in real.items() if k not in ('shape', 'chunks')}, name


# ----------------------------------------------------------------------------- peak memory

WRITE_AND_MEASURE = r'''
import json, sys
import numpy as np
import jax, orbax.checkpoint, tensorstore  # the runtime is part of the baseline
from jaxprompt import checkpoints
as_leaf = jax.device_put if sys.argv[2] == 'jax' else (lambda x: x)

def rss(key):
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

checkpoints.save_t5x_orbax({'warm': as_leaf(np.ones(4, np.float32))}, sys.argv[1] + '/warm', 1)
baseline = rss('VmRSS')
rng = np.random.default_rng(0)
# 400 MiB in 65 leaves, the largest 4% of the tree as T5.1.1-large's embedding is (126 MiB of
# 2.92 GiB): a 16 MiB embedding, 8 MiB and 4 MiB kernels.
shapes = [(4096, 1024)] + [(1024, 2048)] * 32 + [(1024, 1024)] * 32
params = {f'w{i}': as_leaf(rng.standard_normal(s, dtype=np.float32)) for i, s in enumerate(shapes)}
tree_bytes = sum(v.nbytes for v in params.values())
held = rss('VmRSS')
checkpoints.save_t5x_orbax(params, sys.argv[1] + '/big', 1)
print(json.dumps(dict(baseline=baseline, held=held, tree=tree_bytes, peak=rss('VmHWM'),
                      largest=max(v.nbytes for v in params.values()))))
'''


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['numpy', 'jax'])
def test_write_peak_is_within_a_fifth_of_the_tree(tmp_path, kind):
  """Numpy leaves (what `model_tuning` passes) and jax arrays (Orbax's own handler, bounded by
  its in-flight limits). Measured on 2 cores: +0.05x (numpy) and +0.10-0.13x (jax) the tree
  above the held tree; the writer before issue 25 gave +1.9x and +1.0x."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO_ROOT), XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', WRITE_AND_MEASURE, str(tmp_path), kind], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  m = json.loads(out.stdout.strip().splitlines()[-1])
  gib = {k: round(v / 2**30, 3) for k, v in m.items()}
  held = m['held'] - m['baseline']  # the tree as resident (a jax array's is a little more)
  assert held >= 0.95 * m['tree'], gib
  assert m['peak'] - m['baseline'] - max(held, m['tree']) < 0.2 * m['tree'], gib
