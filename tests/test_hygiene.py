"""A test session leaves nothing in the system's temp directory."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow  # the full tier (17 s on 2 cores): a test session in a subprocess
def test_a_test_session_leaves_the_temp_directory_as_it_found_it(tmp_path):
  """A nested pytest run of tests that train a SentencePiece model, write tmp_path files and
  import TensorFlow, with TMPDIR pointing at an empty folder: the folder is empty afterwards."""
  temp = tmp_path / 'system_tmp'
  temp.mkdir()
  env = dict(os.environ, TMPDIR=str(temp))
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  done = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-x',
       'tests/test_data_vocab.py'], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert sorted(os.listdir(temp)) == []
