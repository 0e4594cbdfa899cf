"""Prompts: the module and its place in the tree, initialisers, prompt files."""

import warnings

import jax
import numpy as np
import pytest

from jaxprompt.prompts import (PROMPT_PATH, Prompt, check_compatible, get_prompt, init_prompt,
                               initializers, prompt_tree, read_prompt, select_prompts,
                               write_prompt)

EMB = np.arange(40 * 6, dtype=np.float32).reshape(40, 6) / 100


def test_prompt_module_param_path_and_axes():
  variables = Prompt(5, 6).init(jax.random.PRNGKey(0))
  assert variables['params']['prompt'].shape == (5, 6)
  assert variables['params_axes']['prompt_axes'].names == ('prompt', 'prompt_embed')
  tree = init_prompt(jax.random.PRNGKey(0), 5, 6)
  assert PROMPT_PATH == ('encoder', 'prompt', 'prompt', 'prompt')
  assert tree['encoder']['prompt']['prompt']['prompt'].shape == (5, 6)
  np.testing.assert_array_equal(get_prompt(prompt_tree(np.ones((2, 3)))), np.ones((2, 3)))
  stack = init_prompt(jax.random.PRNGKey(0), 5, 6, num_prompts=3)
  assert get_prompt(stack).shape == (3, 5, 6)
  picked = select_prompts(get_prompt(stack), np.array([2, 0]))
  np.testing.assert_array_equal(picked[0], get_prompt(stack)[2])


def test_uniform_ranges():
  sym = np.asarray(initializers.uniform(0.5)(jax.random.PRNGKey(0), (200, 6)))
  pos = np.asarray(initializers.uniform(0.5, symmetric=False)(jax.random.PRNGKey(0), (200, 6)))
  assert sym.min() < -0.4 and sym.max() > 0.4 and np.abs(sym).max() <= 0.5
  assert pos.min() >= 0 and pos.max() < 0.5 and pos.max() > 0.4


def test_sampled_vocab_draws_rows_from_the_first_n_ids():
  out = np.asarray(initializers.sampled_vocab(EMB, population=10)(jax.random.PRNGKey(0), (8, 6)))
  rows = {tuple(r) for r in EMB[:10]}
  assert all(tuple(r) in rows for r in out)
  assert len({tuple(r) for r in out}) == 8  # without replacement


def test_class_labels_average_multi_piece_labels_and_fill_the_rest():
  init = initializers.class_labels(EMB, [[3], [4, 6]], initializers.sampled_vocab(EMB, 10))
  out = np.asarray(init(jax.random.PRNGKey(0), (5, 6)))
  np.testing.assert_allclose(out[0], EMB[3])
  np.testing.assert_allclose(out[1], (EMB[4] + EMB[6]) / 2)
  rows = {tuple(r) for r in EMB[:10]}
  assert all(tuple(r) in rows for r in out[2:])


def test_text_init_and_array_errors():
  out = np.asarray(initializers.text(EMB, [7, 8, 9])(jax.random.PRNGKey(0), (4, 6)))
  np.testing.assert_allclose(out[:3], EMB[[7, 8, 9]])
  with pytest.raises(ValueError, match='width 6 does not match the model width 8.*projection'):
    initializers.from_array(np.zeros((4, 6)))(None, (4, 8))
  with pytest.raises(ValueError, match='set the prompt length to 4'):
    initializers.from_array(np.zeros((4, 6)))(None, (5, 6))


def test_prompt_file_round_trip_with_masks(tmp_path):
  value = np.random.RandomState(0).randn(4, 6).astype(np.float32)
  path = str(tmp_path / 'p.safetensors')
  write_prompt(path, value, token_mask=[1, 0, 1, 1], piece_mask=np.ones((4, 2)), backbone='/ckpt',
               task='rte', step=7, metrics={'accuracy': 80.0}, init='class_labels')
  p = read_prompt(path)
  np.testing.assert_array_equal(p.value, value)
  assert (p.length, p.width) == (4, 6)
  assert p.metadata['task'] == 'rte' and p.metadata['step'] == 7
  assert p.metadata['metrics'] == {'accuracy': 80.0}
  assert p.metadata['format'].startswith('jaxprompt.prompt')
  masked = p.masked_value()
  assert (masked[1] == 0).all() and (masked[0] == value[0]).all()
  with pytest.raises(FileExistsError, match='already exists'):
    write_prompt(path, value)
  npy = str(tmp_path / 'p.npy')
  write_prompt(npy, value)
  np.testing.assert_array_equal(read_prompt(npy).value, value)


def test_compatibility_checks(tmp_path):
  path = str(tmp_path / 'p.safetensors')
  write_prompt(path, np.zeros((3, 6)), backbone='/ckpts/a')
  p = read_prompt(path)
  with pytest.raises(ValueError, match='prompt width 6 does not match the model width 8.*project'):
    check_compatible(p, 8, path=path)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    check_compatible(p, 6, backbone='/ckpts/b', path=path)
  assert any('/ckpts/a' in str(w.message) and '/ckpts/b' in str(w.message) for w in caught)


def test_no_pickle_in_npy(tmp_path):
  bad = tmp_path / 'obj.npy'
  np.save(bad, np.array([{'a': 1}], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match='allow_pickle=False'):
    read_prompt(str(bad))
