"""The Colab notebook runs top to bottom (headless, with a reduced lab backbone and run)."""

import json
import os
import pathlib

import pytest

from conftest import images, run_notebook


COLAB = pathlib.Path(__file__).resolve().parents[1] / 'colab'
NOTEBOOK = COLAB / 'prompt_tuning.ipynb'


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_notebook_runs(tmp_path, monkeypatch, reduced_lab_cache):
  monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_STEPS', '20')
  monkeypatch.setenv('JAXPROMPT_NB_TUNE_STEPS', '24')
  monkeypatch.setenv('JAXPROMPT_NB_RUN_DIR', str(tmp_path / 'run'))
  outputs, text = run_notebook(NOTEBOOK, tmp_path, timeout=900)
  assert 'validation accuracy best' in text and 'test accuracy with the prompt' in text
  assert images(outputs) >= 1
  assert os.path.exists(tmp_path / 'run' / 'prompt_best.safetensors')


@pytest.mark.slow  # the full tier: a reduced lab backbone, 3 source runs and 7 methods, 1 seed
def test_methods_notebook_runs(tmp_path, monkeypatch, reduced_lab_cache):
  monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE', 'lab')
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_STEPS', '20')
  monkeypatch.setenv('JAXPROMPT_NB_STEPS', '3')
  monkeypatch.setenv('JAXPROMPT_NB_SEEDS', '1')  # seeds' mean +- sd: test_prompt_family
  monkeypatch.setenv('JAXPROMPT_NB_EVAL', '8')
  monkeypatch.setenv('JAXPROMPT_NB_WORK', str(tmp_path / 'work'))
  outputs, text = run_notebook(COLAB / 'methods.ipynb', tmp_path, timeout=600)
  assert 'library:' in text and 'MPT sources: best validation' in text
  run = tmp_path / 'work' / 'lab_20_3steps'
  rows = json.loads((run / 'methods.json').read_text())
  assert [r['method'] for r in rows] == [
      'prompt_tuning', 'p_tuning', 'residual_prompt', 'multitask_prompt', 'attempt',
      'prefix_tuning', 'model_tuning']
  assert all(len(r['scores']) == 1 and r['trainable_params'] > 0 for r in rows)
  assert rows[-1]['trainable_params'] > 10 * rows[0]['trainable_params']  # model tuning
  manifest = lambda m: json.loads((run / 'compare' / m / 'seed_0' / 'manifest.json').read_text())
  assert manifest('multitask_prompt')['method_options']['mpt_source'] == str(
      run / 'mpt_sources' / 'prompt_best.safetensors')  # MPT's target stage, from its sources
  assert manifest('attempt')['method_options']['source_library'] == str(run / 'library')
  assert 'lab_count_numbers, 3 steps: best validation score (mean +- sd' in text  # the table
  assert images(outputs) == 1
  from PIL import Image
  with Image.open(run / 'methods.png') as png:
    assert png.format == 'PNG' and png.size[0] >= 1000 and png.size[1] >= 400
