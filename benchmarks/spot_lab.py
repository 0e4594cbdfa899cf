"""SPoT on the lab, end to end: source prompts into a library, task embeddings, retrieval,
transfer, measured against the lab's known task relatedness.

1. The source prompts of the lab's SOURCE tasks (unprefixed, `lab_<s>`), all at once
   (`spot.train_sources`: one stack, each task's row at its own best validation, its embedding
   after `--embedding_steps`).
2. The generic SPoT prompt: one prompt on the mixture of the same sources, the same steps and
   the same mixed batch (it sees exactly the examples the library's rows saw together).
3. Task embeddings of the targets (each target's prompt after `--embedding_steps`).
4. Retrieval: every target's ranking of the library by per-token / average-token similarity,
   scored against `relatedness_matrix()` (the ground truth the lab is built with).
5. Transfer, with equal target budgets: for each target, one run (one row of one stack run,
   `spot.transfer_matrix`) from each initialisation: class labels (no transfer), the generic
   prompt, the top-3 weighted average, and every source of the library (the target x source
   matrix: best retrieved, best of top-k, oracle, related vs unrelated sources, steps to reach
   the target's own prompt-tuning score).

    python benchmarks/spot_lab.py                    # small default: 8 sources, 4 targets
    python benchmarks/spot_lab.py --sources all --targets has_green,count_numbers,... --target_steps 300
    python benchmarks/spot_lab.py --out benchmarks/results/spot_lab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # noqa: E402

TARGETS = ('has_green', 'minority', 'second_word', 'has_duplicate')
# Small default library: for each target a same-skill source, plus sources sharing a sub-skill
# and unrelated ones (relatedness 1 / 0.5 / 0 by construction).
SOURCES = ('has_red', 'has_blue', 'majority', 'count_colours', 'first_word', 'last_word', 'copy',
           'filter_colours')
# The lab report's test scores (benchmarks/results/lab_report.json): 10-token prompt tuning and
# model tuning, 1000 steps of batch 32 each.
REPORT = {'has_green': (100.0, 100.0), 'has_dog': (100.0, 100.0),
          'more_numbers_than_colours': (86.0, 95.0), 'minority': (60.0, 91.0),
          'count_numbers': (24.5, 57.0), 'second_word': (18.5, 27.0),
          'parity_animals': (54.0, 67.0), 'has_duplicate': (58.5, 64.0)}


def _report_numbers() -> dict:
  path = os.path.join(os.path.dirname(__file__), 'results', 'lab_report.json')
  if os.path.exists(path):
    with open(path) as f:
      rows = json.load(f).get('targets', [])
    return {r['task']: (r['prompt_tuning'], r['model_tuning']) for r in rows}
  return dict(REPORT)


def _auc(pos: list[float], neg: list[float]) -> float | None:
  if not pos or not neg:
    return None
  wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--targets', default=','.join(TARGETS))
  p.add_argument('--sources', default=','.join(SOURCES),
                 help="the library's source tasks ('all': the lab's 17)")
  p.add_argument('--backbone', default='lab', help="'lab' or 'lab:PRESET'")
  p.add_argument('--source_steps', type=int, default=300)
  p.add_argument('--source_batch', type=int, default=8, help='per source task')
  p.add_argument('--embedding_steps', type=int, default=100)
  p.add_argument('--target_steps', type=int, default=300)
  p.add_argument('--target_batch', type=int, default=8, help='per target run')
  p.add_argument('--eval_period', type=int, default=50, help='target validation period')
  p.add_argument('--max_eval_examples', type=int, default=100)
  p.add_argument('--prompt_length', type=int, default=10)
  p.add_argument('--work', default=None, help='keep the runs here (default: a temp dir)')
  p.add_argument('--out', default=None, help='write the JSON here')
  args = p.parse_args(argv)

  import jax
  from jaxprompt.checkpoints.backbone import resolve_backbone_path
  from jaxprompt.lab import SOURCE_TASKS, relatedness
  from jaxprompt.lab import register_lab_tasks
  from jaxprompt.lab.report import TRANSFER_PAIRS
  from jaxprompt.lab.tasks import seqio_name
  from jaxprompt.methods import library as lib, spot
  from jaxprompt.tuning import tune
  work = args.work or tempfile.mkdtemp(prefix='spot_lab_')
  # Many runs rebuild identical steps (the evaluators of each row): reuse compiled code.
  jax.config.update('jax_compilation_cache_dir', os.path.join(work, 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  ckpt = resolve_backbone_path(args.backbone)
  register_lab_tasks()
  targets = [t for t in args.targets.split(',') if t]
  sources = list(SOURCE_TASKS) if args.sources == 'all' else args.sources.split(',')
  src_names = [seqio_name(s) for s in sources]
  common = dict(prompt_length=args.prompt_length, max_eval_examples=args.max_eval_examples,
                progress=False, seed=0)
  timings = {}
  library = os.path.join(work, 'library')

  # 1. Source prompts, all at once, into the library.
  t0 = time.time()
  src_eval = args.embedding_steps  # validations (and kept checkpoints) of the source run
  sources_run = spot.train_sources(
      src_names, library, ckpt, os.path.join(work, 'sources'), train_steps=args.source_steps,
      batch_size=args.source_batch * len(sources), eval_period=src_eval,
      embedding_steps=args.embedding_steps, replace=True, **common)
  timings['sources_min'] = round((time.time() - t0) / 60, 2)
  print(json.dumps({'sources': sources_run.entries}, default=str), flush=True)

  # 2. The generic SPoT prompt: one prompt on the sources' mixture, same steps and batch.
  t0 = time.time()
  mixture = spot.register_tasks_mixture(src_names, rates=[1.0] * len(src_names))
  generic = tune(mixture, backbone=ckpt, model_dir=os.path.join(work, 'generic'),
                 train_steps=args.source_steps, batch_size=args.source_batch * len(sources),
                 eval_period=src_eval, prompt_init='sampled_vocab', **common)
  generic_path = generic.best_prompt_path
  timings['generic_min'] = round((time.time() - t0) / 60, 2)

  # 3. Target task embeddings.
  t0 = time.time()
  tgt_names = [seqio_name(t) for t in targets]
  emb = spot.embed_tasks(tgt_names, ckpt, os.path.join(work, 'embed_run'),
                         os.path.join(work, 'embeddings'), steps=args.embedding_steps,
                         batch_size=args.source_batch * len(targets), overwrite=True, **common)
  timings['embeddings_min'] = round((time.time() - t0) / 60, 2)

  # 4. Retrieval against the ground truth.
  retrieval = {}
  sims = {}
  for sim_name in ('per_token', 'avg_tokens'):
    per_target = {}
    matrix = []
    for t, n in zip(targets, tgt_names):
      ranking = lib.rank(emb[n], library, sim_name)
      by_source = dict(ranking)
      matrix.append([by_source[s] for s in src_names])
      rel = {s: relatedness(t, s.removeprefix('lab_')) for s in src_names}
      order = [s for s, _ in ranking]
      pos = [by_source[s] for s in src_names if rel[s] >= 0.5]
      neg = [by_source[s] for s in src_names if rel[s] == 0.0]
      per_target[t] = dict(
          top3=[(s.removeprefix('lab_'), round(v, 4)) for s, v in ranking[:3]],
          top1_relatedness=rel[order[0]], top3_mean_relatedness=float(np.mean(
              [rel[s] for s in order[:3]])), mean_relatedness=float(np.mean(list(rel.values()))),
          auc_related_vs_unrelated=_auc(pos, neg),
          same_skill_rank=min((order.index(s) + 1 for s in src_names if rel[s] == 1.0),
                              default=None))
    aucs = [v['auc_related_vs_unrelated'] for v in per_target.values()
            if v['auc_related_vs_unrelated'] is not None]
    retrieval[sim_name] = dict(per_target=per_target,
                               mean_auc=float(np.mean(aucs)) if aucs else None)
    sims[sim_name] = np.array(matrix)
  print(json.dumps({'retrieval': {k: v['mean_auc'] for k, v in retrieval.items()}}), flush=True)

  # Top-3 weighted averages (per-token similarity).
  wavg = {}
  for t, n in zip(targets, tgt_names):
    ranking = lib.rank(emb[n], library, 'per_token')
    try:
      wavg[t] = spot.write_weighted_average(os.path.join(work, f'wavg3_{t}.safetensors'),
                                            ranking, library, 3, target=n, overwrite=True)
    except lib.LibraryError as e:
      print(f'{t}: no weighted average ({e})', flush=True)

  # 5. Transfer: every (target, init) as one row of one stack run; equal budgets.
  t0 = time.time()
  pairs = []
  for t, n in zip(targets, tgt_names):
    pairs.append((f'{t}__class_labels', n, 'class_labels'))
    pairs.append((f'{t}__generic', n, generic_path))
    if t in wavg:
      pairs.append((f'{t}__wavg3', n, wavg[t]))
    for s in src_names:
      pairs.append((f'{t}__{s.removeprefix("lab_")}', n, f'{library}:{s}'))
  matrix_run = spot.transfer_matrix(
      pairs, ckpt, os.path.join(work, 'transfer'), train_steps=args.target_steps,
      batch_size=args.target_batch * len(pairs), eval_period=args.eval_period, **common)
  timings['transfer_min'] = round((time.time() - t0) / 60, 2)
  rows = matrix_run['rows']

  report = _report_numbers()
  per_target = {}
  scores = []
  no_transfer = []
  for i, t in enumerate(targets):
    own = rows[f'{t}__class_labels']['best']
    src_scores = [rows[f'{t}__{s.removeprefix("lab_")}']['best'] for s in src_names]
    scores.append(src_scores)
    no_transfer.append(own)
    order = np.argsort(-sims['per_token'][i], kind='stable')
    top1 = sources[order[0]]
    related = TRANSFER_PAIRS.get(t) if TRANSFER_PAIRS.get(t) in sources else None
    reach = {}
    for s in sources:
      reach[s] = spot.steps_to_reach(rows[f'{t}__{s}']['curve'], own)
    rel_steps = [reach[s] for s in sources if relatedness(t, s) == 1.0]
    unrel_steps = [reach[s] for s in sources if relatedness(t, s) == 0.0]

    def summary(steps):
      reached = [x for x in steps if x is not None]
      return dict(n=len(steps), reached=len(reached),
                  median_steps=float(np.median(reached)) if reached else None)

    pt, mt = report.get(t, (None, None))
    per_target[t] = dict(
        class_labels=own, generic=rows[f'{t}__generic']['best'],
        weighted_top3=rows.get(f'{t}__wavg3', {}).get('best'),
        best_retrieved=dict(source=top1, score=rows[f'{t}__{top1}']['best']),
        oracle=dict(source=sources[int(np.argmax(src_scores))], score=float(max(src_scores))),
        related_pair=dict(source=related, score=rows[f'{t}__{related}']['best'],
                          steps_to_own_pt=reach[related]) if related else None,
        steps_to_own_pt_same_skill_sources=summary(rel_steps),
        steps_to_own_pt_unrelated_sources=summary(unrel_steps),
        initial=dict(class_labels=rows[f'{t}__class_labels']['initial'],
                     generic=rows[f'{t}__generic']['initial'],
                     best_retrieved=rows[f'{t}__{top1}']['initial']),
        lab_report_test=dict(prompt_tuning_1000x32=pt, model_tuning_1000x32=mt))
    print(json.dumps({t: per_target[t]}, default=str), flush=True)

  ev = spot.retrieval_evaluation(targets, sources, np.array(scores), sims['per_token'],
                                 no_transfer)
  out = dict(
      settings=dict(vars(args), sources=sources, targets=targets, source_eval_period=src_eval,
                    rows=len(pairs), per_row_batch=args.target_batch,
                    score='best validation accuracy / exact match (max_eval_examples)'),
      backbone=ckpt, cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
      timings=timings, sources=sources_run.entries, generic_prompt=generic_path,
      generic_validation=generic.best_metrics and generic.best_metrics.get('score'),
      retrieval=retrieval, transfer=per_target,
      retrieval_evaluation={k: v for k, v in ev.items() if k != 'per_target'},
      similarity_per_token=sims['per_token'].round(4).tolist(), scores=scores)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1, default=str)
    stem = os.path.splitext(args.out)[0] + '_retrieval'
    spot.write_evaluation(ev, stem, overwrite=True)
    print(f'written: {args.out} and {stem}.(md|csv|png|json)')
  print(spot.format_evaluation(ev))
  return out


if __name__ == '__main__':
  main()
