"""A reduced lab backbone build trains end to end through the engine and learns its sources."""

import json
import os

import pytest

from jaxprompt.evaluate import evaluate
from jaxprompt.lab import backbone
from jaxprompt.lab.tasks import SEQUENCE_LENGTH, seqio_name
from jaxprompt.model import Transformer, init_params
from jaxprompt.checkpoints.backbone import load_backbone


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('labcache'))
  return cache, backbone.build(steps=60, cache_dir=cache, progress=False)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_build_writes_a_real_checkpoint_and_is_reused(built):
  cache, ckpt = built
  directory = os.path.dirname(ckpt)
  manifest = json.load(open(os.path.join(directory, 'manifest.json')))
  assert manifest['steps'] == 60 and 1e6 < manifest['parameters'] < 5e6
  assert os.path.exists(os.path.join(directory, 'vocabulary.model'))
  bb = load_backbone(ckpt)
  module, params = bb.module, bb.params
  assert module.config.family == 't5_1_1' and module.config.emb_dim == 128
  before = os.path.getmtime(os.path.join(directory, 'manifest.json'))
  assert backbone.build(steps=60, cache_dir=cache) == ckpt  # cached: no second training
  assert os.path.getmtime(os.path.join(directory, 'manifest.json')) == before


@pytest.mark.slow  # builds a reduced lab backbone: ~40 s idle
def test_reduced_build_beats_a_random_backbone_on_a_source_task(built):
  _, ckpt = built
  bb = load_backbone(ckpt)
  module, params = bb.module, bb.params
  random = (Transformer(module.config), init_params(module.config, 1))
  task = seqio_name('has_blue', prefixed=True)
  kwargs = dict(split='validation', feature_lengths=SEQUENCE_LENGTH, batch_size=100)
  trained = evaluate(task, backbone=(module, params), **kwargs)
  untrained = evaluate(task, backbone=random, **kwargs)
  # A few hundred steps teach the answer format (label words + EOS) well before the skill.
  assert trained['loss_per_token'] < 0.6 * untrained['loss_per_token'], (trained, untrained)
  assert trained['token_accuracy'] > untrained['token_accuracy'] + 20, (trained, untrained)
  assert trained['accuracy'] >= untrained['accuracy'] - 5, (trained, untrained)


def _validation_inputs(task, n=5):
  from jaxprompt.data.features import get_dataset
  batch = next(iter(get_dataset(task, SEQUENCE_LENGTH, 'validation', n, shuffle=False)))
  return batch['encoder_input_tokens'].tolist()


@pytest.mark.slow  # the full tier (40 s on 2 cores): a lab backbone build
def test_building_a_backbone_of_another_seed_leaves_the_callers_tasks_as_they_were(tmp_path):
  # A study that builds a second backbone (another seed: another world of examples) mid-run
  # must go on evaluating on the tasks it started with, as when that backbone was cached.
  from jaxprompt.lab import tasks
  cache = str(tmp_path / 'cache')
  tasks.register_lab_tasks(cache_dir=cache, seed=0)
  before = _validation_inputs(seqio_name('has_red'))
  backbone.build(steps=2, seed=3, cache_dir=cache, progress=False,
                 preset=dict(emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, layers=1,
                             batch_size=4))
  assert tasks.registration()['seed'] == 0
  assert _validation_inputs(seqio_name('has_red')) == before
  tasks.register_lab_tasks(cache_dir=cache, seed=3)  # the other world really is other data
  assert _validation_inputs(seqio_name('has_red')) != before
  tasks.register_lab_tasks()


def test_a_backbone_another_process_is_building_is_waited_for_not_built_twice(tmp_path, capsys):
  """Processes sharing a cache (parallel jobs, test workers) build each backbone once: while
  another holds the build lock, `build` waits, then uses what it wrote (it does not train)."""
  import subprocess
  import sys
  out = backbone.backbone_dir(20, cache_dir=str(tmp_path))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  other = subprocess.Popen([sys.executable, '-c', (
      'import fcntl, os, sys, time\n'
      f'lock = open({out + ".lock"!r}, "a"); fcntl.flock(lock, fcntl.LOCK_EX)\n'
      'print("building", flush=True); time.sleep(2)\n'
      f'os.makedirs({out!r}); open(os.path.join({out!r}, "manifest.json"), "w").write("{{}}")\n')],
      stdout=subprocess.PIPE, text=True)
  try:
    assert other.stdout.readline().strip() == 'building'
    assert backbone.build(steps=20, cache_dir=str(tmp_path)) == backbone.checkpoint_path(out, 20)
  finally:
    other.wait(timeout=60)
  err = capsys.readouterr().err
  assert 'waiting for another process building' in err and 'another process built' in err
  assert os.listdir(out) == ['manifest.json']  # nothing trained or written here
