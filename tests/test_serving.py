"""`jaxprompt export --to stablehlo`: the exported program, reloaded in a fresh process that
imports only jax and numpy, gives the tokens of in-process greedy decoding."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import cli, serving
from jaxprompt.model import Transformer, decoding
from jaxprompt.prompts.files import write_prompt
from conftest import ENCODER_TOKENS, TINY_GATED, random_params

STEPS = 6


def _example(readme: str) -> str:
  """The README's example code (the text between its markers)."""
  start = readme.index(serving.EXAMPLE_START) + len(serving.EXAMPLE_START)
  return readme[start:readme.index(serving.EXAMPLE_END)]


def test_exported_program_decodes_like_jaxprompt_without_it(tmp_path):
  module, params = Transformer(TINY_GATED), random_params(TINY_GATED, seed=3)
  value = np.random.default_rng(0).normal(0, 1, (4, TINY_GATED.emb_dim)).astype(np.float32)
  prompt = write_prompt(str(tmp_path / 'p.safetensors'), value, method='prompt_tuning')
  out = serving.export_stablehlo((module, params), prompt, str(tmp_path / 'export'),
                                 batch_size=3, inputs_length=7, max_decode_length=STEPS)
  with open(os.path.join(out, serving.README)) as f:
    readme = f.read()
  with open(os.path.join(out, serving.SIGNATURE)) as f:
    signature = json.load(f)
  assert signature['input']['shape'] == [3, 7] and signature['output']['shape'] == [3, STEPS]

  np.save(tmp_path / 'ids.npy', ENCODER_TOKENS)
  script = _example(readme) + (
      'import sys\n'
      "assert 'jaxprompt' not in sys.modules, 'the program must run without jaxprompt'\n"
      'np.save(sys.argv[3], load(sys.argv[1])(np.load(sys.argv[2])))\n')
  subprocess.run([sys.executable, '-c', script, out, str(tmp_path / 'ids.npy'),
                  str(tmp_path / 'tokens.npy')], check=True, cwd=tmp_path, timeout=120)
  exported = np.load(tmp_path / 'tokens.npy')

  reference = np.asarray(decoding.greedy_decode(module, params, jnp.asarray(ENCODER_TOKENS),
                                                STEPS, prompt=jnp.asarray(value)))
  assert exported.dtype == np.int32 and exported.shape == (3, STEPS)
  np.testing.assert_array_equal(exported, reference)
  assert (reference > 1).sum() >= 6, reference  # real tokens, not an immediate EOS


def test_export_refuses_bad_input_before_writing(tmp_path, capsys):
  out = tmp_path / 'taken'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  argv = ['export', '--to', 'stablehlo', '--backbone', str(tmp_path / 'missing'),
          '--prompt', 'none', '--out', str(out)]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'already exists' in err and '--overwrite' in err
  assert (out / 'keep.txt').read_text() == 'mine' and os.listdir(out) == ['keep.txt']
  assert cli.main(['export', '--to', 'stablehlo', '--prompt', 'none', '--out',
                   str(tmp_path / 'new')]) == 2
  assert '--backbone' in capsys.readouterr().err
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('flag', ['--batch_size', '--max_decode_length'])
def test_export_refuses_empty_shapes(tmp_path, flag, capsys):
  argv = ['export', '--to', 'stablehlo', '--backbone', 'x', '--prompt', 'none', '--out',
          str(tmp_path / 'o'), flag, '0']
  assert cli.main(argv) == 2
  assert flag in capsys.readouterr().err and not (tmp_path / 'o').exists()
