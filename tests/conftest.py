"""Shared test fixtures: tiny T5 configs, random params, the real T5X fixtures directory."""

from __future__ import annotations

import os
import pathlib

import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Everything a test session writes to "the temp directory" (pytest's tmp_path folders,
# TensorFlow's autograph files, helpers' scratch, subprocesses') goes under one folder that
# the session removes at its end: nothing is left in the system's temp directory.
SESSION_TMP = tempfile.mkdtemp(prefix='jaxprompt_tests_')
os.environ['TMPDIR'] = SESSION_TMP
tempfile.tempdir = SESSION_TMP
# Many tests build the same tiny programs in fresh closures: a persistent compilation cache
# compiles each once (and across runs: it lives in the checkout, git-ignored). Subprocesses
# the tests start inherit it.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.test_cache', 'xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The tests compile thousands of tiny programs whose run time is negligible: without LLVM's
# optimisations XLA:CPU compiles them about a third faster (measured 2026-12-07: 11 methods'
# 4-step runs 85 -> 58 CPU-s; a lab backbone build, dominated by running, the same). Numbers
# are checked against references with tolerances, and bit-for-bit checks compare runs of the
# same process settings. A test that sets XLA_FLAGS for a subprocess replaces this.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxprompt.model.config import T5Config  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
T5X_FIXTURES = REPO_ROOT.parent / 'shared' / 'fixtures' / 't5x'

# Unequal encoder/decoder depths and head_dim != emb_dim / num_heads, so transposes and
# layer counts cannot line up by accident.
TINY_GATED = T5Config(vocab_size=70, emb_dim=16, num_heads=3, head_dim=5, mlp_dim=24,
                      num_encoder_layers=2, num_decoder_layers=3,
                      mlp_activations=('gelu', 'linear'), logits_via_embedding=False)
TINY_RELU = T5Config(vocab_size=70, emb_dim=16, num_heads=2, head_dim=6, mlp_dim=20,
                     num_encoder_layers=3, num_decoder_layers=2, mlp_activations=('relu',),
                     logits_via_embedding=True)


# The batch every parity test feeds both frameworks: padding in both inputs, decoder inputs the
# targets shifted right with start token 0.
ENCODER_TOKENS = np.array([[5, 6, 7, 8, 9, 10, 1],
                           [11, 12, 1, 0, 0, 0, 0],
                           [13, 14, 15, 16, 1, 0, 0]], np.int32)
TARGETS = np.array([[21, 22, 23, 1, 0],
                    [24, 1, 0, 0, 0],
                    [25, 26, 27, 28, 1]], np.int32)
DECODER_INPUTS = np.concatenate([np.zeros((3, 1), np.int32), TARGETS[:, :-1]], axis=1)


def devices_env(count: int, **extra: str) -> dict:
  """This process's environment for a subprocess with `count` CPU devices (the tests' other
  XLA flags kept)."""
  import re
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  return dict(os.environ, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={count}'
              .strip(), **extra)


def assert_close(actual, reference, what: str, rtol: float) -> None:
  """max |actual - reference| <= rtol x max |reference| (a nonzero reference), shapes equal."""
  actual, reference = np.asarray(actual), np.asarray(reference)
  assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
  scale = float(np.abs(reference).max())
  assert scale > 0, f'{what}: the reference is all zeros'
  err = float(np.abs(actual - reference).max())
  assert err <= rtol * scale, f'{what}: max |diff| {err:.3g} > {rtol} x {scale:.3g}'


def assert_trees_close(tree, reference, rtol: float) -> None:
  """`assert_close` leaf by leaf over two trees of the same structure (dict keys)."""
  import jax
  assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(reference)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    ref = reference
    for key in path:
      ref = ref[key.key]
    assert_close(leaf, ref, f'd loss / d {jax.tree_util.keystr(path)}', rtol)


def pytest_unconfigure(config):
  """The session's temp folder goes with the session (each xdist worker has its own)."""
  shutil.rmtree(SESSION_TMP, ignore_errors=True)


# The full tier's longest tests (measured 2026-12-07 on 2 cores: 100-430 s each) start first,
# so that both xdist workers finish together instead of one waiting on a long test taken last.
LONGEST_FIRST = ('test_docs_walk.py::', 'test_transferability.py::test_notebook',
                 'test_notebook.py::test_methods', 'test_multihost.py::',
                 'test_methods_contract.py::test_one_and_eight', 'test_newcomer.py::',
                 'test_xprompt_study.py::test_lab_report', 'test_sharded_loading.py::',
                 'test_resume_stages.py::')


def pytest_collection_modifyitems(config, items):
  if config.getoption('markexpr', '') != 'slow':
    return  # the fast tier keeps the files' order

  def rank(item) -> int:
    return next((i for i, key in enumerate(LONGEST_FIRST) if key in item.nodeid),
                len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: the rest keep their order


def random_params(config: T5Config, seed: int = 0, std: float = 0.3) -> dict:
  """Random float32 params in the T5X tree: N(0, std), embedding N(0, 1) as T5 initialises
  it (so tied logits, scaled by 1/sqrt(d), stay O(1)), layer-norm scales around 1."""
  from jaxprompt.checkpoints import expected_shapes, unflatten
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in expected_shapes(config).items():
    scale = 1.0 if path == ('token_embedder', 'embedding') else std
    value = rng.normal(0.0, scale, shape).astype(np.float32)
    flat[path] = (1.0 + value) if path[-1] == 'scale' else value
  return unflatten(flat)


@pytest.fixture(params=['gated', 'relu'])
def tiny_params(request) -> tuple[T5Config, dict]:
  """(config, random params) for both T5 families."""
  config = TINY_GATED if request.param == 'gated' else TINY_RELU
  return config, random_params(config, seed=1 if request.param == 'gated' else 2)


def require_t5x_fixtures() -> pathlib.Path:
  """The real T5X fixtures (`../shared/fixtures/t5x`). Absent, the test skips; with
  JAXPROMPT_REQUIRE_FIXTURES=1 (CI, which has ../shared) it fails instead."""
  if not T5X_FIXTURES.is_dir():
    message = f'T5X fixtures not found at {T5X_FIXTURES}'
    if os.environ.get('JAXPROMPT_REQUIRE_FIXTURES') == '1':
      pytest.fail(message + ' (JAXPROMPT_REQUIRE_FIXTURES=1)')
    pytest.skip(message)
  return T5X_FIXTURES


@pytest.fixture
def t5x_fixtures() -> pathlib.Path:
  return require_t5x_fixtures()


@pytest.fixture(scope='session')
def reduced_lab_cache(tmp_path_factory) -> str:
  """One JAXPROMPT_CACHE for the tests that build reduced lab backbones (same steps), shared by
  the run's xdist workers: each reduced backbone is built once per run (the build lock makes
  a second worker wait for the first), not once per test or worker."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # the run's folder, above the workers' own (removed with the run's)
  path = base / 'reduced_lab_cache'
  path.mkdir(exist_ok=True)
  return str(path)


def run_notebook(path, workdir, timeout: int = 900) -> tuple[list, str]:
  """Executes a notebook headless, top to bottom as Colab would, in `workdir`; fails on any
  cell error. Returns (every code cell's outputs, their printed text)."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  nb = nbformat.read(str(path), as_version=4)
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                          resources={'metadata': {'path': str(workdir)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  return outputs, ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')


def images(outputs) -> int:
  """How many PNG images the outputs display."""
  return sum('image/png' in o.get('data', {}) for o in outputs if o.output_type == 'display_data')
