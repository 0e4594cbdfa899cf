"""Parity with Hugging Face PEFT for the prompt family: P-tuning and multitask prompt tuning.

A tiny random T5.1.1 of odd shapes (d = 24, 3 heads of 5, unequal depths) is written with
`save_hf` and loaded by transformers in float32; PEFT wraps it (encoder prompt only:
num_transformer_submodules=1) and the *same* weights are loaded into both sides: PEFT's own
random initialisation of the P-tuning encoder is copied into jaxprompt's Flax encoder; MPT's
shared prompt and task factors are copied from jaxprompt into PEFT. Compared, each relative
to the largest magnitude of the reference (max|a - b| <= 1e-4 max|b|):
  * the prompt(s) the method produces,
  * the loss (summed token cross-entropy, z_loss 0),
  * the gradients w.r.t. every trainable parameter (the encoder's, or P*, U and V).
The gradients go through the method's own `model_inputs`, the mapping the engine trains.
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
from jaxprompt.methods import get_method
from jaxprompt.model import Transformer, loss_and_metrics

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings('ignore:.*is_gradient_checkpointing:FutureWarning')]

CONFIG = TINY_GATED.replace(emb_dim=24, dropout_rate=0.0)
LENGTH, HIDDEN, TASKS, RANK = 5, 7, 3, 2
RTOL = 1e-4

from conftest import (  # noqa: E402 - the parity batch and checks
    DECODER_INPUTS, ENCODER_TOKENS, TARGETS, assert_close, assert_trees_close)
VALID = TARGETS > 0
TASK_IDS = np.array([2, 0, 1], np.int32)
BATCH = {'encoder_input_tokens': jnp.asarray(ENCODER_TOKENS),
         'decoder_input_tokens': jnp.asarray(DECODER_INPUTS),
         'decoder_target_tokens': jnp.asarray(TARGETS),
         'task_index': jnp.asarray(TASK_IDS)}


def close(actual, reference, what):
  assert_close(actual, reference, what, RTOL)


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
  params = random_params(CONFIG, seed=11, std=0.2)
  directory = tmp_path_factory.mktemp('peft_family_t5')
  save_hf(params, CONFIG, str(directory))
  return params, directory


def peft_model(directory, config):
  torch.manual_seed(0)
  base = transformers.T5ForConditionalGeneration.from_pretrained(str(directory),
                                                                 dtype=torch.float32)
  return peft.get_peft_model(base, config).eval()


def peft_loss(model, **extra):
  """Summed token cross-entropy of the batch, backpropagated (PEFT's side)."""
  labels = torch.tensor(np.where(VALID, TARGETS, -100), dtype=torch.long)
  out = model(input_ids=torch.tensor(ENCODER_TOKENS, dtype=torch.long),
              attention_mask=torch.tensor(ENCODER_TOKENS > 0, dtype=torch.long),
              decoder_input_ids=torch.tensor(DECODER_INPUTS, dtype=torch.long), labels=labels,
              **extra)
  loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                           labels.reshape(-1), ignore_index=-100,
                                           reduction='sum')
  loss.backward()
  return float(loss.detach())


def jax_loss_and_grads(method: str, trainable, params):
  m = get_method(method)

  def loss_fn(trainable):
    backbone, prompt = m.model_inputs(trainable, {'backbone': params}, BATCH)
    logits = Transformer(CONFIG).apply({'params': backbone}, BATCH['encoder_input_tokens'],
                                       BATCH['decoder_input_tokens'],
                                       BATCH['decoder_target_tokens'], enable_dropout=False,
                                       prompt=prompt)
    loss, _ = loss_and_metrics(logits, BATCH['decoder_target_tokens'],
                               jnp.asarray(VALID, jnp.float32), z_loss=0.0)
    return loss

  return jax.jit(jax.value_and_grad(loss_fn))(trainable)


def t(x):
  return x.detach().numpy().copy()


# ----------------------------------------------------------------------------- P-tuning


def ptuning_params_of(encoder, encoder_type: str) -> dict:
  """jaxprompt's Flax encoder parameters holding PEFT's `PromptEncoder` weights."""
  params = {'embedding': t(encoder.embedding.weight)}
  linears = [m for m in encoder.mlp_head if isinstance(m, torch.nn.Linear)]
  for i, linear in enumerate(linears):
    params[f'mlp_{i}'] = {'kernel': t(linear.weight).T, 'bias': t(linear.bias)}
  if encoder_type == 'lstm':
    lstm = encoder.lstm_head
    for layer in range(lstm.num_layers):
      for direction, suffix in (('forward', ''), ('backward', '_reverse')):
        get = lambda name: t(getattr(lstm, f'{name}_l{layer}{suffix}'))  # noqa: E731
        params[f'lstm_{layer}_{direction}'] = {'w_ih': get('weight_ih').T,
                                               'w_hh': get('weight_hh').T,
                                               'b_ih': get('bias_ih'), 'b_hh': get('bias_hh')}
  return jax.tree_util.tree_map(jnp.asarray, params)


def ptuning_grads_of(encoder, encoder_type: str) -> dict:
  """PEFT's gradients in the layout of `ptuning_params_of`."""
  grads = {'embedding': t(encoder.embedding.weight.grad)}
  linears = [m for m in encoder.mlp_head if isinstance(m, torch.nn.Linear)]
  for i, linear in enumerate(linears):
    grads[f'mlp_{i}'] = {'kernel': t(linear.weight.grad).T, 'bias': t(linear.bias.grad)}
  if encoder_type == 'lstm':
    lstm = encoder.lstm_head
    for layer in range(lstm.num_layers):
      for direction, suffix in (('forward', ''), ('backward', '_reverse')):
        get = lambda name: t(getattr(lstm, f'{name}_l{layer}{suffix}').grad)  # noqa: E731
        grads[f'lstm_{layer}_{direction}'] = {'w_ih': get('weight_ih').T,
                                              'w_hh': get('weight_hh').T,
                                              'b_ih': get('bias_ih'), 'b_hh': get('bias_hh')}
  return grads


@pytest.mark.parametrize('encoder_type', ['mlp', 'lstm'])
def test_p_tuning_prompt_loss_and_encoder_gradients_match_peft(backbone, encoder_type):
  from jaxprompt.methods.p_tuning import encode
  params, directory = backbone
  config = peft.PromptEncoderConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=LENGTH, token_dim=CONFIG.emb_dim,
      num_transformer_submodules=1, encoder_reparameterization_type=encoder_type.upper(),
      encoder_hidden_size=HIDDEN)
  model = peft_model(directory, config)
  encoder = model.prompt_encoder['default']
  trainable = ptuning_params_of(encoder, encoder_type)
  if encoder_type == 'lstm':
    assert encoder.lstm_head.num_layers == 2 and 'lstm_1_backward' in trainable

  with torch.no_grad():
    reference_prompt = t(model.get_prompt(batch_size=1)[0])
  close(encode(trainable), reference_prompt, 'prompt')
  assert np.abs(reference_prompt).max() > 1e-2

  ref_loss = peft_loss(model)
  loss, grads = jax_loss_and_grads('p_tuning', trainable, params)
  assert ref_loss > 1.0
  close(float(loss), ref_loss, 'loss')
  ref_grads = ptuning_grads_of(encoder, encoder_type)
  assert_trees_close(grads, ref_grads, RTOL)


def test_p_tuning_initialises_as_peft_does():
  """Same distributions as torch's defaults that PEFT keeps (E ~ N(0, 1); Linear and LSTM
  weights U(+-1/sqrt(fan_in)) / U(+-1/sqrt(h))): compared by range and spread."""
  from jaxprompt.methods.p_tuning import PromptEncoder
  params = PromptEncoder(200, 24, 40, 'lstm').init(jax.random.PRNGKey(0))['params']
  torch.manual_seed(0)
  ref = peft.PromptEncoder(peft.PromptEncoderConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=200, token_dim=24,
      num_transformer_submodules=1, encoder_reparameterization_type='LSTM',
      encoder_hidden_size=40, num_layers=1, num_attention_heads=1))
  pairs = [(params['embedding'], ref.embedding.weight),
           (params['lstm_1_forward']['w_ih'], ref.lstm_head.weight_ih_l1),
           (params['mlp_0']['kernel'], ref.mlp_head[0].weight),
           (params['mlp_1']['kernel'], ref.mlp_head[2].weight)]
  for i, (ours, theirs) in enumerate(pairs):
    ours, theirs = np.asarray(ours), t(theirs)
    assert ours.size == theirs.size
    np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.1)
    if i:  # uniform: the same bound
      np.testing.assert_allclose(np.abs(ours).max(), np.abs(theirs).max(), rtol=0.05)


# ----------------------------------------------------------------------------- MPT


def mpt_config(**extra):
  return peft.MultitaskPromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=LENGTH,
      token_dim=CONFIG.emb_dim, num_transformer_submodules=1, num_ranks=RANK, **extra)


def mpt_trainable(seed: int = 3) -> dict:
  rs = np.random.default_rng(seed)
  return {'shared': jnp.asarray(rs.normal(0, 1, (LENGTH, CONFIG.emb_dim)), jnp.float32),
          'task_cols': jnp.asarray(rs.normal(0, 1, (TASKS, LENGTH, RANK)), jnp.float32),
          'task_rows': jnp.asarray(rs.normal(0, 1, (TASKS, RANK, CONFIG.emb_dim)), jnp.float32)}


def test_mpt_prompts_loss_and_gradients_match_peft(backbone):
  from jaxprompt.methods.multitask_prompt import mpt_inputs, task_prompts
  params, directory = backbone
  trainable = mpt_trainable()
  model = peft_model(directory, mpt_config(num_tasks=TASKS))
  encoder = model.prompt_encoder['default']
  with torch.no_grad():
    encoder.embedding.weight.copy_(torch.from_numpy(np.asarray(trainable['shared'])))
    encoder.prefix_task_cols.copy_(torch.from_numpy(np.asarray(trainable['task_cols'])))
    encoder.prefix_task_rows.copy_(torch.from_numpy(np.asarray(trainable['task_rows'])))
    reference = t(model.get_prompt(batch_size=3, task_ids=torch.tensor(TASK_IDS)))
  _, per_example = mpt_inputs(trainable, {'backbone': None}, BATCH)
  close(per_example, reference, 'per-example prompts')
  close(np.asarray(task_prompts(trainable))[TASK_IDS], reference, 'task prompts')

  ref_loss = peft_loss(model, task_ids=torch.tensor(TASK_IDS, dtype=torch.long))
  loss, grads = jax_loss_and_grads('multitask_prompt', trainable, params)
  close(float(loss), ref_loss, 'loss')
  close(grads['shared'], t(encoder.embedding.weight.grad), 'd loss / d P*')
  close(grads['task_cols'], t(encoder.prefix_task_cols.grad), 'd loss / d U')
  close(grads['task_rows'], t(encoder.prefix_task_rows.grad), 'd loss / d V')
  assert np.abs(np.asarray(grads['task_cols'])).max() > 1e-3


@pytest.mark.parametrize('mode', ['average', 'exact', 'shared'])
def test_mpt_product_is_a_source_peft_reads_and_target_inits_agree(tmp_path, mode):
  """Our product is a `prompt_tuning_init_state_dict_path` for PEFT; PEFT's target init from
  it (AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK / ONLY_SOURCE_SHARED) equals ours."""
  from jaxprompt.methods.multitask_prompt import source_init
  trainable = mpt_trainable(seed=4)
  tasks = ['src_a', 'src_b', 'src_c']
  path = get_method('multitask_prompt').save_product(trainable, {}, str(tmp_path / 'source'),
                                                     {'tasks': tasks})
  init = {'average': 'AVERAGE_SOURCE_TASKS', 'exact': 'EXACT_SOURCE_TASK',
          'shared': 'ONLY_SOURCE_SHARED'}[mode]
  torch.manual_seed(0)
  embedding = peft.tuners.multitask_prompt_tuning.MultitaskPromptEmbedding(
      mpt_config(num_tasks=1, prompt_tuning_init=init, prompt_tuning_init_state_dict_path=path,
                 prompt_tuning_init_task=1),
      torch.nn.Embedding(CONFIG.vocab_size, CONFIG.emb_dim))
  shared, cols, rows = source_init(path, LENGTH, CONFIG.emb_dim, RANK, 1, mode, 'src_b')
  np.testing.assert_array_equal(shared, t(embedding.embedding.weight))
  np.testing.assert_array_equal(shared, np.asarray(trainable['shared']))
  if mode == 'shared':
    assert cols is None and rows is None
  else:
    np.testing.assert_allclose(cols, t(embedding.prefix_task_cols), rtol=1e-6)
    np.testing.assert_allclose(rows, t(embedding.prefix_task_rows), rtol=1e-6)
