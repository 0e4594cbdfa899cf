"""The Colab notebook runs top to bottom (headless, with a reduced lab backbone and run)."""

import os
import pathlib

import pytest

from conftest import images, run_notebook


NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'colab' / 'prompt_tuning.ipynb'


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXPROMPT_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_STEPS', '60')
  monkeypatch.setenv('JAXPROMPT_NB_TUNE_STEPS', '24')
  monkeypatch.setenv('JAXPROMPT_NB_RUN_DIR', str(tmp_path / 'run'))
  outputs, text = run_notebook(NOTEBOOK, tmp_path, timeout=900)
  assert 'validation accuracy best' in text and 'test accuracy with the prompt' in text
  assert images(outputs) >= 1
  assert os.path.exists(tmp_path / 'run' / 'prompt_best.safetensors')
