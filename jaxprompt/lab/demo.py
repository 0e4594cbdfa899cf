"""The embedded default of `jaxprompt tune`: prompt tuning on the lab, offline, in minutes."""

from __future__ import annotations

import os
import sys
import time

DEMO_TASK = 'has_green'  # a held-out target: the backbone learned membership of other words
DEMO_STEPS = 300
PROMPT_LENGTH = 10

REAL_RUN = """For a real checkpoint and task:
  jaxprompt tune --gin_file=models/t5_1_1/base.gin --gin_file=runs/prompt_tune.gin \\
    --gin.MODEL_DIR="'runs/rte'" --gin.MIXTURE_OR_TASK_NAME="'jaxprompt_super_glue_rte'" \\
    --gin.INITIAL_CHECKPOINT_PATH="'/path/to/t5_1_1_lm100k_base/checkpoint_1100000'\""""


def run_demo(steps: int | None = None, model_dir: str | None = None, progress: bool = True):
  """Builds (or reuses) the lab backbone and tunes a prompt on a held-out lab task."""
  from jaxprompt.lab import backbone
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH, register_lab_tasks, seqio_name
  from jaxprompt.tuning import tune
  say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  say('jaxprompt demo: prompt tuning on the lab, an artificial world of related tasks.\n'
      'The backbone is a tiny T5 (~1.2M parameters) pretrained here in minutes on the lab\'s '
      'source tasks: it is NOT a pretrained T5.')
  ckpt = backbone.build(progress=progress)
  register_lab_tasks()
  model_dir = model_dir or os.path.join('jaxprompt_runs', 'demo-' + time.strftime('%Y%m%d-%H%M%S'))
  task = seqio_name(DEMO_TASK)
  say(f'tuning a {PROMPT_LENGTH}-token prompt on {task} (never seen by the backbone) with the '
      f'backbone frozen; run directory: {model_dir}')
  result = tune(task, backbone=ckpt, model_dir=model_dir, prompt_length=PROMPT_LENGTH,
                prompt_init='class_labels', train_steps=steps or DEMO_STEPS, batch_size=32,
                feature_lengths=SEQUENCE_LENGTH, eval_period=50, progress=progress)
  print(f'\n{summary_line(task, result)}')
  print(f'run directory: {result.model_dir}')
  print(f'prompt file:   {result.best_prompt_path}')
  print(f'metrics log:   {os.path.join(result.model_dir, "metrics.jsonl")}')
  print(f'loss plot:     {result.plot_path}')
  print(f'\nNext: jaxprompt eval --task {task} --backbone lab --prompt {result.best_prompt_path}')
  print(REAL_RUN)
  return result


def summary_line(task: str, result) -> str:
  """Before, best and final accuracy: the best (the prompt file) is not where the run ended."""
  before = result.initial_metrics['accuracy']
  best = result.best_metrics['accuracy']
  final = result.final_metrics['accuracy']
  return (f'{task}: validation accuracy {before:.1f}% with the initialised (untrained) prompt '
          f'-> {best:.1f}% best (step {result.best_step}, the prompt file), {final:.1f}% final '
          f"(step {result.final_metrics.get('step', result.step)})")
