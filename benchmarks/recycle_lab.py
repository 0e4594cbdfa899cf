"""Prompt recycling (Lester et al. 2022) against the projector (Su et al. 2022) on the transfer
lab's two backbones: B (d 96, seed 1) -> A (d 128), the direction the lab's projectors map.

    nice -n 5 .venv/bin/python benchmarks/recycle_lab.py --backbone lab:methods_c \\
        --source_preset methods_c --work /tmp/tl_methods --steps 600 --steps_b 400 \\
        --projector_steps 300 --distance_steps 1000 --source_build_steps 400

1. `jaxprompt transfer lab` with these options (its stages are reused when cached; stage 5,
   transfer as initialisation, is skipped): libraries A and B, the task and distance projectors.
2. Per seed s (0: the lab's libraries; 1, 2: the held-out tasks' prompts trained again on A and
   on B with seed s), per held-out task: B's prompt recycled onto A (linear, mlp with seed s,
   lincomb) and projected onto A (the lab's task and distance projectors), A's untrained prompt
   (the class-label initialisation tuning starts from, seed s), a random prompt (the embedding
   table's std, seed s) and A's tuned prompt (seed s), each evaluated on A (validation, as the
   lab). No prompt and B's own score on B are the lab's.
Writes benchmarks/results/recycle_lab/recycle_lab.json and recycle_lab.md (the table of
docs/transferability.md); per-seed work under WORK/recycle/ is reused by a rerun.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'results', 'recycle_lab')
RECYCLED = ('linear', 'mlp', 'lincomb')
KINDS = ('tuned',) + tuple(f'recycled_{k}' for k in RECYCLED) + (
    'projected_task', 'projected_distance', 'untrained', 'random', 'no_prompt')


def _parser():
  from jaxprompt.lab import transfer_report
  p = transfer_report.parser('recycle_lab.py')
  p.description = __doc__.splitlines()[0]
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--mlp_steps', type=int, default=2000)
  p.add_argument('--results', default=RESULTS)
  return p


def _lab_argv(args) -> list[str]:
  """The transfer lab's own options out of ours (stage 5 skipped, its JSON under --work)."""
  from jaxprompt.lab import transfer_report
  argv = []
  for action in transfer_report.parser()._actions:
    if action.dest in ('help', 'skip', 'out'):
      continue
    if getattr(args, action.dest) is not None:
      argv += [action.option_strings[0], str(getattr(args, action.dest))]
  skip = {s for s in args.skip.split(',') if s} | {'init'}
  return argv + ['--skip', ','.join(sorted(skip)), '--out',
                 os.path.join(args.work, 'transfer_lab.json')]


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from jaxprompt.lab import transfer_report
  t0 = time.time()
  transfer_report.main(_lab_argv(args))
  lab_seconds = time.time() - t0

  import jax
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.evaluate import evaluate
  from jaxprompt.lab import world
  from jaxprompt.lab.tasks import get_lab_vocabulary
  from jaxprompt.methods import library as lib, projection as pj, recycling as rc, spot
  from jaxprompt.methods.transferability import concat_cosine
  from jaxprompt.prompts.files import write_prompt
  from jaxprompt.prompts.init import make_prompt_init

  stages = os.path.join(args.work, 'stages')
  with open(os.path.join(stages, 'zero_shot.json')) as f:
    zs = json.load(f)['value']
  with open(os.path.join(stages, 'projectors.json')) as f:
    proj_stage = json.load(f)['value']
  bb_a = load_backbone(args.backbone)
  bb_b = load_backbone(transfer_report.source_backbone(args))
  train = [transfer_report._lab(t) for t in args.projector_train.split(',') if t]
  names = [transfer_report._lab(t) for t in args.tasks.split(',') if t]
  held = [n for n in names if n not in train]
  emb_a = np.asarray(bb_a.params['token_embedder']['embedding'], np.float32)
  width_a = emb_a.shape[1]
  vocab = get_lab_vocabulary()
  n_eval = args.max_eval_examples
  work = os.path.join(args.work, 'recycle')
  os.makedirs(work, exist_ok=True)
  say = lambda m: print(f'[{time.time() - t0:6.0f} s] {m}', file=sys.stderr, flush=True)  # noqa

  def score(task, path):
    return evaluate(task, backbone=bb_a, prompt=path, max_examples=n_eval,
                    batch_size=n_eval)['score']

  def libraries(seed):
    """(library on A, library on B) holding the held-out tasks' prompts of this seed."""
    if seed == 0:
      return os.path.join(args.work, 'library_a'), os.path.join(args.work, 'library_b')
    out = []
    for tag, bb, steps in (('a', bb_a, args.steps), ('b', bb_b, args.steps_b or args.steps)):
      d = os.path.join(work, f'library_{tag}_seed{seed}')
      if not (os.path.isfile(os.path.join(d, 'index.json')) and set(held) <= set(lib.entries(d))):
        s = time.time()
        spot.train_sources(held, d, bb, os.path.join(work, f'sources_{tag}_seed{seed}'),
                           train_steps=steps, batch_size=args.per_task_batch * len(held),
                           eval_period=max(steps // 4, 1), embedding_steps=None,
                           prompt_init='class_labels', max_eval_examples=n_eval,
                           eval_batch_size=n_eval, progress=False, replace=True, seed=seed)
        say(f'library {tag} seed {seed}: {time.time() - s:.0f} s')
      out.append(d)
    return tuple(out)

  key = dict(a=bb_a.fingerprint, b=bb_b.fingerprint, held=held, mlp_steps=args.mlp_steps,
             steps=args.steps, steps_b=args.steps_b, n=n_eval, lab=proj_stage['task'])
  per_seed = {}
  for seed in range(args.seeds):
    cache = os.path.join(work, f'seed{seed}.json')
    if os.path.isfile(cache):
      with open(cache) as f:
        done = json.load(f)
      if done['key'] == json.loads(json.dumps(key)):
        per_seed[seed] = done['rows']
        say(f'seed {seed}: reusing {cache}')
        continue
    lib_a, lib_b = libraries(seed)
    folder = os.path.join(work, f'seed{seed}')
    rows = {}
    s = time.time()
    for n in held:
      row, info = {}, {}
      a_path = lib.get_entry(lib_a, n)['path']
      row['tuned'] = score(n, a_path)
      tuned = lib.load_prompt(lib_a, n)
      for kind in RECYCLED:
        path = os.path.join(folder, f'recycled_{kind}_{n}.safetensors')
        value, meta = rc.recycle(bb_b, bb_a, f'{lib_b}:{n}', kind, out=path, overwrite=True,
                                 seed=seed, steps=args.mlp_steps)
        row[f'recycled_{kind}'] = score(n, path)
        r = meta['recycling']
        info[kind] = {'fit_error': r['fit_error'], 'num_tokens': r['num_tokens'],
                      'prompt_outside_vocab_span': r['prompt_outside_vocab_span'],
                      'cosine_to_tuned': concat_cosine(value, tuned)}
      for kind in ('task', 'distance'):
        value, meta = pj.apply_projector(os.path.join(args.work, f'projector_{kind}.safetensors'),
                                         f'{lib_b}:{n}', target_backbone=bb_a)
        path = write_prompt(os.path.join(folder, f'projected_{kind}_{n}.safetensors'), value,
                            overwrite=True, **{k: v for k, v in meta.items() if v is not None})
        row[f'projected_{kind}'] = score(n, path)
        info[f'projected_{kind}'] = {'cosine_to_tuned': concat_cosine(value, tuned)}
      length = tuned.shape[0]
      init = make_prompt_init('class_labels', emb_a, vocab, world.get_task(n[4:]).labels)
      untrained = np.asarray(init(jax.random.PRNGKey(seed), (length, width_a)))
      row['untrained'] = score(n, write_prompt(os.path.join(folder, f'untrained_{n}.safetensors'),
                                               untrained, overwrite=True))
      rand = np.random.RandomState(seed).normal(0, float(np.std(emb_a)), (length, width_a))
      row['random'] = score(n, write_prompt(os.path.join(folder, f'random_{n}.safetensors'),
                                            rand.astype(np.float32), overwrite=True))
      row['no_prompt'] = zs['no_prompt'][n]
      entry = lib.get_entry(lib_b, n)
      row['source_on_b'] = max(v for k, v in entry.get('metrics', {}).items()
                               if k in ('accuracy', 'exact_match'))
      rows[n] = {'scores': row, 'recyclers': info}
      say(f'seed {seed} {n}: ' + ', '.join(f'{k} {v:.0f}' for k, v in row.items()))
    per_seed[seed] = rows
    with open(cache + '.tmp', 'w') as f:
      json.dump({'key': key, 'rows': rows, 'seconds': round(time.time() - s, 1)}, f, indent=1,
                default=float)
    os.replace(cache + '.tmp', cache)

  seeds = sorted(per_seed)
  table = {}
  for n in held:
    table[n] = {}
    for kind in KINDS + ('source_on_b',):
      vals = [per_seed[s][n]['scores'][kind] for s in seeds]
      table[n][kind] = {'mean': float(np.mean(vals)), 'std': float(np.std(vals)), 'runs': vals}
  relative = {kind: float(np.mean([per_seed[s][n]['scores'][kind] / per_seed[s][n]['scores'][
      'tuned'] for s in seeds for n in held])) for kind in KINDS}
  recyclers = {kind: {m: float(np.mean([per_seed[s][n]['recyclers'][kind][m] for s in seeds
                                         for n in held]))
                      for m in per_seed[seeds[0]][held[0]]['recyclers'][kind]}
               for kind in per_seed[seeds[0]][held[0]]['recyclers']}
  linear_vs_lincomb = max(
      abs(per_seed[s][n]['scores']['recycled_linear'] - per_seed[s][n]['scores'][
          'recycled_lincomb']) for s in seeds for n in held)
  out = dict(settings=vars(args), date=time.strftime('%Y-%m-%d'), seeds=seeds, held_out=held,
             backbone_a=dict(path=bb_a.path, fingerprint=bb_a.fingerprint, width=width_a),
             backbone_b=dict(path=bb_b.path, fingerprint=bb_b.fingerprint,
                             width=int(bb_b.module.config.emb_dim)),
             table=table, mean_relative_to_tuned=relative, recyclers=recyclers,
             max_score_gap_linear_lincomb=linear_vs_lincomb, per_seed=per_seed,
             seconds=dict(total=round(time.time() - t0, 1), lab_stages=round(lab_seconds, 1)))
  os.makedirs(args.results, exist_ok=True)
  with open(os.path.join(args.results, 'recycle_lab.json'), 'w') as f:
    json.dump(out, f, indent=1, default=float)
  md = markdown(out)
  with open(os.path.join(args.results, 'recycle_lab.md'), 'w') as f:
    f.write(md)
  print(md)
  return 0


def markdown(out) -> str:
  """The docs' table: mean (std) over seeds per held-out task, and the mean relative score."""
  heads = ['task'] + [k.replace('_', ' ') for k in KINDS] + ['B own (on B)']
  lines = ['| ' + ' | '.join(heads) + ' |', '|' + '---|' * len(heads)]
  for n, row in out['table'].items():
    cells = [n[4:]] + [f'{row[k]["mean"]:.0f} ({row[k]["std"]:.0f})'
                       for k in KINDS + ('source_on_b',)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('| mean score / tuned | ' + ' | '.join(
      f'{out["mean_relative_to_tuned"][k]:.2f}' for k in KINDS) + ' | |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  sys.exit(main())
