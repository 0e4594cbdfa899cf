"""Model tuning, the papers' baseline: every backbone weight is trained, no prompt.

The trainable is the backbone itself (it takes the backbone's shardings), the optimizer
T5X's Adafactor at lr 1e-3 without weight decay, and the product a T5X (Orbax) checkpoint
that `load_t5` reads, with the config beside it.
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.train import steps


@register
class ModelTuning(Method):
  name = 'model_tuning'
  trains_backbone = True
  learning_rate = 1e-3
  weight_decay = None

  def init(self, rng, ctx: Context):
    del rng
    return ctx.backbone.params, {}

  model_inputs = staticmethod(steps.model_tuning_inputs)

  def identity(self, ctx: Context):
    return {}

  def save_product(self, trainable, extras, path, metadata):
    from jaxprompt.checkpoints import save_t5x_orbax
    del extras
    shutil.rmtree(path, ignore_errors=True)
    save_t5x_orbax(jax.device_get(trainable), path, int(metadata.get('step') or 0))
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump({'t5x_T5Config': metadata['t5_config'], 'metrics': metadata.get('metrics')}, f,
                indent=1)
    return path

  def load_product(self, path, ctx):
    from jaxprompt.checkpoints import load_t5
    return load_t5(path)[1], {}
