"""SPoT's study on the lab (issue 12, section 5): `jaxprompt lab report spot`.

A library of lab source prompts, trained jointly (`spot.train_sources`); a generic prompt on
their mixture; task embeddings (a shared or an independent sampled-vocabulary start per row);
transfer of every source, of the best retrieved and of top-k weighted averages to each target,
all in one stack run per target (`spot.transfer_matrix`); model tuning as the ceiling. Every
score is set against the lab's known relatedness (`jaxprompt.lab.world.relatedness`): does
retrieval find the sources that share the target's skill, and do they transfer best?

    jaxprompt lab report spot --out benchmarks/results/spot_lab_methods --work runs/spot_lab
    jaxprompt spot lab ...            # the same (an alias)

`lab_evidence` computes the result (every stage cached under its work directory, a rerun with
the same settings reuses it), `format_lab_evidence` renders it as Markdown tables and
`write_lab_evidence` writes OUT.json/.csv/.md/.png and the retrieval evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Mapping, Sequence

import numpy as np

from jaxprompt.lab.world import SOURCE_TASKS
from jaxprompt.methods.library import SIMILARITIES, LibraryError, similarity_matrix
from jaxprompt.methods.spot import (_primary, format_evaluation, per_task_evals,
                                    register_tasks_mixture, retrieval_evaluation, steps_to_reach,
                                    train_sources, transfer_matrix, weighted_average,
                                    write_evaluation, write_weighted_average)
from jaxprompt.train import agreement


# The library: the lab's unprefixed classification and position sources (membership, count,
# parity, compare, extreme, position: every skill a target below shares, each with related and
# unrelated sources for every target); the generation-heavy order/filter sources are left out
# of the default for time (`--sources all` adds them). The targets: those where prompt tuning
# fell short of model tuning in the lab report, and a control whose skill (duplicate) no source
# has.
LAB_SOURCES = ('has_red', 'has_blue', 'count_colours', 'count_animals', 'parity_colours',
               'more_colours_than_animals', 'more_animals_than_numbers', 'majority',
               'first_word', 'last_word')
LAB_TARGETS = ('count_numbers', 'minority', 'more_numbers_than_colours', 'second_word',
               'has_duplicate')
EMBEDDING_INITS = ('shared', 'independent')


def _auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
  """P(a positive scores above a negative), ties half: 0.5 is chance."""
  if not len(pos) or not len(neg):
    return None
  wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
  return float(wins / (len(pos) * len(neg)))


def _median(xs):
  xs = [x for x in xs if x is not None]
  return float(np.median(xs)) if xs else None


def _shared_init(ckpt: str, path: str, length: int, seed: int) -> str:
  """One sampled-vocabulary draw, written as a prompt file: every embedding row starts here."""
  import jax
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.prompts import initializers
  from jaxprompt.prompts.files import write_prompt
  table = np.asarray(load_backbone(ckpt).params['token_embedder']['embedding'])
  value = initializers.sampled_vocab(table)(jax.random.PRNGKey(seed + 1000),
                                             (length, table.shape[1]))
  return write_prompt(path, np.asarray(value), overwrite=True,
                      init='sampled_vocab, shared by every task-embedding row')


def lab_output_paths(out: str) -> dict[str, str]:
  return {ext: f'{out}.{ext}' for ext in ('json', 'csv', 'md', 'png')}


def lab_evidence(work: str, *, backbone: str = 'lab:methods',
                 sources: Sequence[str] = LAB_SOURCES, targets: Sequence[str] = LAB_TARGETS,
                 source_steps: int = 600, source_batch: int = 8, source_eval_period: int = 100,
                 embedding_steps: int = 500, embedding_inits: Sequence[str] = EMBEDDING_INITS,
                 target_steps: int = 300, target_batch: int = 8, eval_period: int = 50,
                 max_eval_examples: int = 100, prompt_length: int = 10, top_k: int = 3,
                 model_tuning: bool = True, model_tuning_lr: float = 1e-3,
                 generic_mixture: str | None = None, seed: int = 0,
                 log=None) -> dict[str, Any]:
  """SPoT on the lab, end to end, against the lab's known relatedness; returns one JSON-able
  dict (`format_lab_evidence` renders it, `write_lab_evidence` writes it).

  1. The library: the source prompts of `sources` (unprefixed lab tasks), all at once
     (`train_sources`: one stack, sampled-vocab rows, `source_batch` examples per task per
     step, each task's row at its own best validation).
  2. The generic SPoT prompt: one prompt on the mixture of the same sources (equal rates), same
     steps and mixed batch (or on `generic_mixture`).
  3. Task embeddings, each task's prompt after `embedding_steps` (same per-task batch):
     'independent' (the paper's): every row its own sampled-vocab draw (the sources' from the
     library run); 'shared': every source and target row starts from one draw, so that the
     embeddings differ by what the task taught them, not by their random start.
  4. Retrieval: each target's ranking of the sources, per embedding kind and similarity, scored
     by the AUC of related (lab relatedness >= 0.5; and same skill, 1.0) over unrelated (0)
     sources; plus the same AUC among the sources themselves (do same-skill sources embed
     alike?).
  5. Transfer with equal target budgets: every (target, initialisation) as one row of one stack
     run (`transfer_matrix`, `target_steps` of ~`target_batch` examples per row): class labels
     and sampled vocab (prompt tuning), the generic prompt, the top-k weighted average per
     embedding kind, and every library source (the target x source matrix: best retrieved,
     oracle, related vs unrelated, steps to reach the target's own prompt-tuning score).
  6. Model tuning of every target, same steps and batch (the yardstick).
  Scores are each row's best validation (`max_eval_examples` examples), in percent.
  """
  import jax
  from jaxprompt.checkpoints.backbone import resolve_backbone_path
  from jaxprompt.lab import register_lab_tasks
  from jaxprompt.lab.world import TASKS, relatedness
  from jaxprompt.lab.tasks import seqio_name
  from jaxprompt.methods import library as lib
  from jaxprompt.prompts.files import write_prompt
  from jaxprompt.prompts.prompt import get_prompt
  from jaxprompt.tuning import tune
  say = log or (lambda msg: print(msg, flush=True))
  sources, targets = list(sources), list(targets)
  unknown = [t for t in sources + targets if t not in TASKS]
  if unknown:
    raise ValueError(f'not lab tasks: {", ".join(unknown)} (see jaxprompt.lab.TASKS)')
  both = sorted(set(sources) & set(targets))
  if both:
    raise ValueError(f'{", ".join(both)}: both a source and a target')
  bad = [k for k in embedding_inits if k not in EMBEDDING_INITS]
  if bad or not embedding_inits:
    raise ValueError(f'embedding_inits {list(embedding_inits)}: choose from {EMBEDDING_INITS}')
  if 'independent' in embedding_inits and (embedding_steps > source_steps or
                                           embedding_steps % source_eval_period):
    raise ValueError(f'embedding_steps {embedding_steps} must be a multiple of '
                     f'source_eval_period {source_eval_period} and at most source_steps '
                     f'{source_steps} (the independent embeddings come from the library run)')
  if top_k > len(sources):
    raise ValueError(f'top_k = {top_k} is larger than the library ({len(sources)} sources)')
  os.makedirs(work, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # many runs rebuild identical steps
    jax.config.update('jax_compilation_cache_dir', os.path.join(work, 'xla_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  ckpt = resolve_backbone_path(backbone)
  register_lab_tasks()
  src_names = [seqio_name(s) for s in sources]
  tgt_names = [seqio_name(t) for t in targets]
  # Validation in batches of its own size: the default (the training batch, here a mixed batch
  # of hundreds) would pad every row's few examples to it.
  eval_batch = min(max_eval_examples, 128)
  common = dict(prompt_length=prompt_length, max_eval_examples=max_eval_examples,
                eval_batch_size=eval_batch, progress=False, seed=seed)
  minutes: dict[str, float] = {}
  library = os.path.join(work, 'library')

  def stage(name: str, key: Mapping[str, Any], fn):
    """A finished stage of an earlier call with the same `work` and settings is reused (a rerun
    after a crash or an extension resumes); its minutes are the first run's."""
    path = os.path.join(work, 'stages', f'{name}.json')
    key = json.loads(json.dumps(dict(key, checkpoint=ckpt, seed=seed,
                                     prompt_length=prompt_length,
                                     max_eval_examples=max_eval_examples), default=str))

    def done_before() -> dict | None:
      if os.path.exists(path):
        with open(path) as f:
          done = json.load(f)
        if done.get('key') == key:
          return done
      return None

    def write() -> None:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + '.tmp', 'w') as f:
        json.dump(dict(key=key, minutes=minutes[name], value=value), f)
      os.replace(path + '.tmp', path)

    # Every process of a multi-host run decides alike (before process 0 writes the stage).
    done = agreement.same(f'{path}: done?', done_before, hint=agreement.SHARED_STORAGE)
    if done is not None:
      say(f'  {name}: reusing {path}')
      minutes[name] = done['minutes']
      return done['value']
    t0 = time.time()
    value = json.loads(json.dumps(fn(), default=_jsonable))
    minutes[name] = round((time.time() - t0) / 60, 2)
    agreement.by_writer(f'{path}: write', write)
    return value

  # 1. The library: source prompts, all at once.
  say(f'spot lab: {len(sources)} source prompts jointly, {source_steps} steps of '
      f'{source_batch} x {len(sources)} ({ckpt})')

  def run_sources():
    r = train_sources(
        src_names, library, ckpt, os.path.join(work, 'sources'), train_steps=source_steps,
        batch_size=source_batch * len(sources), eval_period=source_eval_period,
        embedding_steps=embedding_steps if 'independent' in embedding_inits else None,
        replace=True, **common)
    return dict(entries=r.entries, macro_best_step=r.macro_best_step)

  lib_run = stage('sources', dict(sources=src_names, steps=source_steps, batch=source_batch,
                                  eval_period=source_eval_period, embedding_steps=(
                                      embedding_steps if 'independent' in embedding_inits
                                      else None)), run_sources)
  source_scores = {s: lib_run['entries'][n]['score'] for s, n in zip(sources, src_names)}
  say(f'  sources ({minutes["sources"]} min): ' +
      ', '.join(f'{s} {v:.1f}' for s, v in source_scores.items()))

  # 2. The generic SPoT prompt.
  mixture = generic_mixture or register_tasks_mixture(src_names, rates=[1.0] * len(src_names))

  def run_generic():
    r = tune(mixture, backbone=ckpt, model_dir=os.path.join(work, 'generic'),
             train_steps=source_steps, batch_size=source_batch * len(sources),
             eval_period=source_eval_period, prompt_init='sampled_vocab', resume=True,
             **common)
    return dict(path=r.best_prompt_path, validation=_primary(r.best_metrics), step=r.best_step)

  generic = stage('generic', dict(mixture=mixture, sources=src_names, steps=source_steps,
                                  batch=source_batch, eval_period=source_eval_period),
                  run_generic)
  say(f'  generic prompt on {mixture} ({minutes["generic"]} min): validation '
      f'{generic["validation"]:.1f} at step {generic["step"]}')

  # 3. Task embeddings.
  shared_path = None
  pairs = []
  if 'shared' in embedding_inits:
    shared_path = agreement.by_writer('write the shared initialisation', lambda: _shared_init(
        ckpt, os.path.join(work, 'shared_init.safetensors'), prompt_length, seed), share=True)
    pairs += [(f'shared__{s}', n, shared_path) for s, n in zip(sources, src_names)]
    pairs += [(f'shared__{t}', n, shared_path) for t, n in zip(targets, tgt_names)]
  if 'independent' in embedding_inits:
    pairs += [(f'independent__{t}', n, 'sampled_vocab') for t, n in zip(targets, tgt_names)]

  def run_embeddings():
    r = transfer_matrix(pairs, ckpt, os.path.join(work, 'embedding_run'),
                        train_steps=embedding_steps, batch_size=source_batch * len(pairs),
                        eval_period=embedding_steps, **common)
    return dict(stack=np.asarray(jax.device_get(get_prompt(r['tune_result'].trainable))))

  stack = np.asarray(stage('embeddings', dict(rows=[p[:2] for p in pairs], steps=embedding_steps,
                                              batch=source_batch, inits=list(embedding_inits)),
                           run_embeddings)['stack'], np.float32)
  rows_of = {label: stack[i] for i, (label, _, _) in enumerate(pairs)}
  embeddings: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  for kind in embedding_inits:
    tgt = {t: rows_of[f'{kind}__{t}'] for t in targets}
    if kind == 'shared':
      src = {s: rows_of[f'shared__{s}'] for s in sources}
    else:
      src = {s: lib.load_embedding(library, n) for s, n in zip(sources, src_names)}
    embeddings[kind] = dict(sources=src, targets=tgt)
    agreement.by_writer(f'write the {kind} task embeddings', lambda: [write_prompt(
        os.path.join(work, 'embeddings', kind, f'{n}.safetensors'), tgt[t], overwrite=True,
        task=n, kind='task_embedding', embedding_steps=embedding_steps, init=kind)
        for t, n in zip(targets, tgt_names)])

  # 4. Retrieval against the ground truth.
  def rel(t, s):
    return float(relatedness(t, s))

  retrieval: dict[str, Any] = {}
  sims: dict[tuple[str, str], np.ndarray] = {}
  shared0 = None
  if shared_path:
    from jaxprompt.prompts.files import read_prompt
    shared0 = np.asarray(read_prompt(shared_path).value)
  for kind, e in embeddings.items():
    variants = {kind: e}
    if kind == 'shared':  # what the tasks taught: the moves away from the common start
      variants['shared_delta'] = dict(
          sources={s: v - shared0 for s, v in e['sources'].items()},
          targets={t: v - shared0 for t, v in e['targets'].items()})
    for vname, ve in variants.items():
      for sim_name in sorted(SIMILARITIES):
        m = similarity_matrix([ve['targets'][t] for t in targets],
                              [ve['sources'][s] for s in sources], sim_name)
        sims[(vname, sim_name)] = m
        per_target = {}
        for i, t in enumerate(targets):
          order = [sources[j] for j in np.argsort(-m[i], kind='stable')]
          r = {s: rel(t, s) for s in sources}
          by = dict(zip(sources, m[i].tolist()))
          per_target[t] = dict(
              ranking=[(s, round(by[s], 4), r[s]) for s in order],
              auc_related=_auc([by[s] for s in sources if r[s] >= 0.5],
                               [by[s] for s in sources if r[s] == 0.0]),
              auc_same_skill=_auc([by[s] for s in sources if r[s] == 1.0],
                                  [by[s] for s in sources if r[s] == 0.0]),
              top1=order[0], top1_relatedness=r[order[0]],
              same_skill_rank=min((order.index(s) + 1 for s in sources if r[s] == 1.0),
                                  default=None))
        # Among the sources: are same-skill pairs more alike than unrelated pairs?
        ms = similarity_matrix([ve['sources'][s] for s in sources],
                               [ve['sources'][s] for s in sources], sim_name)
        pos, neg = [], []
        for i, a in enumerate(sources):
          for j in range(i + 1, len(sources)):
            ra = rel(a, sources[j])
            (pos if ra == 1.0 else neg if ra == 0.0 else []).append(float(ms[i, j]))
        aucs = [v['auc_related'] for v in per_target.values() if v['auc_related'] is not None]
        aucs1 = [v['auc_same_skill'] for v in per_target.values()
                 if v['auc_same_skill'] is not None]
        retrieval[f'{vname}/{sim_name}'] = dict(
            mean_auc_related=float(np.mean(aucs)) if aucs else None,
            mean_auc_same_skill=float(np.mean(aucs1)) if aucs1 else None,
            source_pairs_auc_same_skill=_auc(pos, neg),
            similarity_range=[round(float(m.min()), 4), round(float(m.max()), 4)],
            per_target=per_target)
  # How far the embeddings moved from their start (relative norm), and the library's rows.
  movement = {}
  if shared0 is not None:
    n0 = float(np.linalg.norm(shared0))
    e = embeddings['shared']
    movement['shared_relative_move'] = {
        k: round(float(np.linalg.norm(v - shared0) / n0), 4)
        for k, v in {**e['sources'], **e['targets']}.items()}
  for key, r in retrieval.items():
    say(f'  retrieval {key}: AUC related/unrelated {r["mean_auc_related"]}, same-skill '
        f'{r["mean_auc_same_skill"]}, among sources {r["source_pairs_auc_same_skill"]}')

  # Top-k weighted averages, per embedding kind (per-token similarity).
  def write_weighted() -> dict[str, dict[str, str]]:
    wavg: dict[str, dict[str, str]] = {}
    for kind in embeddings:
      wavg[kind] = {}
      m = sims[(kind, 'per_token')]
      for i, (t, n) in enumerate(zip(targets, tgt_names)):
        ranking = sorted(zip(src_names, m[i].tolist()), key=lambda x: -x[1])
        try:
          wavg[kind][t] = write_weighted_average(
              os.path.join(work, 'weighted', kind, f'{t}.safetensors'), ranking, library, top_k,
              target=n, overwrite=True)
        except LibraryError as err:
          say(f'  {t}: no {kind} weighted average ({err})')
    return wavg

  wavg = agreement.by_writer('write the weighted averages', write_weighted, share=True)

  # 5. Transfer: every (target, init) as one row of one stack run; equal budgets.
  pairs = []
  for t, n in zip(targets, tgt_names):
    pairs.append((f'{t}__class_labels', n, 'class_labels'))
    pairs.append((f'{t}__sampled_vocab', n, 'sampled_vocab'))
    pairs.append((f'{t}__generic', n, generic['path']))
    for kind in embeddings:
      if t in wavg[kind]:
        pairs.append((f'{t}__wavg_{kind}', n, wavg[kind][t]))
    for s, sn in zip(sources, src_names):
      pairs.append((f'{t}__{s}', n, f'{library}:{sn}'))
  say(f'  transfer: {len(pairs)} rows, {target_steps} steps of ~{target_batch} each')

  def run_transfer():
    r = transfer_matrix(pairs, ckpt, os.path.join(work, 'transfer'), train_steps=target_steps,
                        batch_size=target_batch * len(pairs), eval_period=eval_period,
                        **common)
    return r['rows']

  rows = stage('transfer', dict(rows=[p[:2] for p in pairs], steps=target_steps,
                                batch=target_batch, eval_period=eval_period,
                                sources=lib_run, inits=list(embedding_inits)), run_transfer)

  # 6. Model tuning, same steps and batch.
  mt: dict[str, Any] = {}
  if model_tuning:
    for t, n in zip(targets, tgt_names):
      d = os.path.join(work, f'model_tuning_{t}')

      def run_mt(n=n, d=d):
        tune(n, backbone=ckpt, model_dir=d, method='model_tuning',
             learning_rate=model_tuning_lr, train_steps=target_steps, batch_size=target_batch,
             eval_period=eval_period, max_eval_examples=max_eval_examples,
             eval_batch_size=eval_batch, progress=False, seed=seed, keep_checkpoints=1,
             resume=True)
        curve = [(s, _primary(m)) for s, m in per_task_evals(d, [n])[n]]
        best_step, best = max(curve, key=lambda sc: (sc[1], -sc[0]))
        return dict(best=best, best_step=best_step, curve=curve)

      mt[t] = stage(f'model_tuning_{t}', dict(steps=target_steps, batch=target_batch,
                                               eval_period=eval_period, lr=model_tuning_lr),
                    run_mt)
      say(f'  model tuning {t}: {mt[t]["best"]:.1f} at step {mt[t]["best_step"]}')
    minutes['model_tuning'] = round(sum(minutes.pop(f'model_tuning_{t}') for t in targets), 2)

  # 7. Per target.
  per_target = {}
  scores = []
  no_transfer = []
  for i, t in enumerate(targets):
    pt = rows[f'{t}__class_labels']['best']
    src_scores = [rows[f'{t}__{s}']['best'] for s in sources]
    scores.append(src_scores)
    no_transfer.append(pt)
    r = {s: rel(t, s) for s in sources}
    reach = {s: steps_to_reach(rows[f'{t}__{s}']['curve'], pt) for s in sources}
    first = {s: dict(rows[f'{t}__{s}']['curve']).get(eval_period) for s in sources}

    def group(level, reach=reach, first=first, r=r):
      ss = [s for s in sources if r[s] == level]
      got = [reach[s] for s in ss if reach[s] is not None]
      return dict(sources=ss, reached=len(got), median_steps=_median(got),
                  mean_best=float(np.mean([rows[f'{t}__{s}']['best'] for s in ss]))
                  if ss else None,
                  mean_at_first_check=float(np.mean([first[s] for s in ss
                                                     if first[s] is not None]))
                  if ss else None)

    best_retrieved = {}
    for key in (f'{k}/per_token' for k in embeddings):
      top1 = retrieval[key]['per_target'][t]['top1']
      best_retrieved[key.split('/')[0]] = dict(source=top1, score=rows[f'{t}__{top1}']['best'])
    oracle_j = int(np.argmax(src_scores))
    row = dict(
        class_labels=pt, sampled_vocab=rows[f'{t}__sampled_vocab']['best'],
        generic=rows[f'{t}__generic']['best'],
        weighted_average={k: rows[f'{t}__wavg_{k}']['best'] for k in embeddings
                          if f'{t}__wavg_{k}' in rows},
        best_retrieved=best_retrieved,
        oracle=dict(source=sources[oracle_j], score=float(src_scores[oracle_j])),
        model_tuning=mt.get(t, {}).get('best'),
        by_source={s: rows[f'{t}__{s}']['best'] for s in sources},
        same_skill=group(1.0), partly_related=group(0.5), unrelated=group(0.0),
        steps_to_own_pt=dict(
            sampled_vocab=steps_to_reach(rows[f'{t}__sampled_vocab']['curve'], pt),
            generic=steps_to_reach(rows[f'{t}__generic']['curve'], pt), **reach),
        curves={k.split('__', 1)[1]: v['curve'] for k, v in rows.items()
                if k.startswith(t + '__')})
    m_score = row['model_tuning']
    if m_score is not None:
      row['pt_over_mt'] = round(pt / max(m_score, 1e-9), 3)
      row['pt_short'] = bool(pt < 0.9 * m_score)
      gap = m_score - pt
      cands = dict(generic=row['generic'], oracle=row['oracle']['score'],
                   **{f'best_retrieved_{k}': v['score'] for k, v in best_retrieved.items()},
                   **{f'weighted_average_{k}': v for k, v in row['weighted_average'].items()})
      row['gap_closed'] = {k: (round((v - pt) / gap, 3) if gap > 0 else None)
                           for k, v in cands.items()}
    per_target[t] = row
    say(f'  {t}: class labels {pt:.1f}, generic {row["generic"]:.1f}, oracle '
        f'{row["oracle"]["score"]:.1f} ({row["oracle"]["source"]}), model tuning {m_score}')

  evaluations = {}
  for key in (f'{k}/per_token' for k in embeddings):
    evaluations[key.split('/')[0]] = retrieval_evaluation(
        targets, sources, np.array(scores), sims[tuple(key.split('/'))], no_transfer)
  return dict(
      settings=dict(backbone=backbone, checkpoint=ckpt, sources=sources, targets=targets,
                    source_steps=source_steps, source_batch_per_task=source_batch,
                    source_eval_period=source_eval_period, embedding_steps=embedding_steps,
                    embedding_inits=list(embedding_inits), target_steps=target_steps,
                    target_batch_per_row=target_batch, eval_period=eval_period,
                    max_eval_examples=max_eval_examples, prompt_length=prompt_length,
                    top_k=top_k, model_tuning_lr=model_tuning_lr, generic_mixture=mixture,
                    seed=seed, transfer_rows=len(pairs),
                    score='best validation accuracy / exact match (%), max_eval_examples'),
      cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), minutes=minutes,
      work=os.path.abspath(work), library=library,
      sources=dict(scores=source_scores, **lib_run), generic=generic,
      retrieval=retrieval, movement=movement, targets=per_target,
      scores=dict(targets=targets, sources=sources, matrix=scores, no_transfer=no_transfer),
      similarity={f'{k[0]}/{k[1]}': v.round(5).tolist() for k, v in sims.items()},
      retrieval_evaluation={k: {kk: vv for kk, vv in v.items() if kk != 'per_target'}
                            for k, v in evaluations.items()},
      _evaluations=evaluations)


def _jsonable(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return str(x)


def _f(x, digits=1):
  return '-' if x is None else f'{x:.{digits}f}'


def format_lab_evidence(res: Mapping[str, Any]) -> str:
  """Markdown tables of a `lab_evidence` result."""
  st = res['settings']
  kinds = st['embedding_inits']
  out = [f'Backbone {st["backbone"]}; {len(st["sources"])} sources x {st["source_steps"]} steps '
         f'({st["source_batch_per_task"]}/task/step), embeddings after '
         f'{st["embedding_steps"]} steps ({", ".join(kinds)} init), targets '
         f'{st["target_steps"]} steps of ~{st["target_batch_per_row"]} per row '
         f'({st["transfer_rows"]} rows), validation every {st["eval_period"]} steps on '
         f'{st["max_eval_examples"]} examples; best validation, %. Minutes: ' +
         ', '.join(f'{k} {v}' for k, v in res['minutes'].items()) + '.', '']
  out.append('Source prompts (library, best validation): ' + ', '.join(
      f'{s} {v:.0f}' for s, v in res['sources']['scores'].items()) +
      f'; generic prompt {res["generic"]["validation"]:.1f}.')
  out.append('')
  head = ['target', 'class-label init', 'sampled-vocab init', 'generic SPoT']
  head += [f'best retrieved ({k})' for k in kinds]
  head += [f'top-{st["top_k"]} wavg ({k})' for k in kinds]
  head += ['oracle', 'model tuning', 'PT/MT']
  out += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for t, r in res['targets'].items():
    cells = [t, _f(r['class_labels']), _f(r['sampled_vocab']), _f(r['generic'])]
    cells += [f'{_f(r["best_retrieved"][k]["score"])} ({r["best_retrieved"][k]["source"]})'
              for k in kinds]
    cells += [_f(r['weighted_average'].get(k)) for k in kinds]
    cells += [f'{_f(r["oracle"]["score"])} ({r["oracle"]["source"]})', _f(r['model_tuning']),
              _f(r.get('pt_over_mt'), 2)]
    out.append('| ' + ' | '.join(cells) + ' |')
  means = lambda f: _f(float(np.mean([f(r) for r in res['targets'].values()])))  # noqa: E731
  cells = ['mean', means(lambda r: r['class_labels']), means(lambda r: r['sampled_vocab']),
           means(lambda r: r['generic'])]
  cells += [means(lambda r, k=k: r['best_retrieved'][k]['score']) for k in kinds]
  cells += [means(lambda r, k=k: r['weighted_average'].get(k, np.nan)) for k in kinds]
  cells += [means(lambda r: r['oracle']['score']),
            means(lambda r: r['model_tuning'] if r['model_tuning'] is not None else np.nan), '']
  out.append('| ' + ' | '.join(cells) + ' |')
  short = {t: r for t, r in res['targets'].items() if r.get('pt_short')}
  out.append('')
  if short:
    # A weighted average can be undefined for a target (its top-k similarities sum to <= 0).
    keys = list(dict.fromkeys(k for r in short.values() for k in r['gap_closed']))
    out.append('Share of the prompt-tuning -> model-tuning gap closed (targets with PT < 0.9 MT; '
               '>= 0.5 is the goal):')
    out.append('')
    out += ['| target | PT | MT | ' + ' | '.join(keys) + ' |', '|' + '---|' * (len(keys) + 3)]
    for t, r in short.items():
      out.append(f'| {t} | {_f(r["class_labels"])} | {_f(r["model_tuning"])} | ' +
                 ' | '.join(_f(r['gap_closed'].get(k), 2) for k in keys) + ' |')
  else:
    out.append('No target has prompt tuning below 0.9 of model tuning at these budgets.')
  out.append('')
  out.append(f'Steps to reach the target\'s own prompt-tuning score (class-label best), '
             f'validation every {st["eval_period"]}; per source group: reached / n, median '
             f'steps, mean best, mean score at the first check:')
  out.append('')
  out += ['| target | own PT | same skill (1.0) | partly related (0.5) | unrelated (0) | '
          'sampled vocab | generic |', '|---|---|---|---|---|---|---|']

  def g(x):
    n = len(x['sources'])
    if not n:
      return '-'
    return (f'{x["reached"]}/{n}, {_f(x["median_steps"], 0)}, {_f(x["mean_best"])}, '
            f'{_f(x["mean_at_first_check"])}')
  for t, r in res['targets'].items():
    s = r['steps_to_own_pt']
    out.append(f'| {t} | {_f(r["class_labels"])} | {g(r["same_skill"])} | '
               f'{g(r["partly_related"])} | {g(r["unrelated"])} | '
               f'{s["sampled_vocab"] if s["sampled_vocab"] is not None else "never"} | '
               f'{s["generic"] if s["generic"] is not None else "never"} |')
  out.append('')
  out.append('Retrieval: AUC of related (>= 0.5) / same-skill (1.0) over unrelated (0) sources '
             '(0.5 = chance), mean over targets; among the sources themselves (same-skill pairs '
             'over unrelated pairs); the similarity range:')
  out.append('')
  out += ['| embeddings / similarity | AUC related | AUC same skill | among sources | '
          'similarity range |', '|---|---|---|---|---|']
  for k, r in res['retrieval'].items():
    out.append(f'| {k} | {_f(r["mean_auc_related"], 2)} | {_f(r["mean_auc_same_skill"], 2)} | '
               f'{_f(r["source_pairs_auc_same_skill"], 2)} | {r["similarity_range"]} |')
  out.append('')
  for k in kinds:
    out.append(f'Rankings ({k}, per-token), top 3 with relatedness:')
    out.append('')
    for t, r in res['retrieval'][f'{k}/per_token']['per_target'].items():
      top = ', '.join(f'{s} {v:+.3f} ({rl:g})' for s, v, rl in r['ranking'][:3])
      out.append(f'- {t}: {top}; same-skill rank {r["same_skill_rank"]}')
    out.append('')
    out.append(f'Retrieval evaluation ({k} embeddings, per-token):')
    out.append('')
    out.append(format_evaluation(res['_evaluations'][k] if '_evaluations' in res
                                 else res['retrieval_evaluation'][k]))
    out.append('')
  if res.get('movement', {}).get('shared_relative_move'):
    mv = res['movement']['shared_relative_move']
    out.append(f'Shared-init embeddings moved ||P_N - P_0|| / ||P_0|| = '
               f'{min(mv.values()):.3f} - {max(mv.values()):.3f} from the common start.')
  return '\n'.join(out)


def write_lab_evidence(res: Mapping[str, Any], out: str, overwrite: bool = False
                       ) -> dict[str, str]:
  """Writes OUT.json (everything), OUT.csv (one row per target), OUT.md (the tables), OUT.png
  (per-target bars) and OUT_retrieval_<kind>.(md|csv|png|json) (`spot evaluate`'s table)."""
  paths = lab_output_paths(out)
  existing = [p for p in paths.values() if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f'{existing[0]}: already exists; pass --overwrite or another --out')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(paths['json'], 'w') as f:
    json.dump({k: v for k, v in res.items() if not k.startswith('_')}, f, indent=1,
              default=str)
  kinds = res['settings']['embedding_inits']
  cols = (['class_labels', 'sampled_vocab', 'generic'] + [f'best_retrieved_{k}' for k in kinds]
          + [f'weighted_average_{k}' for k in kinds] + ['oracle', 'model_tuning'])

  def values(r):
    v = dict(class_labels=r['class_labels'], sampled_vocab=r['sampled_vocab'],
             generic=r['generic'], oracle=r['oracle']['score'], model_tuning=r['model_tuning'])
    v.update({f'best_retrieved_{k}': r['best_retrieved'][k]['score'] for k in kinds})
    v.update({f'weighted_average_{k}': r['weighted_average'].get(k) for k in kinds})
    return v

  with open(paths['csv'], 'w') as f:
    f.write('target,' + ','.join(cols) + '\n')
    for t, r in res['targets'].items():
      v = values(r)
      f.write(t + ',' + ','.join('' if v[c] is None else f'{v[c]:.6g}' for c in cols) + '\n')
  with open(paths['md'], 'w') as f:
    f.write(format_lab_evidence(res) + '\n')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  targets = list(res['targets'])
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(targets)) + 2.5, 3.8))
  width = 0.8 / len(cols)
  for j, c in enumerate(cols):
    ys = [values(res['targets'][t])[c] for t in targets]
    ax.bar(np.arange(len(targets)) + j * width, [np.nan if y is None else y for y in ys],
           width, label=c.replace('_', ' '))
  ax.set_xticks(np.arange(len(targets)) + 0.4 - width / 2)
  ax.set_xticklabels(targets, fontsize=8)
  ax.set_ylabel('best validation (%)')
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(paths['png'], dpi=100)
  plt.close(fig)
  for k in kinds:
    ev = (res['_evaluations'][k] if '_evaluations' in res else res['retrieval_evaluation'][k])
    for ext, p in write_evaluation(ev, f'{out}_retrieval_{k}', overwrite=True).items():
      paths[f'retrieval_{k}_{ext}'] = p
  return paths


# ---------------------------------------------------------------------------------------------
# The command line: `jaxprompt lab report spot` (alias `jaxprompt spot lab`).

def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(',') if t.strip()]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
  from jaxprompt.flags import Parser  # one-line errors naming a typo'd flag's close matches
  p = Parser(prog=prog, description="SPoT's evidence on the lab: library, generic prompt, "
             'retrieval, transfer and model tuning, against the lab relatedness')
  p.add_argument('--out', default='spot_lab',
                 help='write OUT.json, OUT.csv, OUT.md, OUT.png, OUT_retrieval_<kind>.*')
  p.add_argument('--overwrite', action='store_true', help='replace existing OUT files')
  p.add_argument('--work', default=None, help='keep the runs here (default: a temporary dir)')
  p.add_argument('--backbone', default='lab:methods', help="'lab:PRESET' or a checkpoint")
  p.add_argument('--sources', default=','.join(LAB_SOURCES),
                 help="the library's lab source tasks ('all': every source)")
  p.add_argument('--targets', default=','.join(LAB_TARGETS), help='lab target tasks')
  p.add_argument('--source_steps', type=int, default=600)
  p.add_argument('--source_batch', type=int, default=8, help='examples per source per step')
  p.add_argument('--source_eval_period', type=int, default=100)
  p.add_argument('--embedding_steps', type=int, default=500)
  p.add_argument('--embedding_init', default='both', choices=('both',) + EMBEDDING_INITS,
                 help='independent: each row its own sampled-vocab draw (the paper); shared: '
                      'one draw for every row; both')
  p.add_argument('--target_steps', type=int, default=300)
  p.add_argument('--target_batch', type=int, default=8, help='examples per row per step')
  p.add_argument('--eval_period', type=int, default=50, help='target validation period')
  p.add_argument('--max_eval_examples', type=int, default=100)
  p.add_argument('--prompt_length', type=int, default=10)
  p.add_argument('--top_k', type=int, default=3, help='for the weighted average')
  p.add_argument('--no_model_tuning', action='store_true', help='skip the model-tuning runs')
  p.add_argument('--model_tuning_lr', type=float, default=1e-3)
  p.add_argument('--generic_mixture', default=None,
                 help="the generic prompt's mixture (default: the library's sources, equal "
                      'rates)')
  p.add_argument('--seed', type=int, default=0)
  return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  args = build_parser(prog).parse_args(argv)
  import tempfile
  paths = lab_output_paths(args.out)
  existing = [p for p in paths.values() if os.path.exists(p)]
  if existing and not args.overwrite:
    raise FileExistsError(f'{existing[0]}: already exists; pass --overwrite or another --out')
  sources = list(SOURCE_TASKS) if args.sources == 'all' else _split(args.sources)
  kinds = EMBEDDING_INITS if args.embedding_init == 'both' else (args.embedding_init,)
  work = args.work or tempfile.mkdtemp(prefix='jaxprompt_spot_lab_')
  res = lab_evidence(
      work, backbone=args.backbone, sources=sources, targets=_split(args.targets),
      source_steps=args.source_steps, source_batch=args.source_batch,
      source_eval_period=args.source_eval_period, embedding_steps=args.embedding_steps,
      embedding_inits=kinds, target_steps=args.target_steps, target_batch=args.target_batch,
      eval_period=args.eval_period, max_eval_examples=args.max_eval_examples,
      prompt_length=args.prompt_length, top_k=args.top_k,
      model_tuning=not args.no_model_tuning, model_tuning_lr=args.model_tuning_lr,
      generic_mixture=args.generic_mixture, seed=args.seed)
  written = write_lab_evidence(res, args.out, overwrite=True)
  print(format_lab_evidence(res))
  print(f'runs: {work}')
  print('written: ' + ', '.join(written.values()))
  return 0


__all__ = ['EMBEDDING_INITS', 'LAB_SOURCES', 'LAB_TARGETS', 'format_lab_evidence', 'lab_evidence',
           'lab_output_paths', 'main', 'write_lab_evidence']
