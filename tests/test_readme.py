"""The README's Python blocks run as written (on a smaller lab backbone, via JAXPROMPT_LAB_STEPS),
and its two commands are the ones CI and a newcomer run."""

import os
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _python_blocks() -> list[str]:
  return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_readme_python_blocks_run(tmp_path, monkeypatch, reduced_lab_cache):
  blocks = _python_blocks()
  assert blocks, 'the README has no Python block'
  monkeypatch.setenv('JAXPROMPT_CACHE', reduced_lab_cache)
  monkeypatch.setenv('JAXPROMPT_LAB_STEPS', '20')
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    exec(compile(block, str(README), 'exec'), {'__name__': '__readme__'})  # noqa: S102
  assert os.path.exists(tmp_path / 'runs' / 'has_dog_py' / 'prompt_best.safetensors')


def test_readme_has_the_two_commands():
  text = README.read_text()
  commands = [line for line in text.splitlines() if line.startswith('python3 -m venv .venv')]
  assert len(commands) == 2
  assert commands[0].endswith('jaxprompt tune') and commands[1].endswith('-m pytest -n 2')
