"""Transferability on the lab (Su et al. 2022): zero-shot matrix, indicators, projector.

    nice -n 10 .venv/bin/python benchmarks/transfer_lab.py --work /tmp/transfer_lab \
        --out benchmarks/results/transfer_lab.json

1. A prompt per task on backbone A (`spot.train_sources`: one stack run, each row at its best).
2. The zero-shot matrix of those prompts (`transferability.zero_shot_matrix`, batched per task);
   related vs unrelated pairs by the lab's `relatedness_matrix`.
3. Every indicator (E_concat, E_avg, ON and its windows on A) and its Spearman rho with zero-shot
   transfer and with relatedness, over ordered source != target pairs.
4. A second backbone B of another width (`lab.backbone.build(preset={... emb_dim ...}, seed=1)`),
   prompts of the same tasks on it, a projector B -> A trained with the task objective
   (method `projector`) on TRAIN tasks, applied to the held-out tasks' B prompts and evaluated on
   A relative to A's own prompt; baselines: a random prompt and no prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TASKS = ('has_red', 'has_green', 'has_dog', 'count_colours', 'count_numbers', 'parity_numbers',
         'parity_animals', 'minority')
PROJECTOR_TRAIN = ('has_red', 'count_colours', 'parity_numbers', 'minority')


def _lab(t):
  return f'lab_{t}'


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--work', default='/tmp/transfer_lab')
  p.add_argument('--out', default=None, help='JSON results file')
  p.add_argument('--backbone', default='lab', help="backbone A ('lab', 'lab:methods', ...)")
  p.add_argument('--tasks', default=','.join(TASKS))
  p.add_argument('--projector_train', default=','.join(PROJECTOR_TRAIN))
  p.add_argument('--steps', type=int, default=300, help='prompt-tuning steps per library')
  p.add_argument('--projector_steps', type=int, default=300)
  p.add_argument('--source_width', type=int, default=96, help="backbone B's width")
  p.add_argument('--source_build_steps', type=int, default=600, help="backbone B's pretraining")
  p.add_argument('--max_eval_examples', type=int, default=100)
  p.add_argument('--skip_projector', action='store_true')
  args = p.parse_args(argv)
  import jax
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.lab import register_lab_tasks, relatedness_matrix
  from jaxprompt.methods import library as lib, spot, transferability as tr
  register_lab_tasks()
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  names = [_lab(t) for t in tasks]
  os.makedirs(args.work, exist_ok=True)
  out: dict = {'settings': vars(args), 'tasks': names}
  t0 = time.time()
  bb_a = load_backbone(args.backbone)
  out['backbone_a'] = {'path': bb_a.path, 'fingerprint': bb_a.fingerprint,
                       'width': bb_a.module.config.emb_dim}

  def library_for(bb, tag):
    d = os.path.join(args.work, f'library_{tag}')
    have = set(lib.entries(d)) if os.path.isfile(os.path.join(d, 'index.json')) else set()
    todo = [n for n in names if n not in have]
    if todo:
      start = time.time()
      spot.train_sources(todo, d, bb, os.path.join(args.work, f'sources_{tag}'),
                         train_steps=args.steps, batch_size=32 * len(todo) // 4,
                         eval_period=args.steps // 3, embedding_steps=None,
                         prompt_init='class_labels', max_eval_examples=args.max_eval_examples,
                         progress=False)
      out[f'library_{tag}_seconds'] = round(time.time() - start, 1)
    return d

  lib_a = library_for(bb_a, 'a')
  # 2. zero-shot matrix
  tm = tr.zero_shot_matrix(lib_a, bb_a, names, max_eval_examples=args.max_eval_examples,
                           progress=False)
  tr.write_transfer_matrix(tm, os.path.join(args.work, 'zero_shot'), overwrite=True)
  rel = tm.relative
  order = [tm.sources.index(n) for n in names]
  rel = rel[order]
  _, relatedness = relatedness_matrix(tasks)
  off = ~np.eye(len(names), dtype=bool)
  groups = {}
  for level in (1.0, 0.5, 0.0):
    sel = off & (relatedness == level)
    groups[str(level)] = {'pairs': int(sel.sum()),
                          'mean_relative': float(np.nanmean(rel[sel])) if sel.any() else None}
  out['zero_shot'] = {'seconds': round(tm.seconds, 1), 'own': tm.own,
                      'relative': rel.tolist(), 'by_relatedness': groups,
                      'spearman_with_relatedness': tr.spearman(relatedness[off], rel[off])}
  print(f'zero-shot matrix {len(names)}x{len(names)} in {tm.seconds:.0f} s; by relatedness: '
        + ', '.join(f'{k}: {v["mean_relative"]:.3f} ({v["pairs"]})' for k, v in groups.items()),
        file=sys.stderr)
  # 3. indicators
  _, prompts, _ = tr.library_prompts(lib_a, names)
  start = time.time()
  ind = tr.indicator_matrices(prompts, bb_a)
  out['indicators_seconds'] = round(time.time() - start, 1)
  corr = tr.indicator_correlations(ind, names, {
      'zero_shot': (rel, names, names), 'relatedness': (relatedness, names, names)})
  out['spearman'] = corr
  print(tr.format_correlations(corr), file=sys.stderr)
  for name, m in ind.items():
    tr.heatmap(os.path.join(args.work, f'indicator_{name}.png'), m, names, names, name)
  # 4. projector
  if not args.skip_projector:
    from jaxprompt.evaluate import evaluate
    from jaxprompt.lab import backbone as lab_backbone
    from jaxprompt.methods import projection as pj
    from jaxprompt.prompts.files import write_prompt
    start = time.time()
    ckpt_b = lab_backbone.build(preset={'emb_dim': args.source_width,
                                        'mlp_dim': 2 * args.source_width,
                                        'head_dim': args.source_width // 4,
                                        'name': f'w{args.source_width}'},
                                steps=args.source_build_steps, seed=1, progress=False)
    out['backbone_b_build_seconds'] = round(time.time() - start, 1)
    bb_b = load_backbone(ckpt_b)
    out['backbone_b'] = {'path': ckpt_b, 'fingerprint': bb_b.fingerprint,
                         'width': bb_b.module.config.emb_dim}
    lib_b = library_for(bb_b, 'b')
    train = [_lab(t) for t in args.projector_train.split(',') if t]
    held = [n for n in names if n not in train]
    proj_path = os.path.join(args.work, 'projector_b_to_a.safetensors')
    start = time.time()
    r = pj.train_task_objective(train, lib_b, bb_a, proj_path,
                                model_dir=os.path.join(args.work, 'projector_run'),
                                steps=args.projector_steps, batch_size=32,
                                eval_period=args.projector_steps // 3, hidden=768,
                                overwrite=True, max_eval_examples=args.max_eval_examples,
                                progress=False)
    out['projector'] = {'seconds': round(time.time() - start, 1), 'train_tasks': train,
                        'best_train_score': r.best_metrics and r.best_metrics.get('score'),
                        'held_out': {}}
    emb_std = float(np.std(np.asarray(bb_a.params['token_embedder']['embedding'])))
    length = prompts[0].shape[0]
    random_prompt = np.random.RandomState(0).normal(0, emb_std, (length, bb_a.module.config
                                                                 .emb_dim)).astype(np.float32)
    rand_path = write_prompt(os.path.join(args.work, 'random_prompt.safetensors'), random_prompt,
                             overwrite=True)
    for n in train + held:
      value, meta = pj.apply_projector(proj_path, f'{lib_b}:{n}', target_backbone=bb_a)
      path = write_prompt(os.path.join(args.work, f'projected_{n}.safetensors'), value,
                          overwrite=True, **{k: v for k, v in meta.items() if v is not None})
      own = tm.own[n]
      row = {}
      for label, prompt in (('projected', path), ('random', rand_path), ('no_prompt', None)):
        s = evaluate(n, backbone=bb_a, prompt=prompt, max_examples=args.max_eval_examples,
                     batch_size=100)['score']
        row[label] = {'score': s, 'relative': s / own if own else None}
      row['own'] = own
      out['projector']['held_out' if n in held else 'train_tasks_scores'] = dict(
          out['projector'].get('held_out' if n in held else 'train_tasks_scores', {}), **{n: row})
      print(f'projector {n} ({"held out" if n in held else "train"}): ' + ', '.join(
          f'{k} {v["relative"]:.3f}' for k, v in row.items() if k != 'own'), file=sys.stderr)
    for kind in ('projected', 'random', 'no_prompt'):
      vals = [row[kind]['relative'] for row in out['projector']['held_out'].values()]
      out['projector'][f'held_out_mean_{kind}'] = float(np.mean(vals))
  out['total_seconds'] = round(time.time() - t0, 1)
  text = json.dumps(out, indent=1, default=float)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  print(text)
  del jax
  return 0


if __name__ == '__main__':
  sys.exit(main())
