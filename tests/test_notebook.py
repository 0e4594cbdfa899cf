"""The Colab notebook runs top to bottom (headless, with a reduced lab backbone and run)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'colab' / 'prompt_tuning.ipynb'


def test_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXPROMPT_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('JAXPROMPT_NB_BACKBONE_STEPS', '60')
  monkeypatch.setenv('JAXPROMPT_NB_TUNE_STEPS', '24')
  monkeypatch.setenv('JAXPROMPT_NB_RUN_DIR', str(tmp_path / 'run'))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'validation accuracy best' in text and 'test accuracy with the prompt' in text
  assert any('image/png' in o.get('data', {}) for o in outputs if o.output_type == 'display_data')
  assert os.path.exists(tmp_path / 'run' / 'prompt_best.safetensors')
