"""`jaxprompt info` knows every artefact the project writes and tells its provenance."""

import json
import os

import jax
import numpy as np

from jaxprompt import artefacts, cli


def _info(path, capsys) -> str:
  assert cli.main(['info', str(path)]) == 0
  return capsys.readouterr().out


def test_a_prompt_library_is_described_not_read_as_a_checkpoint(tmp_path, capsys):
  from jaxprompt.methods import library as lib
  rs = np.random.RandomState(0)
  for task in ('lab_has_red', 'lab_majority'):
    lib.add(str(tmp_path / 'lib'), rs.normal(size=(4, 8)).astype(np.float32), task=task,
            embedding=rs.normal(size=(4, 8)).astype(np.float32), embedding_steps=100,
            metadata=dict(steps=300, method='prompt_stack', metrics={'accuracy': 91.5},
                          backbone_fingerprint='sha256:abc'))
  assert artefacts.kind_of(str(tmp_path / 'lib')) == 'prompt_library'
  out = _info(tmp_path / 'lib', capsys)
  assert out.startswith('prompt_library: ')
  assert 'prompts            2' in out and 'with_embeddings    2' in out
  assert 'lab_has_red step 300, prompt_stack, accuracy 91.5' in out and 'sha256:abc' in out


def test_a_projector_and_a_projected_prompt_name_their_provenance(tmp_path, capsys):
  from jaxprompt.methods import projection
  from jaxprompt.prompts.files import write_prompt
  params = projection.init_projector(jax.random.PRNGKey(0), (3, 4), (5, 6), hidden=7)
  proj = projection.save_projector(str(tmp_path / 'proj.safetensors'), params, dict(
      source_length=3, source_width=4, source_fingerprint='sha256:src',
      target_fingerprint='sha256:tgt', backbone='/ckpt/target', activation='tanh', task='t'))
  out = _info(proj, capsys)
  assert out.startswith('projector: ') and 'init' not in out
  assert '3 x 4 -> 5 x 6' in out and 'sha256:src' in out and '/ckpt/target' in out
  source = write_prompt(str(tmp_path / 'src.safetensors'), np.ones((3, 4), np.float32),
                        task='lab_has_red', backbone_fingerprint='sha256:src')
  value, meta = projection.apply_projector(proj, source)
  projected = write_prompt(str(tmp_path / 'projected.safetensors'), value,
                           **{k: v for k, v in meta.items() if v is not None})
  out = _info(projected, capsys)
  assert 'method             projected prompt' in out and 'prompt_tuning' not in out
  assert proj in out and source in out and 'sha256:tgt' in out


def test_a_prune_folder_and_a_resumed_run_tell_what_they_hold(tmp_path, capsys):
  prune = tmp_path / 'xprompt'
  prune.mkdir()
  (prune / 'prune.json').write_text(json.dumps({
      'identity': {'task': 'lab_has_dog', 'backbone': 'sha256:bb'},
      'unpruned': {'fraction': 0.0, 'val_before': 80.0},
      'rows': {'f0.5': {'fraction': 0.5, 'val_after': 82.5}}, 'chosen': 0.5}))
  out = _info(prune, capsys)
  assert out.startswith('prune: ') and 'lab_has_dog' in out and '0.5 82.5' in out
  assert 'chosen_fraction    0.5' in out and 'finished' in out
  run = tmp_path / 'sources'
  run.mkdir()
  (run / 'manifest.json').write_text(json.dumps({'method': 'prompt_stack', 'task': 'mix',
                                                 'train_steps': 100, 'config': {}}))
  (run / 'summary.json').write_text(json.dumps({'step': 300, 'train_steps': 300}))
  out = _info(run, capsys)  # the embedding stage started it at 100; it was resumed to 300
  assert 'train_steps        300' in out and 'step               300' in out
