"""XPrompt's study on the lab: accuracy vs pruned fraction, importance vs random masks, cost.

    jaxprompt lab report xprompt --out benchmarks/results/xprompt_lab.json   # lab:methods, 3 seeds
    jaxprompt lab report xprompt --targets minority --seeds 0 --steps 200 --fractions 0.5 --out X
    python benchmarks/xprompt_lab.py ...     # the same; --out defaults to benchmarks/results/

For each lab target: stage 1 tunes a 20-token prompt (method xprompt, all-ones masks, i.e.
prompt tuning); `prune` scores it, prunes to each fraction and rewinds (retrains with the same
schedule), once with importance-chosen masks and once with random scores (masks of the same
number of kept pieces); every prompt is then scored on the test split. It also times one
importance pass (one batch) against one train step at the same batch size, and scores the
chosen rewound prompt with its pruned tokens dropped from the sequence instead of zero vectors.

Every (seed, target) is one stage 1, one control and one prune per mask kind; the seed changes
the prompt's initial draw, the data order and the random masks. The summary gives, per target and
fraction, the mean and sample sd over seeds, and the paired differences (pruned-and-rewound minus
the unpruned prompt retrained for the same total steps; importance minus random masks) with
whether the mean difference exceeds its spread (|mean| > sd and all seeds agree in sign).

Writes OUT (JSON, rewritten after every target) and OUT's .md table (docs/xprompt.md); refuses
to replace them without --overwrite. A rerun with the same --work resumes the runs in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

# The lab:methods targets where prompt tuning falls short of model tuning (docs/spot.md).
DEFAULT_TARGETS = ('count_numbers', 'minority', 'more_numbers_than_colours')
DEFAULT_FRACTIONS = (0.3, 0.6)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 400
PROMPT_LENGTH = 20  # the paper's
PIECES = 16
BATCH_SIZE = 16  # the paper's


def say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def test_split_scorer(bb, ctx, position):
  """Scores a prompt file (or masks) on the test split, as validation does on its split."""
  import dataclasses
  from jaxprompt.methods.xprompt import _Validator
  test_ctx = dataclasses.replace(ctx, config=ctx.config.replace(eval_split='test'))
  return _Validator(bb, test_ctx, position, 100)


def time_costs(bb, task, prompt_path, lengths, batch_size, repeats=20):
  """Seconds of one warm train step and one warm importance pass (same batch, same prompt)."""
  import jax
  from jaxprompt.data.features import EXAMPLE_MASK, get_dataset
  from jaxprompt.methods import xprompt as xp
  from jaxprompt.prompts.files import read_prompt
  value = read_prompt(prompt_path).value
  m = value.shape[0]
  batch = next(iter(get_dataset(task, lengths, 'train', batch_size, shuffle=True, seed=0,
                                num_epochs=None)))
  batch = {k: v for k, v in batch.items() if k != EXAMPLE_MASK}
  eng, state = xp.unpruned_train_engine(bb, value, PIECES)
  dev_batch = eng.put_batch(batch)
  rng = jax.random.PRNGKey(0)
  scorer = xp.Scorer(bb, value, task, lengths, batch_size, pieces=PIECES, batches=1,
                     batch_source=[batch])
  masks = {'token': jax.numpy.ones((m,)), 'piece': jax.numpy.ones((m, PIECES))}
  state, _ = eng.train_step(state, eng.frozen, dev_batch, rng)  # compile both
  jax.block_until_ready(scorer._grad(masks, value, scorer.engine.frozen, scorer.batches[0]))
  step_times, imp_times = [], []
  for _ in range(repeats):  # interleaved, each synchronised: same machine load for both
    start = time.perf_counter()
    state, metrics = eng.train_step(state, eng.frozen, dev_batch, rng)
    jax.block_until_ready(metrics)
    step_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(scorer._grad(masks, value, scorer.engine.frozen, scorer.batches[0]))
    imp_times.append(time.perf_counter() - start)
  step, imp = float(np.median(step_times)), float(np.median(imp_times))
  return {'train_step_s': step, 'importance_pass_s': imp, 'ratio': imp / step,
          'batch_size': batch_size, 'repeats': repeats, 'statistic': 'median, synchronised'}


def run_target(target, ckpt, work, steps, fractions, seed):
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH, seqio_name
  from jaxprompt.methods import get_method
  from jaxprompt.methods import xprompt as xp
  from jaxprompt.tuning import make_context, tune
  from jaxprompt.config import RunConfig
  task = seqio_name(target)
  bb = load_backbone(ckpt)
  common = dict(feature_lengths=SEQUENCE_LENGTH, batch_size=BATCH_SIZE, progress=False,
                seed=seed)
  eval_period = max(steps // 4, 1)
  start = time.time()
  stage1 = tune(task, backbone=bb, model_dir=os.path.join(work, f'{target}_stage1'),
                method='xprompt', prompt_length=PROMPT_LENGTH, prompt_init='class_labels',
                train_steps=steps, eval_period=eval_period, pieces=PIECES,
                prune_fractions=fractions, resume=True, **common)
  from jaxprompt.prompts.files import read_prompt
  out = {'target': target, 'width': int(read_prompt(stage1.best_prompt_path).value.shape[1]),
         'stage1_minutes': round((time.time() - start) / 60, 2),
         'stage1_val': stage1.best_metrics['score']}
  say(f'{target}: stage 1 validation {out["stage1_val"]:.1f}')
  ctx = make_context(get_method('xprompt'), task, bb,
                     RunConfig(method='xprompt', prompt_length=PROMPT_LENGTH, **common),
                     xp.XPromptOptions())
  test = test_split_scorer(bb, ctx, 0)
  out['unpruned_test'] = test(stage1.best_prompt_path)
  # The control for "more training": the unpruned prompt retrained from its stage-1 values with
  # the same schedule as every rewinding run (all-ones masks).
  cont = tune(task, backbone=bb, model_dir=os.path.join(work, f'{target}_continued'),
              method='xprompt', prompt_length=PROMPT_LENGTH,
              init_from=os.path.abspath(stage1.best_prompt_path), train_steps=steps,
              eval_period=eval_period, pieces=PIECES, resume=True, **common)
  out['unpruned_continued_val'] = cont.best_metrics['score']
  out['unpruned_continued_test'] = test(cont.best_prompt_path)
  for scores in ('importance', 'random'):
    start = time.time()
    res = xp.prune(stage1.best_prompt_path, task, backbone=bb,
                   out_dir=os.path.join(work, f'{target}_{scores}'),
                   options={'mask_scores': scores, 'importance_batches': 8},
                   config={'eval_period': eval_period}, log=say)
    rows = []
    for r in res.rows[1:]:
      tag = xp._tag(r['fraction'])
      masks = os.path.join(res.out_dir, 'masks', f'{tag}.safetensors')
      rows.append({k: r[k] for k in ('fraction', 'kept_tokens', 'kept_pieces',
                                     'trainable_parameters', 'val_before', 'val_after')}
                  | {'test_before': test(masks), 'test_after': test(r['prompt'])})
    out[scores] = {'rows': rows, 'chosen': res.chosen,
                   'minutes': round((time.time() - start) / 60, 2)}
    if scores == 'importance':
      out['importance_pass_s_in_prune'] = res.importance_seconds
      chosen = next(r for r in res.rows[1:] if r['fraction'] == res.chosen)
      out['chosen_test'] = test(chosen['prompt'])
      out['chosen_test_drop_pruned'] = score_dropping_pruned(test, chosen['prompt'], work,
                                                             target)
    say(f'{target} [{scores}]: ' + '; '.join(
        f'{r["fraction"]:g}: val {r["val_before"]:.1f}->{r["val_after"]:.1f} test '
        f'{r["test_before"]:.1f}->{r["test_after"]:.1f}' for r in rows))
  return out, stage1.best_prompt_path, bb


def score_dropping_pruned(test, prompt_path, work, target):
  """The same trained prompt scored with its pruned tokens dropped from the sequence."""
  from jaxprompt.prompts.files import read_prompt, write_prompt
  pf = read_prompt(prompt_path)
  meta = dict(pf.metadata)
  meta['xprompt'] = dict(meta.get('xprompt') or {}, drop_pruned=True)
  path = os.path.join(work, f'{target}_drop.safetensors')
  write_prompt(path, pf.value, overwrite=True, token_mask=pf.token_mask,
               piece_mask=pf.piece_mask, **{k: v for k, v in meta.items()
                                            if k not in ('format', 'jaxprompt_version', 'length',
                                                         'width')})
  return test(path)


def summarise(targets: list[dict], fractions) -> dict:
  out = {}
  for f in fractions:
    imp = [next(r for r in t['importance']['rows'] if r['fraction'] == f) for t in targets]
    rnd = [next(r for r in t['random']['rows'] if r['fraction'] == f) for t in targets]
    out[f'{f:g}'] = {
        'targets_matching_or_beating_unpruned_test': sum(
            r['test_after'] >= t['unpruned_test'] for r, t in zip(imp, targets)),
        'targets_importance_beats_random_after': sum(
            a['test_after'] > b['test_after'] for a, b in zip(imp, rnd)),
        'targets_importance_beats_random_before': sum(
            a['test_before'] > b['test_before'] for a, b in zip(imp, rnd)),
        'mean_test_after_importance': float(np.mean([r['test_after'] for r in imp])),
        'mean_test_after_random': float(np.mean([r['test_after'] for r in rnd])),
        'mean_test_before_importance': float(np.mean([r['test_before'] for r in imp])),
        'mean_test_before_random': float(np.mean([r['test_before'] for r in rnd])),
    }
  out['mean_unpruned_test'] = float(np.mean([t['unpruned_test'] for t in targets]))
  if all('unpruned_continued_test' in t for t in targets):
    out['mean_unpruned_continued_test'] = float(np.mean([t['unpruned_continued_test']
                                                         for t in targets]))
    for f in fractions:
      imp = [next(r for r in t['importance']['rows'] if r['fraction'] == f) for t in targets]
      out[f'{f:g}']['targets_matching_or_beating_unpruned_continued_test'] = sum(
          r['test_after'] >= t['unpruned_continued_test'] for r, t in zip(imp, targets))
  return out


def _pick(target_row, kind, fraction, key):
  return next(r for r in target_row[kind]['rows'] if r['fraction'] == fraction)[key]


def _spread(values) -> dict:
  v = np.asarray(values, float)
  return {'mean': float(v.mean()), 'sd': float(v.std(ddof=1)) if v.size > 1 else float('nan'),
          'n': int(v.size)}


def _paired(a, b) -> dict:
  """Mean and sd of the per-seed differences a - b; 'exceeds' when |mean| > sd and every seed
  has the same sign (with 3 seeds, a difference a reader can trust only as a direction)."""
  d = np.asarray(a, float) - np.asarray(b, float)
  out = _spread(d)
  out['exceeds_spread'] = bool(d.size > 1 and abs(out['mean']) > out['sd'] and
                               (np.all(d > 0) or np.all(d < 0)))
  return out


def summarise_seeds(rows: list[dict], fractions) -> dict:
  """Per target (over seeds): the unpruned prompt, its retrained control, and per fraction the
  importance and random prompts before/after rewinding, with paired differences."""
  out = {}
  for target in dict.fromkeys(r['target'] for r in rows):
    rs = sorted((r for r in rows if r['target'] == target), key=lambda r: r['seed'])
    t = {'seeds': [r['seed'] for r in rs],
         'unpruned_test': _spread([r['unpruned_test'] for r in rs]),
         'unpruned_continued_test': _spread([r['unpruned_continued_test'] for r in rs])}
    for f in fractions:
      imp_after = [_pick(r, 'importance', f, 'test_after') for r in rs]
      rnd_after = [_pick(r, 'random', f, 'test_after') for r in rs]
      t[f'{f:g}'] = {
          'importance_before': _spread([_pick(r, 'importance', f, 'test_before') for r in rs]),
          'importance_after': _spread(imp_after),
          'random_before': _spread([_pick(r, 'random', f, 'test_before') for r in rs]),
          'random_after': _spread(rnd_after),
          'kept_tokens': [_pick(r, 'importance', f, 'kept_tokens') for r in rs],
          'trainable_parameters': _pick(rs[0], 'importance', f, 'trainable_parameters'),
          'importance_minus_continued': _paired(imp_after,
                                                [r['unpruned_continued_test'] for r in rs]),
          'importance_minus_unpruned': _paired(imp_after, [r['unpruned_test'] for r in rs]),
          'importance_minus_random': _paired(imp_after, rnd_after)}
    out[target] = t
  return out


def markdown(report: dict) -> str:
  """The table for docs/xprompt.md: test accuracy, mean +- sd over seeds."""
  fmt = lambda s: f'{s["mean"]:.1f} ± {s["sd"]:.1f}'
  dif = lambda s: (f'**{s["mean"]:+.1f} ± {s["sd"]:.1f}**' if s['exceeds_spread']
                   else f'{s["mean"]:+.1f} ± {s["sd"]:.1f}')
  lines = ['| target | prompt | kept tokens | params | importance: before -> after | '
           'random: before -> after | after − retrained unpruned | importance − random |',
           '|---|---|---|---|---|---|---|---|']
  for target, t in report['summary'].items():
    full = PROMPT_LENGTH * next(r['width'] for r in report['targets'] if r['target'] == target)
    lines.append(f'| {target} | unpruned, stage 1 | {PROMPT_LENGTH} | {full} | '
                 f'{fmt(t["unpruned_test"])} | | | |')
    lines.append(f'| {target} | unpruned, retrained (control) | {PROMPT_LENGTH} | {full} | '
                 f'{fmt(t["unpruned_continued_test"])} | | | |')
    for f in report['settings']['fractions']:
      r = t[f'{f:g}']
      lines.append(
          f'| {target} | pruned {f:g} | {"/".join(map(str, r["kept_tokens"]))} | '
          f'{r["trainable_parameters"]} | {fmt(r["importance_before"])} -> '
          f'{fmt(r["importance_after"])} | {fmt(r["random_before"])} -> {fmt(r["random_after"])} '
          f'| {dif(r["importance_minus_continued"])} | {dif(r["importance_minus_random"])} |')
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------
# The command line: `jaxprompt lab report xprompt` (and benchmarks/xprompt_lab.py).

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
  from jaxprompt.flags import Parser  # one-line errors naming a typo'd flag's close matches
  p = Parser(prog=prog, description=__doc__.split('\n')[0])
  p.add_argument('--targets', default=','.join(DEFAULT_TARGETS), help='lab target tasks')
  p.add_argument('--fractions', default=','.join(map(str, DEFAULT_FRACTIONS)),
                 help='pruned fractions, each in (0, 1)')
  p.add_argument('--steps', type=int, default=DEFAULT_STEPS,
                 help='stage-1 steps (the rewinding runs use the same schedule)')
  p.add_argument('--seeds', default=','.join(map(str, DEFAULT_SEEDS)))
  p.add_argument('--backbone', default='lab:methods', help="'lab:PRESET' or a checkpoint")
  p.add_argument('--work', default=None, help='run directories (default: a temporary one); '
                 'reusing one resumes')
  p.add_argument('--out', default='xprompt_lab.json',
                 help='the JSON report; the Markdown table goes beside it (.md)')
  p.add_argument('--overwrite', action='store_true')
  p.add_argument('--no_cost', action='store_true', help='skip the step-vs-importance timing')
  return p


def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(',') if t.strip()]


def check_args(args) -> tuple[list[str], tuple[float, ...], list[int]]:
  """(targets, fractions, seeds), or one error naming the flag and the fix; nothing is loaded."""
  from jaxprompt.config import ConfigError
  from jaxprompt.lab.world import TASKS
  from jaxprompt.methods.xprompt import check_fractions
  for path in (args.out, markdown_path(args.out)):
    if os.path.exists(path) and not args.overwrite:
      raise FileExistsError(f'{path}: already exists; pass --overwrite or another --out')
  targets = _split(args.targets)
  unknown = [t for t in targets if t not in TASKS]
  if not targets or unknown:
    raise ValueError(f'--targets: {", ".join(unknown) or "none given"}: not lab tasks; '
                     f'choose among {", ".join(TASKS)}')
  try:
    fractions = check_fractions(args.fractions)
  except ConfigError:
    raise ValueError(f'--fractions: comma-separated fractions strictly between 0 and 1, got '
                     f'{args.fractions!r}') from None
  try:
    seeds = [int(s) for s in _split(args.seeds)]
  except ValueError:
    seeds = []
  if not seeds:
    raise ValueError(f'--seeds: comma-separated integers, got {args.seeds!r}')
  if args.steps < 1:
    raise ValueError(f'--steps: at least 1, got {args.steps}')
  return targets, fractions, seeds


def markdown_path(out: str) -> str:
  return os.path.splitext(out)[0] + '.md'


def write_report(report: dict, out: str) -> None:
  """OUT (JSON, replaced atomically) and its Markdown table."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + '.tmp', 'w') as f:
    json.dump(report, f, indent=1, default=float)
  os.replace(out + '.tmp', out)
  with open(markdown_path(out), 'w') as f:
    f.write(markdown(report))


def make_report(args, results: list[dict], fractions, seeds, cost, started: float) -> dict:
  return dict(
      settings=dict(backbone=args.backbone, prompt_length=PROMPT_LENGTH, pieces=PIECES,
                    batch_size=BATCH_SIZE, steps=args.steps, fractions=list(fractions),
                    importance_batches=8, prompt_init='class_labels', seeds=seeds,
                    token_share=0.5, selection='validation', scores='test split (200)',
                    importance_per='example'),
      targets=results, by_seed={s: summarise([r for r in results if r['seed'] == s],
                                             fractions) for s in seeds
                                if any(r['seed'] == s for r in results)},
      summary=summarise_seeds(results, fractions), cost=cost,
      minutes=round((time.time() - started) / 60, 1), machine=platform.processor() or
      platform.machine(), cpus=os.cpu_count())


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  args = build_parser(prog).parse_args(argv)
  targets, fractions, seeds = check_args(args)
  from jaxprompt.checkpoints.backbone import resolve_backbone_path
  from jaxprompt.lab import register_lab_tasks
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH, seqio_name
  ckpt = resolve_backbone_path(args.backbone)
  register_lab_tasks()
  work = args.work or tempfile.mkdtemp(prefix='xprompt_lab_')
  say(f'work directory: {work}')
  started = time.time()
  results, cost = [], None
  for seed in seeds:
    for target in targets:
      row, stage1_prompt, bb = run_target(target, ckpt, os.path.join(work, f'seed{seed}'),
                                          args.steps, fractions, seed)
      row['seed'] = seed
      results.append(row)
      if cost is None and not args.no_cost:
        cost = time_costs(bb, seqio_name(target), stage1_prompt, SEQUENCE_LENGTH, BATCH_SIZE)
        say(f'cost: train step {cost["train_step_s"] * 1e3:.1f} ms, importance pass '
            f'{cost["importance_pass_s"] * 1e3:.1f} ms (ratio {cost["ratio"]:.2f})')
      report = make_report(args, results, fractions, seeds, cost, started)
      write_report(report, args.out)
  print(json.dumps(report['summary'], indent=1))
  return 0

