"""SPoT: soft prompt transfer (Vu, Lester, Constant, Al-Rfou, Cer, ACL 2022).

An outer procedure over the one run driver (`jaxprompt.tuning.tune`), not a new loop:

* **Source prompts, many at once** (`train_sources`, `jaxprompt spot sources`): the source tasks
  become one mixture and the `prompt_stack` method trains one row per task in mixed-task
  batches (the per-row optimizer gives each row the update it would get alone). The driver
  selects one best step by the macro score; the `prompt_stack` method also keeps each task's
  row at *its own* best validation (`best_rows.safetensors`, its `after_validation` hook), which
  is written to the prompt library (`jaxprompt.methods.library`) with its metrics and,
  optionally, its task embedding (the row after `embedding_steps` steps: the run stops there,
  is snapshotted, and resumes).
* **Transfer** is `tune(..., init_from=PROMPT_FILE or LIBRARY_DIR:TASK)`; `transfer_matrix`
  trains many (target, initialisation) pairs at once in one stack run (method `spot_rows`, rows
  initialised each from its own source).
* **Task embeddings and retrieval** (`embed_tasks`, `jaxprompt spot embed|rank`): a task's
  prompt after N steps; similarity `per_token` (mean cosine over all token pairs) or
  `avg_tokens` (cosine of the average tokens), see `jaxprompt.methods.library`. Strategies:
  best of top-k (`best_of_top_k`), top-k weighted average (`weighted_average`, a_r =
  sim_r / sum sim), top-k mixture (`top_k_mixture`).
* **Evaluating retrieval** (`retrieval_evaluation`, `jaxprompt spot evaluate`): from a
  target x source transfer-score matrix, the average target score of best-of-top-k for
  k in {1, 3, 6, 9, 12, 15}, the oracle and no-transfer lines, and Pearson r per target between
  similarity and transfer gain; a table, a CSV and a plot.

Its study on the lab, against the lab's known relatedness, is `jaxprompt.lab.spot_study`
(`jaxprompt lab report spot`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from jaxprompt.methods import Command, register
from jaxprompt.methods.base import Context
from jaxprompt.methods.library import (DEFAULT_SIMILARITY, SIMILARITIES, LibraryError,
                                       cosine_average_tokens, per_token_average_cosine, rank,
                                       similarity_matrix)
from jaxprompt.methods.prompt_stack import PromptStack
from jaxprompt.train import agreement

PAPER_SOURCE_STEPS = 2 ** 18  # 262,144
PAPER_EMBEDDING_STEPS = 10_000
RETRIEVAL_KS = (1, 3, 6, 9, 12, 15)
MIXTURE_CAP = 2 ** 19


# ---------------------------------------------------------------------------------------------
# A stack whose rows start from different prompts: many transfers in one run.

@dataclasses.dataclass(frozen=True)
class RowsOptions:
  """`row_init`: one initialisation per member task of the run's mixture, in its order: a prompt
  file, `LIBRARY_DIR:TASK`, or an initialiser name (class_labels, sampled_vocab, uniform, ...).
  Empty: every row from the run's own `--init_from` / `--prompt_init`."""

  row_init: tuple[str, ...] = ()


@register
class PromptRows(PromptStack):
  """A prompt stack (one row per mixture member) with a separate initialisation per row."""

  name = 'spot_rows'
  Options = RowsOptions

  def init(self, rng, ctx: Context):
    import jax
    from jaxprompt import config as config_lib
    from jaxprompt.data.tasks import label_names
    from jaxprompt.prompts.init import make_prompt_init, source_prompt
    c = ctx.config
    default = c.init_from or (c.prompt_init_file if c.prompt_init == 'file' else c.prompt_init)
    specs = tuple(ctx.options.row_init) or (default,) * len(ctx.tasks)
    if len(specs) != len(ctx.tasks):
      raise ValueError(f'spot_rows: row_init has {len(specs)} entries for {len(ctx.tasks)} '
                       'member tasks; give one initialisation per task, in the mixture\'s order')
    rows = []
    for key, spec, task in zip(jax.random.split(rng, len(specs)), specs, ctx.tasks):
      if spec in config_lib.PROMPT_INITS and spec not in ('file', 'text'):
        labels = label_names(task)
        fn = make_prompt_init(spec, ctx.embedding, ctx.vocabulary, list(labels) if labels else
                              None, c.prompt_init_scale)
        rows.append(np.asarray(fn(key, (c.prompt_length, ctx.width))))
      else:
        rows.append(source_prompt(spec, ctx.width, ctx.backbone, c.prompt_length,
                                  c.init_length_mismatch))
    from jaxprompt.prompts import prompt as prompt_lib
    return prompt_lib.prompt_tree(np.stack(rows).astype(np.float32)), {}


# ---------------------------------------------------------------------------------------------
# Mixtures and the per-task best rows of a stack run.

def register_tasks_mixture(tasks: Sequence[str], name: str | None = None,
                           cap: int = MIXTURE_CAP, rates=None) -> str:
  """Registers `tasks` as a mixture (examples-proportional with cap K, as SPoT; equal rates
  when the tasks' sizes are unknown) and returns its name."""
  from jaxprompt.data.tasks import (check_task_name, examples_proportional_rate,
                                    register_mixture)
  import seqio
  tasks = list(tasks)
  if len(set(tasks)) != len(tasks):
    raise ValueError(f'tasks repeat: {", ".join(t for t in tasks if tasks.count(t) > 1)}')
  for t in tasks:
    check_task_name(t)
  if rates is None:
    try:
      rates = [examples_proportional_rate(seqio.get_mixture_or_task(t), cap) for t in tasks]
    except ValueError:
      rates = [1.0] * len(tasks)
  digest = hashlib.blake2b(repr((tasks, list(rates))).encode(), digest_size=4).hexdigest()
  name = name or f'spot_mixture_{digest}'
  register_mixture(name, tasks, rates=list(rates))
  return name


def _primary(metrics: Mapping[str, float]) -> float:
  from jaxprompt.train.evaluation import primary_score
  return float(primary_score(dict(metrics)))


def per_task_evals(model_dir: str, tasks: Sequence[str]) -> dict[str, list[tuple[int, dict]]]:
  """{task: [(step, its metrics)]} of every validation of a run (from metrics.jsonl)."""
  from jaxprompt.train.summaries import read_metrics
  rows = [r for r in read_metrics(model_dir) if r.get('split') == 'eval']
  out: dict[str, list] = {t: [] for t in tasks}
  for r in rows:
    for t in tasks:
      if len(tasks) == 1:
        m = {k: v for k, v in r.items() if k not in ('step', 'split', 'score')}
      else:
        m = {k[len(t) + 1:]: v for k, v in r.items() if k.startswith(t + '/')}
      if m:
        out[t].append((int(r['step']), m))
  return out


def restore_stack(model_dir: str, step: int) -> np.ndarray:
  """The prompt (or stack) a run had at checkpoint `step` ([n, P, d] or [P, d])."""
  import orbax.checkpoint as ocp
  from jaxprompt.prompts.prompt import get_prompt
  path = os.path.join(os.path.abspath(model_dir), 'checkpoints', str(step), 'state')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{model_dir}: no checkpoint of step {step}')
  with ocp.PyTreeCheckpointer() as ckpt:
    state = ckpt.restore(path)
  return np.asarray(get_prompt(state['trainable']))


# ---------------------------------------------------------------------------------------------
# Source prompts, many at once.

@dataclasses.dataclass
class SourcesResult:
  library: str
  model_dir: str
  mixture: str
  entries: dict[str, dict[str, Any]]  # task -> {step, score, metrics, embedding_steps, file}
  macro_best_step: int | None
  macro_best_scores: dict[str, float]  # each task's score at the driver's (macro) best step
  seconds: float
  tune_result: Any = dataclasses.field(repr=False, default=None)


EMBEDDINGS_FILE = 'task_embeddings.safetensors'  # in a sources run: the rows at embedding_steps


def _save_stack(path: str, stack: np.ndarray) -> None:
  from safetensors.numpy import save_file
  save_file({'stack': np.ascontiguousarray(stack, np.float32)}, path + '.tmp')
  os.replace(path + '.tmp', path)


def _load_stack(path: str) -> np.ndarray:
  from safetensors.numpy import load_file
  return load_file(path)['stack']


def train_sources(tasks: Sequence[str], library: str, backbone, model_dir: str, *,
                  train_steps: int = PAPER_SOURCE_STEPS, batch_size: int = 32,
                  eval_period: int = 500, embedding_steps: int | None = None,
                  prompt_init: str = 'sampled_vocab', replace: bool = False,
                  mixture: str | None = None, **options) -> SourcesResult:
  """Trains the source prompts of `tasks` jointly (one stack row each) and adds each task's
  best row (by its own validation) to `library`.

  Args:
    tasks: registered seqio tasks.
    library: the prompt library directory (created if new).
    backbone: a checkpoint path ('lab'), `(module, params)` or a `Backbone`.
    model_dir: the run directory of the joint run.
    train_steps, batch_size, eval_period: of the joint run (batch_size is the mixed batch;
      SPoT: 2**18 steps, batch 32, a checkpoint every 500 steps keeping the best).
    embedding_steps: record each row after this many steps as the task's embedding (a multiple
      of eval_period, at most train_steps; the paper's 10K); None: no embedding.
    prompt_init: the rows' initialiser (SPoT: sampled vocabulary).
    replace: replace tasks already in the library (otherwise an error before training).
    mixture: the mixture name to register (default: a digest of the tasks).
    **options: more `tune` options (prompt_length, learning_rate, dropout_rate, seed, ...).
  """
  from jaxprompt.methods import library as lib
  from jaxprompt.tuning import tune
  tasks = list(tasks)
  if not tasks:
    raise ValueError('no source tasks given')
  if embedding_steps is not None and (embedding_steps <= 0 or embedding_steps > train_steps or
                                      (embedding_steps % eval_period and
                                       embedding_steps != train_steps)):
    raise ValueError(f'embedding_steps {embedding_steps} must be a multiple of eval_period '
                     f'{eval_period} and at most train_steps {train_steps}')
  from jaxprompt.train import agreement
  if os.path.exists(library) and not replace:
    held = [t for t in tasks if t in lib.entries(library)]
    if held:
      raise LibraryError(f'{library}: already holds {", ".join(held)}; pass --replace')
  elif os.path.exists(library):
    lib.read_index(library)
  # The library exists before training: its default run folder (LIBRARY/runs/...) lives inside
  # it, and a directory that is not a library fails now, not after the training.
  agreement.by_writer(f'{library}: the prompt library', lambda: lib.create(library))
  name = mixture or register_tasks_mixture(tasks)
  from jaxprompt.data.tasks import member_tasks
  from jaxprompt.methods import prompt_stack
  members = list(member_tasks(name))
  run = dict(backbone=backbone, model_dir=model_dir, method='prompt_stack',
             batch_size=batch_size, eval_period=eval_period, prompt_init=prompt_init, **options)
  # Every stage resumes the run it left in model_dir (a run of other settings is refused), so a
  # killed or failed `spot sources` continues where it stopped when run again.
  run.pop('resume', None)
  start = time.time()
  embeddings = {}
  if embedding_steps is not None:
    # The same run stopped at the embedding step: its latest checkpoint is the snapshot, and
    # resuming continues it bit for bit (the prompt-tuning rate is constant) to train_steps.
    # The snapshot is kept in model_dir, as later checkpoints replace that step's.
    snapshot = os.path.join(model_dir, EMBEDDINGS_FILE)
    if not agreement.same(f'{snapshot}: taken', lambda: os.path.exists(snapshot)):
      tune(name, train_steps=embedding_steps, resume=True, **run)
      stack = np.asarray(restore_stack(model_dir, embedding_steps), np.float32)
      agreement.by_writer(f'{snapshot}: write', lambda: _save_stack(snapshot, stack))
    stack = _load_stack(snapshot)
    embeddings = {t: stack[i] for i, t in enumerate(members)}
  result = tune(name, train_steps=train_steps, resume=True, **run)
  seconds = time.time() - start
  values, records = prompt_stack.best_rows(model_dir)  # each task's row at its own best
  rows = {t: dict(step=records[t]['step'], metrics=records[t]['metrics'],
                  score=_primary(records[t]['metrics']), value=values[i])
          for i, t in enumerate(members)}
  bb = result.backbone
  macro = {}
  if result.best_step is not None:
    evals = per_task_evals(model_dir, members)
    macro = {t: _primary(m) for t in members for s, m in evals[t] if s == result.best_step}

  def add_all() -> dict[str, dict]:
    out = {}
    for task in members:
      r = rows[task]
      entry = lib.add(library, r['value'], task=task, embedding=embeddings.get(task),
                      embedding_steps=embedding_steps if task in embeddings else None,
                      replace=replace, backbone=bb, metadata=dict(
                          steps=r['step'], seed=options.get('seed', 0), metrics=r['metrics'],
                          init=prompt_init, source_run=os.path.abspath(model_dir),
                          method='prompt_stack', mixture=name, train_steps=train_steps,
                          batch_size=batch_size, position=options.get('prompt_position',
                                                                       'prefix')))
      out[task] = dict(step=r['step'], score=round(r['score'], 4), file=entry['path'],
                       embedding_steps=entry.get('embedding_steps'))
    return out

  # One process adds (a second would find each task already held); all go on once it has.
  out = agreement.by_writer(f'{library}: add the source prompts', add_all, share=True)
  return SourcesResult(os.path.abspath(library), os.path.abspath(model_dir), name, out,
                       result.best_step, macro, seconds, result)


# ---------------------------------------------------------------------------------------------
# Task embeddings.

def embed_tasks(tasks: Sequence[str], backbone, model_dir: str, out_dir: str, *,
                steps: int = PAPER_EMBEDDING_STEPS, batch_size: int = 32,
                prompt_init: str = 'sampled_vocab', overwrite: bool = False,
                **options) -> dict[str, str]:
  """The task embeddings of `tasks` (each task's prompt after `steps` steps of tuning on it),
  trained jointly as a stack (one row per task; one task: plain prompt tuning), written as
  prompt files `out_dir/<task>.safetensors` (kind 'task_embedding'). Returns {task: path}."""
  from jaxprompt.prompts.files import write_prompt
  from jaxprompt.tuning import tune
  tasks = list(tasks)
  paths = {t: os.path.join(out_dir, f'{t}.safetensors') for t in tasks}
  existing = [p for p in paths.values() if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f'{existing[0]}: already exists; pass --overwrite or another --out')
  if len(tasks) == 1:
    from jaxprompt.data.tasks import check_task_name
    check_task_name(tasks[0])
    name, method = tasks[0], 'prompt_tuning'
  else:
    name, method = register_tasks_mixture(tasks), 'prompt_stack'
  options.setdefault('eval_period', steps)
  result = tune(name, backbone=backbone, model_dir=model_dir, method=method, train_steps=steps,
                batch_size=batch_size, prompt_init=prompt_init, **options)
  from jaxprompt.prompts.prompt import get_prompt
  import jax
  value = np.asarray(jax.device_get(get_prompt(result.trainable)))
  bb = result.backbone

  def write_all() -> None:
    for i, t in enumerate(tasks):
      write_prompt(paths[t], value[i] if value.ndim == 3 else value, overwrite=True, task=t,
                   kind='task_embedding', embedding_steps=steps, step=steps, init=prompt_init,
                   backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                   source_run=os.path.abspath(model_dir))

  agreement.by_writer(f'{out_dir}: write the task embeddings', write_all)
  return paths


# ---------------------------------------------------------------------------------------------
# Retrieval strategies.

def weighted_average(ranking: Sequence[tuple[str, float]], library: str, k: int | None = None,
                     width: int | None = None) -> np.ndarray:
  """sum_r a_r P_r over the top k of `ranking`, a_r = sim_r / sum(sim) (SPoT's top-k weighted
  average initialisation)."""
  from jaxprompt.methods import library as lib
  top = list(ranking)[:k] if k else list(ranking)
  if k is not None and k > len(ranking):
    raise LibraryError(f'k = {k} is larger than the ranking ({len(ranking)} prompts)')
  sims = np.array([s for _, s in top], np.float64)
  if sims.sum() <= 0:
    raise LibraryError(f'the top-{len(top)} similarities sum to {sims.sum():.3g} <= 0; weights '
                       'sim_r / sum(sim) are undefined; use best of top-k instead')
  prompts = [lib.load_prompt(library, t, width) for t, _ in top]
  if len({p.shape for p in prompts}) > 1:
    raise LibraryError(f'top-k prompts differ in shape: {[p.shape for p in prompts]}')
  weights = sims / sims.sum()
  return np.tensordot(weights, np.stack(prompts), axes=1).astype(np.float32)


def write_weighted_average(path: str, ranking, library: str, k: int, target: str | None = None,
                           width: int | None = None, overwrite: bool = False) -> str:
  from jaxprompt.methods import library as lib
  from jaxprompt.prompts.files import write_prompt
  value = weighted_average(ranking, library, k, width)
  first = lib.get_entry(library, ranking[0][0])
  top = list(ranking)[:k]
  return write_prompt(path, value, overwrite=overwrite, task=target,
                      init=f'top-{k} weighted average of {library}',
                      sources={t: float(s) for t, s in top},
                      backbone=first.get('backbone'),
                      backbone_fingerprint=first.get('backbone_fingerprint'))


def best_of_top_k(target: str, ranking, k: int, library: str, backbone, work_dir: str,
                  **options) -> dict[str, Any]:
  """Tunes the target from each of the top-k sources; returns the runs and the best."""
  from jaxprompt.tuning import tune
  if k > len(ranking):
    raise LibraryError(f'k = {k} is larger than the ranking ({len(ranking)} prompts)')
  runs = {}
  for source, sim in list(ranking)[:k]:
    r = tune(target, backbone=backbone, model_dir=os.path.join(work_dir, f'from_{source}'),
             init_from=f'{library}:{source}', **options)
    runs[source] = dict(similarity=sim, best=float(r.best_metrics['score']),
                        best_step=r.best_step, prompt=r.best_prompt_path)
  best = max(runs, key=lambda s: runs[s]['best'])
  return dict(runs=runs, best_source=best, best=runs[best]['best'],
              prompt=runs[best]['prompt'])


def top_k_mixture(target: str, ranking, k: int, backbone, model_dir: str,
                  **options) -> str:
  """Trains one source prompt on the top-k source tasks plus the target (SPoT's top-k
  mixture); returns its best prompt file (an initialisation for the target)."""
  from jaxprompt.tuning import tune
  if k > len(ranking):
    raise LibraryError(f'k = {k} is larger than the ranking ({len(ranking)} prompts)')
  tasks = [t for t, _ in list(ranking)[:k]] + [target]
  name = register_tasks_mixture(tasks)
  options.setdefault('prompt_init', 'sampled_vocab')
  r = tune(name, backbone=backbone, model_dir=model_dir, method='prompt_tuning', **options)
  return r.best_prompt_path


# ---------------------------------------------------------------------------------------------
# Many transfers at once: one stack run over (target, initialisation) pairs.

def alias_task(task: str, alias: str) -> str:
  """Registers `alias` as a copy of seqio task `task` (same data, metrics, labels, defaults):
  lets one stack run hold a target several times, each row from another initialisation."""
  import seqio
  from jaxprompt.data import tasks as data_tasks
  data_tasks.check_task_name(task)
  t = seqio.get_mixture_or_task(task)
  if alias in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(alias)
  seqio.TaskRegistry.add(alias, source=t.source, preprocessors=t.preprocessors,
                         output_features=t.output_features, postprocess_fn=t.postprocess_fn,
                         metric_fns=t.metric_fns)
  if task in data_tasks.LABELS:
    data_tasks.LABELS[alias] = data_tasks.LABELS[task]
  if task in data_tasks.TASK_DEFAULTS:
    data_tasks.TASK_DEFAULTS[alias] = data_tasks.TASK_DEFAULTS[task]
  return alias


def transfer_matrix(pairs: Sequence[tuple[str, str, str]], backbone, model_dir: str, *,
                    train_steps: int, batch_size: int, eval_period: int,
                    **options) -> dict[str, Any]:
  """Trains every `(label, target, init)` of `pairs` as one row of one stack run (method
  `spot_rows`): each row is the target tuned from its own initialisation (a prompt file,
  `LIB:TASK` or an initialiser name), and, by the per-row optimizer, gets the updates it would
  get alone on its share of the mixed batches. `batch_size` is the mixed batch (per row:
  batch_size / len(pairs) on average). Returns {'rows': {label: {target, init, best, best_step,
  initial, curve}}, 'seconds'}. A run of the same pairs left in `model_dir` (killed, or finished
  before a later step failed) is resumed; one of other settings is refused."""
  from jaxprompt.tuning import tune
  labels = [p[0] for p in pairs]
  if len(set(labels)) != len(labels):
    raise ValueError('transfer_matrix: labels repeat')
  aliases = [alias_task(target, f'spot_row_{i:03d}_{label}'[:120])
             for i, (label, target, _) in enumerate(pairs)]
  name = register_tasks_mixture(aliases, rates=[1.0] * len(aliases))
  start = time.time()
  result = tune(name, backbone=backbone, model_dir=model_dir, method='spot_rows',
                row_init=tuple(p[2] for p in pairs), train_steps=train_steps,
                batch_size=batch_size, eval_period=eval_period, **dict(options, resume=True))
  seconds = time.time() - start
  evals = per_task_evals(model_dir, aliases)
  rows = {}
  for (label, target, init), alias in zip(pairs, aliases):
    curve = [(s, _primary(m)) for s, m in evals[alias]]
    best_step, best = max(curve, key=lambda sc: (sc[1], -sc[0]))
    rows[label] = dict(target=target, init=init, best=best, best_step=best_step,
                       initial=curve[0][1] if curve else None, curve=curve)
  return dict(rows=rows, seconds=seconds, mixture=name, tune_result=result, aliases=aliases)


def steps_to_reach(curve: Sequence[tuple[int, float]], threshold: float) -> int | None:
  """The first validation step whose score is >= threshold (None if never)."""
  for step, score in curve:
    if score >= threshold:
      return int(step)
  return None


# ---------------------------------------------------------------------------------------------
# Evaluating retrieval.

def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
    return None
  return float(np.corrcoef(x, y)[0, 1])


def retrieval_evaluation(targets: Sequence[str], sources: Sequence[str], scores,
                         similarity, no_transfer: Mapping[str, float] | Sequence[float],
                         ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, Any]:
  """SPoT's evaluation of retrieval from a transfer-results matrix.

  Args:
    targets, sources: names of the rows / columns.
    scores: [targets, sources] target score when initialised from each source.
    similarity: [targets, sources] similarity of the target's embedding to each source's.
    no_transfer: each target's score without transfer (prompt tuning from its usual init).
    ks: best-of-top-k sizes; those above the library size are capped to it (and deduplicated).

  Returns:
    {'best_of_top_k': {k: average target score}, 'oracle', 'no_transfer', 'pearson':
     {target: r between similarity and gain}, 'mean_pearson', 'per_target': {...}, 'ks'}.
  """
  scores = np.asarray(scores, np.float64)
  sim = np.asarray(similarity, np.float64)
  targets, sources = list(targets), list(sources)
  if scores.shape != (len(targets), len(sources)) or sim.shape != scores.shape:
    raise ValueError(f'scores {scores.shape} and similarity {sim.shape} must both be '
                     f'[{len(targets)} targets, {len(sources)} sources]')
  base = np.asarray([no_transfer[t] for t in targets] if isinstance(no_transfer, Mapping)
                    else no_transfer, np.float64)
  n = len(sources)
  capped = sorted({min(int(k), n) for k in ks if int(k) > 0})
  order = np.argsort(-sim, axis=1, kind='stable')
  top = {k: scores[np.arange(len(targets))[:, None], order[:, :k]].max(axis=1) for k in capped}
  pearson = {t: _pearson(sim[i], scores[i] - base[i]) for i, t in enumerate(targets)}
  valid = [r for r in pearson.values() if r is not None]
  per_target = {t: dict(no_transfer=float(base[i]), oracle=float(scores[i].max()),
                        oracle_source=sources[int(scores[i].argmax())],
                        ranking=[sources[j] for j in order[i]],
                        **{f'top{k}': float(top[k][i]) for k in capped})
                for i, t in enumerate(targets)}
  return dict(ks=capped, best_of_top_k={k: float(top[k].mean()) for k in capped},
              oracle=float(scores.max(axis=1).mean()), no_transfer=float(base.mean()),
              pearson=pearson, mean_pearson=float(np.mean(valid)) if valid else None,
              per_target=per_target, targets=targets, sources=sources)


def format_evaluation(ev: Mapping[str, Any]) -> str:
  lines = ['| k | best of top-k (avg target score) |', '|---|---|']
  lines += [f'| {k} | {v:.2f} |' for k, v in ev['best_of_top_k'].items()]
  lines += [f'| oracle | {ev["oracle"]:.2f} |', f'| no transfer | {ev["no_transfer"]:.2f} |']
  lines.append('')
  lines.append('| target | Pearson r (similarity, gain) |')
  lines.append('|---|---|')
  for t, r in ev['pearson'].items():
    lines.append(f'| {t} | {"n/a" if r is None else f"{r:.3f}"} |')
  if ev.get('mean_pearson') is not None:
    lines.append(f'| mean | {ev["mean_pearson"]:.3f} |')
  return '\n'.join(lines)


def write_evaluation(ev: Mapping[str, Any], out: str, overwrite: bool = False) -> dict[str, str]:
  """Writes `out.md` (table), `out.csv` (k, score rows) and `out.png` (the curve)."""
  paths = {ext: f'{out}.{ext}' for ext in ('md', 'csv', 'png', 'json')}
  existing = [p for p in paths.values() if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f'{existing[0]}: already exists; pass --overwrite or another --out')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(paths['md'], 'w') as f:
    f.write(format_evaluation(ev) + '\n')
  with open(paths['csv'], 'w') as f:
    f.write('line,k,average_target_score\n')
    for k, v in ev['best_of_top_k'].items():
      f.write(f'best_of_top_k,{k},{v:.6g}\n')
    f.write(f'oracle,,{ev["oracle"]:.6g}\nno_transfer,,{ev["no_transfer"]:.6g}\n')
    for t, r in ev['pearson'].items():
      f.write(f'pearson:{t},,{"" if r is None else f"{r:.6g}"}\n')
  with open(paths['json'], 'w') as f:
    json.dump(ev, f, indent=1, default=str)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ks = list(ev['best_of_top_k'])
  ax.plot(ks, [ev['best_of_top_k'][k] for k in ks], 'o-', label='best of top-k')
  ax.axhline(ev['oracle'], color='g', ls='--', label='oracle')
  ax.axhline(ev['no_transfer'], color='r', ls=':', label='no transfer')
  ax.set_xlabel('k (retrieved sources tried)')
  ax.set_ylabel('average target score')
  ax.legend()
  fig.tight_layout()
  fig.savefig(paths['png'], dpi=100)
  plt.close(fig)
  return paths


def read_transfer_results(path: str) -> dict[str, Any]:
  """A transfer-results file: JSON {"targets", "sources", "scores" [t][s], "no_transfer"
  {t: score} or [..], and "similarity" [t][s] (or "embeddings" {t: file} + a library)}, or a
  CSV with a header `target,SOURCE...,no_transfer` and one row per target."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such transfer-results file')
  if path.endswith('.csv'):
    import csv
    with open(path, newline='') as f:
      rows = list(csv.reader(f))
    header = rows[0]
    if header[0] != 'target' or header[-1] != 'no_transfer':
      raise ValueError(f'{path}: the CSV header must be target,SOURCE...,no_transfer')
    sources = header[1:-1]
    body = [r for r in rows[1:] if r]
    return dict(targets=[r[0] for r in body], sources=sources,
                scores=[[float(x) for x in r[1:-1]] for r in body],
                no_transfer=[float(r[-1]) for r in body])
  with open(path) as f:
    data = json.load(f)
  missing = [k for k in ('targets', 'sources', 'scores', 'no_transfer') if k not in data]
  if missing:
    raise ValueError(f'{path}: missing {", ".join(missing)}')
  return data


# ---------------------------------------------------------------------------------------------
# The command line: `jaxprompt spot sources|embed|rank|evaluate`.

def _add_arguments(parser) -> None:
  sub = parser.add_subparsers(dest='spot_command', required=True)
  s = sub.add_parser('sources', help='train many source prompts at once into a library')
  s.add_argument('--tasks', required=True, help='comma-separated source tasks')
  s.add_argument('--library', required=True, help='the prompt library directory')
  s.add_argument('--backbone', required=True, help="checkpoint or 'lab'")
  s.add_argument('--model_dir', default=None,
                 help='the joint run directory (default: LIBRARY/runs/sources_<digest>)')
  s.add_argument('--steps', type=int, default=PAPER_SOURCE_STEPS, help='training steps (2**18)')
  s.add_argument('--batch_size', type=int, default=32, help='mixed-task batch size')
  s.add_argument('--eval_period', type=int, default=500, help='steps between validations')
  s.add_argument('--embedding_steps', type=int, default=None,
                 help='record each row after this many steps as the task embedding (paper: 10000;'
                 ' default: min(10000, steps) rounded down to --eval_period)')
  s.add_argument('--no_embeddings', action='store_true', help='record no task embeddings')
  s.add_argument('--prompt_length', type=int, default=None, help="default: the task's, else 100")
  s.add_argument('--prompt_init', default='sampled_vocab', help='row initialiser')
  s.add_argument('--learning_rate', type=float, default=None, help='default 0.3')
  s.add_argument('--dropout_rate', type=float, default=None, help="default: the checkpoint's")
  s.add_argument('--max_eval_examples', type=int, default=None, help='validate on N per task')
  s.add_argument('--seed', type=int, default=0)
  s.add_argument('--replace', action='store_true', help='replace tasks already in the library')
  s.add_argument('--vocabulary', default=None, help="SentencePiece model (default: T5's)")

  e = sub.add_parser('embed', help='task embeddings: each task\'s prompt after N steps')
  e.add_argument('--tasks', required=True, help='comma-separated tasks (trained jointly)')
  e.add_argument('--backbone', required=True, help="checkpoint or 'lab'")
  e.add_argument('--out', required=True, help='directory for <task>.safetensors')
  e.add_argument('--steps', type=int, default=PAPER_EMBEDDING_STEPS, help='tuning steps (10000)')
  e.add_argument('--batch_size', type=int, default=32)
  e.add_argument('--prompt_length', type=int, default=None)
  e.add_argument('--seed', type=int, default=0)
  e.add_argument('--model_dir', default=None, help='run directory (default: OUT/run)')
  e.add_argument('--overwrite', action='store_true')
  e.add_argument('--vocabulary', default=None)

  r = sub.add_parser('rank', help='rank a library by similarity to a target task embedding')
  r.add_argument('--target', required=True, help="the target's task-embedding prompt file")
  r.add_argument('--library', required=True, help='the prompt library directory')
  r.add_argument('--similarity', default=DEFAULT_SIMILARITY, choices=sorted(SIMILARITIES))
  r.add_argument('--k', type=int, default=None, help='show the top k only')
  r.add_argument('--exclude', default='', help='comma-separated tasks to leave out')
  r.add_argument('--weighted_average', default=None,
                 help='also write the top-k weighted-average prompt to this file (needs --k)')
  r.add_argument('--json', action='store_true', help='print JSON')

  v = sub.add_parser('evaluate', help='score retrieval from a transfer-results matrix')
  v.add_argument('--results', required=True,
                 help='JSON or CSV of target x source transfer scores (see docs/spot.md)')
  v.add_argument('--library', default=None,
                 help='compute similarities from this library and the file\'s "embeddings"')
  v.add_argument('--similarity', default=DEFAULT_SIMILARITY, choices=sorted(SIMILARITIES))
  v.add_argument('--similarity_file', default=None,
                 help='CSV target,SOURCE... of similarities (for a CSV --results)')
  v.add_argument('--ks', default=','.join(map(str, RETRIEVAL_KS)), help='best-of-top-k sizes')
  v.add_argument('--out', default=None, help='write OUT.md, OUT.csv, OUT.png, OUT.json')
  v.add_argument('--overwrite', action='store_true')
  v.add_argument('--json', action='store_true', help='print JSON')



def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(',') if t.strip()]


def _sources_command(args) -> int:
  from jaxprompt.data import setup_tasks
  tasks = _split(args.tasks)
  setup_tasks(args.vocabulary)
  from jaxprompt.data.tasks import check_task_name
  for t in tasks:
    check_task_name(t)
  emb = None
  if not args.no_embeddings:
    emb = args.embedding_steps or max(args.eval_period,
                                      min(PAPER_EMBEDDING_STEPS, args.steps)
                                      // args.eval_period * args.eval_period)
    emb = min(emb, args.steps)
  digest = hashlib.blake2b(','.join(tasks).encode(), digest_size=4).hexdigest()
  model_dir = args.model_dir or os.path.join(args.library, 'runs', f'sources_{digest}')
  options = {k: getattr(args, k) for k in ('prompt_length', 'learning_rate', 'dropout_rate',
                                           'max_eval_examples') if getattr(args, k) is not None}
  r = train_sources(tasks, args.library, args.backbone, model_dir, train_steps=args.steps,
                    batch_size=args.batch_size, eval_period=args.eval_period,
                    embedding_steps=emb, prompt_init=args.prompt_init, replace=args.replace,
                    seed=args.seed, **options)
  print(f'trained {len(r.entries)} source prompts jointly in {r.seconds / 60:.1f} min '
        f'({r.model_dir})')
  for task, e in r.entries.items():
    macro = r.macro_best_scores.get(task)
    print(f'  {task:<32} best {e["score"]:.4g} at step {e["step"]}' +
          (f' (at the macro-best step {r.macro_best_step}: {macro:.4g})' if macro is not None
           else ''))
  print(f'library: {r.library}')
  return 0


def _embed_command(args) -> int:
  from jaxprompt.data import setup_tasks
  setup_tasks(args.vocabulary)
  tasks = _split(args.tasks)
  options = {'prompt_length': args.prompt_length} if args.prompt_length else {}
  paths = embed_tasks(tasks, args.backbone, args.model_dir or os.path.join(args.out, 'run'),
                      args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      overwrite=args.overwrite, **options)
  for t, p in paths.items():
    print(f'{t}: {p}')
  return 0


def _rank_command(args) -> int:
  ranking = rank(args.target, args.library, args.similarity, args.k,
                 exclude=_split(args.exclude))
  extra = {}
  if args.weighted_average:
    if not args.k:
      raise ValueError('--weighted_average needs --k')
    extra['weighted_average'] = write_weighted_average(args.weighted_average, ranking,
                                                       args.library, args.k)
  if args.json:
    print(json.dumps({'similarity': args.similarity,
                      'ranking': [{'task': t, 'similarity': s} for t, s in ranking], **extra}))
  else:
    print(f'{args.library} ranked by {args.similarity} similarity to {args.target}:')
    for i, (t, s) in enumerate(ranking, 1):
      print(f'  {i:>3}. {t:<32} {s:+.4f}')
    for k, v in extra.items():
      print(f'{k}: {v}')
  return 0


def _evaluate_command(args) -> int:
  data = read_transfer_results(args.results)
  targets, sources = data['targets'], data['sources']
  if 'similarity' in data:
    sim = data['similarity']
  elif args.similarity_file:
    sim_data = read_transfer_results_similarity(args.similarity_file, targets, sources)
    sim = sim_data
  elif args.library and 'embeddings' in data:
    from jaxprompt.methods import library as lib
    from jaxprompt.prompts.files import read_prompt
    emb = [np.asarray(read_prompt(data['embeddings'][t]).value) for t in targets]
    src = [lib.load_embedding(args.library, s) for s in sources]
    sim = similarity_matrix(emb, src, args.similarity)
  else:
    raise ValueError(f'{args.results}: no "similarity" matrix; add one, or give --library with '
                     '"embeddings" {target: file} in the file, or --similarity_file')
  ks = [int(k) for k in _split(args.ks)]
  ev = retrieval_evaluation(targets, sources, data['scores'], sim, data['no_transfer'], ks)
  if args.out:
    paths = write_evaluation(ev, args.out, args.overwrite)
  if args.json:
    print(json.dumps(ev, default=str))
  else:
    print(format_evaluation(ev))
    if args.out:
      print('written: ' + ', '.join(paths.values()))
  return 0


def read_transfer_results_similarity(path: str, targets, sources) -> list[list[float]]:
  import csv
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such similarity file')
  with open(path, newline='') as f:
    rows = [r for r in csv.reader(f) if r]
  header = rows[0][1:]
  by_target = {r[0]: dict(zip(header, map(float, r[1:]))) for r in rows[1:]}
  try:
    return [[by_target[t][s] for s in sources] for t in targets]
  except KeyError as e:
    raise ValueError(f'{path}: no similarity for {e}') from None


def _run(args) -> int:
  # `spot lab` is the lab's study (`jaxprompt/lab/spot_study.py`): the CLI sends it there.
  return {'sources': _sources_command, 'embed': _embed_command, 'rank': _rank_command,
          'evaluate': _evaluate_command}[args.spot_command](args)


COMMANDS = {'spot': Command('SPoT: source prompts, task embeddings, retrieval (Vu et al. 2022)',
                            _add_arguments, _run)}

__all__ = ['COMMANDS', 'PromptRows', 'RETRIEVAL_KS', 'SourcesResult', 'alias_task',
           'best_of_top_k', 'cosine_average_tokens', 'embed_tasks', 'format_evaluation',
           'per_task_evals', 'per_token_average_cosine', 'rank', 'read_transfer_results',
           'register_tasks_mixture', 'restore_stack', 'retrieval_evaluation',
           'similarity_matrix', 'steps_to_reach', 'top_k_mixture', 'train_sources',
           'transfer_matrix', 'weighted_average', 'write_evaluation', 'write_weighted_average']
