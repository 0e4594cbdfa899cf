"""The README's install step, as a user runs it: quiet, and the package imports from anywhere."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow  # a fresh venv and an editable build: ~30 s
def test_editable_install_prints_no_build_notice(tmp_path):
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  pip = [str(venv / 'bin' / 'python'), '-m', 'pip']
  env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK='1')
  done = subprocess.run(pip + ['install', '-q', '--no-deps', '-e', str(REPO_ROOT)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  notices = [line for line in (done.stdout + done.stderr).splitlines()
             if 'Editable install' in line or 'be careful' in line]
  assert not notices, '\n'.join(notices)
  where = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                          'import importlib.util as u; print(u.find_spec("jaxprompt").origin)'],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
  assert where == str(REPO_ROOT / 'jaxprompt' / '__init__.py')
