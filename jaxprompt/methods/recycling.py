"""Prompt recycling (Lester, Yurtsever, Shakeri, Constant 2022, "Reducing Retraining by
Recycling Parameter-Efficient Prompts"): a prompt trained on backbone A moved to backbone B
without task data, through a recycler fitted on the two backbones' embeddings of the tokens of
their shared vocabulary (E_A [T, d_A] and E_B [T, d_B], the same T token ids):

* `linear` (the paper's v2v-lin): W = argmin ||E_A W - E_B||_F (least squares, the minimum-norm
  W when T < d_A), recycled = P W;
* `mlp` (v2v-nn): W2 relu(W1 x + b1) + b2 with 4 d_B hidden units, fitted to E_A -> E_B by Adam
  (lr 3e-4, batches of 50, mean squared error), applied to each prompt vector;
* `lincomb` (lin-comb): the prompt as a combination of A's token embeddings,
  X = argmin ||X E_A - P|| (minimum norm), recycled = X E_B. In closed form X = P pinv(E_A), so
  lincomb is P pinv(E_A) E_B: the same map as `linear` (whose minimum-norm solution is
  pinv(E_A) E_B), whatever T and d_A; the two differ by rounding only (tests check both).

The vocabulary (the paper's filtered one, docs/transferability.md): the paper fits on 4000 tokens
of an English-only filtered list of T5's 32k SentencePiece pieces, skipping that list's first
1000 (the most frequent). Here the fit uses every regular piece of the shared SentencePiece model
(no control, unknown, unused or byte pieces, no sentinel or padding rows), in id order
(SentencePiece numbers pieces by score, about frequency); `num_tokens` / `token_offset` take a
window of that list as the paper did. Both backbones must have the same vocabulary: the same
number of embedding rows and, where a checkpoint carries its SentencePiece model
(`vocabulary.model` beside it), the same model bytes.

    jaxprompt project recycle --source_backbone A --target_backbone B --prompt P.safetensors \\
        --recycler linear|mlp|lincomb --out P_on_B.safetensors

The product is a prompt file for B (`write_prompt`) naming where it came from: the source
prompt, both backbones and fingerprints, the recycler and its settings, its fit error.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np

RECYCLERS = ('linear', 'mlp', 'lincomb')
VOCABULARY_FILE = 'vocabulary.model'


class RecyclingError(ValueError):
  """A bad recycling input; one line naming the fix."""


# ---------------------------------------------------------------------------------------------
# The recyclers (numpy in, numpy out).

def fit_linear(source_emb, target_emb) -> np.ndarray:
  """W [d_A, d_B] = argmin ||E_A W - E_B||_F (minimum norm), in float64."""
  w, *_ = np.linalg.lstsq(np.asarray(source_emb, np.float64),
                          np.asarray(target_emb, np.float64), rcond=None)
  return w


def recycle_lincomb(prompt, source_emb, target_emb) -> tuple[np.ndarray, np.ndarray]:
  """(recycled [P, d_B], combination X [P, T]): X = argmin ||X E_A - P|| (minimum norm),
  recycled = X E_B."""
  x, *_ = np.linalg.lstsq(np.asarray(source_emb, np.float64).T,
                          np.asarray(prompt, np.float64).T, rcond=None)
  return x.T @ np.asarray(target_emb, np.float64), x.T


def mlp_apply(params, x):
  """W2 relu(W1 x + b1) + b2 on the last axis (jax or numpy arrays)."""
  import jax
  h = jax.nn.relu(x @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


def fit_mlp(source_emb, target_emb, *, hidden_scale: int = 4, steps: int = 2000,
            batch_size: int = 50, learning_rate: float = 3e-4, seed: int = 0
            ) -> dict[str, np.ndarray]:
  """The v2v-nn recycler: a ReLU MLP [d_A -> hidden_scale d_B -> d_B] fitted to map each token's
  A embedding to its B embedding; Adam on shuffled batches (an epoch per pass over the tokens),
  mean squared error. The paper: hidden 4 d_B, lr 3e-4, batch 50, 25 epochs of 4000 tokens
  (2000 steps)."""
  import jax
  import jax.numpy as jnp
  import optax
  src = jnp.asarray(source_emb, jnp.float32)
  tgt = jnp.asarray(target_emb, jnp.float32)
  d_a, d_b = src.shape[1], tgt.shape[1]
  hidden = hidden_scale * d_b
  k1, k2, kshuffle = jax.random.split(jax.random.PRNGKey(seed), 3)
  init = jax.nn.initializers.lecun_normal()
  params = {'w1': init(k1, (d_a, hidden)), 'b1': jnp.zeros((hidden,)),
            'w2': init(k2, (hidden, d_b)), 'b2': jnp.zeros((d_b,))}
  tx = optax.adam(learning_rate)
  n = src.shape[0]
  batch = min(batch_size, n)
  per_epoch = max(n // batch, 1)
  epochs = -(-steps // per_epoch)
  order = jnp.concatenate([jax.random.permutation(k, n)[:per_epoch * batch]
                           for k in jax.random.split(kshuffle, epochs)])
  order = order[:steps * batch].reshape(steps, batch)

  def body(carry, idx):
    p, o = carry
    loss, grads = jax.value_and_grad(
        lambda q: jnp.mean(jnp.square(mlp_apply(q, src[idx]) - tgt[idx])))(p)
    updates, o = tx.update(grads, o, p)
    return (optax.apply_updates(p, updates), o), loss

  (params, _), _ = jax.jit(lambda p, o, idx: jax.lax.scan(body, (p, o), idx))(
      params, tx.init(params), order)
  return {k: np.asarray(v) for k, v in params.items()}


def _relative(residual, reference) -> float:
  return float(np.linalg.norm(residual) / max(np.linalg.norm(reference), 1e-30))


def recycle_prompt(prompt, source_emb, target_emb, recycler: str = 'linear', *,
                   hidden_scale: int = 4, steps: int = 2000, batch_size: int = 50,
                   learning_rate: float = 3e-4, seed: int = 0) -> tuple[np.ndarray, dict]:
  """(recycled [P, d_B] float32, fit info) of a [P, d_A] prompt with the embeddings of the fit
  tokens. fit_error: ||f(E_A) - E_B|| / ||E_B|| over the fit tokens for linear and mlp; for
  lincomb ||X E_A - P|| / ||P||. prompt_outside_vocab_span: ||P - P pinv(E_A) E_A|| / ||P||, the
  part of the prompt that linear and lincomb drop."""
  p = np.asarray(prompt, np.float64)
  ea = np.asarray(source_emb, np.float64)
  eb = np.asarray(target_emb, np.float64)
  info: dict[str, Any] = {'recycler': recycler}
  if recycler == 'linear':
    w = fit_linear(ea, eb)
    out = p @ w
    info['fit_error'] = _relative(ea @ w - eb, eb)
  elif recycler == 'lincomb':
    out, x = recycle_lincomb(p, ea, eb)
    info['fit_error'] = _relative(x @ ea - p, p)
  elif recycler == 'mlp':
    params = fit_mlp(ea, eb, hidden_scale=hidden_scale, steps=steps, batch_size=batch_size,
                     learning_rate=learning_rate, seed=seed)
    out = np.asarray(mlp_apply(params, np.asarray(p, np.float32)), np.float64)
    info['fit_error'] = _relative(np.asarray(mlp_apply(params, ea.astype(np.float32))) - eb, eb)
    info.update(hidden=hidden_scale * eb.shape[1], steps=steps, batch_size=batch_size,
                learning_rate=learning_rate, seed=seed)
  else:
    raise RecyclingError(f'recycler {recycler!r}: choose one of {", ".join(RECYCLERS)}')
  info['prompt_outside_vocab_span'] = _relative(p - p @ np.linalg.pinv(ea) @ ea, p)
  return out.astype(np.float32), info


# ---------------------------------------------------------------------------------------------
# The shared vocabulary.

def vocabulary_file(backbone) -> str | None:
  """The SentencePiece model a checkpoint carries (`vocabulary.model` in its folder or the one
  above, as lab backbones are written), or None."""
  path = getattr(backbone, 'path', None)
  if not path or '://' in str(path):
    return None
  for folder in (path, os.path.dirname(os.path.abspath(path))):
    candidate = os.path.join(folder, VOCABULARY_FILE)
    if os.path.isfile(candidate):
      return candidate
  return None


def _sha(path: str) -> str:
  with open(path, 'rb') as f:
    return 'sha256:' + hashlib.sha256(f.read()).hexdigest()[:16]


def _rows(backbone) -> int:
  return int(backbone.params['token_embedder']['embedding'].shape[0])


def shared_tokens(source, target, vocabulary: str | None = None, num_tokens: int | None = None,
                  token_offset: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """(the token ids the recycler is fitted on, a description) of two Backbones, refusing
  backbones that do not share one vocabulary."""
  rows_a, rows_b = _rows(source), _rows(target)
  if rows_a != rows_b:
    raise RecyclingError(f'source backbone {source.name} has {rows_a} vocabulary rows, target '
                         f'{target.name} {rows_b}: recycling needs two backbones of one shared '
                         'vocabulary (the same SentencePiece model); move the prompt with a '
                         'projector instead (jaxprompt project train / apply)')
  files = {name: vocabulary_file(bb) for name, bb in (('source', source), ('target', target))}
  digests = {name: _sha(f) for name, f in files.items() if f}
  if vocabulary:
    if not os.path.isfile(vocabulary):
      raise RecyclingError(f'--vocabulary {vocabulary}: no such SentencePiece model file')
    digests['given'] = _sha(vocabulary)
  if len(set(digests.values())) > 1:
    named = ', '.join(f'{k} {files.get(k) or vocabulary} ({v})' for k, v in digests.items())
    raise RecyclingError(f'the vocabularies differ ({named}): recycling needs backbones of one '
                         'shared SentencePiece model; move the prompt with a projector instead '
                         '(jaxprompt project train / apply)')
  model = vocabulary or files['source'] or files['target']
  if model:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    if sp.get_piece_size() > rows_a:
      raise RecyclingError(f'{model}: {sp.get_piece_size()} pieces, more than the backbones\' '
                           f'{rows_a} vocabulary rows: not these backbones\' vocabulary')
    ids = [i for i in range(sp.get_piece_size())
           if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))]
    described = f'regular pieces of {model}'
  else:  # no model to read: every row but T5's pad, EOS and UNK (ids 0-2)
    ids = list(range(3, rows_a))
    described = 'rows 3.. of the embedding (no SentencePiece model found; pass --vocabulary)'
  if token_offset < 0 or (num_tokens is not None and num_tokens < 1):
    raise RecyclingError('--token_offset must be >= 0 and --num_tokens >= 1')
  ids = ids[token_offset:token_offset + num_tokens if num_tokens else None]
  if len(ids) < 2:
    raise RecyclingError(f'{described}: {len(ids)} token(s) left after --token_offset '
                         f'{token_offset} / --num_tokens {num_tokens}; a recycler needs more')
  info = dict(vocabulary=model, vocabulary_digest=next(iter(digests.values()), None),
              tokens=described, token_offset=token_offset, num_tokens=len(ids))
  return np.asarray(ids, np.int64), info


# ---------------------------------------------------------------------------------------------
# The Python API.

def recycle(source_backbone, target_backbone, prompt, recycler: str = 'linear', *,
            out: str | None = None, overwrite: bool = False, vocabulary: str | None = None,
            num_tokens: int | None = None, token_offset: int = 0, seed: int = 0,
            **fit_options) -> tuple[np.ndarray, dict[str, Any]]:
  """(recycled prompt for the target backbone, its prompt-file metadata); written to `out`
  (a prompt file) when given. `prompt` is a prompt file, `LIBRARY_DIR:TASK` or a [P, d_A]
  array; the backbones are checkpoint paths ('lab:PRESET') or Backbones. `fit_options`:
  `recycle_prompt`'s mlp settings. Every mismatch is a one-line error before anything is
  written."""
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.methods.library import read_source_prompt
  if recycler not in RECYCLERS:
    raise RecyclingError(f'recycler {recycler!r}: choose one of {", ".join(RECYCLERS)}')
  if out and os.path.exists(out) and not overwrite:
    raise RecyclingError(f'{out}: already exists; choose another --out or pass --overwrite')
  if isinstance(prompt, str):
    value, pmeta = read_source_prompt(prompt, seed)
    name = prompt if not os.path.exists(prompt) else os.path.abspath(prompt)
  else:
    value, pmeta, name = np.asarray(prompt, np.float32), {}, 'prompt'
  if value.ndim != 2:
    raise RecyclingError(f'{name}: a prompt to recycle is one [P, d] prompt, got {value.shape}')
  source, target = load_backbone(source_backbone), load_backbone(target_backbone)
  width_a = source.module.config.emb_dim
  if value.shape[1] != width_a:
    raise RecyclingError(f'{name}: prompt width {value.shape[1]}, but the source backbone '
                         f'{source.name} has width {width_a}: pass a prompt trained on the '
                         'source backbone')
  prompt_fp = pmeta.get('backbone_fingerprint')
  if prompt_fp and prompt_fp != 'random' and prompt_fp != source.fingerprint:
    raise RecyclingError(f'{name}: a prompt of backbone {prompt_fp}, but the source backbone '
                         f'{source.name} is {source.fingerprint}')
  ids, vocab = shared_tokens(source, target, vocabulary, num_tokens, token_offset)
  ea = np.asarray(source.params['token_embedder']['embedding'], np.float32)[ids]
  eb = np.asarray(target.params['token_embedder']['embedding'], np.float32)[ids]
  recycled, info = recycle_prompt(value, ea, eb, recycler, seed=seed, **fit_options)
  meta = dict(method='prompt_tuning', task=pmeta.get('task'), backbone=target.name,
              backbone_fingerprint=target.fingerprint, recycled_from=name,
              source_backbone=source.name, source_fingerprint=source.fingerprint,
              source_prompt_fingerprint=prompt_fp, position=pmeta.get('position', 'prefix'),
              recycling=dict(info, **vocab))
  meta = {k: v for k, v in meta.items() if v is not None}
  if out:
    from jaxprompt.prompts.files import write_prompt
    write_prompt(out, recycled, overwrite=True, **meta)
  return recycled, meta


# ---------------------------------------------------------------------------------------------
# The command line: `jaxprompt project recycle` (its parser lives with `project`'s).

def add_recycle_parser(sub) -> None:
  """`recycle` under `jaxprompt project`'s subcommands."""
  r = sub.add_parser('recycle', help='recycle a prompt onto a backbone of the same vocabulary '
                     '(Lester et al. 2022; no task data)')
  r.add_argument('--source_backbone', required=True, help='the backbone the prompt was trained on')
  r.add_argument('--target_backbone', required=True, help='the backbone to recycle it onto')
  r.add_argument('--prompt', required=True, help='a prompt file of the source backbone, or '
                 'LIBRARY_DIR:TASK')
  r.add_argument('--recycler', choices=RECYCLERS, default='linear',
                 help='linear (v2v-lin), mlp (v2v-nn) or lincomb (lin-comb)')
  r.add_argument('--out', required=True, help='the recycled prompt file (.safetensors)')
  r.add_argument('--vocabulary', default=None, help='the shared SentencePiece model (default: '
                 "the checkpoints' own vocabulary.model)")
  r.add_argument('--num_tokens', type=int, default=None,
                 help='fit on this many regular pieces (default all; the paper: 4000)')
  r.add_argument('--token_offset', type=int, default=0,
                 help='skip this many of the most frequent pieces first (the paper: 1000)')
  r.add_argument('--mlp_steps', type=int, default=2000, help='mlp: Adam steps (2000)')
  r.add_argument('--hidden_scale', type=int, default=4, help='mlp: hidden = this x d_target')
  r.add_argument('--learning_rate', type=float, default=3e-4, help='mlp: Adam learning rate')
  r.add_argument('--batch_size', type=int, default=50, help='mlp: tokens per step')
  r.add_argument('--seed', type=int, default=0)
  r.add_argument('--overwrite', action='store_true', help='replace an existing --out')


def recycle_command(args) -> int:
  value, meta = recycle(args.source_backbone, args.target_backbone, args.prompt, args.recycler,
                        out=args.out, overwrite=args.overwrite, vocabulary=args.vocabulary,
                        num_tokens=args.num_tokens, token_offset=args.token_offset,
                        seed=args.seed, hidden_scale=args.hidden_scale, steps=args.mlp_steps,
                        batch_size=args.batch_size, learning_rate=args.learning_rate)
  r = meta['recycling']
  print(f'recycled {args.prompt} -> {args.out} ({value.shape[0]} x {value.shape[1]}; '
        f'{args.recycler} on {r["num_tokens"]} tokens, fit error {r["fit_error"]:.3g})')
  return 0


__all__ = ['RECYCLERS', 'RecyclingError', 'add_recycle_parser', 'fit_linear', 'fit_mlp',
           'mlp_apply', 'recycle', 'recycle_command', 'recycle_lincomb', 'recycle_prompt',
           'shared_tokens', 'vocabulary_file']
