"""`jaxprompt lab report`: what prompt tuning does on the lab, measured.

For each target task (never seen by the backbone) it scores, on the test split:
the frozen backbone with no prompt, with a random (untrained) prompt, with a tuned
prompt, and the backbone after model tuning on the task for the same number of steps.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

DEFAULT_TASKS = ('has_green', 'has_dog', 'more_numbers_than_colours', 'count_numbers',
                 'parity_animals', 'minority', 'second_word', 'has_duplicate')
# Prompt and model tuning each get this many steps of batch 32. 300 steps left the harder
# targets under-trained for a prompt (minority 29.5 -> 60.0 and more_numbers_than_colours
# 77.5 -> 86.0 at 1000 steps); docs/lab-results.md has the other levers measured.
DEFAULT_STEPS = 1000


def measure_task(task: str, ckpt: str, steps: int, prompt_length: int, work: str,
                 seed: int = 0) -> dict:
  """No-prompt, random-prompt, prompt-tuning and model-tuning test scores on one lab target."""
  from jaxprompt.evaluate import evaluate
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH, seqio_name
  from jaxprompt.prompts.files import write_prompt
  from jaxprompt.train.evaluation import primary_score
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.tuning import tune
  name = seqio_name(task)
  bb = load_backbone(ckpt)
  module, params = bb.module, bb.params
  common = dict(feature_lengths=SEQUENCE_LENGTH, batch_size=100)
  row = {'task': task}

  def test_score(backbone=(module, params), prompt=None) -> float:
    return primary_score(evaluate(name, backbone=backbone, prompt=prompt, split='test', **common))

  row['no_prompt'] = test_score()
  rs = np.random.RandomState(seed)
  random_prompt = os.path.join(work, f'{task}_random.safetensors')
  write_prompt(random_prompt, rs.uniform(-0.5, 0.5, (prompt_length, module.config.emb_dim)),
               overwrite=True)
  row['random_prompt'] = test_score(prompt=random_prompt)
  start = time.time()
  pt = tune(name, backbone=(module, params), model_dir=os.path.join(work, f'{task}_pt'),
            prompt_length=prompt_length, prompt_init='class_labels', train_steps=steps,
            batch_size=32, feature_lengths=SEQUENCE_LENGTH, eval_period=max(steps // 6, 1),
            seed=seed, progress=False)
  row['prompt_tuning_minutes'] = round((time.time() - start) / 60, 2)
  row['prompt_tuning'] = test_score(prompt=pt.best_prompt_path)
  start = time.time()
  mt = tune(name, backbone=(module, params), model_dir=os.path.join(work, f'{task}_mt'),
            method='model_tuning', learning_rate=1e-3, train_steps=steps, batch_size=32,
            feature_lengths=SEQUENCE_LENGTH, eval_period=steps, seed=seed, progress=False)
  row['model_tuning_minutes'] = round((time.time() - start) / 60, 2)
  row['model_tuning'] = test_score(backbone=(module, mt.trainable))
  row['pt_over_mt'] = round(row['prompt_tuning'] / max(row['model_tuning'], 1e-9), 3)
  return row


# The source skills that have a target counterpart (the goal of issue 15), and for each target
# the related source whose prompt initialises it in `measure_transfer`.
GOAL_SKILLS = ('membership', 'count', 'compare', 'extreme', 'position', 'filter')
TRANSFER_PAIRS = {
    'has_green': 'has_red',
    'count_numbers': 'count_colours',
    'more_numbers_than_colours': 'more_colours_than_animals',
    'minority': 'majority',
    'second_word': 'first_word',
    'filter_numbers': 'filter_colours',
}
# Source prompts (`measure_sources`): initialised from the task's prefix token, 1000 steps at
# lr 0.1. At the paper's class-label init, 600 steps and lr 0.3 a 10-token prompt reached only
# 0.86 / 0.75 of the prefixed accuracy on count_colours / count_animals; with these settings
# 0.99 / 0.99 (measurements in docs/lab-results.md).
SOURCE_STEPS = 1000
SOURCE_LEARNING_RATE = 0.1
SOURCE_INIT = 'prefix'
TRANSFER_STEPS = 400
# Targets in `measure_transfer` (both inits): at the method's 0.3, T5X Adafactor's step, scaled by
# the prompt's own RMS, carried a target prompt 2-3x its norm away from a transferred init in 400
# steps (cosine 0.3-0.4 to it), and class-label init also did worse at 0.3 than at 0.1 on the
# three targets measured at both (docs/lab-results.md, "the goal, measured on `methods`").
TRANSFER_LEARNING_RATE = 0.1


# Filler of a prefix-initialised prompt: the lab's function words (labels of no source's input
# category, so a counting or filtering skill has nothing extra to count or copy), cycled.
_FILLER = ('yes', 'no', 'even', 'odd', 'colour', 'animal', 'number')


def prefix_prompt_text(task: str, length: int) -> str:
  """The text of a `length`-token prompt that ends with `task`'s prefix token.

  The backbone was pretrained on `'<prefix> <inputs>'`, and the prompt sits before the inputs,
  so its last position is where the prefix was: a prompt initialised from this text
  (`prompt_init='text'`) starts at the prefix's relative distance to the inputs. The positions
  before it hold function words (`_FILLER`, cycled). With `length` 1 the prompt is the prefix.
  """
  from jaxprompt.lab.world import get_task
  from jaxprompt.lab.tasks import world_name
  filler = [_FILLER[i % len(_FILLER)] for i in range(length - 1)]
  return ' '.join(filler + [get_task(world_name(task)).prefix.strip()])


def _init_options(task: str, init: str, prompt_length: int) -> dict:
  """`tune` options of a source prompt's initialisation: 'prefix' or any `prompt_init` name."""
  if init == 'prefix':
    return dict(prompt_init='text', prompt_init_text=prefix_prompt_text(task, prompt_length))
  return dict(prompt_init=init)


def goal_sources() -> tuple[str, ...]:
  """The source tasks whose skill has a target counterpart (`GOAL_SKILLS`)."""
  from jaxprompt.lab.world import SOURCE_TASKS, get_task
  return tuple(t for t in SOURCE_TASKS if get_task(t).skill in GOAL_SKILLS)


def _tune_prompt(name: str, ckpt, model_dir: str, steps: int, prompt_length: int, seed: int,
                 eval_period: int = 50, learning_rate: float | None = None, **init) -> dict:
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH
  from jaxprompt.train.summaries import read_metrics
  from jaxprompt.tuning import tune
  start = time.time()
  r = tune(name, backbone=ckpt, model_dir=model_dir, prompt_length=prompt_length,
           train_steps=steps, batch_size=32, feature_lengths=SEQUENCE_LENGTH,
           eval_period=eval_period, seed=seed, progress=False, learning_rate=learning_rate,
           resume=True, **init)
  curve = {int(m['step']): round(float(m['score']), 2) for m in read_metrics(model_dir)
           if m.get('split') == 'eval' and 'score' in m}
  return dict(best=round(float(r.best_metrics['score']), 2), best_step=r.best_step,
              initial=round(float(r.initial_metrics['score']), 2),
              final=round(float(r.final_metrics['score']), 2), curve=curve,
              prompt=r.best_prompt_path, minutes=round((time.time() - start) / 60, 2))


def _tune_source(task: str, backbone, work: str, steps: int = SOURCE_STEPS,
                 prompt_length: int = 10, seed: int = 0, init: str = SOURCE_INIT,
                 learning_rate: float | None = SOURCE_LEARNING_RATE, eval_period: int = 50) -> dict:
  """A source prompt tuned without the task's prefix (`_tune_prompt`'s result), in
  `work/<task>_src` suffixed with every setting that differs from the defaults, so that a
  finished run there is reused only with the settings it was tuned with."""
  from jaxprompt.lab.tasks import seqio_name
  defaults = dict(steps=SOURCE_STEPS, len=10, seed=0, init=SOURCE_INIT, lr=SOURCE_LEARNING_RATE,
                  every=50)
  given = dict(steps=steps, len=prompt_length, seed=seed, init=init, lr=learning_rate,
               every=eval_period)
  tag = ''.join(f'_{k}{v}' for k, v in given.items() if v != defaults[k])
  return _tune_prompt(seqio_name(task), backbone, os.path.join(work, f'{task}_src{tag}'), steps,
                      prompt_length, seed, eval_period, learning_rate,
                      **_init_options(task, init, prompt_length))


def measure_sources(ckpt: str, work: str, tasks=None, steps: int = SOURCE_STEPS,
                    prompt_length: int = 10, seed: int = 0, init: str = SOURCE_INIT,
                    learning_rate: float | None = SOURCE_LEARNING_RATE,
                    eval_period: int = 50) -> dict[str, dict]:
  """How well the backbone knows each source, with its prefix and through a tuned prompt.

  For each source task (default: `goal_sources()`): the backbone's validation score asked with
  the task prefix (`prefixed`), and the best validation score of a `prompt_length`-token prompt
  tuned `steps` steps (batch 32, T5X Adafactor at `learning_rate`, None for the method's 0.3, a
  validation check every `eval_period` steps) on the task without prefix (`prompt`), and their
  ratio. `init` 'prefix' starts the prompt from the task's prefix token at its last position
  (`prefix_prompt_text`); any other value is a `prompt_init` name (e.g. 'class_labels'). The
  prompts are kept in `work/<task>_src[_<settings>]/prompt_best.safetensors` (`prompt_path`) for
  `measure_transfer`; a finished run there with the same settings is reused.

  Returns:
    {task: {'prefixed', 'prompt', 'ratio', 'prompt_path', 'minutes', ...}}.
  """
  from jaxprompt.lab import backbone
  from jaxprompt.lab.tasks import register_lab_tasks
  from jaxprompt.checkpoints.backbone import load_backbone
  register_lab_tasks()
  tasks = tuple(tasks or goal_sources())
  prefixed = backbone.source_accuracy(ckpt, tasks=tasks)
  bb = load_backbone(ckpt)
  out = {}
  for task in _progress(tasks, 'sources'):
    r = _tune_source(task, bb, work, steps, prompt_length, seed, init, learning_rate, eval_period)
    out[task] = dict(prefixed=round(float(prefixed[task]), 2), prompt=r['best'],
                     ratio=round(r['best'] / max(prefixed[task], 1e-9), 3),
                     prompt_path=r['prompt'], best_step=r['best_step'], initial=r['initial'],
                     curve=r['curve'], minutes=r['minutes'])
  return out


def _progress(items, what: str):
  """`items` with a progress bar on stderr (one bar per study, not one line per run)."""
  from tqdm.auto import tqdm
  return tqdm(list(items), desc=what, unit='run', leave=False)


def parse_pairs(text: str) -> list[tuple[str, str]]:
  """'target:source,...' (the CLI's --pairs) as checked (target, source) pairs of lab tasks."""
  from jaxprompt.lab.world import SOURCE_TASKS, TARGET_TASKS
  pairs = []
  for item in text.split(','):
    parts = item.strip().split(':')
    if len(parts) != 2 or parts[0] not in TARGET_TASKS or parts[1] not in SOURCE_TASKS:
      raise ValueError(f'--pairs {item!r}: give TARGET:SOURCE,... of lab targets and sources, '
                       'e.g. minority:more_colours_than_animals')
    pairs.append((parts[0], parts[1]))
  return pairs


def measure_transfer(ckpt: str, work: str, pairs=None, source_prompts=None,
                     steps: int = TRANSFER_STEPS, source_steps: int = SOURCE_STEPS,
                     prompt_length: int = 10, seeds=(0,), eval_period: int = 50,
                     learning_rate: float | None = TRANSFER_LEARNING_RATE) -> list[dict]:
  """SPoT on the lab: a related source's prompt as the initialisation of a target's prompt.

  For each `(target, source)` of `pairs` (default `TRANSFER_PAIRS.items()`; a dict
  {target: source} also works) and each seed of `seeds`, tunes a prompt on the target for
  `steps` steps twice with the same seed, data and schedule (batch 32, a validation check every
  `eval_period` steps, T5X Adafactor at `learning_rate`: `TRANSFER_LEARNING_RATE`, None for the
  method's 0.3): from class-label init and from the source's tuned prompt
  (`prompt_init='file'`). Source prompts come from `source_prompts` ({source: path}, e.g. the
  `prompt_path`s of `measure_sources`) or are tuned here as `measure_sources` does
  (`source_steps` steps, seed 0; its finished run in `work` is reused). Every run lives in
  `work`, named by its steps, validation period, rate and seed, and a finished one is reused, so
  a second call with the same `work` only runs what is missing.

  Returns:
    [{'target', 'source', 'seed', 'class_labels': {'initial', 'best', 'best_step', 'curve',
      ...}, 'transfer': {...}, 'gain': transfer best - class-label best}, ...].
  """
  from jaxprompt.lab.tasks import register_lab_tasks, seqio_name
  from jaxprompt.checkpoints.backbone import load_backbone
  register_lab_tasks()
  pairs = pairs or TRANSFER_PAIRS
  pairs = list(pairs.items() if isinstance(pairs, dict) else pairs)
  source_prompts = dict(source_prompts or {})
  bb = load_backbone(ckpt)
  rate = '' if learning_rate is None else f'_lr{learning_rate:g}'

  def run(target: str, seed: int, init_name: str, **init) -> dict:
    tag = f'{steps}x{eval_period}{rate}_seed{seed}'  # a run is reused only with these settings
    return _tune_prompt(seqio_name(target), bb, os.path.join(work, f'{target}_{init_name}_{tag}'),
                        steps, prompt_length, seed, eval_period, learning_rate, **init)

  out = []
  for target, source, seed in _progress([(t, s, seed) for t, s in pairs for seed in seeds],
                                        'transfer pairs x seeds'):
    if source not in source_prompts:  # measure_sources' run, or tuned here as it does
      source_prompts[source] = _tune_source(source, bb, work, source_steps, prompt_length)['prompt']
    base = run(target, seed, 'cl', prompt_init='class_labels')
    spot = run(target, seed, f'from_{source}', prompt_init='file',
               prompt_init_file=source_prompts[source])
    out.append(dict(target=target, source=source, seed=seed, class_labels=base,
                    transfer=spot, gain=round(spot['best'] - base['best'], 2)))
  return out


def format_table(rows: list[dict]) -> str:
  cols = ('task', 'no_prompt', 'random_prompt', 'prompt_tuning', 'model_tuning', 'pt_over_mt')
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in rows:
    lines.append('| ' + ' | '.join(f'{r[c]:.1f}' if isinstance(r[c], float) and c != 'pt_over_mt'
                                   else str(r[c]) for c in cols) + ' |')
  return '\n'.join(lines)


# The goal per source (README's Status): known at >= 97.5% with its prefix, and a prompt tuned
# without the prefix reaches >= 0.99 of that.
GOAL_PREFIXED = 97.5
GOAL_RATIO = 0.99


def format_sources(rows: dict[str, dict]) -> str:
  """`measure_sources`' result as a table by skill, with the goal marked per source."""
  from jaxprompt.lab.world import get_task
  lines = ['| skill | source | prefixed | prompt, no prefix | ratio | goal |',
           '|---|---|---|---|---|---|']
  for task, r in sorted(rows.items(), key=lambda kv: (get_task(kv[0]).skill, kv[0])):
    met = r['prefixed'] >= GOAL_PREFIXED and r['ratio'] >= GOAL_RATIO
    lines.append(f'| {get_task(task).skill} | {task} | {r["prefixed"]:.1f} | {r["prompt"]:.1f} | '
                 f'{r["ratio"]:.2f} | {"met" if met else "SHORT"} |')
  return '\n'.join(lines)


def format_transfer(rows: list[dict]) -> str:
  """`measure_transfer`' result: per pair and seed, the best and the mean over the validation
  checks after step 0 of each init, and at how many of those checks the source prompt is ahead."""
  lines = ['| target | source | seed | class labels: best (mean) | source prompt: best (mean) '
           '| checks ahead |', '|---|---|---|---|---|---|']
  for r in rows:
    cl, tr = r['class_labels']['curve'], r['transfer']['curve']
    steps = sorted(s for s in set(cl) & set(tr) if s > 0)
    mean = lambda c: sum(c[s] for s in steps) / max(len(steps), 1)  # pylint: disable=unnecessary-lambda-assignment
    ahead = sum(tr[s] > cl[s] for s in steps)
    lines.append(f'| {r["target"]} | {r["source"]} | {r["seed"]} | {r["class_labels"]["best"]:.1f} '
                 f'({mean(cl):.1f}) | {r["transfer"]["best"]:.1f} ({mean(tr):.1f}) | {ahead} of '
                 f'{len(steps)} |')
  return '\n'.join(lines)


def main(out: str | None = None, steps: int | None = None, tasks=DEFAULT_TASKS,
         prompt_length: int = 10, overwrite: bool = False, preset: str = 'demo') -> list[dict]:
  from jaxprompt.lab import TARGET_TASKS, backbone
  from jaxprompt.lab.tasks import register_lab_tasks
  unknown = [t for t in tasks if t not in TARGET_TASKS]
  if unknown:
    raise ValueError(f'--tasks: {", ".join(unknown)} not lab targets; choose from '
                     f'{", ".join(TARGET_TASKS)}')
  out = out or 'lab_report.json'
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'{out} exists; pass --overwrite or choose another --out')
  print(f'lab report: writes {os.path.abspath(out)} at the end', file=sys.stderr, flush=True)
  steps = steps or DEFAULT_STEPS
  ckpt = backbone.build(preset=preset)
  register_lab_tasks()
  sources = backbone.source_accuracy(ckpt)
  print('backbone source-task validation scores (prefixed): ' +
        ', '.join(f'{k} {v:.0f}' for k, v in sources.items()), flush=True)
  rows = []
  with tempfile.TemporaryDirectory(prefix='jaxprompt_lab_report_') as work:
    for task in _progress(tasks, 'targets'):
      rows.append(measure_task(task, ckpt, steps, prompt_length, work))
  table = format_table(rows)
  print(table)
  with open(out, 'w') as f:
    json.dump({'backbone': ckpt, 'preset': preset, 'steps': steps, 'prompt_length': prompt_length,
               'source_scores': sources, 'targets': rows}, f, indent=1)
  print(f'written: {out}')
  return rows
