"""P-tuning (Liu et al. 2021, "GPT understands, too"): the prompt is a prompt encoder's output.

    prompt = MLP(E)                  encoder_type 'mlp'
    prompt = MLP(BiLSTM(E))          encoder_type 'lstm'

E is a trainable [P, d] embedding. The encoder is the one of HF PEFT's `PromptEncoder`
(peft/tuners/p_tuning/model.py, PEFT 0.21), reimplemented here:

* 'mlp': Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, d) (always three layers);
* 'lstm': an `encoder_num_layers`-layer (PEFT's default 2) bidirectional LSTM of h units per
  direction (torch's cell: gates i, f, g, o; an input and a hidden bias), then
  Linear(2h, 2h) - ReLU - Linear(2h, d);
* initialised as torch initialises these layers (PEFT keeps torch's defaults): E ~ N(0, 1),
  Linear weight and bias ~ U(+-1/sqrt(fan_in)), LSTM weights and biases ~ U(+-1/sqrt(h)).

h is `encoder_hidden_size` (PEFT has no default and requires it; here the model width d).
PEFT's `encoder_dropout` (between LSTM layers, default 0) is not implemented.

The encoder exists for training only: the product is the plain [P, d] prompt it produces (as
PEFT saves a P-tuning adapter), so `jaxprompt eval`, `export --to peft`, `--init_from` and a
SPoT library read it like any prompt. The default optimizer is AdamW, lr 1e-3, no weight decay
(an encoder's weights do not take prompt tuning's Adafactor step of 0.3).

`ReparameterizedPrompt` is the shared base of this and `residual_prompt`: any method whose
trainable is a network that yields one [P, d] prompt.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.core import unfreeze

from jaxprompt.config import ConfigError
from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.prompts import prompt as prompt_lib

ENCODER_TYPES = ('mlp', 'lstm')


# ---------------------------------------------------------------------------------------------
# A prompt made by a network.

def is_plain_prompt(trainable) -> bool:
  """True for a plain prompt tree (`prompt_lib.prompt_tree`), as a product reads back."""
  return isinstance(trainable, dict) and set(trainable) == {prompt_lib.PROMPT_PATH[0]}


def adamw(method: Method, ctx: Context) -> optax.GradientTransformation:
  """AdamW at the method's (or the run's) learning rate and weight decay."""
  c = ctx.config
  lr = method.learning_rate if c.learning_rate is None else c.learning_rate
  wd = method.weight_decay if c.weight_decay is None else c.weight_decay
  return optax.adamw(lr, weight_decay=wd or 0.0)


class ReparameterizedPrompt(Method):
  """A method whose trainable is a network that yields one [P, d] prompt (`prompt_of`); its
  product is that prompt, which reads back as a plain prompt tree."""

  learning_rate = 1e-3
  weight_decay = None

  @staticmethod
  def prompt_of(trainable) -> jax.Array:
    raise NotImplementedError

  def model_inputs(self, trainable, frozen, batch):
    del batch
    if is_plain_prompt(trainable):  # a product read back for evaluation
      return frozen['backbone'], prompt_lib.get_prompt(trainable)
    return frozen['backbone'], self.prompt_of(trainable)

  def optimizer(self, ctx: Context):
    return adamw(self, ctx)

  def product_value(self, trainable) -> np.ndarray:
    if is_plain_prompt(trainable):
      return super().product_value(trainable)
    return np.asarray(jax.device_get(jax.jit(self.prompt_of)(trainable)))


# ---------------------------------------------------------------------------------------------
# PEFT's prompt encoder, in Flax.

def torch_uniform(bound: float):
  """U(-bound, bound): torch's default init of Linear (bound 1/sqrt(fan_in)) and LSTM
  (1/sqrt(hidden)) weights and biases."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class TorchDense(nn.Module):
  """`torch.nn.Linear` as Flax holds it: kernel [in, out] (torch's weight transposed), bias."""

  features: int

  @nn.compact
  def __call__(self, x):
    bound = 1.0 / math.sqrt(x.shape[-1])
    kernel = self.param('kernel', torch_uniform(bound), (x.shape[-1], self.features))
    bias = self.param('bias', torch_uniform(bound), (self.features,))
    return x @ kernel + bias


class LSTMDirection(nn.Module):
  """One direction of one layer of `torch.nn.LSTM` over a [T, in] sequence (zero initial state):
  gates = x W_ih + b_ih + h W_hh + b_hh split as (i, f, g, o); c' = f c + i g; h' = o tanh(c')."""

  hidden: int
  reverse: bool = False

  @nn.compact
  def __call__(self, x):
    h_size, init = self.hidden, torch_uniform(1.0 / math.sqrt(self.hidden))
    w_ih = self.param('w_ih', init, (x.shape[-1], 4 * h_size))
    w_hh = self.param('w_hh', init, (h_size, 4 * h_size))
    b_ih = self.param('b_ih', init, (4 * h_size,))
    b_hh = self.param('b_hh', init, (4 * h_size,))
    inputs = x @ w_ih + b_ih + b_hh  # [T, 4h]: the input part of every step at once

    def cell(carry, gates_in):
      h, c = carry
      i, f, g, o = jnp.split(gates_in + h @ w_hh, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    zeros = jnp.zeros((h_size,), x.dtype)
    _, out = jax.lax.scan(cell, (zeros, zeros), inputs, reverse=self.reverse)
    return out


class PromptEncoder(nn.Module):
  """[P, d] trainable embedding -> [P, d] prompt, as PEFT's P-tuning `PromptEncoder`."""

  length: int
  width: int
  hidden: int
  encoder_type: str = 'mlp'
  lstm_layers: int = 2

  @nn.compact
  def __call__(self):
    x = self.param('embedding', jax.nn.initializers.normal(1.0), (self.length, self.width))
    if self.encoder_type == 'lstm':
      for layer in range(self.lstm_layers):
        x = jnp.concatenate([LSTMDirection(self.hidden, name=f'lstm_{layer}_forward')(x),
                             LSTMDirection(self.hidden, reverse=True,
                                           name=f'lstm_{layer}_backward')(x)], axis=-1)
      sizes = (2 * self.hidden, self.width)
    else:
      sizes = (self.hidden, self.hidden, self.width)
    for i, size in enumerate(sizes):
      x = TorchDense(size, name=f'mlp_{i}')(x)
      if i < len(sizes) - 1:
        x = jax.nn.relu(x)
    return x


def encoder_for(params) -> PromptEncoder:
  """The `PromptEncoder` whose parameters `params` are (its sizes read from their shapes)."""
  length, width = params['embedding'].shape
  lstm_layers = sum(1 for k in params if k.startswith('lstm_') and k.endswith('_forward'))
  if lstm_layers:
    return PromptEncoder(length, width, params['lstm_0_forward']['w_hh'].shape[0], 'lstm',
                         lstm_layers)
  return PromptEncoder(length, width, params['mlp_0']['kernel'].shape[1], 'mlp')


def encode(params) -> jax.Array:
  """The prompt [P, d] of prompt-encoder parameters."""
  return encoder_for(params).apply({'params': params})


def continue_peft(adapter_dir: str, fresh, ctx: Context):
  """The encoder weights of a PEFT P-tuning run (`--init_from ADAPTER_DIR` holding
  `prompt_encoder.safetensors`, see `jaxprompt.checkpoints.peft`) as this run's trainable, its
  options checked against the adapter's config (`fresh`: this run's freshly initialised one)."""
  from jaxprompt.checkpoints import peft as peft_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(adapter_dir):
    raise ConfigError(f'--init_from {adapter_dir}: a p_tuning run starts from the encoder '
                      'weights of a PEFT P-tuning adapter directory (see docs/methods.md); a '
                      'prompt has no encoder to continue')
  config, params = peft_lib.peft_encoder_params(adapter_dir)
  if config['peft_type'] != 'P_TUNING':
    raise ConfigError(f'--init_from {adapter_dir}: a {config["peft_type"]} adapter; p_tuning '
                      'continues a P_TUNING one')
  o = ctx.options
  kind = str(config.get('encoder_reparameterization_type') or 'MLP').lower()
  if kind != o.encoder_type:
    raise ConfigError(f'--init_from {adapter_dir}: a PEFT {kind.upper()} encoder; pass '
                      f'--encoder_type {kind}')
  length, width = params['embedding'].shape
  hidden = params['mlp_0']['kernel'].shape[1] if 'mlp_0' in params else None
  if kind == 'lstm':
    hidden = params['lstm_0_forward']['w_hh'].shape[0] if 'lstm_0_forward' in params else None
  layers = sum(1 for k in params if k.endswith('_forward'))
  for value, want, flag in ((length, ctx.config.prompt_length, '--prompt_length'),
                            (hidden, o.encoder_hidden_size or ctx.width, '--encoder_hidden_size'),
                            (layers, o.encoder_num_layers if kind == 'lstm' else 0,
                             '--encoder_num_layers')):
    if value is not None and value != want:
      raise ConfigError(f'--init_from {adapter_dir}: its encoder has {flag[2:]} {value}, this '
                        f'run {want}; pass {flag} {value}')
  if width != ctx.width:
    raise ConfigError(f'--init_from {adapter_dir}: an encoder of width {width}, but the model '
                      f'width is {ctx.width}; continue it on the backbone it was trained on')
  peft_lib.check_encoder_shapes(params, fresh, adapter_dir)
  return jax.tree_util.tree_map(jnp.asarray, params)


# ---------------------------------------------------------------------------------------------
# The method.

@dataclasses.dataclass(frozen=True)
class PTuningOptions:
  encoder_type: str = 'mlp'  # 'mlp' or 'lstm' (PEFT's encoder_reparameterization_type)
  encoder_hidden_size: int | None = None  # h; None: the model width
  encoder_num_layers: int = 2  # LSTM layers (PEFT's default; the MLP always has three layers)

  def __post_init__(self):
    if self.encoder_type not in ENCODER_TYPES:
      raise ConfigError(f'encoder_type (--encoder_type) must be one of {", ".join(ENCODER_TYPES)},'
                        f' got {self.encoder_type!r}')
    for name in ('encoder_hidden_size', 'encoder_num_layers'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f'{name} (--{name}) must be a positive integer, got {value!r}')


@register
class PTuning(ReparameterizedPrompt):
  """P-tuning: a [P, d] prompt produced by PEFT's prompt encoder (MLP or LSTM + MLP)."""

  name = 'p_tuning'
  Options = PTuningOptions

  def init(self, rng, ctx: Context):
    o = ctx.options
    module = PromptEncoder(ctx.config.prompt_length, ctx.width,
                           o.encoder_hidden_size or ctx.width, o.encoder_type,
                           o.encoder_num_layers)
    params = unfreeze(module.init(rng)['params'])
    if ctx.config.init_from:  # continue a PEFT P-tuning run with its encoder weights
      return continue_peft(ctx.config.init_from, params, ctx), {}
    return params, {}

  prompt_of = staticmethod(encode)

  def product_metadata(self, ctx: Context) -> dict[str, Any]:
    o = ctx.options
    return dict(encoder_type=o.encoder_type, encoder_hidden_size=o.encoder_hidden_size or ctx.width,
                encoder_num_layers=o.encoder_num_layers)

  def contract_options(self) -> dict[str, Any]:
    return {'encoder_type': 'lstm', 'encoder_hidden_size': 6, 'encoder_num_layers': 1}


__all__ = ['ENCODER_TYPES', 'LSTMDirection', 'PTuning', 'PTuningOptions', 'PromptEncoder',
           'ReparameterizedPrompt', 'TorchDense', 'adamw', 'continue_peft', 'encode', 'encoder_for',
           'is_plain_prompt', 'torch_uniform']
