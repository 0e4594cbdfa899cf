"""Tests for jaxprompt.train.optimizers: T5X parity, paper parity, contract."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprompt.train.optimizers import masked_trainable, t5x_adafactor

from conftest import require_t5x_fixtures


def _run(tx, initial, grads):
  """Applies `tx` to `initial` for each gradient; returns every param."""
  params = jnp.asarray(initial)
  state = tx.init(params)
  out = []
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(params))
  return np.stack(out), state


@pytest.fixture(scope='module')
def trace():
  with np.load(require_t5x_fixtures() / 'adafactor_prompt_trace.npz') as f:
    return {k: f[k] for k in f.files}


def test_reproduces_t5x_prompt_trace(trace):
  tx = t5x_adafactor(learning_rate=0.3, decay_rate=0.8, step_offset=0,
                     multiply_by_parameter_scale=False, weight_decay_rate=1e-5)
  got, _ = _run(tx, trace['initial'], trace['grads'])
  err = np.abs(got - trace['params_after_each_step']).max(axis=(1, 2))
  assert err.max() <= 1e-6, err


def test_trace_rejects_lr_scaled_weight_decay(trace):
  """The trace is sharp enough to tell decay 1e-5 from lr * 1e-5."""
  tx = t5x_adafactor(learning_rate=0.3, weight_decay_rate=0.3 * 1e-5)
  got, _ = _run(tx, trace['initial'], trace['grads'])
  assert np.abs(got - trace['params_after_each_step']).max() > 1e-5


def test_trace_accepts_schedule(trace):
  tx = t5x_adafactor(learning_rate=optax.constant_schedule(0.3))
  got, _ = _run(tx, trace['initial'], trace['grads'])
  np.testing.assert_allclose(got, trace['params_after_each_step'], atol=1e-6)


def _paper_adafactor(x, grads, lr=0.3, decay=0.8, d=1.0, eps1=1e-30, wd=1e-5):
  """Adafactor, Algorithm 4 (factored) of Shazeer & Stern 2018, in float64.

  R (n, 1) and C (1, m) hold row and column sums of G**2 + eps1;
  V = R C / (1^T R). Update clipping as in the paper, plus T5X's decoupled
  weight decay (x <- x - wd * x - lr * U).
  """
  x = np.asarray(x, np.float64)
  n, m = x.shape
  r = np.zeros((n, 1))
  c = np.zeros((1, m))
  out = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    beta2 = 1.0 - t ** (-decay)
    g2 = g * g + eps1
    r = beta2 * r + (1 - beta2) * g2 @ np.ones((m, 1))
    c = beta2 * c + (1 - beta2) * np.ones((1, n)) @ g2
    v = r @ c / (np.ones((1, n)) @ r)
    u = g / np.sqrt(v)
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / d)
    x = x - wd * x - lr * u
    out.append(x)
  return np.stack(out)


def test_factored_matches_paper_equations():
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(256, 200)).astype(np.float32)
  # Rows and columns with very different scales so factoring matters.
  scale = np.exp(rng.normal(size=(256, 1))) * np.exp(rng.normal(size=(1, 200)))
  grads = (rng.normal(size=(5, 256, 200)) * scale).astype(np.float32)
  got, state = _run(t5x_adafactor(), x0, grads)
  want = _paper_adafactor(x0, grads)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  inner = state[0]  # FactoredState
  assert {inner.v_row.shape, inner.v_col.shape} == {(256,), (200,)}
  assert inner.v.shape == (1,)
  # And the factored estimate really differs from the full one.
  full, _ = _run(t5x_adafactor(factored=False), x0, grads)
  assert np.abs(full - got).max() > 1e-3


def test_prompt_shape_is_not_factored():
  params = jnp.zeros((100, 512))
  inner = t5x_adafactor().init(params)[0]
  assert inner.v.shape == (100, 512)
  assert inner.v_row.shape == inner.v_col.shape == (1,)


def test_clipping_bounds_update_rms():
  params = jnp.zeros((4, 8))
  tx = t5x_adafactor(learning_rate=1.0, weight_decay_rate=None)
  state = tx.init(params)
  # Small first gradient, then a large one: unclipped rms(y) would be ~1.32.
  _, state = tx.update(jnp.full((4, 8), 1e-3), state, params)
  updates, _ = tx.update(jnp.ones((4, 8)), state, params)
  assert float(jnp.sqrt(jnp.mean(updates**2))) == pytest.approx(1.0, rel=1e-5)
  unclipped = t5x_adafactor(learning_rate=1.0, weight_decay_rate=None,
                            clipping_threshold=None)
  state = unclipped.init(params)
  _, state = unclipped.update(jnp.full((4, 8), 1e-3), state, params)
  updates, _ = unclipped.update(jnp.ones((4, 8)), state, params)
  assert float(jnp.sqrt(jnp.mean(updates**2))) > 1.3


def test_parameter_scale_and_momentum_options():
  rng = np.random.default_rng(1)
  p0 = rng.normal(size=(6, 5)).astype(np.float32) * 4.0
  grads = rng.normal(size=(3, 6, 5)).astype(np.float32)
  got, _ = _run(
      t5x_adafactor(multiply_by_parameter_scale=True, momentum=0.9,
                    weight_decay_rate=None, learning_rate=0.01), p0, grads)
  # Hand-rolled T5X rule with parameter scale and beta1.
  x, v, mom = p0.astype(np.float64), np.zeros_like(p0, np.float64), 0.0
  for t, g in enumerate(grads.astype(np.float64), start=1):
    beta2 = 1.0 - t ** -0.8
    v = beta2 * v + (1 - beta2) * (g * g + 1e-30)
    y = g / np.sqrt(v)
    y = y / max(1.0, np.sqrt(np.mean(y * y)))
    scale = max(np.sqrt(np.mean(x * x)), 1e-3)
    mom = 0.9 * mom + 0.1 * (0.01 * scale * y)
    x = x - mom
  np.testing.assert_allclose(got[-1], x, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_contract_jit_state_shapes_dtypes(dtype):
  params = {'prompt': jnp.ones((20, 24), dtype),
            'big': jnp.ones((128, 256), dtype), 'scale': jnp.ones((24,), dtype)}
  tx = t5x_adafactor()
  state = tx.init(params)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  # Statistics are float32 whatever the parameter dtype, as in T5X.
  assert all(a.dtype in (jnp.float32, jnp.int32)
             for a in jax.tree.leaves(state))

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  for _ in range(3):
    params, state, updates = step(params, state, grads)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
  for tree in (params, updates):
    assert all(a.dtype == dtype for a in jax.tree.leaves(tree))
  assert int(state[0].count) == 3
  assert all(bool(jnp.isfinite(a.astype(jnp.float32)).all())
             for a in jax.tree.leaves(params))


def test_masked_trainable_freezes_and_keeps_no_state():
  params = {'encoder': {'prompt': {'prompt': jnp.ones((3, 4))},
                        'kernel': jnp.ones((4, 4))}}
  mask = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: 'prompt' in jax.tree_util.keystr(path), p)
  tx = masked_trainable(t5x_adafactor(), mask)
  state = tx.init(params)
  sizes = sorted(a.size for a in jax.tree.leaves(state))
  assert 3 * 4 in sizes and 4 * 4 not in sizes
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert float(jnp.abs(updates['encoder']['kernel']).max()) == 0.0
  assert float(jnp.abs(updates['encoder']['prompt']['prompt']).min()) > 0.1
