"""XPrompt (Ma et al., EMNLP 2022): hierarchical structured pruning of a tuned soft prompt.

Stage 1 is prompt tuning (method `xprompt` with no masks is exactly prompt tuning; its run
records the XPrompt options in the manifest). Stage 2 scores and prunes: a token mask gamma
[m] and a piece mask zeta [m, k] (each token's vector split into k pieces, contiguous by the
paper, strided as an option) multiply the prompt, P_hat = P * gamma * zeta; the importance of
an entry is I = E_x |dL(x)/d mask| at the current masks (pruned entries 0, the rest 1): each
training example's own gradient, its absolute value, then the mean over the examples of a few
training batches (eq. 3 of the paper, after Michel et al. 2019). One jitted backward pass per
batch gives every example's gradient, the masks carrying one copy per example. Tokens are
pruned first, strictly by importance rank, then pieces within surviving tokens, round after
round to each target fraction of the prompt's parameters (10%..90%); the masks are nested
across fractions and at least one token survives. Stage 3 rewinds: the surviving entries
restart from their stage-1 values (`init_from` the stage-1 prompt), pruned entries are zero and
never updated, and the run is retrained with stage 1's schedule through the one run driver
(method `xprompt` with `masks=FILE`); the fraction with the best validation metric is chosen.

    jaxprompt tune --gin_file=runs/xprompt.gin --gin.MODEL_DIR="'runs/x'" ...   # stage 1
    jaxprompt prune --prompt runs/x/prompt_best.safetensors --task T --backbone B  # 2 and 3

The masks travel in the prompt file (`token_mask` [m], `piece_mask` [m, k], metadata
`xprompt`), so `eval`, `info`, transfer init (`PromptFile.masked_value()`) and every export
see the pruned prompt. A pruned token is a zero vector that still sits in the sequence, as in
the paper; `drop_pruned=True` instead removes pruned tokens from the encoder's sequence (and so
from attention); later prompt tokens then sit that many positions closer to the text (the model
seam has no per-position prompt mask, see docs/xprompt.md).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt.config import ConfigError, RunConfig
from jaxprompt.methods import Command, register
from jaxprompt.methods.base import Context, Method
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.train import agreement

PIECE_LAYOUTS = ('contiguous', 'strided')
IMPORTANCE_KINDS = ('absolute', 'signed')
IMPORTANCE_UNITS = ('example', 'batch')
MASK_SCORES = ('importance', 'random')
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
STATE_FILE = 'prune.json'


def _literal(value):
  """Command-line text ('0.1,0.5', '16', 'true') to a Python value; other values unchanged."""
  if isinstance(value, str):
    text = value.strip()
    if text.lower() in ('true', 'false'):
      return text.lower() == 'true'
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return value
  return value


def check_fractions(fractions) -> tuple[float, ...]:
  """Sorted unique fractions, each strictly inside (0, 1); one clear error otherwise."""
  fractions = _literal(fractions)
  if isinstance(fractions, (int, float)) and not isinstance(fractions, bool):
    fractions = (fractions,)
  try:
    values = tuple(float(f) for f in fractions)
  except (TypeError, ValueError):
    raise ConfigError(f'prune_fractions (--prune_fractions): a list of numbers in (0, 1), got '
                      f'{fractions!r}') from None
  bad = [f for f in values if not 0.0 < f < 1.0]
  if not values or bad:
    raise ConfigError(f'prune_fractions (--prune_fractions): every fraction must lie strictly '
                      f'between 0 and 1, got {bad or "none"}')
  return tuple(sorted(set(values)))


@dataclasses.dataclass(frozen=True)
class XPromptOptions:
  """XPrompt's own options (flags --NAME of `jaxprompt tune`, gin `tune.NAME`).

  masks: a prompt file whose `token_mask` / `piece_mask` are applied (from `jaxprompt prune`);
    None: all ones (stage 1, plain prompt tuning).
  pieces: k, pieces per token vector (must divide the width).
  piece_layout: 'contiguous' (the paper: piece j is dims [j d/k, (j+1) d/k)) or 'strided'
    (piece j is dims j, j + k, j + 2k, ...).
  drop_pruned: remove pruned tokens from the encoder sequence instead of feeding zero vectors.
  prune_fractions: the target fractions of pruned prompt parameters searched by `prune`.
  importance_batches: training batches averaged per importance pass.
  importance_kind: 'absolute' (E|dL/dmask|, the paper) or 'signed' (-E[dL/dmask], the
    first-order loss increase when the entry is removed).
  importance_per: 'example' (the paper: |dL(x)/dmask| per example x, then the mean over
    examples) or 'batch' (|dL(batch)/dmask| per batch, then the mean over batches).
  token_share: share of each round's pruning done by whole tokens (the rest by pieces).
  mask_scores: 'importance', or 'random' scores (the control of the same sizes).
  """

  masks: str | None = None
  pieces: int = 16
  piece_layout: str = 'contiguous'
  drop_pruned: bool = False
  prune_fractions: tuple = DEFAULT_FRACTIONS
  importance_batches: int = 8
  importance_kind: str = 'absolute'
  importance_per: str = 'example'
  token_share: float = 0.5
  mask_scores: str = 'importance'

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    for name in ('pieces', 'importance_batches', 'token_share', 'drop_pruned'):
      set_(name, _literal(getattr(self, name)))
    set_('prune_fractions', check_fractions(self.prune_fractions))
    for name in ('pieces', 'importance_batches'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f'{name} (--{name}) must be a positive integer, got {value!r}')
    if not isinstance(self.drop_pruned, bool):
      raise ConfigError(f'drop_pruned (--drop_pruned) must be True or False, got '
                        f'{self.drop_pruned!r}')
    if not isinstance(self.token_share, (int, float)) or not 0 <= self.token_share <= 1:
      raise ConfigError(f'token_share (--token_share) must be in [0, 1], got {self.token_share!r}')
    for name, choices in (('piece_layout', PIECE_LAYOUTS), ('importance_kind', IMPORTANCE_KINDS),
                          ('importance_per', IMPORTANCE_UNITS), ('mask_scores', MASK_SCORES)):
      if getattr(self, name) not in choices:
        raise ConfigError(f'{name} (--{name}): unknown value {getattr(self, name)!r}; choose '
                          f'one of {", ".join(choices)}')
    if self.masks is not None and not isinstance(self.masks, str):
      raise ConfigError(f'masks (--masks) must be a prompt file path, got {self.masks!r}')


# ---- masks ----

def check_pieces(width: int, pieces: int, where: str = 'prompt') -> None:
  if pieces < 1 or width % pieces:
    raise ValueError(f'{where}: {pieces} pieces do not divide the prompt width {width}; choose '
                     f'--pieces among {[k for k in range(1, min(width, 64) + 1) if width % k == 0]}')


def piece_index(width: int, pieces: int, layout: str = 'contiguous') -> np.ndarray:
  """[d] int32: the piece each dimension of a token vector belongs to."""
  check_pieces(width, pieces)
  dims = np.arange(width)
  if layout == 'contiguous':
    return (dims // (width // pieces)).astype(np.int32)
  if layout == 'strided':
    return (dims % pieces).astype(np.int32)
  raise ValueError(f'unknown piece layout {layout!r}; choose one of {PIECE_LAYOUTS}')


def element_mask(token_mask, piece_mask, index):
  """gamma [..., m], zeta [..., m, k], piece index [d] -> the [..., m, d] multiplier (numpy or
  jax); masks with a leading batch axis give one multiplier per example."""
  xp = jnp if isinstance(token_mask, jax.Array) or isinstance(piece_mask, jax.Array) else np
  return token_mask[..., None] * xp.take(piece_mask, index, axis=-1)


def kept_tokens(token_mask, piece_mask) -> np.ndarray:
  """Indices of tokens with at least one kept piece."""
  alive = (np.asarray(token_mask) > 0) & (np.asarray(piece_mask).sum(-1) > 0)
  return np.flatnonzero(alive).astype(np.int32)


def mask_extras(token_mask, piece_mask, layout: str, width: int,
                drop_pruned: bool = False) -> dict[str, np.ndarray]:
  """The frozen extras of a masked prompt (what `masked_inputs` reads)."""
  token_mask = np.asarray(token_mask, np.float32)
  piece_mask = np.asarray(piece_mask, np.float32)
  extras = {'token_mask': token_mask, 'piece_mask': piece_mask,
            'piece_index': piece_index(width, piece_mask.shape[-1], layout)}
  if drop_pruned:
    keep = kept_tokens(token_mask, piece_mask)
    if not len(keep):
      raise ValueError('the masks prune every token; at least one must be kept')
    extras['kept_tokens'] = keep
  return extras


def masked_inputs(trainable, frozen, batch):
  """The XPrompt mapping: frozen backbone, prompt * gamma * zeta (pruned tokens dropped from the
  sequence when the extras name the kept ones). Masks gamma [B, m], zeta [B, m, k] (one copy per
  example, as the importance pass uses them) give a [B, m, d] prompt, one per example."""
  del batch
  prompt = prompt_lib.get_prompt(trainable)
  prompt = prompt * element_mask(frozen['token_mask'], frozen['piece_mask'],
                                 frozen['piece_index'])
  if 'kept_tokens' in frozen:
    prompt = jnp.take(prompt, frozen['kept_tokens'], axis=-2)
  return frozen['backbone'], prompt


def unpruned_train_engine(bb, value, pieces: int, layout: str = 'contiguous'):
  """`(engine, state)` of the method's own train step (T5X Adafactor lr 0.3, weight decay 1e-5)
  on an all-kept mask: what the importance pass's cost is measured against."""
  from jaxprompt.train import engine as engine_lib
  from jaxprompt.train.optimizers import t5x_adafactor
  m, d = np.shape(value)
  extras = mask_extras(np.ones(m), np.ones((m, pieces)), layout, d)
  return engine_lib.build_engine(bb.module, masked_inputs,
                                 t5x_adafactor(0.3, weight_decay_rate=1e-5),
                                 {'backbone': bb.params, **extras}, prompt_lib.prompt_tree(value))


def zero_masked_updates(mask: np.ndarray) -> optax.GradientTransformation:
  """Multiplies the prompt's updates by the [m, d] mask: pruned entries never move."""
  mask = np.asarray(mask, np.float32)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u: u * mask.astype(u.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def read_masks(pf, path: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(gamma [m], zeta [m, k], layout) of a prompt file; all ones when it has none. Checks shapes."""
  meta = pf.metadata.get('xprompt') or {}
  if pf.value.ndim != 2:
    raise ValueError(f'{path}: holds a stack of {pf.value.shape[0]} prompts; XPrompt masks one '
                     '[P, d] prompt')
  m, d = pf.value.shape
  layout = meta.get('piece_layout', 'contiguous')
  if layout not in PIECE_LAYOUTS:
    raise ValueError(f'{path}: unknown piece layout {layout!r} in its xprompt metadata')
  token = pf.token_mask
  piece = pf.piece_mask
  if piece is None and meta.get('piece_mask') is not None:
    piece = np.asarray(meta['piece_mask'], np.float32)
  if token is None:
    token = np.ones((m,), np.float32)
  if piece is None:
    piece = np.ones((m, int(meta.get('pieces', 1))), np.float32)
  token, piece = np.asarray(token, np.float32), np.asarray(piece, np.float32)
  if token.shape != (m,):
    raise ValueError(f'{path}: token mask of shape {token.shape} does not match its prompt of '
                     f'length {m} (expected ({m},))')
  if piece.ndim != 2 or piece.shape[0] != m:
    raise ValueError(f'{path}: piece mask of shape {piece.shape} does not match its prompt of '
                     f'length {m} (expected ({m}, k))')
  if d % piece.shape[1]:
    raise ValueError(f'{path}: piece mask of {piece.shape[1]} pieces does not divide the prompt '
                     f'width {d}')
  for name, mask in (('token', token), ('piece', piece)):
    if not np.all((mask == 0) | (mask == 1)):
      raise ValueError(f'{path}: the {name} mask holds values other than 0 and 1')
  return token, piece, layout


def mask_summary(token_mask, piece_mask, width: int) -> dict[str, Any]:
  """kept tokens, kept pieces and trainable parameters of a pair of masks."""
  token_mask, piece_mask = np.asarray(token_mask), np.asarray(piece_mask)
  k = piece_mask.shape[-1]
  live = piece_mask * token_mask[:, None]
  return {'kept_tokens': int(len(kept_tokens(token_mask, piece_mask))),
          'kept_pieces': int(live.sum()), 'total_pieces': int(live.size),
          'trainable_parameters': int(live.sum()) * (width // k),
          'total_parameters': int(live.size) * (width // k)}


def product_meta(token_mask, piece_mask, layout: str, width: int, drop_pruned: bool,
                 **more) -> dict[str, Any]:
  meta = dict(pieces=int(piece_mask.shape[-1]), piece_layout=layout, drop_pruned=drop_pruned,
              **mask_summary(token_mask, piece_mask, width), **more)
  if layout != 'contiguous':  # files.py reads `piece_mask` as contiguous pieces
    meta['piece_mask'] = np.asarray(piece_mask, np.int32).tolist()
  return meta


def file_masks(token_mask, piece_mask, layout: str) -> dict[str, Any]:
  """The mask tensors a prompt file carries (`PromptFile` reads pieces as contiguous, so a strided
  piece mask travels in the metadata and the stored value is already zero where pruned)."""
  out = {'token_mask': np.asarray(token_mask, np.float32)}
  if layout == 'contiguous':
    out['piece_mask'] = np.asarray(piece_mask, np.float32)
  return out


# ---- the method ----

@register
class XPrompt(Method):
  name = 'xprompt'
  Options = XPromptOptions

  def _masks(self, ctx: Context):
    from jaxprompt.prompts.files import check_compatible, read_prompt
    opts, m, d = ctx.options, ctx.config.prompt_length, ctx.width
    if opts.masks is None:
      check_pieces(d, opts.pieces, 'xprompt')
      return (np.ones((m,), np.float32), np.ones((m, opts.pieces), np.float32),
              opts.piece_layout)
    pf = read_prompt(opts.masks)
    check_compatible(pf, d, ctx.backbone, path=opts.masks)
    token, piece, layout = read_masks(pf, opts.masks)
    if len(token) != m:
      raise ValueError(f'{opts.masks}: masks of a {len(token)}-token prompt, but the run\'s prompt '
                       f'length is {m}; set --prompt_length {len(token)}')
    return token, piece, layout

  def init(self, rng, ctx: Context):
    token, piece, layout = self._masks(ctx)
    extras = mask_extras(token, piece, layout, ctx.width, ctx.options.drop_pruned)
    trainable, _ = super().init(rng, ctx)
    value = np.asarray(prompt_lib.get_prompt(trainable), np.float32)
    value = value * element_mask(token, piece, extras['piece_index'])
    return prompt_lib.prompt_tree(value), extras

  model_inputs = staticmethod(masked_inputs)

  def optimizer(self, ctx: Context):
    token, piece, layout = self._masks(ctx)
    mask = element_mask(token, piece, piece_index(ctx.width, piece.shape[-1], layout))
    if np.all(mask == 1):
      return super().optimizer(ctx)
    return optax.chain(super().optimizer(ctx), zero_masked_updates(mask))

  def product_value(self, trainable) -> np.ndarray:
    return np.asarray(jax.device_get(prompt_lib.get_prompt(trainable)), np.float32)

  def product_masks(self, extras):
    layout = _layout_of(extras)
    width = len(extras['piece_index'])
    return dict(file_masks(extras['token_mask'], extras['piece_mask'], layout),
                xprompt=product_meta(extras['token_mask'], extras['piece_mask'], layout, width,
                                     'kept_tokens' in extras))

  def masked(self, value, extras):
    return np.asarray(value) * element_mask(extras['token_mask'], extras['piece_mask'],
                                            extras['piece_index'])

  def save_product(self, trainable, extras, path, metadata):
    value = self.masked(self.product_value(trainable), extras)
    return super().save_product(prompt_lib.prompt_tree(value), extras, path, metadata)

  def from_prompt_file(self, pf, path):
    token, piece, layout = read_masks(pf, path)
    drop = bool((pf.metadata.get('xprompt') or {}).get('drop_pruned', False))
    extras = mask_extras(token, piece, layout, pf.width, drop)
    value = np.asarray(pf.value, np.float32) * element_mask(token, piece, extras['piece_index'])
    return prompt_lib.prompt_tree(value), extras


def _layout_of(extras) -> str:
  index = np.asarray(extras['piece_index'])
  k = extras['piece_mask'].shape[-1]
  return 'strided' if k > 1 and index[1] == 1 else 'contiguous'


# ---- importance ----

def make_mask_loss(module, loss=None, prompt_position: int = 0) -> Callable:
  """`loss(masks, prompt, frozen, batch)`: the training loss of `batch` (dropout off) with the
  prompt masked by masks = {'token': gamma, 'piece': zeta}, shared ([m], [m, k]) or one copy per
  example ([B, m], [B, m, k]); the train step's mapping (`masked_inputs`) and loss.

  T5X's loss sums over examples: L(batch) = sum_x L(x), where L(x), the loss of one example, is
  its target tokens' cross-entropy plus z-loss (label smoothing as configured), summed over its
  target tokens (weighted by `decoder_loss_weights`) and divided by `loss_normalizing_factor`
  when one is set (a constant; none by default). A padding example (all weights 0) has L = 0.
  """
  from jaxprompt.train.steps import LossConfig, make_eval_step
  step = make_eval_step(module, masked_inputs, loss or LossConfig(), prompt_position)

  def loss_fn(masks, prompt, frozen, batch):
    frozen = dict(frozen, token_mask=masks['token'], piece_mask=masks['piece'])
    return step(prompt_lib.prompt_tree(prompt), frozen, batch)['loss']

  return loss_fn


def make_mask_gradient(module, loss=None, prompt_position: int = 0) -> Callable:
  """`grad(masks, prompt, frozen, batch)`: dL/dmasks at the given masks (pure; jit it), dropout
  off, with the training loss (`make_mask_loss`; its `loss_fn` attribute). Shared masks ([m],
  [m, k]) give the batch's gradient dL(batch)/dmask; one copy per example ([B, m], [B, m, k])
  gives each example's own dL(x)/dmask in the same one backward pass, since L(batch) =
  sum_x L(x) and example x's prompt depends on its own copy alone."""
  loss_fn = make_mask_loss(module, loss, prompt_position)

  def grad(masks, prompt, frozen, batch):
    return jax.grad(loss_fn)(masks, prompt, frozen, batch)

  grad.loss_fn = loss_fn
  return grad


def real_examples(batch) -> jax.Array:
  """[B] float: 1 for a real example, 0 for padding (`example_mask` 0, or no loss weight)."""
  from jaxprompt.data.features import EXAMPLE_MASK
  weights = batch.get('decoder_loss_weights')
  size = batch['decoder_target_tokens'].shape[0]
  real = jnp.ones((size,), bool) if weights is None else jnp.any(weights != 0, axis=-1)
  if EXAMPLE_MASK in batch:
    real = real & (batch[EXAMPLE_MASK] != 0)
  return real.astype(jnp.float32)


def make_importance_pass(module, loss=None, prompt_position: int = 0, per: str = 'example',
                         kind: str = 'absolute') -> Callable:
  """`one_pass(masks, prompt, frozen, batch) -> {'token': [m], 'piece': [m, k], 'count': n}`
  (pure; jit it): one batch's share of the importance at the masks ([m], [m, k]); the importance
  is the sum of 'token' (or 'piece') over batches divided by the sum of 'count'.

  per 'example' (the paper's E_x |dL(x)/dmask|): the masks get a batch axis, one copy per example,
  so one backward pass gives every example's dL(x)/dmask; sums |dL(x)/dmask| (kind 'absolute')
  or dL(x)/dmask ('signed') over the batch's real examples; count = real examples.
  per 'batch': |dL(batch)/dmask| (or dL(batch)/dmask) of the whole batch; count = 1.
  """
  if per not in IMPORTANCE_UNITS or kind not in IMPORTANCE_KINDS:
    raise ValueError(f'importance per {per!r}, kind {kind!r}: choose per in {IMPORTANCE_UNITS}, '
                     f'kind in {IMPORTANCE_KINDS}')
  grad = make_mask_gradient(module, loss, prompt_position)
  size = jnp.abs if kind == 'absolute' else (lambda g: g)

  def one_pass(masks, prompt, frozen, batch):
    if per == 'batch':
      g = grad(masks, prompt, frozen, batch)
      return {'token': size(g['token']), 'piece': size(g['piece']), 'count': jnp.float32(1.0)}
    real = real_examples(batch)
    copies = {k: jnp.broadcast_to(v, real.shape + v.shape) for k, v in masks.items()}
    g = grad(copies, prompt, frozen, batch)
    return {'token': jnp.tensordot(real, size(g['token']), axes=1),
            'piece': jnp.tensordot(real, size(g['piece']), axes=1), 'count': jnp.sum(real)}

  return one_pass


class Scorer:
  """Importance of token and piece masks of one prompt on one task's training batches.

  `scores(token_mask, piece_mask)` -> {'token': [m], 'piece': [m, k]} at the given masks: by
  default I = E_x |dL(x)/dmask| (Ma et al. 2022 eq. 3), the mean over the real examples of
  `batches` training batches of each example's absolute gradient (L(x): `make_mask_loss`); one
  jitted backward pass per batch (`make_importance_pass`; `per='batch'` averages
  |dL(batch)/dmask| over batches instead; `kind='signed'` gives -E_x[dL(x)/dmask]).
  `pass_seconds` records every pass.
  """

  def __init__(self, backbone, prompt: np.ndarray, task: str, feature_lengths, batch_size: int,
               *, pieces: int = 16, layout: str = 'contiguous', batches: int = 8,
               kind: str = 'absolute', per: str = 'example', seed: int = 0,
               prompt_position: int = 0, loss=None, batch_source: Sequence[dict] | None = None):
    from jaxprompt.train import engine as engine_lib
    self.prompt = np.asarray(prompt, np.float32)
    m, d = self.prompt.shape
    self.index = piece_index(d, pieces, layout)
    self.kind, self.per, self.num_batches = kind, per, batches
    self.engine, state = engine_lib.build_engine(
        backbone.module, masked_inputs, None,
        {'backbone': backbone.params, 'piece_index': self.index},
        prompt_lib.prompt_tree(self.prompt), prompt_position=prompt_position)
    self._prompt = prompt_lib.get_prompt(state.trainable)  # on the engine's devices, once
    self._grad = self.engine.jit(make_importance_pass(backbone.module, loss, prompt_position,
                                                      per, kind))
    if batch_source is None:
      from jaxprompt.data.features import get_dataset
      it = get_dataset(task, feature_lengths, 'train', batch_size, shuffle=True, seed=seed,
                       num_epochs=None)
      batch_source = [b for b, _ in zip(it, range(batches))]
    self.batches = [self.engine.put_batch(b) for b in list(batch_source)[:batches]]
    self.pass_seconds: list[float] = []

  def batch_sums(self, token_mask, piece_mask) -> list[dict[str, np.ndarray]]:
    """Each batch's `make_importance_pass` output at the masks (float64)."""
    masks = {'token': jnp.asarray(token_mask, jnp.float32),
             'piece': jnp.asarray(piece_mask, jnp.float32)}
    out = []
    for batch in self.batches:
      start = time.perf_counter()
      sums = jax.device_get(self._grad(masks, self._prompt, self.engine.frozen, batch))
      self.pass_seconds.append(time.perf_counter() - start)
      out.append({k: np.asarray(v, np.float64) for k, v in sums.items()})
    return out

  def scores(self, token_mask, piece_mask) -> dict[str, np.ndarray]:
    sums = self.batch_sums(token_mask, piece_mask)
    count = sum(float(s['count']) for s in sums)
    if count == 0:
      raise ValueError('importance: the scoring batches hold no real example')
    sign = 1.0 if self.kind == 'absolute' else -1.0
    return {k: sign * np.sum([s[k] for s in sums], axis=0) / count for k in ('token', 'piece')}


# ---- hierarchical pruning ----

def _prune_round(token, piece, target: int, token_share: float, score_fn) -> None:
  """Prunes (in place) down to `target` pruned pieces: whole tokens, then pieces.

  Token level: the surviving tokens in order of importance, lowest first, while their live
  pieces fit in `token_share` of the round's need; strictly by rank, so the first token that
  does not fit ends the token step (no later, more important token is pruned in its place) and
  the rest of the need goes to the piece level. At least one token survives. Piece level: the
  lowest-importance live pieces, re-scored after the token step; at least one piece survives.
  """
  m, k = piece.shape
  live = lambda: piece * token[:, None]  # noqa: E731
  need = target - (m * k - int(live().sum()))
  if need <= 0:
    return
  budget = int(np.floor(token_share * need))
  if budget >= 1:
    s = score_fn(token, piece)['token']
    alive = kept_tokens(token, piece)
    counts = live().sum(-1)
    removed = 0
    for i in alive[np.argsort(s[alive], kind='stable')][:len(alive) - 1]:
      if removed + counts[i] > budget:
        break
      token[i] = 0.0
      piece[i] = 0.0
      removed += int(counts[i])
  need = target - (m * k - int(live().sum()))
  if need <= 0:
    return
  s = score_fn(token, piece)['piece']
  cur = live()
  order = [(i, j) for i, j in zip(*np.unravel_index(np.argsort(s, axis=None, kind='stable'),
                                                   s.shape)) if cur[i, j] > 0]
  for i, j in order[:min(need, int(cur.sum()) - 1)]:  # at least one piece (one token) survives
    piece[i, j] = 0.0
  for i in range(m):
    if piece[i].sum() == 0:
      token[i] = 0.0


def hierarchical_masks(m: int, k: int, fractions: Sequence[float], score_fn,
                       token_share: float = 0.5) -> dict[float, tuple[np.ndarray, np.ndarray]]:
  """Nested (gamma, zeta) per fraction of pruned pieces, ascending; `score_fn(token, piece)` gives
  {'token': [m], 'piece': [m, k]} importance at the current masks (lowest pruned first)."""
  token, piece = np.ones((m,), np.float32), np.ones((m, k), np.float32)
  out = {}
  for f in check_fractions(fractions):
    _prune_round(token, piece, int(round(f * m * k)), token_share, score_fn)
    out[f] = (token.copy(), piece.copy())
  return out


def random_scores(seed: int):
  rs = np.random.RandomState(seed)
  return lambda token, piece: {'token': rs.uniform(size=token.shape),
                               'piece': rs.uniform(size=piece.shape)}


# ---- prune: stages 2 and 3 ----

@dataclasses.dataclass
class PruneResult:
  out_dir: str
  rows: list[dict[str, Any]]  # one per fraction (+ the unpruned prompt first)
  chosen: float | None
  best_prompt_path: str | None
  table_path: str
  picture_path: str | None
  importance_seconds: float | None  # one importance pass (one batch), median


def _tag(f: float) -> str:
  return f'f{int(round(f * 1000)):03d}'


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()[:16]


SCHEDULE_KEYS = ('train_steps', 'batch_size', 'learning_rate', 'feature_lengths',
                 'prompt_position', 'seed')


def stage1_schedule(prompt_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(RunConfig fields, XPrompt options) recorded by the run that wrote `prompt_path`
  (its run directory's manifest), or empty when there is none."""
  manifest = os.path.join(os.path.dirname(os.path.abspath(prompt_path)), 'manifest.json')
  if not os.path.exists(manifest):
    return {}, {}
  with open(manifest) as f:
    man = json.load(f)
  config = {k: man[k] for k in SCHEDULE_KEYS if man.get(k) is not None}
  options = {}
  if man.get('method') == 'xprompt':
    fields = {f.name for f in dataclasses.fields(XPromptOptions)} - {'masks'}
    options = {k: v for k, v in (man.get('options') or {}).items() if k in fields}
  return config, options


def prune(prompt: str, task: str, *, backbone, out_dir: str | None = None,
          config: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
          eval_batch_size: int | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None) -> PruneResult:
  """XPrompt stages 2 and 3 on a stage-1 prompt file: score, prune to each fraction, rewind.

  Args:
    prompt: the stage-1 prompt file (e.g. a run's prompt_best.safetensors); the run directory's
      manifest beside it gives the schedule (steps, batch, lr, lengths, seed) and the XPrompt
      options of that run.
    task: the task (a registered seqio task).
    backbone: the frozen backbone (path, 'lab', (module, params) or a Backbone).
    out_dir: where to write (default: `xprompt/` beside the prompt file); a killed prune resumes.
    config: RunConfig fields overriding stage 1's (train_steps, eval_period, ...).
    options: XPromptOptions fields overriding stage 1's (prune_fractions, pieces, ...).
  Writes per fraction a masks file and a rewound run, `prune.csv`, `masks.png`, `prune.json`,
  and the chosen prompt as `xprompt_best.safetensors`.
  """
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.methods import get_method
  from jaxprompt.prompts.files import check_compatible, read_prompt, write_prompt
  from jaxprompt.tuning import make_context, run
  say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  # ---- everything is checked before anything is written ----
  pf = read_prompt(prompt)
  schedule, stage_options = stage1_schedule(prompt)
  opts = XPromptOptions(**{**stage_options, **(options or {}), 'masks': None})
  run_fields = {f.name for f in dataclasses.fields(RunConfig)}
  unknown = sorted(set(config or {}) - run_fields)
  if unknown:
    raise ConfigError(f'unknown run option(s) {", ".join(unknown)}')
  token0, piece0, _ = read_masks(pf, prompt)
  m, d = pf.value.shape
  check_pieces(d, opts.pieces, prompt)
  cfg = RunConfig(**{'progress': progress, **schedule, **(config or {}), 'method': 'xprompt',
                     'prompt_length': m, 'init_from': os.path.abspath(prompt), 'resume': True})
  bb = load_backbone(backbone, dropout_rate=cfg.dropout_rate)
  check_compatible(pf, bb.module.config.emb_dim, bb, path=prompt)
  if not (np.all(token0 == 1) and np.all(piece0 == 1)):
    raise ValueError(f'{prompt}: is already pruned ({mask_summary(token0, piece0, d)}); prune '
                     'the unpruned stage-1 prompt')
  ctx = make_context(get_method('xprompt'), task, bb, cfg, opts)
  cfg = ctx.config
  out_dir = os.path.abspath(out_dir or os.path.join(os.path.dirname(os.path.abspath(prompt)),
                                                    'xprompt'))
  identity = dict(prompt_digest=_file_digest(prompt), task=task, backbone=bb.fingerprint,
                  options={k: v for k, v in dataclasses.asdict(opts).items() if k != 'masks'},
                  config={k: getattr(cfg, k) for k in SCHEDULE_KEYS + (
                      'eval_period', 'weight_decay', 'dropout_rate', 'max_eval_examples')})
  identity = json.loads(json.dumps(identity, default=list))
  state_path = os.path.join(out_dir, STATE_FILE)

  def prune_so_far() -> dict[str, Any]:
    if os.path.exists(state_path):
      with open(state_path) as f:
        state = json.load(f)
      if state['identity'] != identity:
        diff = [k for k in identity if state['identity'].get(k) != identity[k]]
        raise ValueError(f'{out_dir}: holds a prune of another setting ({", ".join(diff)} '
                         'differ); give a new --out')
      say(f'resuming the prune in {out_dir} ({len(state["rows"])} fractions done)')
      return state
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      raise ValueError(f'{out_dir}: not empty and holds no {STATE_FILE}; give a new or empty '
                       '--out')
    return {'identity': identity, 'rows': {}, 'unpruned': None, 'importance_seconds': None}

  # Every process of a multi-host prune decides on what it sees before process 0 writes; each
  # later "is it done?" follows from this state or from an agreed check, and process 0 writes.
  state = agreement.same(f'{out_dir}: the prune so far', prune_so_far,
                         hint=agreement.SHARED_STORAGE)

  def save_state():
    def write():
      os.makedirs(out_dir, exist_ok=True)
      tmp = state_path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(state, f, indent=1, default=float)
      os.replace(tmp, state_path)
    agreement.by_writer(f'{state_path}: save', write)

  save_state()
  value = np.asarray(pf.value, np.float32)
  position = prompt_lib.position_index(cfg.prompt_position)
  # ---- stage 2: nested masks for every fraction (computed once, kept on disk) ----
  mask_paths = {f: os.path.join(out_dir, 'masks', f'{_tag(f)}.safetensors')
                for f in opts.prune_fractions}
  if not agreement.same(f'{out_dir}/masks: written?',
                        lambda: all(os.path.exists(p) for p in mask_paths.values())):
    scorer = Scorer(bb, value, task, cfg.feature_lengths, cfg.batch_size, pieces=opts.pieces,
                    layout=opts.piece_layout, batches=opts.importance_batches,
                    kind=opts.importance_kind, per=opts.importance_per, seed=cfg.seed,
                    prompt_position=position)
    score_fn = (scorer.scores if opts.mask_scores == 'importance'
                else random_scores(cfg.seed))
    say(f'scoring and pruning {m} tokens x {opts.pieces} pieces to fractions '
        f'{", ".join(f"{f:g}" for f in opts.prune_fractions)} ({opts.mask_scores})')
    masks = hierarchical_masks(m, opts.pieces, opts.prune_fractions, score_fn, opts.token_share)
    if scorer.pass_seconds:
      warm = scorer.pass_seconds[1:] or scorer.pass_seconds
      state['importance_seconds'] = float(np.median(warm))
    index = piece_index(d, opts.pieces, opts.piece_layout)

    def write_masks():
      for f, (token, piece) in masks.items():
        write_prompt(mask_paths[f], value * element_mask(token, piece, index), overwrite=True,
                     method='xprompt', **file_masks(token, piece, opts.piece_layout),
                     xprompt=product_meta(token, piece, opts.piece_layout, d, opts.drop_pruned,
                                          fraction=f, stage='pruned, not rewound'),
                     **{k: v for k, v in pf.metadata.items()
                        if k in ('backbone', 'backbone_fingerprint', 'task', 'position',
                                 't5_config')})

    agreement.by_writer(f'{out_dir}/masks: write', write_masks)  # all read them next
    save_state()
  # ---- validation of the unpruned and the pruned-before-rewinding prompts ----
  validation = None

  def validate(path: str) -> float:
    nonlocal validation
    if validation is None:
      validation = _Validator(bb, ctx, position, eval_batch_size)
    return validation(path)

  if state['unpruned'] is None:
    state['unpruned'] = {'fraction': 0.0, **mask_summary(token0, np.ones((m, opts.pieces)), d),
                         'val_before': validate(prompt), 'val_after': None}
    state['unpruned']['val_after'] = state['unpruned']['val_before']
    save_state()
  # ---- stage 3: rewind and retrain each fraction ----
  method = get_method('xprompt')
  for f in opts.prune_fractions:
    key = _tag(f)
    if key in state['rows']:
      continue
    mpf = read_prompt(mask_paths[f])
    token, piece, _ = read_masks(mpf, mask_paths[f])
    row = {'fraction': f, **mask_summary(token, piece, d)}
    row['val_before'] = validate(mask_paths[f])
    say(f'fraction {f:g}: {row["kept_tokens"]} tokens, {row["kept_pieces"]} pieces kept; '
        f'validation before rewinding {row["val_before"]:.4g}; rewinding')
    result = run(method, task, bb, os.path.join(out_dir, key), cfg,
                 dataclasses.replace(opts, masks=mask_paths[f]))
    row['val_after'] = float((result.best_metrics or {}).get('score', float('nan')))
    row['best_step'] = result.best_step
    row['prompt'] = result.best_prompt_path
    state['rows'][key] = row
    save_state()
  rows = [state['unpruned']] + [state['rows'][_tag(f)] for f in opts.prune_fractions]
  higher = cfg.higher_is_better
  pruned = [r for r in rows[1:] if r['val_after'] == r['val_after']]
  chosen = None
  best_path = None
  if pruned:
    pick = max(pruned, key=lambda r: ((r['val_after'] if higher else -r['val_after']),
                                      r['fraction']))
    chosen = pick['fraction']
    best_path = os.path.join(out_dir, 'xprompt_best.safetensors')
  for r in rows:
    r['chosen'] = r['fraction'] == chosen and r is not rows[0]
  table_path = os.path.join(out_dir, 'prune.csv')

  def write_results() -> str | None:
    if best_path and pick.get('prompt'):
      shutil.copyfile(pick['prompt'], best_path)
      npy = pick['prompt'].replace('.safetensors', '.npy')
      if os.path.exists(npy):
        shutil.copyfile(npy, best_path.replace('.safetensors', '.npy'))
    write_table(rows, table_path)
    try:
      return draw_masks({f: read_masks(read_prompt(mask_paths[f]), mask_paths[f])[:2]
                         for f in opts.prune_fractions}, os.path.join(out_dir, 'masks.png'),
                        chosen)
    except ImportError:
      return None

  picture = agreement.by_writer(f'{out_dir}: the prune results', write_results, share=True)
  state['chosen'] = chosen
  save_state()
  return PruneResult(out_dir, rows, chosen, best_path, table_path, picture,
                     state.get('importance_seconds'))


class _Validator:
  """Validation score of a prompt file (the method read from the file), one engine per shape."""

  def __init__(self, bb, ctx: Context, position: int, batch_size: int | None):
    self.bb, self.ctx, self.position = bb, ctx, position
    self.batch_size = batch_size or ctx.config.eval_batch_size or ctx.config.batch_size
    self._cache = {}

  def __call__(self, path: str) -> float:
    from jaxprompt.methods import get_method
    from jaxprompt.prompts.files import read_prompt
    from jaxprompt.train import engine as engine_lib, evaluation, partitioning
    pf = read_prompt(path)
    method = get_method('prompt_tuning')
    value = np.asarray(pf.masked_value(), np.float32)
    if pf.metadata.get('method') == 'xprompt':
      token, piece, layout = read_masks(pf, path)
      extras = mask_extras(token, piece, layout, pf.width,
                           bool((pf.metadata.get('xprompt') or {}).get('drop_pruned')))
      value = value * element_mask(token, piece, extras['piece_index'])
      if 'kept_tokens' in extras:
        value = value[extras['kept_tokens']]
    key = value.shape
    if key not in self._cache:
      c = self.ctx.config
      eng, _ = engine_lib.build_engine(self.bb.module, method.eval_inputs, None,
                                       {'backbone': self.bb.params}, prompt_lib.prompt_tree(value),
                                       prompt_position=self.position,
                                       mesh=partitioning.mesh_from_config(c),
                                       rules=partitioning.rules_from_config(c))
      self._cache[key] = evaluation.build_validation(
          eng, method, self.ctx.tasks, c.eval_split, c.feature_lengths, self.batch_size,
          c.eval_mode, c.max_eval_examples, self.position)
    return float(self._cache[key](prompt_lib.prompt_tree(value))['score'])


TABLE_COLUMNS = ('fraction', 'kept_tokens', 'kept_pieces', 'trainable_parameters', 'val_before',
                 'val_after', 'chosen')


def write_table(rows: list[dict[str, Any]], path: str) -> str:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, TABLE_COLUMNS, extrasaction='ignore')
    w.writeheader()
    for r in rows:
      w.writerow(r)
  os.replace(tmp, path)
  return path


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = ['fraction  tokens  pieces  params  val before  val after  chosen']
  for r in rows:
    lines.append(f'{r["fraction"]:8.2f}  {r["kept_tokens"]:6d}  {r["kept_pieces"]:6d}  '
                 f'{r["trainable_parameters"]:6d}  {r["val_before"]:10.2f}  '
                 f'{r["val_after"]:9.2f}  {"*" if r.get("chosen") else ""}')
  return '\n'.join(lines)


# The colours of `masks.png`, read by its legend and its test.
MASK_COLOURS = {'kept': '#1b7837', 'pruned': '#e6e6e6'}


def draw_masks(masks: dict[float, tuple[np.ndarray, np.ndarray]], path: str,
               chosen: float | None = None) -> str:
  """A PNG: one panel per fraction, tokens down, pieces across; kept pieces dark green, pruned
  ones light grey (`MASK_COLOURS`), with a legend that says so."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch
  n = len(masks)
  cmap = ListedColormap([MASK_COLOURS['pruned'], MASK_COLOURS['kept']])
  fig, axes = plt.subplots(1, n, figsize=(max(6.4, 1.3 * n + 1.6), 3.8), squeeze=False)
  for ax, (f, (token, piece)) in zip(axes[0], sorted(masks.items())):
    live = np.asarray(piece) * np.asarray(token)[:, None]
    ax.imshow(live, cmap=cmap, vmin=0, vmax=1, aspect='auto', interpolation='nearest')
    ax.set_title(f'{f:.0%} pruned{" *" if f == chosen else ""}\n{int(live.sum())}/{live.size} '
                 'kept', fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0][0].set_ylabel('prompt tokens')
  axes[0][n // 2].set_xlabel('pieces of each token')
  fig.legend(handles=[Patch(color=c, label=name) for name, c in MASK_COLOURS.items()],
             loc='lower right', fontsize=8, ncol=2)
  fig.suptitle('XPrompt masks by pruned fraction (* chosen)', fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---- the `jaxprompt prune` command ----

def _add_arguments(p) -> None:
  p.add_argument('--prompt', required=True, help='the stage-1 prompt file (prompt_best of a run)')
  p.add_argument('--task', required=True, help='seqio task')
  p.add_argument('--backbone', required=True, help="checkpoint, or 'lab'")
  p.add_argument('--out', default=None, help='output directory (default: xprompt/ beside '
                 '--prompt); a killed prune resumes there')
  p.add_argument('--fractions', default=None,
                 help='comma-separated fractions of prompt parameters to prune (default: the '
                 "stage-1 run's, else 0.1..0.9)")
  for name, kind, help_text in (
      ('pieces', int, 'pieces per token (default 16)'),
      ('piece_layout', str, 'contiguous (default) or strided'),
      ('importance_batches', int, 'batches per importance pass (default 8)'),
      ('importance_kind', str, 'absolute (default) or signed'),
      ('importance_per', str, 'example (default: the mean of |dL(x)/dmask| over examples) or '
       'batch (over batches of |dL(batch)/dmask|)'),
      ('token_share', float, 'share of each round pruned as whole tokens (default 0.5)'),
      ('mask_scores', str, 'importance (default) or random (the control)')):
    p.add_argument(f'--{name}', type=kind, default=None, help=help_text)
  p.add_argument('--drop_pruned', action='store_true',
                 help='drop pruned tokens from the encoder sequence instead of zero vectors')
  for name, kind, help_text in (
      ('steps', int, "retraining steps (default: stage 1's)"),
      ('batch_size', int, "batch size (default: stage 1's)"),
      ('learning_rate', float, "learning rate (default: stage 1's)"),
      ('eval_period', int, 'steps between validations'),
      ('seed', int, "seed (default: stage 1's)"),
      ('max_eval_examples', int, 'validate on the first N examples only'),
      ('inputs_length', int, 'input budget'), ('targets_length', int, 'target budget')):
    p.add_argument(f'--{name}', type=kind, default=None, help=help_text)
  p.add_argument('--vocabulary', default=None, help="SentencePiece model (default: T5's)")
  p.add_argument('--progress', action='store_true', help='progress bars')


def _run_command(args) -> int:
  from jaxprompt.data import setup_tasks
  setup_tasks(args.vocabulary)
  config = {k: getattr(args, k) for k in ('batch_size', 'learning_rate', 'eval_period', 'seed',
                                          'max_eval_examples') if getattr(args, k) is not None}
  if args.steps is not None:
    config['train_steps'] = args.steps
  lengths = {k: getattr(args, f'{k}_length') for k in ('inputs', 'targets')
             if getattr(args, f'{k}_length')}
  if lengths:
    config['feature_lengths'] = lengths
  options = {k: getattr(args, k) for k in ('pieces', 'piece_layout', 'importance_batches',
                                           'importance_kind', 'importance_per', 'token_share',
                                           'mask_scores')
             if getattr(args, k) is not None}
  if args.fractions is not None:
    options['prune_fractions'] = check_fractions(args.fractions)
  if args.drop_pruned:
    options['drop_pruned'] = True
  result = prune(args.prompt, args.task, backbone=args.backbone, out_dir=args.out, config=config,
                 options=options, progress=args.progress)
  print(format_table(result.rows))
  print(f'table: {result.table_path}')
  if result.picture_path:
    print(f'masks: {result.picture_path}')
  if result.best_prompt_path:
    print(f'chosen: fraction {result.chosen:g} -> {result.best_prompt_path}')
  return 0


COMMANDS = {'prune': Command('XPrompt: score, prune and rewind a tuned prompt (stages 2 and 3)',
                             _add_arguments, _run_command)}
