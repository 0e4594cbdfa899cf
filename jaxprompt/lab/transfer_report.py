"""Transferability on the lab (Su et al. 2022): zero-shot matrix, indicators, projector, init.

    jaxprompt transfer lab --backbone lab:methods \\
        --work /tmp/transfer_lab_methods --steps 600 --projector_steps 300 \\
        --out benchmarks/results/transfer_lab_methods.json

1. A prompt per task on backbone A (`spot.train_sources`: one stack run, each row at its best).
2. The zero-shot matrix of those prompts (`transferability.zero_shot_matrix`, batched per task),
   as relative performance (score / the target's own prompt) and as normalised gain
   ((score - no prompt) / (own - no prompt)); grouped by the lab's `relatedness_matrix`.
3. Every indicator (E_concat, E_avg, ON and its windows on A) and its Spearman rho with zero-shot
   transfer (both forms) and with relatedness, over ordered source != target pairs.
4. A second backbone B of another width and seed (`lab.backbone.with_width(preset, width)`,
   seed 1), prompts of the same tasks on it, and two projectors B -> A trained on the TRAIN
   tasks: the task objective (method `projector`, A's loss on [Proj(P_B); x]) and the distance
   objective (to A's prompts of the train tasks). Each is applied to the held-out tasks' B
   prompts and evaluated on A relative to A's own prompt; baselines: a random prompt (the
   embedding table's std) and no prompt.
5. Transfer as initialisation (`spot.transfer_matrix`: every (target, init) one row of one stack
   run): uniform random and class-label init vs a related and an unrelated source prompt of the
   library; steps to reach the target's own prompt-tuning score (and 90% of it); a curves PNG.

Every stage writes `WORK/stages/<name>.json` and a rerun with the same settings reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TASKS = ('has_red', 'has_green', 'count_colours', 'count_numbers', 'more_colours_than_animals',
         'more_numbers_than_colours', 'majority', 'minority')
PROJECTOR_TRAIN = ('has_red', 'count_colours', 'more_colours_than_animals', 'majority')
# (target, related source, unrelated source) for transfer as initialisation
INIT_TARGETS = (('more_numbers_than_colours', 'more_colours_than_animals', 'has_red'),
                ('minority', 'majority', 'has_green'),
                ('count_numbers', 'count_colours', 'has_red'),
                ('has_green', 'has_red', 'count_colours'))


def _lab(t):
  return t if t.startswith('lab_') else f'lab_{t}'


def _short(n):
  return n[4:] if n.startswith('lab_') else n


def parser(prog: str | None = None) -> argparse.ArgumentParser:
  """`jaxprompt transfer lab`'s options."""
  from jaxprompt.flags import Parser  # one-line errors naming a typo'd flag's close matches
  p = Parser(prog=prog, description=__doc__.splitlines()[0])
  p.add_argument('--work', default='/tmp/transfer_lab')
  p.add_argument('--out', default=None, help='JSON results file (PNGs next to it)')
  p.add_argument('--backbone', default='lab:methods', help="backbone A ('lab', 'lab:methods')")
  p.add_argument('--tasks', default=','.join(TASKS))
  p.add_argument('--projector_train', default=','.join(PROJECTOR_TRAIN))
  p.add_argument('--steps', type=int, default=600, help='prompt-tuning steps per library')
  p.add_argument('--steps_b', type=int, default=None,
                 help="prompt-tuning steps of B's library (default --steps)")
  p.add_argument('--per_task_batch', type=int, default=8, help='library: examples per task/step')
  p.add_argument('--projector_steps', type=int, default=300)
  p.add_argument('--distance_steps', type=int, default=1000)
  p.add_argument('--hidden', type=int, default=768)
  p.add_argument('--source_width', type=int, default=96, help="backbone B's width")
  p.add_argument('--source_preset', default='methods', help="backbone B's preset (at its width)")
  p.add_argument('--source_seed', type=int, default=1)
  p.add_argument('--source_build_steps', type=int, default=600, help="backbone B's pretraining")
  p.add_argument('--max_eval_examples', type=int, default=100)
  p.add_argument('--init_steps', type=int, default=300, help='transfer as init: target steps')
  p.add_argument('--init_eval_period', type=int, default=25)
  p.add_argument('--init_targets', default=';'.join(','.join(t) for t in INIT_TARGETS),
                 help="'target,related,unrelated;...'")
  p.add_argument('--skip', default='', help='comma-separated stages to skip: projector, init')
  return p


def source_backbone(args: argparse.Namespace) -> str:
  """Backbone B's checkpoint, built on first use: `--source_preset` at `--source_width`, seed
  `--source_seed`, `--source_build_steps` steps."""
  from jaxprompt.lab import backbone as lab_backbone
  return lab_backbone.build(preset=lab_backbone.with_width(args.source_preset, args.source_width),
                            steps=args.source_build_steps, seed=args.source_seed, progress=False)


def main(argv=None, prog: str | None = None) -> int:
  args = parser(prog).parse_args(argv)
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(args.work, 'xla_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.evaluate import evaluate
  from jaxprompt.lab import register_lab_tasks, relatedness_matrix
  from jaxprompt.methods import library as lib, spot, transferability as tr
  register_lab_tasks()
  skip = {s.strip() for s in args.skip.split(',') if s.strip()}
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  names = [_lab(t) for t in tasks]
  os.makedirs(os.path.join(args.work, 'stages'), exist_ok=True)
  if args.out:  # the results' folder (e.g. benchmarks/results) may not exist where this runs
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  out_base = os.path.splitext(args.out)[0] if args.out else os.path.join(args.work, 'results')
  out: dict = {'settings': vars(args), 'tasks': names}
  t0 = time.time()

  def say(msg):
    print(f'[{time.time() - t0:6.0f} s] {msg}', file=sys.stderr, flush=True)

  def stage(name, key, fn):
    path = os.path.join(args.work, 'stages', f'{name}.json')
    key = json.loads(json.dumps(key, default=str))
    if os.path.exists(path):
      with open(path) as f:
        done = json.load(f)
      if done.get('key') == key:
        say(f'{name}: reusing {path}')
        return done['value']
    start = time.time()
    value = fn()
    value = json.loads(json.dumps(value, default=float))
    with open(path + '.tmp', 'w') as f:
      json.dump({'key': key, 'value': value, 'seconds': round(time.time() - start, 1)}, f,
                indent=1)
    os.replace(path + '.tmp', path)
    say(f'{name}: {time.time() - start:.0f} s')
    return value

  def write_results():
    out['total_seconds'] = round(time.time() - t0, 1)
    if args.out:
      with open(args.out + '.tmp', 'w') as f:
        json.dump(out, f, indent=1, default=float)
      os.replace(args.out + '.tmp', args.out)

  bb_a = load_backbone(args.backbone)
  out['backbone_a'] = {'path': bb_a.path, 'fingerprint': bb_a.fingerprint,
                       'width': bb_a.module.config.emb_dim}

  def library_for(bb, tag, steps):
    d = os.path.join(args.work, f'library_{tag}')

    def train():
      have = set(lib.entries(d)) if os.path.isfile(os.path.join(d, 'index.json')) else set()
      todo = [n for n in names if n not in have]
      start = time.time()
      if todo:
        spot.train_sources(todo, d, bb, os.path.join(args.work, f'sources_{tag}'),
                           train_steps=steps, batch_size=args.per_task_batch * len(todo),
                           eval_period=max(steps // 4, 1), embedding_steps=None,
                           prompt_init='class_labels', max_eval_examples=args.max_eval_examples,
                           eval_batch_size=args.max_eval_examples, progress=False,
                           replace=True)
      ents = lib.entries(d)
      return {'seconds': round(time.time() - start, 1),
              'best': {n: {'score': ents[n].get('metrics', {}) and
                           max(v for k, v in ents[n]['metrics'].items()
                               if k in ('accuracy', 'exact_match')),
                           'step': ents[n].get('steps')} for n in names}}
    info = stage(f'library_{tag}', dict(backbone=bb.fingerprint, tasks=names, steps=steps,
                                        batch=args.per_task_batch), train)
    out[f'library_{tag}'] = info
    say(f'library {tag}: ' + ', '.join(f'{_short(n)} {v["score"]}' for n, v in
                                       info['best'].items()))
    return d

  # 1. library A
  lib_a = library_for(bb_a, 'a', args.steps)
  key_a = dict(backbone=bb_a.fingerprint, tasks=names, steps=args.steps,
               n=args.max_eval_examples)

  # 2. zero-shot matrix (+ no-prompt score per target, for the normalised gain)
  def matrix():
    tm = tr.zero_shot_matrix(lib_a, bb_a, names, sources=names,
                             max_eval_examples=args.max_eval_examples, progress=False)
    tr.write_transfer_matrix(tm, os.path.join(args.work, 'zero_shot'), overwrite=True)
    nop = {n: evaluate(n, backbone=bb_a, max_examples=args.max_eval_examples,
                       batch_size=args.max_eval_examples)['score'] for n in names}
    return {'seconds': round(tm.seconds, 1), 'scores': tm.scores.tolist(), 'own': tm.own,
            'no_prompt': nop}
  zs = stage('zero_shot', key_a, matrix)
  scores = np.array(zs['scores'])
  own = np.array([zs['own'][n] for n in names])
  nop = np.array([zs['no_prompt'][n] for n in names])
  rel = scores / own[None, :]
  with np.errstate(divide='ignore', invalid='ignore'):
    gain = (scores - nop[None, :]) / np.where(own - nop > 1e-9, own - nop, np.nan)[None, :]
  _, relatedness = relatedness_matrix(tasks)
  off = ~np.eye(len(names), dtype=bool)
  groups = {}
  for level in (1.0, 0.5, 0.0):
    sel = off & (relatedness == level)
    groups[str(level)] = {'pairs': int(sel.sum()),
                          'mean_relative': float(np.nanmean(rel[sel])) if sel.any() else None,
                          'mean_gain': float(np.nanmean(gain[sel])) if sel.any() else None}
  # per target: best related vs best unrelated source
  per_target = {}
  for j, n in enumerate(names):
    r1 = [rel[i, j] for i in range(len(names)) if i != j and relatedness[i, j] >= 0.5]
    r0 = [rel[i, j] for i in range(len(names)) if i != j and relatedness[i, j] == 0]
    per_target[n] = {'own': own[j], 'no_prompt': nop[j],
                     'mean_related': float(np.mean(r1)) if r1 else None,
                     'mean_unrelated': float(np.mean(r0)) if r0 else None}
  out['zero_shot'] = {'seconds': zs['seconds'], 'own': zs['own'], 'no_prompt': zs['no_prompt'],
                      'scores': scores.tolist(), 'relative': rel.tolist(),
                      'gain': gain.tolist(), 'by_relatedness': groups, 'per_target': per_target,
                      'spearman_relative_vs_relatedness': tr.spearman(relatedness[off],
                                                                      rel[off]),
                      'spearman_gain_vs_relatedness': tr.spearman(relatedness[off], gain[off])}
  # Why (or why not) related prompts transfer zero-shot in the lab: a source prompt that does
  # its own task perfectly scores, on the target, the rate at which the source's answer equals
  # the target's on the target's inputs ("label agreement", from the world's rules, no model).
  agree = np.array([[_label_agreement(s, t, args.max_eval_examples) for t in tasks]
                    for s in tasks])
  out['zero_shot']['label_agreement'] = agree.tolist()
  out['zero_shot']['spearman_relative_vs_label_agreement'] = tr.spearman(agree[off], rel[off])
  out['zero_shot']['spearman_score_vs_label_agreement'] = tr.spearman(agree[off], scores[off])
  from jaxprompt.lab import world
  same_labels = np.array([[world.get_task(a).labels == world.get_task(b).labels for b in tasks]
                          for a in tasks]) & off
  out['zero_shot']['label_agreement_same_label_set'] = {
      'pairs': int(same_labels.sum()),
      'spearman_score': tr.spearman(agree[same_labels], scores[same_labels]),
      'pearson_score': float(np.corrcoef(agree[same_labels], scores[same_labels])[0, 1])
      if same_labels.sum() > 2 else None}
  for level in (1.0, 0.5, 0.0):
    sel = off & (relatedness == level)
    if sel.any():
      groups[str(level)]['mean_label_agreement'] = float(np.mean(agree[sel]))
  say('label agreement by relatedness: ' + ', '.join(
      f'{k}: {v.get("mean_label_agreement", float("nan")):.3f}' for k, v in groups.items()) +
      f'; Spearman(zero-shot score, agreement) '
      f'{_fmt(out["zero_shot"]["spearman_score_vs_label_agreement"])}')
  tr.heatmap(out_base + '_zero_shot.png', rel, names, names,
             "zero-shot transfer on A: score / target's own prompt score")
  tr.heatmap(out_base + '_zero_shot_gain.png', gain, names, names,
             'zero-shot gain: (score - no prompt) / (own - no prompt)')
  say(f'zero-shot {len(names)}x{len(names)} in {zs["seconds"]:.0f} s; by relatedness: ' +
      ', '.join(f'{k}: rel {_fmt(v["mean_relative"])} gain {_fmt(v["mean_gain"])} '
                f'({v["pairs"]})' for k, v in groups.items()))
  write_results()

  # 3. indicators
  _, prompts, _ = tr.library_prompts(lib_a, names)
  start = time.time()
  ind = tr.indicator_matrices(prompts, bb_a)
  out['indicators_seconds'] = round(time.time() - start, 1)
  corr = tr.indicator_correlations(ind, names, {
      'zero_shot': (rel, names, names), 'zero_shot_gain': (gain, names, names),
      'relatedness': (relatedness, names, names)})
  out['spearman'] = corr
  say('\n' + tr.format_correlations(corr))
  for name in ('concat_cosine', 'avg_cosine', 'on'):
    if name in ind:
      tr.heatmap(out_base + f'_indicator_{name}.png', ind[name], names, names, name)
  for name, m in ind.items():
    tr.heatmap(os.path.join(args.work, f'indicator_{name}.png'), m, names, names, name)
  write_results()

  # 4. projectors B -> A
  if 'projector' not in skip:
    from jaxprompt.methods import projection as pj
    from jaxprompt.prompts.files import write_prompt
    start = time.time()
    ckpt_b = source_backbone(args)
    bb_b = load_backbone(ckpt_b)
    with open(os.path.join(os.path.dirname(ckpt_b), 'manifest.json')) as f:
      manifest = json.load(f)
    out['backbone_b'] = {'path': ckpt_b, 'fingerprint': bb_b.fingerprint,
                         'width': bb_b.module.config.emb_dim, 'seed': args.source_seed,
                         'build_minutes': manifest.get('minutes'),
                         'seconds_this_run': round(time.time() - start, 1)}
    say(f'backbone B: {ckpt_b} ({manifest.get("minutes")} min to build)')
    lib_b = library_for(bb_b, 'b', args.steps_b or args.steps)
    train = [_lab(t) for t in args.projector_train.split(',') if t]
    held = [n for n in names if n not in train]
    emb_std = float(np.std(np.asarray(bb_a.params['token_embedder']['embedding'])))
    length = prompts[0].shape[0]
    rand = np.random.RandomState(0).normal(0, emb_std, (length, bb_a.module.config.emb_dim))
    rand_path = write_prompt(os.path.join(args.work, 'random_prompt.safetensors'),
                             rand.astype(np.float32), overwrite=True)
    key_p = dict(key_a, b=bb_b.fingerprint, steps_b=args.steps_b, train=train,
                 steps_task=args.projector_steps, steps_distance=args.distance_steps,
                 hidden=args.hidden)

    def projectors():
      res = {}
      task_path = os.path.join(args.work, 'projector_task.safetensors')
      s = time.time()
      r = pj.train_task_objective(train, lib_b, bb_a, task_path,
                                  model_dir=os.path.join(args.work, 'projector_task_run'),
                                  steps=args.projector_steps, batch_size=8 * len(train),
                                  eval_period=max(args.projector_steps // 3, 1),
                                  hidden=args.hidden, overwrite=True,
                                  max_eval_examples=args.max_eval_examples,
                                  eval_batch_size=args.max_eval_examples, progress=False)
      res['task'] = {'seconds': round(time.time() - s, 1), 'best_step': r.best_step,
                     'best_train_score': r.best_metrics and r.best_metrics.get('score')}
      dist_path = os.path.join(args.work, 'projector_distance.safetensors')
      s = time.time()
      parser = argparse.ArgumentParser()
      pj._add_arguments(parser)
      pj._train_command(parser.parse_args([
          'train', '--objective', 'distance', '--tasks', ','.join(train),
          '--source_library', lib_b, '--target_library', lib_a, '--target_backbone',
          bb_a.path, '--out', dist_path, '--steps', str(args.distance_steps), '--hidden',
          str(args.hidden), '--overwrite']))
      _, meta, _ = pj.load_projector(dist_path)
      res['distance'] = {'seconds': round(time.time() - s, 1),
                         'final_loss': meta.get('final_loss')}
      rows = {}
      for n in train + held:
        row = {'own': zs['own'][n], 'no_prompt': zs['no_prompt'][n]}
        for label, ppath in (('task', task_path), ('distance', dist_path)):
          value, meta = pj.apply_projector(ppath, f'{lib_b}:{n}', target_backbone=bb_a)
          path = write_prompt(os.path.join(args.work, f'projected_{label}_{n}.safetensors'),
                              value, overwrite=True,
                              **{k: v for k, v in meta.items() if v is not None})
          row[label] = evaluate(n, backbone=bb_a, prompt=path,
                                max_examples=args.max_eval_examples,
                                batch_size=args.max_eval_examples)['score']
        row['random'] = evaluate(n, backbone=bb_a, prompt=rand_path,
                                 max_examples=args.max_eval_examples,
                                 batch_size=args.max_eval_examples)['score']
        rows[n] = row
        say(f'projector {_short(n)}: ' + ', '.join(f'{k} {v:.1f}' for k, v in row.items()))
      res['rows'] = rows
      return res
    pr = stage('projectors', key_p, projectors)
    kinds = ('task', 'distance', 'random', 'no_prompt')
    table = {}
    for n, row in pr['rows'].items():
      table[n] = dict(row, held_out=n in held,
                      relative={k: row[k] / row['own'] if row['own'] else None for k in kinds})
    means = {}
    for part, sel in (('held_out', held), ('train', train)):
      means[part] = {k: float(np.mean([table[n]['relative'][k] for n in sel])) for k in kinds}
    # A held-out task's projection against the zero-shot score, on that task, of A's own prompt
    # of its same-skill train task, and the A library prompt nearest to each projection.
    from jaxprompt.prompts.files import read_prompt
    for n in train + held:
      near = {}
      for label in ('task', 'distance'):
        v = read_prompt(os.path.join(args.work, f'projected_{label}_{n}.safetensors')).value
        sims = {m: tr.concat_cosine(v, lib.load_prompt(lib_a, m)) for m in names}
        best = max(sims, key=sims.get)
        near[label] = {'nearest_a_prompt': best, 'cosine': sims[best], 'cosine_own': sims[n]}
      table[n]['nearest'] = near
      sibling = [m for m in train if m != n and
                 relatedness[names.index(m), names.index(n)] == 1.0]
      if sibling:
        table[n]['same_skill_train_task'] = sibling[0]
        table[n]['its_a_prompt_zero_shot'] = zs['scores'][names.index(sibling[0])][
            names.index(n)]
    wins = {k: all(table[n]['task'] > table[n][k] for n in held) for k in ('random', 'no_prompt')}
    out['projector'] = dict(train_tasks=train, held_out=held, task=pr['task'],
                            distance=pr['distance'], rows=table, mean_relative=means,
                            task_beats_on_every_held_out=wins)
    say(f'projector means (relative): {means}; task objective beats on every held-out: {wins}')
    write_results()

  # 5. transfer as initialisation
  if 'init' not in skip:
    triples = [tuple(_lab(x) for x in t.split(',')) for t in args.init_targets.split(';') if t]
    pairs = []
    for target, related, unrelated in triples:
      short = _short(target)
      pairs += [(f'{short}__uniform', target, 'uniform'),
                (f'{short}__class_labels', target, 'class_labels'),
                (f'{short}__related_{_short(related)}', target, f'{lib_a}:{related}'),
                (f'{short}__unrelated_{_short(unrelated)}', target, f'{lib_a}:{unrelated}')]

    def init_run():
      r = spot.transfer_matrix(pairs, bb_a, os.path.join(args.work, 'init_run'),
                               train_steps=args.init_steps, batch_size=8 * len(pairs),
                               eval_period=args.init_eval_period,
                               max_eval_examples=args.max_eval_examples,
                               eval_batch_size=args.max_eval_examples, progress=False)
      return {'seconds': round(r['seconds'], 1),
              'rows': {k: {kk: v[kk] for kk in ('target', 'init', 'best', 'best_step', 'initial',
                                                'curve')} for k, v in r['rows'].items()}}
    ir = stage('init', dict(key_a, pairs=pairs, steps=args.init_steps,
                            period=args.init_eval_period), init_run)
    summary = {}
    for target, related, unrelated in triples:
      own_t = zs['own'][target]
      short = _short(target)
      row = {'own': own_t}
      for label, v in ir['rows'].items():
        if v['target'] != target:
          continue
        kind = label.split('__', 1)[1]
        row[kind] = {'initial': v['initial'], 'best': v['best'], 'best_step': v['best_step'],
                     'steps_to_own': spot.steps_to_reach(v['curve'], own_t),
                     'steps_to_90pct_own': spot.steps_to_reach(v['curve'], 0.9 * own_t)}
      summary[short] = row
    out['init'] = {'seconds': ir['seconds'], 'steps': args.init_steps,
                   'eval_period': args.init_eval_period, 'targets': summary,
                   'curves': {k: v['curve'] for k, v in ir['rows'].items()}}
    _init_png(out_base + '_init_curves.png', ir['rows'], triples, zs['own'])
    for t, row in summary.items():
      say(f'init {t} (own {row["own"]:.1f}): ' + '; '.join(
          f'{k}: first {_fmt(v["initial"], ".1f")}, best {_fmt(v["best"], ".1f")}, '
          f'to own {v["steps_to_own"]}, '
          f'to 90% {v["steps_to_90pct_own"]}' for k, v in row.items() if k != 'own'))
  write_results()
  print(json.dumps(out, indent=1, default=float)[:4000])
  return 0


def _rule(task):
  """The answer of lab task `task` for any input (None where it has no unique answer)."""
  from jaxprompt.lab import world
  cat = lambda ws, c: sum(world.CATEGORY_OF[w] == c for w in ws)  # noqa: E731
  t = world.get_task(task)
  if t.skill == 'membership':
    return lambda ws: 'yes' if t.detail in ws else 'no'
  if t.skill == 'count':
    return lambda ws: world.COUNT_LABELS[cat(ws, t.detail)] if cat(ws, t.detail) < 7 else None
  if t.skill == 'parity':
    return lambda ws: world.EVEN_ODD[cat(ws, t.detail) % 2]
  if t.skill == 'compare':
    a, b = t.detail.split('>')
    return lambda ws: None if cat(ws, a) == cat(ws, b) else ('yes' if cat(ws, a) > cat(ws, b)
                                                            else 'no')
  if t.skill == 'extreme':
    def fn(ws):
      counts = {c: cat(ws, c) for c in world.CATEGORY_LABELS}
      best = (max if t.detail == 'most' else min)(counts.values())
      winners = [c for c, k in counts.items() if k == best]
      return winners[0] if len(winners) == 1 else None
    return fn
  if t.skill == 'position':
    i = {'first': 0, 'last': -1, 'second': 1}[t.detail]
    return lambda ws: ws[i]
  return None


def _label_agreement(source, target, n):
  """Share of `target`'s first n validation examples on which `source`'s rule gives the target's
  answer: what a perfect source prompt would score on the target zero-shot."""
  from jaxprompt.lab import world
  rule = _rule(source)
  if rule is None:
    return float('nan')
  ex = world.generate_examples(target, 'validation', n)
  return float(np.mean([rule(tuple(e['inputs'].split())) == e['targets'] for e in ex]))


def _fmt(x, spec='.3f'):
  return '-' if x is None else format(x, spec)


def _init_png(path, rows, triples, own):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(triples), figsize=(4.2 * len(triples), 3.4), squeeze=False)
  for ax, (target, _, _) in zip(axes[0], triples):
    for label, v in rows.items():
      if v['target'] != target:
        continue
      steps, vals = zip(*v['curve'])
      ax.plot(steps, vals, marker='.', label=label.split('__', 1)[1])
    ax.axhline(own[target], color='k', ls='--', lw=0.8, label='own PT (library)')
    ax.set_title(_short(target), fontsize=9)
    ax.set_xlabel('step')
    ax.set_ylabel('validation score')
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == '__main__':
  sys.exit(main())
