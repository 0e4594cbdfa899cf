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
  return cache, backbone.build(steps=160, cache_dir=cache, progress=False)


@pytest.mark.slow  # the full tier: over ~20 s on 2 loaded cores
def test_build_writes_a_real_checkpoint_and_is_reused(built):
  cache, ckpt = built
  directory = os.path.dirname(ckpt)
  manifest = json.load(open(os.path.join(directory, 'manifest.json')))
  assert manifest['steps'] == 160 and 1e6 < manifest['parameters'] < 5e6
  assert os.path.exists(os.path.join(directory, 'vocabulary.model'))
  bb = load_backbone(ckpt)
  module, params = bb.module, bb.params
  assert module.config.family == 't5_1_1' and module.config.emb_dim == 128
  before = os.path.getmtime(os.path.join(directory, 'manifest.json'))
  assert backbone.build(steps=160, cache_dir=cache) == ckpt  # cached: no second training
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
