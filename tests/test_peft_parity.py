"""Parity with Hugging Face PEFT prompt tuning: same prompt + same weights -> same numbers.

A tiny random T5.1.1 (gated-gelu, untied logits, unequal encoder/decoder depths) is written
with `save_hf` and loaded by transformers in float32; PEFT wraps it with
`PromptTuningConfig(SEQ_2_SEQ_LM, num_virtual_tokens=P, num_transformer_submodules=1)` and
its prompt embedding is overwritten with jaxprompt's prompt. Both sides then see a prefix
prompt with an all-ones mask in front of padded inputs. Compared, to 1e-4:

  * decoder logits at valid target positions (T5X also masks padded decoder *queries*,
    HF does not, so padded rows differ by design);
  * the loss: summed token cross-entropy over non-pad targets (z_loss 0 in jaxprompt,
    torch `cross_entropy(reduction='sum', ignore_index=-100)`, and PEFT's own mean loss
    times the token count);
  * the gradient with respect to the prompt: `jax.grad` (and the real jitted train step
    with SGD(1)) against torch autograd on PEFT's prompt embedding weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_GATED, random_params

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from jaxprompt.checkpoints import save_hf
from jaxprompt.model import Transformer, loss_and_metrics
from jaxprompt.prompts import get_prompt, prompt_tree
from jaxprompt.train.steps import LossConfig, init_state, make_train_step, prompt_inputs

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings('ignore:.*is_gradient_checkpointing:FutureWarning')]

CONFIG = TINY_GATED.replace(dropout_rate=0.0)
PROMPT_LENGTH = 4
ATOL = 1e-4

from conftest import DECODER_INPUTS, ENCODER_TOKENS, TARGETS  # noqa: E402 - the parity batch
VALID = TARGETS > 0


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  params = random_params(CONFIG, seed=5, std=0.2)
  directory = tmp_path_factory.mktemp('peft_parity_t5')
  save_hf(params, CONFIG, str(directory))
  prompt = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (PROMPT_LENGTH, CONFIG.emb_dim),
                                         jnp.float32, -0.5, 0.5)) * 3.0  # O(1) like embeddings
  return params, directory, prompt


@pytest.fixture(scope='module')
def reference(setup):
  _, directory, prompt = setup
  return peft_outputs(directory, prompt)


# ----------------------------------------------------------------------------- jaxprompt side


@jax.jit
def _logits(params, prompt):
  return Transformer(CONFIG).apply({'params': params}, ENCODER_TOKENS, DECODER_INPUTS, TARGETS,
                                   enable_dropout=False, prompt=prompt)


def jax_logits(params, prompt):
  return np.asarray(_logits(params, None if prompt is None else jnp.asarray(prompt)))


@jax.jit
def jax_loss_and_grad(prompt, params):
  return jax.value_and_grad(jax_loss)(prompt, params)


def jax_loss(prompt, params):
  logits = Transformer(CONFIG).apply({'params': params}, ENCODER_TOKENS, DECODER_INPUTS, TARGETS,
                                     enable_dropout=False, prompt=prompt)
  loss, _ = loss_and_metrics(logits, jnp.asarray(TARGETS), jnp.asarray(VALID, jnp.float32),
                             z_loss=0.0)
  return loss


# ----------------------------------------------------------------------------- PEFT side


def peft_outputs(directory, prompt):
  """(logits, summed CE, PEFT's own mean loss, d loss / d prompt) from PEFT prompt tuning."""
  torch.manual_seed(0)
  base = transformers.T5ForConditionalGeneration.from_pretrained(str(directory),
                                                                 dtype=torch.float32)
  config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM,
                                   num_virtual_tokens=PROMPT_LENGTH,
                                   num_transformer_submodules=1)
  model = peft.get_peft_model(base, config).eval()
  embedding = model.prompt_encoder['default'].embedding.weight
  assert tuple(embedding.shape) == prompt.shape
  with torch.no_grad():
    embedding.copy_(torch.from_numpy(prompt))
  trainable = [p for p in model.parameters() if p.requires_grad]
  assert len(trainable) == 1 and trainable[0] is embedding  # the backbone is frozen

  labels = torch.tensor(np.where(VALID, TARGETS, -100), dtype=torch.long)
  out = model(input_ids=torch.tensor(ENCODER_TOKENS, dtype=torch.long),
              attention_mask=torch.tensor(ENCODER_TOKENS > 0, dtype=torch.long),
              decoder_input_ids=torch.tensor(DECODER_INPUTS, dtype=torch.long),
              labels=labels)
  summed = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                             labels.reshape(-1), ignore_index=-100,
                                             reduction='sum')
  summed.backward()
  return (out.logits.detach().numpy(), float(summed.detach()), float(out.loss.detach()),
          embedding.grad.detach().numpy().copy())


def hf_logits_without_prompt(directory):
  base = transformers.T5ForConditionalGeneration.from_pretrained(str(directory),
                                                                 dtype=torch.float32).eval()
  with torch.no_grad():
    return base(input_ids=torch.tensor(ENCODER_TOKENS, dtype=torch.long),
                attention_mask=torch.tensor(ENCODER_TOKENS > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(DECODER_INPUTS, dtype=torch.long)).logits.numpy()


# ----------------------------------------------------------------------------- tests


def test_logits_loss_and_prompt_gradient_match_peft(setup, reference):
  params, _, prompt = setup
  ref_logits, ref_loss, ref_mean_loss, ref_grad = reference

  logits = jax_logits(params, prompt)
  assert logits.shape == ref_logits.shape == TARGETS.shape + (CONFIG.vocab_size,)
  assert 1.0 < np.abs(ref_logits[VALID]).max() < 100.0  # O(1-10) logits, not degenerate
  np.testing.assert_allclose(logits[VALID], ref_logits[VALID], rtol=0, atol=ATOL)

  loss, grad = jax_loss_and_grad(jnp.asarray(prompt), params)
  n_tokens = int(VALID.sum())
  assert ref_loss > 1.0
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6, atol=ATOL)
  np.testing.assert_allclose(float(loss), ref_mean_loss * n_tokens, rtol=1e-6, atol=ATOL)

  grad = np.asarray(grad)
  assert grad.shape == ref_grad.shape == prompt.shape
  assert np.abs(ref_grad).max() > 1e-2  # the prompt gets a real gradient
  np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=ATOL)


def test_train_step_gradient_matches_peft(setup, reference):
  """The jitted generic train step (prompt_inputs, SGD lr 1, z_loss 0, no dropout) moves the
  prompt by exactly minus PEFT's gradient, and reports PEFT's loss."""
  params, _, prompt = setup
  _, ref_loss, _, ref_grad = reference

  tx = optax.sgd(1.0)
  step = jax.jit(make_train_step(Transformer(CONFIG), prompt_inputs, tx,
                                 LossConfig(z_loss=0.0), dropout=False))
  trainable = prompt_tree(jnp.asarray(prompt))
  batch = {'encoder_input_tokens': jnp.asarray(ENCODER_TOKENS),
           'decoder_input_tokens': jnp.asarray(DECODER_INPUTS),
           'decoder_target_tokens': jnp.asarray(TARGETS),
           'decoder_loss_weights': jnp.asarray(VALID, jnp.float32)}
  state, metrics = step(init_state(trainable, tx), {'backbone': params}, batch,
                        jax.random.PRNGKey(0))
  assert not bool(metrics['nonfinite'])
  np.testing.assert_allclose(float(metrics['loss']), ref_loss, rtol=1e-6, atol=ATOL)
  moved = np.asarray(get_prompt(state.trainable)) - prompt
  np.testing.assert_allclose(-moved, ref_grad, rtol=0, atol=ATOL)


def test_prompt_matters(setup):
  """Guards the comparison: removing the prompt changes the logits on both sides."""
  params, directory, prompt = setup
  with_prompt = jax_logits(params, prompt)
  without = jax_logits(params, None)
  assert np.abs(with_prompt[VALID] - without[VALID]).max() > 0.1
  hf_without = hf_logits_without_prompt(directory)
  np.testing.assert_allclose(without[VALID], hf_without[VALID], rtol=0, atol=ATOL)
  assert np.abs(with_prompt[VALID] - hf_without[VALID]).max() > 0.1
  other = prompt[::-1].copy()  # same values, other order: attention is order-aware
  assert np.abs(jax_logits(params, other)[VALID] - with_prompt[VALID]).max() > 1e-2
