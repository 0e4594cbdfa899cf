"""Cross-model projector (Su et al. 2022): the formula vs numpy, files, bad input, the distance
objective, the task objective as a method through the run driver, the CLI, the gin run files."""

import glob
import os

import numpy as np
import pytest

import data_helpers
from jaxprompt import cli
from jaxprompt.methods import library as lib
from jaxprompt.methods import projection as pj
from jaxprompt.prompts.files import read_prompt, write_prompt

GIN_DIR = os.path.join(os.path.dirname(cli.__file__), 'gin')


def _numpy_project(params, prompt, leaky=False):
  h = prompt.reshape(-1) @ params['w1'] + params['b1']
  h = np.where(h > 0, h, 0.01 * h) if leaky else np.tanh(h)
  y = h @ params['w2'] + params['b2']
  y = (y - y.mean()) / np.sqrt(y.var() + 1e-5)
  return y.reshape(params['ln_scale'].shape) * params['ln_scale'] + params['ln_bias']


@pytest.mark.parametrize('activation', pj.ACTIVATIONS)
def test_projection_matches_numpy(activation):
  import jax
  params = pj.init_projector(jax.random.PRNGKey(0), (3, 4), (5, 6), hidden=7, out_scale=0.5)
  rs = np.random.RandomState(0)
  params = {k: np.asarray(v) + rs.normal(0, 0.1, v.shape).astype(np.float32)
            for k, v in params.items()}
  prompts = rs.normal(size=(2, 3, 4)).astype(np.float32)
  leaky = activation == 'leaky_relu'
  got = np.asarray(pj.project(params, prompts, 1.0 if leaky else 0.0))
  assert got.shape == (2, 5, 6)
  for i in range(2):
    np.testing.assert_allclose(got[i], _numpy_project(params, prompts[i], leaky), atol=2e-5)
  np.testing.assert_allclose(np.asarray(pj.project(params, prompts[0], float(leaky))), got[0],
                             atol=1e-6)


def _projector_file(tmp_path, source_fp='sha256:src', target_fp='sha256:tgt'):
  import jax
  params = pj.init_projector(jax.random.PRNGKey(1), (3, 4), (3, 6), hidden=5)
  sources = np.random.RandomState(2).normal(size=(2, 3, 4)).astype(np.float32)
  path = str(tmp_path / 'proj.safetensors')
  pj.save_projector(path, params, dict(objective='distance', activation='tanh',
                                       tasks=['a', 'b'], source_fingerprint=source_fp,
                                       target_fingerprint=target_fp), sources)
  return path, params, sources


def test_projector_file_is_self_describing_and_round_trips(tmp_path):
  path, params, sources = _projector_file(tmp_path)
  loaded, meta, src = pj.load_projector(path)
  for k in pj.PARAM_NAMES:
    np.testing.assert_array_equal(loaded[k], np.asarray(params[k]))
  np.testing.assert_array_equal(src, sources)
  assert meta['source_fingerprint'] == 'sha256:src' and meta['target_fingerprint'] == 'sha256:tgt'
  assert (meta['source_length'], meta['source_width'], meta['target_length'],
          meta['target_width'], meta['hidden']) == (3, 4, 3, 6, 5)
  assert meta['objective'] == 'distance' and meta['tasks'] == ['a', 'b']
  pf = read_prompt(path)  # the training tasks' projections read as a prompt stack
  assert pf.value.shape == (2, 3, 6) and pf.metadata['method'] == 'projector'
  with open(path, 'rb') as f:
    assert b'pickle' not in f.read(200)
  prompt = write_prompt(str(tmp_path / 'p.safetensors'), sources[0], task='a',
                        backbone_fingerprint='sha256:src')
  value, out_meta = pj.apply_projector(path, prompt)
  np.testing.assert_allclose(value, _numpy_project(loaded, sources[0]), atol=2e-5)
  assert out_meta['backbone_fingerprint'] == 'sha256:tgt' and out_meta['task'] == 'a'


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
  path, _, _ = _projector_file(tmp_path)
  rs = np.random.RandomState(3)
  wide = write_prompt(str(tmp_path / 'wide.safetensors'), rs.normal(size=(3, 5)))
  long = write_prompt(str(tmp_path / 'long.safetensors'), rs.normal(size=(4, 4)))
  other = write_prompt(str(tmp_path / 'other.safetensors'), rs.normal(size=(3, 4)),
                       backbone_fingerprint='sha256:zzz')
  with pytest.raises(pj.ProjectionError, match='width 5, but .* width 4'):
    pj.apply_projector(path, wide)
  with pytest.raises(pj.ProjectionError, match='length 4 and width 4, but .* length 3'):
    pj.apply_projector(path, long)
  with pytest.raises(pj.ProjectionError, match='backbone sha256:zzz, but .* sha256:src'):
    pj.apply_projector(path, other)
  with pytest.raises(pj.ProjectionError, match='projects onto backbone sha256:tgt, not sha256:x'):
    pj.apply_projector(path, rs.normal(size=(3, 4)), target_backbone='sha256:x')
  with pytest.raises(pj.ProjectionError, match='not a projector file'):
    pj.load_projector(wide)
  before = sorted(os.listdir(tmp_path))
  for prompt in (wide, other):
    assert cli.main(['project', 'apply', '--projector', path, '--prompt', prompt, '--out',
                     str(tmp_path / 'out.safetensors')]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'error' in err[0]
  assert sorted(os.listdir(tmp_path)) == before


def test_distance_objective_fits_target_prompts():
  rs = np.random.RandomState(4)
  src, tgt = rs.normal(size=(3, 2, 4)), rs.normal(size=(3, 2, 5))
  params, losses = pj.train_distance(src, tgt, hidden=16, steps=300, learning_rate=1e-2)
  assert losses[-1] < 0.05 * losses[0]
  np.testing.assert_allclose(np.asarray(pj.project(params, src.astype(np.float32))), tgt,
                             atol=0.2)
  with pytest.raises(pj.ProjectionError, match='same n tasks'):
    pj.train_distance(src, tgt[:2])


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_distance_cli_and_apply_through_libraries(tmp_path, capsys):
  from jaxprompt.model import Transformer, get_config, init_params
  from jaxprompt.checkpoints import save_t5x_orbax
  import json
  rs = np.random.RandomState(5)
  cfg = get_config('t5_1_1_tiny', vocab_size=64, dropout_rate=0.0)
  ckpt = str(tmp_path / 'target')
  save_t5x_orbax(init_params(cfg, 0), ckpt, 1)
  with open(os.path.join(ckpt, 'config.json'), 'w') as f:
    json.dump({'t5x_T5Config': cfg.to_dict()}, f)
  src_lib, tgt_lib = str(tmp_path / 'src'), str(tmp_path / 'tgt')
  for t in ('a', 'b', 'c'):
    lib.add(src_lib, rs.normal(size=(2, 6)), task=t, metadata={'backbone_fingerprint': 'sha256:s'})
    lib.add(tgt_lib, rs.normal(size=(2, cfg.emb_dim)), task=t)
  out = str(tmp_path / 'd.safetensors')
  target = os.path.join(ckpt, 'checkpoint_1')
  assert cli.main(['project', 'train', '--objective', 'distance', '--tasks', 'a,b',
                   '--source_library', src_lib, '--target_library', tgt_lib,
                   '--target_backbone', target, '--out', out, '--steps', '50', '--hidden',
                   '8']) == 0, capsys.readouterr().err
  _, meta, _ = pj.load_projector(out)
  assert meta['source_fingerprint'] == 'sha256:s' and meta['target_fingerprint'].startswith(
      'sha256:') and meta['tasks'] == ['a', 'b']
  projected = str(tmp_path / 'c.safetensors')
  assert cli.main(['project', 'apply', '--projector', out, '--prompt', f'{src_lib}:c', '--out',
                   projected, '--target_backbone', target]) == 0
  pf = read_prompt(projected)
  assert pf.value.shape == (2, cfg.emb_dim) and pf.metadata['task'] == 'c'
  assert cli.main(['project', 'train', '--objective', 'distance', '--tasks', 'a',
                   '--source_library', src_lib, '--target_backbone', target, '--out',
                   str(tmp_path / 'e.safetensors')]) != 0
  assert 'needs --target_library' in capsys.readouterr().err


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_task_objective_is_a_method_of_the_run_driver(tmp_path):
  """The projector trained on the target model's loss: only the projector moves, and the
  product (the projector file) evaluates to the run's recorded best metric."""
  from jaxprompt.evaluate import evaluate
  from jaxprompt.model import Transformer, get_config, init_params
  from jaxprompt.tuning import tune
  vocab = data_helpers.vocabulary()
  rs = np.random.RandomState(0)
  rows = [{'text': ' '.join(rs.choice(data_helpers.WORDS, 4)), 'label': i % 2} for i in range(30)]
  train = data_helpers.write_jsonl(str(tmp_path / 'train.jsonl'), rows[:20])
  dev = data_helpers.write_jsonl(str(tmp_path / 'dev.jsonl'), rows[20:])
  cli.setup_tasks(data_helpers.spm_model_path(), train, dev, 'proj_task', 'text', 'target',
                  'label', ['bad', 'good'])
  cfg = get_config('t5_1_1_tiny', vocab_size=vocab.vocab_size, dropout_rate=0.0)
  backbone = (Transformer(cfg), init_params(cfg, 0))
  src_lib = str(tmp_path / 'src')
  lib.add(src_lib, rs.normal(size=(3, 6)), task='proj_task',
          metadata={'backbone_fingerprint': 'sha256:small'})
  lengths = {'inputs': 12, 'targets': 4}
  r = tune('proj_task', backbone=backbone, model_dir=str(tmp_path / 'run'), method='projector',
           source_library=src_lib, hidden=8, train_steps=6, eval_period=3, batch_size=8,
           feature_lengths=lengths, progress=False)
  assert r.best_prompt_path.endswith('.safetensors')
  params, meta, sources = pj.load_projector(r.best_prompt_path)
  assert meta['source_fingerprint'] == 'sha256:small' and meta['objective'] == 'task'
  assert meta['target_width'] == cfg.emb_dim and meta['source_width'] == 6
  assert sources.shape == (1, 3, 6)
  metrics = evaluate('proj_task', backbone=backbone, prompt=r.best_prompt_path,
                     feature_lengths=lengths, batch_size=8)
  assert metrics['score'] == r.best_metrics['score']
  # a projected prompt file evaluates like the projector does on its own task
  value, pmeta = pj.apply_projector(r.best_prompt_path, f'{src_lib}:proj_task')
  np.testing.assert_allclose(value, read_prompt(r.best_prompt_path).value[0], atol=1e-6)
  with pytest.raises(Exception, match='source prompt'):
    tune('proj_task', backbone=backbone, model_dir=str(tmp_path / 'bad'), method='projector',
         source_prompts=('a.safetensors', 'b.safetensors'), train_steps=1, progress=False)


@pytest.mark.parametrize('run_file', sorted(glob.glob(os.path.join(GIN_DIR, 'runs', 'project_*.gin'))
                                            + glob.glob(os.path.join(GIN_DIR, 'runs',
                                                                     'transfer_*.gin'))))
def test_gin_run_files_parse(run_file):
  import gin
  gin.clear_config()
  cli._register_configurables()  # noqa: SLF001
  try:
    gin.parse_config_files_and_bindings(
        [run_file], ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'lab_has_green'",
                     "INITIAL_CHECKPOINT_PATH = '/ckpt'", "SOURCE_LIBRARY = '/lib'"],
        skip_unknown=False)
    bound = gin.query_parameter('tune.method')
    assert bound in ('projector', 'prompt_tuning')
    assert gin.query_parameter('%PROMPT_LENGTH') == 100  # Su et al.'s prompt length
    if bound == 'projector':
      assert gin.query_parameter('%HIDDEN') == 768 and gin.query_parameter('%ACTIVATION') == 'tanh'
  finally:
    gin.clear_config()


def test_lab_build_second_backbone_of_another_width_and_seed(monkeypatch, capsys):
  """`jaxprompt lab build --width 96 --seed 1`: the preset's settings at another width, its own
  cache directory; the preset's own width is the preset itself (same cache path)."""
  from jaxprompt.lab import backbone
  p = backbone.with_width('methods', 96)
  assert (p['emb_dim'], p['mlp_dim'], p['num_heads'], p['head_dim']) == (96, 192, 8, 12)
  assert p['name'] == 'methods_w96' and p['relpos_lr_scale'] == 10.0 and p['batch_size'] == 128
  assert backbone.with_width('methods', 128) == 'methods'
  assert backbone.with_width(None, None) is None
  assert backbone.backbone_dir(seed=1, preset=p) != backbone.backbone_dir(seed=1, preset='methods')
  assert 'methods_w96_1200steps_seed1_' in backbone.backbone_dir(seed=1, preset=p)
  with pytest.raises(ValueError, match='multiple'):
    backbone.with_width('methods', 100)
  calls = []
  monkeypatch.setattr(backbone, 'build', lambda **kw: calls.append(kw) or '/x/checkpoint_1')
  assert cli.main(['lab', 'build', '--preset', 'methods', '--width', '96', '--seed', '1']) == 0
  assert calls[-1]['seed'] == 1 and calls[-1]['preset'] == p
  assert cli.main(['lab', 'build']) == 0
  assert calls[-1]['seed'] == 0 and calls[-1]['preset'] is None
  assert 'lab backbone: /x/checkpoint_1' in capsys.readouterr().out
