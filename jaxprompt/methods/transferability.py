"""On transferability of prompt tuning (Su et al., NAACL 2022): indicators and zero-shot transfer.

* **Indicators** between two prompts P1, P2 ([P, d] each, one backbone):
  - `concat_cosine` / `concat_euclidean` (E_concat): cos(vec P1, vec P2) and
    1 / (1 + ||vec P1 - vec P2||) (equal lengths);
  - `avg_cosine` / `avg_euclidean` (E_avg): the mean cosine over all token pairs
    (`library.per_token_average_cosine`, SPoT's similarity) and 1 / (1 + mean pairwise distance);
  - `overlap_rate` (ON) of activated neurons: the frozen backbone reads the prompt plus one
    filler token (EOS by default); every FFN's first projection pre-activation (the gate `wi_0`
    for gated-gelu; `model/layers.py` sows it) is recorded in every encoder layer (every
    position) and every decoder layer at the first decoding step; a neuron is active when its
    pre-activation is > 0, and ON = |A1 & A2| / sqrt(|A1| |A2|), over all layers and per
    window of 3 consecutive layers (encoder layers first, then decoder layers).
    `activation_masks` computes the masks of a whole library in one jitted program, in batches.
* **Zero-shot transfer** (`zero_shot_matrix`, `jaxprompt transfer matrix`): every library prompt
  evaluated on every target task; relative performance = transfer score / the target's own
  prompt's score, measured in the same evaluation. One eval-only engine per target task holds
  the library as one [n, P, d] stack; each row is evaluated through the one evaluation path
  (`train.evaluation.Evaluator`) with its `task_index` batch entry (the `prompt_stack` mapping),
  so the predict program is compiled once per task, not once per pair.
* **Indicators vs transfer** (`indicator_correlations`, `jaxprompt transfer indicators`): the
  Spearman correlation of each indicator with the zero-shot matrix (and with transfer-as-init
  gain when given) over ordered source != target pairs; a table, a CSV and a heatmap each.

    jaxprompt transfer matrix --library DIR --backbone B [--tasks T1,T2] --out OUT
    jaxprompt transfer indicators --library DIR --backbone B [--matrix OUT.csv] --out OUT2

Its study on the lab is `jaxprompt.lab.transfer_report` (`jaxprompt lab report transferability`).
See docs/transferability.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from jaxprompt.methods import Command
from jaxprompt.methods.library import LibraryError, per_token_average_cosine

WINDOW = 3  # layers per ON window (Su et al.)
DEFAULT_FILLER = 'eos'


class TransferError(ValueError):
  """A bad library, matrix or argument; the message is one line naming the fix."""


# ---------------------------------------------------------------------------------------------
# Embedding-based indicators.

def _prompt(p, name: str) -> np.ndarray:
  p = np.asarray(p, np.float64)
  if p.ndim != 2:
    raise TransferError(f'{name}: a prompt is [P, d], got shape {p.shape}')
  return p


def _same_width(p1: np.ndarray, p2: np.ndarray) -> None:
  if p1.shape[-1] != p2.shape[-1]:
    raise TransferError(f'prompt widths differ: {p1.shape[-1]} vs {p2.shape[-1]}; indicators '
                        'compare prompts of one backbone (project one first: jaxprompt project)')


def _same_shape(p1: np.ndarray, p2: np.ndarray) -> None:
  _same_width(p1, p2)
  if p1.shape != p2.shape:
    raise TransferError(f'prompt lengths differ: {p1.shape[0]} vs {p2.shape[0]}; E_concat '
                        'compares flattened prompts of one length')


def concat_cosine(p1, p2) -> float:
  """E_concat (cosine): cos(vec P1, vec P2)."""
  p1, p2 = _prompt(p1, 'p1'), _prompt(p2, 'p2')
  _same_shape(p1, p2)
  a, b = p1.ravel(), p2.ravel()
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def concat_euclidean(p1, p2) -> float:
  """E_concat (Euclidean): 1 / (1 + ||vec P1 - vec P2||)."""
  p1, p2 = _prompt(p1, 'p1'), _prompt(p2, 'p2')
  _same_shape(p1, p2)
  return float(1.0 / (1.0 + np.linalg.norm(p1.ravel() - p2.ravel())))


def avg_cosine(p1, p2) -> float:
  """E_avg (cosine): (1 / l1 l2) sum_i sum_j cos(p1_i, p2_j) (the library's per-token cosine)."""
  try:
    return per_token_average_cosine(p1, p2)
  except LibraryError as e:
    raise TransferError(str(e)) from None


def avg_euclidean(p1, p2) -> float:
  """E_avg (Euclidean): 1 / (1 + (1 / l1 l2) sum_i sum_j ||p1_i - p2_j||)."""
  p1, p2 = _prompt(p1, 'p1'), _prompt(p2, 'p2')
  _same_width(p1, p2)
  sq = (p1 ** 2).sum(1)[:, None] + (p2 ** 2).sum(1)[None, :] - 2 * p1 @ p2.T
  return float(1.0 / (1.0 + np.sqrt(np.maximum(sq, 0.0)).mean()))


EMBEDDING_INDICATORS = {'concat_cosine': concat_cosine, 'concat_euclidean': concat_euclidean,
                        'avg_cosine': avg_cosine, 'avg_euclidean': avg_euclidean}


# ---------------------------------------------------------------------------------------------
# Activated neurons (ON).

@dataclasses.dataclass
class ActivationMasks:
  """Active-neuron masks of n prompts: `layers[k]` is a bool [n, ...] array for layer k
  (encoder layers first, each [n, P + 1, mlp]; then decoder layers at step one, [n, mlp])."""

  layers: list[np.ndarray]
  names: list[str]  # 'encoder/layers_0', ..., 'decoder/layers_0', ...

  @property
  def num_prompts(self) -> int:
    return int(self.layers[0].shape[0])

  def flat(self, layers: Sequence[int] | None = None) -> np.ndarray:
    """[n, neurons] bool, the chosen layers' masks side by side."""
    keep = range(len(self.layers)) if layers is None else layers
    return np.concatenate([self.layers[k].reshape(self.num_prompts, -1) for k in keep], axis=1)

  def windows(self, size: int = WINDOW) -> list[tuple[int, ...]]:
    n = len(self.layers)
    return [tuple(range(s, min(s + size, n))) for s in range(0, n, size)]


def _filler_id(filler, vocabulary=None) -> int:
  if isinstance(filler, (int, np.integer)):
    return int(filler)
  if filler in (None, 'eos'):
    return int(getattr(vocabulary, 'eos_id', 1) if vocabulary is not None else 1)
  if vocabulary is None:
    raise TransferError(f'filler {filler!r}: a word needs the vocabulary; pass a token id')
  ids = list(vocabulary.encode(str(filler)))
  if len(ids) != 1:
    raise TransferError(f'filler {filler!r} is {len(ids)} tokens; choose one token')
  return int(ids[0])


def _masks_program(module, position: int):
  import jax
  import jax.numpy as jnp

  def run(params, prompts, filler):
    n = prompts.shape[0]
    tokens = jnp.full((n, 1), filler, jnp.int32)
    dec_in = jnp.zeros((n, 1), jnp.int32)  # T5's decoder starts from 0
    dec_target = jnp.ones((n, 1), jnp.int32)  # any non-pad target: one real decoding step
    _, state = module.apply({'params': params}, tokens, dec_in, dec_target,
                            enable_dropout=False, prompt=prompts, prompt_position=position,
                            mutable=['intermediates'])
    inter = state['intermediates']
    out = []
    for part, count in (('encoder', module.config.num_encoder_layers),
                        ('decoder', module.config.num_decoder_layers)):
      for i in range(count):
        pre = inter[part][f'layers_{i}']['mlp']['mlp_pre_activation'][0]  # [n, L, mlp]
        out.append(pre > 0 if part == 'encoder' else pre[:, 0] > 0)
    return out

  return jax.jit(run)


def activation_masks(backbone, prompts, *, filler=DEFAULT_FILLER, vocabulary=None,
                     batch_size: int = 16, prompt_position: int = 0) -> ActivationMasks:
  """The active-neuron masks of each prompt of `prompts` ([n, P, d] or a list of [P, d] of one
  shape) on the frozen `backbone` (a `Backbone`, `(module, params)` or a checkpoint path).

  One jitted program, run on batches of `batch_size` prompts (the last batch padded).
  """
  from jaxprompt.checkpoints.backbone import load_backbone
  bb = load_backbone(backbone)
  cfg = bb.module.config
  if isinstance(prompts, np.ndarray) or hasattr(prompts, 'shape'):
    stack = np.asarray(prompts, np.float32)
  else:
    shapes = sorted({tuple(np.shape(p)) for p in prompts})
    if len(shapes) != 1:
      raise TransferError(f'prompts differ in shape {shapes}; ON compares prompts of one length '
                          'and width')
    stack = np.stack([np.asarray(p, np.float32) for p in prompts])
  if stack.ndim == 2:
    stack = stack[None]
  if stack.ndim != 3:
    raise TransferError(f'prompts: expected [n, P, d], got shape {stack.shape}')
  if stack.shape[-1] != cfg.emb_dim:
    raise TransferError(f'prompt width {stack.shape[-1]} does not match the backbone width '
                        f'{cfg.emb_dim}; activations are read on the prompts\' own backbone')
  fid = _filler_id(filler, vocabulary)
  program = _masks_program(bb.module, prompt_position)
  n = stack.shape[0]
  batch_size = max(1, min(batch_size, n))
  chunks: list[list[np.ndarray]] = []
  for start in range(0, n, batch_size):
    part = stack[start:start + batch_size]
    real = part.shape[0]
    if real < batch_size:
      part = np.concatenate([part, np.zeros((batch_size - real,) + part.shape[1:], part.dtype)])
    out = program(bb.params, part, np.int32(fid))
    chunks.append([np.asarray(m)[:real] for m in out])
  layers = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
  names = ([f'encoder/layers_{i}' for i in range(cfg.num_encoder_layers)] +
           [f'decoder/layers_{i}' for i in range(cfg.num_decoder_layers)])
  return ActivationMasks(layers, names)


def overlap_rate(a1, a2) -> float:
  """ON = |A1 & A2| / sqrt(|A1| |A2|) of two boolean masks of one shape (0 when one is empty)."""
  a1, a2 = np.asarray(a1, bool).ravel(), np.asarray(a2, bool).ravel()
  if a1.shape != a2.shape:
    raise TransferError(f'activation masks differ in size: {a1.size} vs {a2.size}')
  n1, n2 = int(a1.sum()), int(a2.sum())
  return float((a1 & a2).sum() / math.sqrt(n1 * n2)) if n1 and n2 else 0.0


def overlap_matrix(flat: np.ndarray) -> np.ndarray:
  """[n, n] ON of every pair of rows of a boolean [n, neurons] matrix (one matrix product)."""
  m = np.asarray(flat, np.float32)
  inter = m @ m.T
  counts = np.diag(inter).astype(np.float64)
  denom = np.sqrt(np.outer(counts, counts))
  with np.errstate(invalid='ignore', divide='ignore'):
    out = np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), 0.0)
  return out


def on_matrices(masks: ActivationMasks, window: int = WINDOW) -> dict[str, np.ndarray]:
  """{'on': over all layers, 'on_layers_a-b': per window of `window` layers} [n, n] each."""
  out = {'on': overlap_matrix(masks.flat())}
  for w in masks.windows(window):
    out[f'on_layers_{w[0] + 1}-{w[-1] + 1}'] = overlap_matrix(masks.flat(w))
  return out


# ---------------------------------------------------------------------------------------------
# A library's prompts and all their indicators.

def library_prompts(directory: str, tasks: Sequence[str] | None = None
                    ) -> tuple[list[str], list[np.ndarray], dict[str, dict]]:
  """(tasks, [P, d] prompts, entries) of a library; mixed widths are an error naming them."""
  from jaxprompt.methods import library as lib
  entries = lib.entries(directory)
  if not entries:
    raise TransferError(f'{directory}: the library holds no prompts')
  names = list(tasks) if tasks else sorted(entries)
  missing = [t for t in names if t not in entries]
  if missing:
    raise TransferError(f'{directory}: the library has no prompt for {", ".join(missing)}; it '
                        f'holds {", ".join(sorted(entries))}')
  widths = {}
  for t in names:
    widths.setdefault(entries[t]['width'], []).append(t)
  if len(widths) > 1:
    parts = '; '.join(f'width {w}: {", ".join(ts)}' for w, ts in sorted(widths.items()))
    raise TransferError(f'{directory}: the library mixes prompt widths ({parts}); compare prompts '
                        'of one backbone (pass --tasks, or project the others first)')
  fps = {entries[t].get('backbone_fingerprint') for t in names} - {None}
  if len(fps) > 1:
    print(f'transfer: warning: {directory} holds prompts of {len(fps)} backbones of one width '
          f'({", ".join(sorted(fps))}); ON reads them all on one backbone', file=sys.stderr)
  return names, [lib.load_prompt(directory, t) for t in names], {t: entries[t] for t in names}


def indicator_matrices(prompts: Sequence[np.ndarray], backbone=None, *,
                       filler=DEFAULT_FILLER, vocabulary=None, batch_size: int = 16,
                       window: int = WINDOW) -> dict[str, np.ndarray]:
  """Every indicator as an [n, n] matrix; ON and its windows only with a `backbone`. E_concat
  needs one prompt length: with mixed lengths it (and ON) are left out with a note."""
  n = len(prompts)
  out = {}
  same_length = len({np.shape(p) for p in prompts}) == 1
  for name, fn in EMBEDDING_INDICATORS.items():
    if name.startswith('concat') and not same_length:
      print(f'transfer: {name} left out: the prompts differ in length', file=sys.stderr)
      continue
    out[name] = np.array([[fn(prompts[i], prompts[j]) for j in range(n)] for i in range(n)])
  if backbone is not None:
    if not same_length:
      print('transfer: ON left out: the prompts differ in length', file=sys.stderr)
    else:
      masks = activation_masks(backbone, prompts, filler=filler, vocabulary=vocabulary,
                               batch_size=batch_size)
      out.update(on_matrices(masks, window))
  return out


# ---------------------------------------------------------------------------------------------
# Zero-shot transfer, batched: one engine per target task.

@dataclasses.dataclass
class TransferMatrix:
  sources: list[str]  # the library prompts (rows)
  targets: list[str]  # the tasks evaluated (columns)
  scores: np.ndarray  # [sources, targets] the task's primary metric
  own: dict[str, float]  # each target's own prompt's score
  seconds: float = 0.0

  @property
  def relative(self) -> np.ndarray:
    own = np.array([self.own[t] for t in self.targets], np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
      return self.scores / np.where(own != 0, own, np.nan)[None, :]


def zero_shot_matrix(library: str, backbone, targets: Sequence[str] | None = None,
                     sources: Sequence[str] | None = None, *, split: str = 'validation',
                     max_eval_examples: int | None = None, batch_size: int = 64,
                     mode: str = 'auto', feature_lengths: Mapping[str, int] | None = None,
                     progress: bool = True) -> TransferMatrix:
  """Scores of every `sources` prompt of `library` (all by default) on every target task.

  A target's own score is its own library prompt's score in this same evaluation, so every
  target needs a prompt in the library (checked before anything runs).
  """
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.config import FALLBACK_FEATURE_LENGTHS
  from jaxprompt.data.tasks import check_task_name, task_defaults
  from jaxprompt.methods import get_method
  from jaxprompt.prompts import prompt as prompt_lib
  from jaxprompt.train import engine as engine_lib, evaluation
  from jaxprompt.train.evaluation import primary_score
  from jaxprompt.train.steps import LossConfig
  from jaxprompt.methods import library as lib
  all_entries = lib.entries(library)
  targets = list(targets) if targets else sorted(all_entries)
  no_own = [t for t in targets if t not in all_entries]
  if no_own:
    raise TransferError(f'{library}: no own prompt-tuning score for {", ".join(no_own)} (the '
                        'library has no prompt for it); add its prompt with `jaxprompt library '
                        'add` or leave it out of --tasks')
  for t in targets:
    check_task_name(t)
  names, prompts, _ = library_prompts(library, sources)
  missing_rows = [t for t in targets if t not in names]
  if missing_rows:  # the own prompt must be evaluated too
    names = names + missing_rows
    prompts = prompts + [lib.load_prompt(library, t) for t in missing_rows]
  bb = load_backbone(backbone)
  width = bb.module.config.emb_dim
  if prompts[0].shape[-1] != width:
    raise TransferError(f'{library}: prompt width {prompts[0].shape[-1]} does not match the '
                        f'backbone width {width}; evaluate the library on its own backbone')
  groups: dict[tuple, list[int]] = {}
  for i, p in enumerate(prompts):
    groups.setdefault(p.shape, []).append(i)
  method = get_method('prompt_stack')
  scores = np.full((len(names), len(targets)), np.nan)
  start = time.time()
  for shape, rows in groups.items():
    stack = prompt_lib.prompt_tree(np.stack([prompts[i] for i in rows]).astype(np.float32))
    eng, state = engine_lib.build_engine(bb.module, method.eval_inputs, None,
                                         {'backbone': bb.params}, stack)
    size = eng.data_parallel_size
    bs = -(-batch_size // size) * size
    for j, task in enumerate(targets):
      lengths = dict(feature_lengths or task_defaults(task).get('feature_lengths',
                                                                FALLBACK_FEATURE_LENGTHS))
      data = evaluation.load_eval_data(task, split, lengths, bs, max_eval_examples)
      ev = evaluation.Evaluator(eng, method.eval_inputs, task, data, mode, loss=LossConfig(),
                                batch_extras=method.eval_extras(0))
      for k, i in enumerate(rows):  # one program: task_index is a batch entry
        scores[i, j] = primary_score(ev.with_extras(method.eval_extras(k))(state.trainable))
      if progress:
        print(f'transfer: {task}: {len(rows)} prompts of length {shape[0]} evaluated '
              f'({time.time() - start:.0f} s)', file=sys.stderr)
    del eng, state
  own = {t: float(scores[names.index(t), j]) for j, t in enumerate(targets)}
  keep = list(sources) if sources else names
  rows_kept = [names.index(s) for s in keep]
  return TransferMatrix(keep, targets, scores[rows_kept], own, time.time() - start)


# ---------------------------------------------------------------------------------------------
# Correlations.

def spearman(x, y) -> float | None:
  """Spearman's rho of two vectors (None when one is constant or fewer than 3 points)."""
  from scipy.stats import spearmanr
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  return float(spearmanr(x, y).statistic)


def pair_values(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                pairs: Sequence[tuple[str, str]]) -> np.ndarray:
  return np.array([matrix[rows.index(a), cols.index(b)] for a, b in pairs], np.float64)


def indicator_correlations(indicators: Mapping[str, np.ndarray], tasks: Sequence[str],
                           references: Mapping[str, tuple[np.ndarray, Sequence[str],
                                                          Sequence[str]]]
                           ) -> dict[str, dict[str, Any]]:
  """{indicator: {reference: rho}} over ordered (source, target) pairs, source != target, that
  every reference covers; `references[name] = (matrix [sources, targets], sources, targets)`;
  the indicator between the two tasks' prompts is `indicators[name][source, target]`."""
  out: dict[str, dict[str, Any]] = {}
  tasks = list(tasks)
  for ref, (matrix, rows, cols) in references.items():
    pairs = [(s, t) for s in rows for t in cols if s != t and s in tasks and t in tasks]
    y = pair_values(matrix, list(rows), list(cols), pairs)
    for name, ind in indicators.items():
      x = pair_values(ind, tasks, tasks, pairs)
      out.setdefault(name, {})[ref] = spearman(x, y)
      out[name][f'{ref}_pairs'] = len(pairs)
  return out


def format_correlations(corr: Mapping[str, Mapping[str, Any]]) -> str:
  refs = [k for k in next(iter(corr.values())) if not k.endswith('_pairs')] if corr else []
  lines = [f'{"indicator":<22}' + ''.join(f'{r:>20}' for r in refs)]
  for name, row in corr.items():
    cells = ''.join(f'{"-" if row[r] is None else f"{row[r]:+.3f}":>20}' for r in refs)
    lines.append(f'{name:<22}{cells}')
  if refs:
    lines.append('(Spearman rho over ordered source != target pairs: ' + ', '.join(
        f'{r} {next(iter(corr.values()))[r + "_pairs"]}' for r in refs) + ')')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Files: CSV matrices and heatmaps.

def write_matrix_csv(path: str, matrix, rows: Sequence[str], cols: Sequence[str],
                     corner: str = 'source\\target') -> str:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow([corner] + list(cols))
    for name, row in zip(rows, np.asarray(matrix)):
      w.writerow([name] + [f'{v:.6g}' for v in row])
  os.replace(tmp, path)
  return path


def read_matrix_csv(path: str) -> tuple[np.ndarray, list[str], list[str]]:
  """(matrix, rows, cols) of a CSV written by `write_matrix_csv` (first row and column: names)."""
  if not os.path.isfile(path):
    raise TransferError(f'{path}: no such matrix file')
  with open(path, newline='') as f:
    table = [r for r in csv.reader(f) if r]
  if len(table) < 2 or len(table[0]) < 2:
    raise TransferError(f'{path}: not a matrix CSV (header row of targets, one row per source)')
  cols, rows = table[0][1:], [r[0] for r in table[1:]]
  try:
    matrix = np.array([[float(v) for v in r[1:]] for r in table[1:]], np.float64)
  except ValueError as e:
    raise TransferError(f'{path}: a non-numeric cell ({e})') from None
  if matrix.shape != (len(rows), len(cols)):
    raise TransferError(f'{path}: rows of unequal length')
  return matrix, rows, cols


def heatmap(path: str, matrix, rows: Sequence[str], cols: Sequence[str], title: str,
            fmt: str = '{:.2f}', value_label: str = '') -> str:
  """A readable heatmap PNG: at least 6.4 x 4.8 in at 110 dpi whatever the matrix size, the
  title wrapped rather than clipped, both axes and the colour bar labelled."""
  import textwrap

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  m = np.asarray(matrix, np.float64)
  fig, ax = plt.subplots(figsize=(max(6.4, 2.5 + 0.55 * len(cols)),
                                  max(4.8, 2.0 + 0.45 * len(rows))))
  im = ax.imshow(m, cmap='viridis', aspect='auto')
  short = lambda n: n[4:] if n.startswith('lab_') else n  # noqa: E731
  ax.set_xticks(range(len(cols)), [short(c) for c in cols], rotation=60, ha='right', fontsize=8)
  ax.set_yticks(range(len(rows)), [short(r) for r in rows], fontsize=8)
  ax.set_xlabel('target task')
  ax.set_ylabel('source prompt')
  if m.size <= 400:
    low, high = im.get_clim()
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        if np.isfinite(m[i, j]):  # dark text on the bright end of viridis, white elsewhere
          bright = (m[i, j] - low) / max(high - low, 1e-12) > 0.6
          ax.text(j, i, fmt.format(m[i, j]), ha='center', va='center', fontsize=7,
                  color='k' if bright else 'w')
  bar = fig.colorbar(im, ax=ax)
  if value_label:
    bar.set_label(value_label)
  ax.set_title('\n'.join(textwrap.wrap(title, 60)), fontsize=10)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def _check_out(out: str, suffixes: Sequence[str], overwrite: bool) -> None:
  existing = [out + s for s in suffixes if os.path.exists(out + s)]
  if existing and not overwrite:
    raise TransferError(f'{existing[0]}: already exists; choose another --out or pass '
                        '--overwrite')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)


def write_transfer_matrix(tm: TransferMatrix, out: str, overwrite: bool = False
                          ) -> dict[str, str]:
  """OUT.csv (relative performance), OUT_scores.csv, OUT.png, OUT.json."""
  _check_out(out, ('.csv', '_scores.csv', '.png', '.json'), overwrite)
  paths = {'relative': write_matrix_csv(out + '.csv', tm.relative, tm.sources, tm.targets),
           'scores': write_matrix_csv(out + '_scores.csv', tm.scores, tm.sources, tm.targets)}
  paths['heatmap'] = heatmap(out + '.png', tm.relative, tm.sources, tm.targets,
                             'zero-shot transfer: score / target\'s own prompt score',
                             value_label='relative score (1 = the target\'s own prompt)')
  with open(out + '.json', 'w') as f:
    json.dump({'sources': tm.sources, 'targets': tm.targets, 'scores': tm.scores.tolist(),
               'relative': tm.relative.tolist(), 'own': tm.own,
               'seconds': round(tm.seconds, 2)}, f, indent=1)
  paths['json'] = out + '.json'
  return paths


# ---------------------------------------------------------------------------------------------
# The command line: `jaxprompt transfer matrix|indicators`.

def _split(text: str | None) -> list[str]:
  return [t.strip() for t in (text or '').split(',') if t.strip()]


def _add_arguments(parser) -> None:
  sub = parser.add_subparsers(dest='transfer_command', required=True)
  m = sub.add_parser('matrix', help='zero-shot transfer of every library prompt to every task')
  m.add_argument('--library', required=True, help='the prompt library directory')
  m.add_argument('--backbone', required=True, help="the library's backbone (checkpoint or 'lab')")
  m.add_argument('--tasks', default=None,
                 help='comma-separated target tasks (default: every library task); each needs '
                 'its own prompt in the library')
  m.add_argument('--sources', default=None, help='comma-separated source prompts (default: all)')
  m.add_argument('--out', required=True, help='writes OUT.csv, OUT_scores.csv, OUT.png, OUT.json')
  m.add_argument('--split', default='validation', help='evaluation split')
  m.add_argument('--max_eval_examples', type=int, default=None, help='evaluate on N per task')
  m.add_argument('--batch_size', type=int, default=64, help='evaluation batch size')
  m.add_argument('--overwrite', action='store_true', help='replace existing OUT files')
  m.add_argument('--vocabulary', default=None, help="SentencePiece model (default: T5's)")
  i = sub.add_parser('indicators', help='prompt-similarity indicators vs zero-shot transfer')
  i.add_argument('--library', required=True, help='the prompt library directory')
  i.add_argument('--backbone', default=None,
                 help="the library's backbone, for ON (without it: E_concat and E_avg only)")
  i.add_argument('--tasks', default=None, help='comma-separated tasks (default: all)')
  i.add_argument('--matrix', default=None,
                 help='zero-shot relative-performance CSV (`transfer matrix` OUT.csv)')
  i.add_argument('--init_gain', default=None,
                 help='CSV of transfer-as-initialisation gains, same layout (source rows)')
  i.add_argument('--filler', default=DEFAULT_FILLER,
                 help="ON's filler token: 'eos', a token id, or a one-token word")
  i.add_argument('--out', default=None, help='writes OUT.csv (table), OUT_<indicator>.png, '
                 'OUT_<indicator>.csv, OUT.json')
  i.add_argument('--overwrite', action='store_true', help='replace existing OUT files')
  i.add_argument('--json', action='store_true', help='print JSON')
  i.add_argument('--vocabulary', default=None, help="SentencePiece model (default: T5's)")


def _matrix_command(args) -> int:
  from jaxprompt.data import setup_tasks
  _check_out(args.out, ('.csv', '_scores.csv', '.png', '.json'), args.overwrite)
  setup_tasks(args.vocabulary)
  tm = zero_shot_matrix(args.library, args.backbone, _split(args.tasks) or None,
                        _split(args.sources) or None, split=args.split,
                        max_eval_examples=args.max_eval_examples, batch_size=args.batch_size)
  paths = write_transfer_matrix(tm, args.out, overwrite=True)
  rel = tm.relative
  print(f'zero-shot transfer: {len(tm.sources)} prompts x {len(tm.targets)} tasks in '
        f'{tm.seconds:.1f} s')
  for j, t in enumerate(tm.targets):
    best = int(np.nanargmax(np.where(np.array(tm.sources) == t, -np.inf, rel[:, j]))) \
        if len(tm.sources) > 1 else j
    print(f'  {t:<32} own {tm.own[t]:.4g}; best other source {tm.sources[best]} '
          f'{rel[best, j]:.3f}')
  print('written: ' + ', '.join(paths.values()))
  return 0


def _indicators_command(args) -> int:
  tasks, prompts, _ = library_prompts(args.library, _split(args.tasks) or None)
  vocabulary = None
  if args.backbone:
    from jaxprompt.data import setup_tasks
    setup_tasks(args.vocabulary)
    if args.filler not in ('eos',) and not str(args.filler).isdigit():
      from jaxprompt.data import vocab as vocab_lib
      vocabulary = vocab_lib.get_vocabulary(args.vocabulary) if args.vocabulary else None
  filler = int(args.filler) if str(args.filler).isdigit() else args.filler
  refs = {}
  for name, path in (('zero_shot', args.matrix), ('init_gain', args.init_gain)):
    if path:
      refs[name] = read_matrix_csv(path)
  if args.out:
    _check_out(args.out, ('.csv', '.json'), args.overwrite)
  ind = indicator_matrices(prompts, args.backbone, filler=filler, vocabulary=vocabulary)
  corr = indicator_correlations(ind, tasks, refs) if refs else {}
  if args.out:
    for name, m in ind.items():
      write_matrix_csv(f'{args.out}_{name}.csv', m, tasks, tasks, 'task\\task')
      heatmap(f'{args.out}_{name}.png', m, tasks, tasks, f'indicator {name}')
    if corr:
      table = [[n] + [row[r] for r in refs] for n, row in corr.items()]
      with open(args.out + '.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['indicator'] + [f'spearman_{r}' for r in refs])
        w.writerows(table)
    with open(args.out + '.json', 'w') as f:
      json.dump({'tasks': tasks, 'indicators': {k: v.tolist() for k, v in ind.items()},
                 'spearman': corr}, f, indent=1)
  if args.json:
    print(json.dumps({'tasks': tasks, 'spearman': corr,
                      'indicators': {k: v.tolist() for k, v in ind.items()}}))
    return 0
  print(f'{len(tasks)} prompts of {args.library}; indicators: {", ".join(ind)}')
  if corr:
    print(format_correlations(corr))
  else:
    print('(give --matrix to correlate the indicators with zero-shot transfer)')
  if args.out:
    print(f'written: {args.out}_<indicator>.csv/.png, {args.out}.json' +
          (f', {args.out}.csv' if corr else ''))
  return 0


def _run(args) -> int:
  return {'matrix': _matrix_command, 'indicators': _indicators_command}[args.transfer_command](args)


COMMANDS = {'transfer': Command('transferability (Su et al. 2022): zero-shot matrix, indicators',
                                _add_arguments, _run)}

__all__ = ['COMMANDS', 'ActivationMasks', 'EMBEDDING_INDICATORS', 'TransferError',
           'TransferMatrix', 'activation_masks', 'avg_cosine', 'avg_euclidean', 'concat_cosine',
           'concat_euclidean', 'format_correlations', 'heatmap', 'indicator_correlations',
           'indicator_matrices', 'library_prompts', 'on_matrices', 'overlap_matrix',
           'overlap_rate', 'read_matrix_csv', 'spearman', 'write_matrix_csv',
           'write_transfer_matrix', 'zero_shot_matrix']
