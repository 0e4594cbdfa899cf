"""PEFT adapters of the prompt family, both ways, through the real libraries.

Adapters saved by PEFT itself (`save_pretrained`) on a tiny random T5.1.1 of odd shapes (d = 24,
3 heads of 5 so heads x head_dim != d, encoder 3 / decoder 2 layers) are read by jaxprompt and
evaluated with the method's own `load_product` + `model_inputs`; the reference is the logits
of the same adapter loaded by `PeftModel.from_pretrained` (max |diff| <= 1e-4 x max |logit|):
  * P_TUNING (MLP encoder): its saved prompt (the encoder's output); exported back as a
    P_TUNING adapter that PEFT loads with jaxprompt's logits;
  * PREFIX_TUNING (with the projection MLP): the saved prefix rows, its layer layout checked
    against the backbone; exported back the same way;
  * continuing a PEFT run: the encoder weights saved beside the adapter
    (`prompt_encoder.safetensors`) become the jaxprompt run's trainable (`--init_from DIR`);
  * MULTITASK_PROMPT_TUNING: the task prompts, and `--mpt_source` of the adapter.
PEFT's seq2seq default num_transformer_submodules=2 (decoder virtual tokens) is refused.
The two round trips with logits are in the full tier (about 6 CPU-s each).
"""

from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_GATED, random_params

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')
from safetensors.torch import save_file  # noqa: E402

from jaxprompt.checkpoints import save_hf  # noqa: E402
from jaxprompt.checkpoints.peft import export_peft  # noqa: E402
from jaxprompt.config import RunConfig  # noqa: E402
from jaxprompt.methods import Context, get_method  # noqa: E402
from jaxprompt.model import Transformer  # noqa: E402
from jaxprompt.prompts.files import read_prompt  # noqa: E402

from conftest import DECODER_INPUTS, ENCODER_TOKENS, TARGETS, assert_close  # noqa: E402
import test_peft_family_parity as family  # noqa: E402 - PEFT -> jaxprompt weight mapping
import test_peft_prefix_parity as prefix  # noqa: E402

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings('ignore:.*is_gradient_checkpointing:FutureWarning')]

CONFIG = TINY_GATED.replace(emb_dim=24, num_heads=3, head_dim=5, dropout_rate=0.0,
                            num_encoder_layers=3, num_decoder_layers=2)
LENGTH, HIDDEN, RTOL = 5, 7, 1e-4
VALID = TARGETS > 0


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
  params = random_params(CONFIG, seed=17, std=0.2)
  directory = str(tmp_path_factory.mktemp('peft_family_interop_t5'))
  save_hf(params, CONFIG, directory)
  bb = types.SimpleNamespace(module=Transformer(CONFIG), params=params, path=directory,
                             fingerprint=None, name=directory)
  return bb


def context(bb, method: str, init_from=None, **options) -> Context:
  m = get_method(method)
  return Context(bb, 't', ('t',), None, None, RunConfig(method=method, prompt_length=LENGTH,
                                                        init_from=init_from), m.Options(**options))


def peft_save(bb, config, out, encoder=False):
  """A PEFT model of `config` on the backbone, saved by PEFT (and its encoder's state dict)."""
  model = family.peft_model(bb.path, config)
  model.save_pretrained(out)
  if encoder:
    save_file({k: v.contiguous() for k, v in model.prompt_encoder['default'].state_dict().items()},
              os.path.join(out, 'prompt_encoder.safetensors'))
  return model


def peft_loaded_logits(bb, adapter):
  """PEFT's logits of a saved adapter, as `PeftModel.from_pretrained` loads it."""
  loaded = peft.PeftModel.from_pretrained(prefix.hf_base(bb.path), adapter).eval()
  with torch.no_grad():
    logits, _ = prefix.peft_logits_and_loss(loaded, backward=False)
  return loaded, logits


def jax_logits(bb, method: str, trainable):
  def logits(trainable, backbone):
    params, prompt = get_method(method).model_inputs(trainable, {'backbone': backbone}, {})
    return bb.module.apply({'params': params}, jnp.asarray(ENCODER_TOKENS),
                           jnp.asarray(DECODER_INPUTS), jnp.asarray(TARGETS),
                           enable_dropout=False, prompt=prompt)
  return np.asarray(jax.jit(logits)(trainable, bb.params))


def close_logits(ours, reference, what):
  assert 1.0 < np.abs(reference[VALID]).max() < 100.0
  assert_close(ours[VALID], reference[VALID], what, RTOL)


@pytest.mark.slow
def test_p_tuning_adapter_both_ways_and_its_encoder(backbone, tmp_path):
  bb, adapter = backbone, str(tmp_path / 'p_tuning')
  model = peft_save(bb, peft.PromptEncoderConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=LENGTH, token_dim=CONFIG.emb_dim,
      num_transformer_submodules=1, encoder_reparameterization_type='MLP',
      encoder_hidden_size=HIDDEN), adapter, encoder=True)
  _, reference = peft_loaded_logits(bb, adapter)

  pf = read_prompt(adapter)
  assert pf.metadata['method'] == 'p_tuning' and pf.value.shape == (LENGTH, CONFIG.emb_dim)
  method = get_method('p_tuning')
  trainable, _ = method.load_product(adapter, context(bb, 'p_tuning'))
  ours = jax_logits(bb, 'p_tuning', trainable)
  close_logits(ours, reference, 'PEFT P-tuning adapter in jaxprompt')
  plain = jax_logits(bb, 'model_tuning', bb.params)  # the backbone alone
  assert np.abs(plain - reference)[VALID].max() > 1e-2  # the prompt matters

  # Continue the PEFT run: its encoder weights are the trainable, and produce its prompt.
  ctx = context(bb, 'p_tuning', init_from=adapter, encoder_hidden_size=HIDDEN)
  start, _ = method.init(jax.random.PRNGKey(0), ctx)
  expected = family.ptuning_params_of(model.prompt_encoder['default'], 'mlp')
  jax.tree_util.tree_map(np.testing.assert_array_equal, start, expected)
  assert_close(method.product_value(start), pf.value, 'continued encoder prompt', RTOL)
  with pytest.raises(Exception, match='--encoder_hidden_size 7') as e:
    method.init(jax.random.PRNGKey(0), context(bb, 'p_tuning', init_from=adapter))
  assert '\n' not in str(e.value)

  # A jaxprompt product back to PEFT: a P_TUNING adapter with jaxprompt's logits.
  product = method.save_product(start, {}, str(tmp_path / 'product'),
                                method.product_metadata(ctx) | {'backbone': bb.path})
  out = export_peft(product, str(tmp_path / 'exported'))
  loaded, back = peft_loaded_logits(bb, out)
  assert loaded.peft_config['default'].peft_type == peft.PeftType.P_TUNING
  close_logits(jax_logits(bb, 'p_tuning', start), back, 'exported P-tuning product in PEFT')


@pytest.mark.slow
def test_prefix_adapter_both_ways_and_its_encoder(backbone, tmp_path):
  bb, adapter = backbone, str(tmp_path / 'prefix')
  model = peft_save(bb, peft.PrefixTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=LENGTH,
      token_dim=CONFIG.num_heads * CONFIG.head_dim, num_attention_heads=CONFIG.num_heads,
      prefix_projection=True, encoder_hidden_size=HIDDEN), adapter, encoder=True)
  _, reference = peft_loaded_logits(bb, adapter)

  pf = read_prompt(adapter)
  assert (pf.metadata['method'], pf.metadata['prefix_layout'], pf.metadata['num_layers']) == (
      'prefix_tuning', 'peft', 3)
  method = get_method('prefix_tuning')
  trainable, _ = method.load_product(adapter, context(bb, 'prefix_tuning'))
  close_logits(jax_logits(bb, 'prefix_tuning', trainable), reference,
               'PEFT prefix adapter in jaxprompt')

  # Continue the PEFT run from its projection MLP.
  ctx = context(bb, 'prefix_tuning', init_from=adapter, prefix_projection=True,
                encoder_hidden_size=HIDDEN)
  start, _ = method.init(jax.random.PRNGKey(0), ctx)
  expected = prefix.trainable_of(model.prompt_encoder['default'], True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, start, expected)
  with pytest.raises(Exception, match='--prefix_projection True'):
    method.init(jax.random.PRNGKey(0), context(bb, 'prefix_tuning', init_from=adapter))

  # Read from PEFT, exported back to PEFT: the same logits.
  out = export_peft(adapter, str(tmp_path / 'exported'))
  _, back = peft_loaded_logits(bb, out)
  close_logits(back, reference, 'PEFT prefix round trip')

  # Another backbone (4 decoder layers): the layer layout is refused in one line.
  deeper = types.SimpleNamespace(module=Transformer(CONFIG.replace(num_decoder_layers=4)),
                                 params=None, path=None, fingerprint=None, name='deeper')
  with pytest.raises(ValueError, match='a prefix for 3 layers') as e:
    method.load_product(adapter, context(deeper, 'prefix_tuning'))
  assert '\n' not in str(e.value) and adapter in str(e.value)


def test_seq2seq_default_two_submodules_is_refused(backbone, tmp_path):
  """PEFT's default for seq2seq: the LSTM encoder reads 2P tokens, P of them the decoder's."""
  adapter = str(tmp_path / 'two')
  peft_save(backbone, peft.PromptEncoderConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=LENGTH, token_dim=CONFIG.emb_dim,
      encoder_reparameterization_type='LSTM', encoder_hidden_size=HIDDEN), adapter, encoder=True)
  for call in (lambda: read_prompt(adapter),
               lambda: get_method('p_tuning').init(jax.random.PRNGKey(0), context(
                   backbone, 'p_tuning', init_from=adapter, encoder_type='lstm',
                   encoder_hidden_size=HIDDEN))):
    with pytest.raises(ValueError, match='num_transformer_submodules=2') as e:
      call()
    assert '\n' not in str(e.value) and 'num_transformer_submodules=1' in str(e.value)


def test_mpt_adapter_is_a_source_and_a_stack(backbone, tmp_path):
  from jaxprompt.methods.multitask_prompt import source_init
  adapter = str(tmp_path / 'mpt')
  model = peft_save(backbone, peft.MultitaskPromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=LENGTH, token_dim=CONFIG.emb_dim,
      num_transformer_submodules=1, num_ranks=2, num_tasks=3), adapter)
  encoder = model.prompt_encoder['default']
  with torch.no_grad():  # factors away from their near-zero start, so the tasks differ
    encoder.prefix_task_cols.normal_()
    encoder.prefix_task_rows.normal_()
    model.save_pretrained(adapter)
    reference = model.get_prompt(batch_size=3, task_ids=torch.tensor([0, 1, 2])).numpy()
  pf = read_prompt(adapter)
  assert pf.metadata['method'] == 'multitask_prompt' and pf.metadata['tasks'] == ['0', '1', '2']
  assert_close(pf.value, reference, 'MPT task prompts', RTOL)
  shared, cols, rows = source_init(adapter, LENGTH, CONFIG.emb_dim, 2, 1, 'exact', '1')
  np.testing.assert_array_equal(shared, encoder.embedding.weight.detach().numpy())
  np.testing.assert_array_equal(cols[0], encoder.prefix_task_cols[1].detach().numpy())
  np.testing.assert_array_equal(rows[0], encoder.prefix_task_rows[1].detach().numpy())
