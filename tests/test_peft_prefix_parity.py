"""Parity with Hugging Face PEFT's prefix tuning (`PrefixTuningConfig`) on T5.

A tiny random T5.1.1 of odd shapes (d = 24, 3 heads of 5, so heads * head_dim = 15 != d, and
encoder and decoder of different depths) is written with `save_hf` and loaded by transformers
in float32; PEFT wraps it with a prefix of 4 virtual tokens, with and without the
reparameterisation MLP, and its own random prefix encoder is copied into jaxprompt's
`prefix_tuning` trainable. Compared, each relative to the largest magnitude of the reference
(max|a - b| <= 1e-4 max|b|): the logits at the target positions, the loss (summed token
cross-entropy) and the gradients w.r.t. every prefix parameter, through the method's own
`model_inputs` (the mapping the engine trains). Then the method's product, exported with
`jaxprompt export --to peft`'s function, is loaded by `PeftModel.from_pretrained` and gives
the same logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_GATED, random_params

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from jaxprompt.checkpoints import save_hf
from jaxprompt.checkpoints.peft import export_peft
from jaxprompt.methods import get_method
from jaxprompt.methods.prefix_tuning import Dims
from jaxprompt.model import Transformer, loss_and_metrics

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings('ignore:.*is_gradient_checkpointing:FutureWarning')]

LENGTH, HIDDEN, RTOL = 4, 7, 1e-4
# (encoder, decoder) depths: PEFT's default num_layers (the encoder's 3) covers a shallower
# decoder; a deeper, even one (4) needs num_layers=4 and shares prefixes between layers.
DEPTHS = {'enc3_dec2': (3, 2), 'enc2_dec4': (2, 4)}

from conftest import (  # noqa: E402 - the parity batch and checks
    DECODER_INPUTS, ENCODER_TOKENS, TARGETS, assert_close, assert_trees_close)
VALID = TARGETS > 0


def close(actual, reference, what):
  assert_close(actual, reference, what, RTOL)


def t(x):
  return x.detach().numpy().copy()


@pytest.fixture(scope='module', params=[
    'enc3_dec2', pytest.param('enc2_dec4', marks=pytest.mark.slow)])
def backbone(request, tmp_path_factory):
  encoder_layers, decoder_layers = DEPTHS[request.param]
  config = TINY_GATED.replace(emb_dim=24, num_heads=3, head_dim=5, dropout_rate=0.0,
                              num_encoder_layers=encoder_layers,
                              num_decoder_layers=decoder_layers)
  params = random_params(config, seed=13, std=0.2)
  directory = tmp_path_factory.mktemp(f'peft_prefix_{request.param}')
  save_hf(params, config, str(directory))
  return config, params, directory


def hf_base(directory):
  return transformers.T5ForConditionalGeneration.from_pretrained(str(directory),
                                                                 dtype=torch.float32).eval()


def peft_prefix_model(config, directory, projection: bool):
  torch.manual_seed(0)
  extra = {} if config.num_decoder_layers <= config.num_encoder_layers else {
      'num_layers': config.num_decoder_layers}  # PEFT's default (the encoder's depth) fails
  peft_config = peft.PrefixTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=LENGTH,
      token_dim=config.num_heads * config.head_dim, num_attention_heads=config.num_heads,
      prefix_projection=projection, encoder_hidden_size=HIDDEN, **extra)
  model = peft.get_peft_model(hf_base(directory), peft_config).eval()
  assert model.peft_config['default'].num_transformer_submodules == 2  # seq2seq
  return model


def peft_logits_and_loss(model, backward: bool = True):
  labels = torch.tensor(np.where(VALID, TARGETS, -100), dtype=torch.long)
  out = model(input_ids=torch.tensor(ENCODER_TOKENS, dtype=torch.long),
              attention_mask=torch.tensor(ENCODER_TOKENS > 0, dtype=torch.long),
              decoder_input_ids=torch.tensor(DECODER_INPUTS, dtype=torch.long), labels=labels)
  loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                           labels.reshape(-1), ignore_index=-100,
                                           reduction='sum')
  if backward:
    loss.backward()
  return t(out.logits), float(loss.detach())


def trainable_of(encoder, projection: bool) -> dict:
  """jaxprompt's trainable holding PEFT's `PrefixEncoder` weights (layout 'peft')."""
  params = {'embedding': t(encoder.embedding.weight)}
  if projection:
    for i in (0, 2):
      params[f'transform_{i}'] = {'kernel': t(encoder.transform[i].weight).T,
                                  'bias': t(encoder.transform[i].bias)}
  return {'peft': jax.tree_util.tree_map(jnp.asarray, params)}


def grads_of(encoder, projection: bool) -> dict:
  grads = {'embedding': t(encoder.embedding.weight.grad)}
  if projection:
    for i in (0, 2):
      grads[f'transform_{i}'] = {'kernel': t(encoder.transform[i].weight.grad).T,
                                 'bias': t(encoder.transform[i].bias.grad)}
  return {'peft': grads}


def jax_logits(config, trainable, params):
  backbone, prompt = get_method('prefix_tuning').model_inputs(trainable, {'backbone': params},
                                                              {})
  return Transformer(config).apply({'params': backbone}, jnp.asarray(ENCODER_TOKENS),
                                   jnp.asarray(DECODER_INPUTS), jnp.asarray(TARGETS),
                                   enable_dropout=False, prompt=prompt)


def jax_loss_and_grads(config, trainable, params):
  def loss_fn(trainable):
    logits = jax_logits(config, trainable, params)
    loss, _ = loss_and_metrics(logits, jnp.asarray(TARGETS), jnp.asarray(VALID, jnp.float32),
                               z_loss=0.0)
    return loss, logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable)
  return logits, loss, grads


@pytest.mark.parametrize('projection', [False, True], ids=['embedding', 'projection'])
def test_logits_loss_and_prefix_gradients_match_peft(backbone, projection):
  config, params, directory = backbone
  model = peft_prefix_model(config, directory, projection)
  encoder = model.prompt_encoder['default']
  trainable = trainable_of(encoder, projection)
  ref_logits, ref_loss = peft_logits_and_loss(model)
  logits, loss, grads = jax_loss_and_grads(config, trainable, params)

  with torch.no_grad():  # the prefix changes the model: the comparison is not vacuous
    plain_logits, _ = peft_logits_and_loss(hf_base(directory), backward=False)
  assert np.abs(plain_logits - ref_logits)[VALID].max() > 1e-2 * np.abs(ref_logits).max()
  close(np.asarray(logits)[VALID], ref_logits[VALID], 'logits')
  assert ref_loss > 1.0
  close(float(loss), ref_loss, 'loss')
  ref_grads = grads_of(encoder, projection)
  assert_trees_close(grads, ref_grads, RTOL)
  if not projection:  # PEFT's T5 layout: decoder layer i reads rows 4i, 4i+1 (mod 2n) only
    n = max(config.num_encoder_layers, config.num_decoder_layers)
    used = {(4 * i + j) % (2 * n) for i in range(config.num_decoder_layers) for j in (0, 1)}
    per_row = np.abs(np.asarray(grads['peft']['embedding'])).reshape(LENGTH, 2 * n, -1)
    assert {r for r in range(2 * n) if per_row[:, r].max() > 0} == used


@pytest.mark.parametrize('projection', [False, True], ids=['embedding', 'projection'])
def test_exported_adapter_loads_in_peft_with_the_same_logits(backbone, projection, tmp_path):
  config, params, directory = backbone
  method = get_method('prefix_tuning')
  model = peft_prefix_model(config, directory, projection)
  trainable = trainable_of(model.prompt_encoder['default'], projection)
  dims = Dims(config.num_encoder_layers, config.num_decoder_layers, config.num_heads,
              config.head_dim)
  product = method.save_product(trainable, {}, str(tmp_path / 'prefix'),
                                dict(prefix_layout='peft', prefix_projection=projection,
                                     backbone=str(directory), **vars(dims)))
  out = export_peft(product, str(tmp_path / 'adapter'))
  loaded = peft.PeftModel.from_pretrained(hf_base(directory), out).eval()
  assert loaded.peft_config['default'].peft_type == peft.PeftType.PREFIX_TUNING
  with torch.no_grad():
    ref_logits, _ = peft_logits_and_loss(loaded, backward=False)
  logits = jax_logits(config, trainable, params)
  close(np.asarray(logits)[VALID], ref_logits[VALID], 'logits of the exported adapter')
