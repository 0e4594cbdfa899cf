"""Multi-task prompts: a [n, P, d] stack, one row per task of a mixture, trained in one run.

Because the backbone is frozen, one batch can hold examples of n tasks, each example using
its own task's prompt (Lester et al.'s serving argument; SPoT's many source prompts at once).
The data layer tags each training example with `task_index` (its task's position in the
mixture), the optimizer keeps separate statistics per row (a row gets the update it would
get alone), and each task is validated with its own row. Each task's best row (by its own
validation, which need not be at the run's best step) is kept in MODEL_DIR/best_rows.safetensors.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.prompts.files import read_prompt, write_prompt
from jaxprompt.train import steps
from jaxprompt.train.optimizers import per_row


@register
class PromptStack(Method):
  name = 'prompt_stack'
  uses_task_index = True

  def init(self, rng, ctx: Context):
    from jaxprompt.prompts.init import prompt_initializer
    return prompt_lib.init_prompt(rng, ctx.config.prompt_length, ctx.width,
                                  prompt_initializer(ctx), num_prompts=len(ctx.tasks)), {}

  model_inputs = staticmethod(steps.prompt_stack_inputs)

  def optimizer(self, ctx: Context):
    return per_row(super().optimizer(ctx))

  def identity(self, ctx: Context):
    return dict(super().identity(ctx), tasks=list(ctx.tasks))

  def from_prompt_file(self, pf, path):
    if pf.value.ndim != 3:
      raise ValueError(f'{path}: holds one prompt, not a stack; evaluate it with method '
                       'prompt_tuning')
    return prompt_lib.prompt_tree(np.asarray(pf.masked_value())), {}

  def eval_extras(self, task_index: int):
    return {'task_index': np.int32(task_index)}

  def after_validation(self, trainable, extras, step, metrics, model_dir, ctx):
    path = os.path.join(model_dir, BEST_ROWS)
    config = ctx.config
    sign = 1.0 if config.higher_is_better else -1.0
    per_task = task_metrics(metrics, ctx.tasks)
    stack = np.asarray(jax.device_get(prompt_lib.get_prompt(trainable)))
    if os.path.exists(path):
      old = read_prompt(path)
      rows, records = np.array(old.value), dict(old.metadata['rows'])
    else:
      rows, records = stack.copy(), {}
    changed = False
    for i, task in enumerate(ctx.tasks):
      if task not in per_task:
        continue
      value = selection_value(per_task[task], config.metric)
      held = records.get(task)
      if held is None or sign * value > sign * held['value'] or (
          value == held['value'] and step < held['step']):
        rows[i] = stack[i]
        records[task] = dict(step=step, value=value, metrics=per_task[task])
        changed = True
    if changed:
      write_prompt(path, rows, overwrite=True, method=self.name, tasks=list(ctx.tasks),
                   rows=records, backbone_fingerprint=ctx.backbone.fingerprint,
                   backbone=ctx.backbone.name, metric=config.metric)


BEST_ROWS = 'best_rows.safetensors'


def task_metrics(metrics: Mapping[str, float], tasks: Sequence[str]) -> dict[str, dict]:
  """{task: its metrics} of one validation of a run over `tasks` (a mixture's members report
  `TASK/metric`; a single task reports plain names)."""
  if len(tasks) == 1:
    return {tasks[0]: dict(metrics)}
  out = {}
  for task in tasks:
    m = {k[len(task) + 1:]: v for k, v in metrics.items() if k.startswith(task + '/')}
    if m:
      out[task] = m
  return out


def selection_value(metrics: Mapping[str, float], metric: str) -> float:
  """A task's value of the run's selection metric ('score': the task's first metric)."""
  from jaxprompt.train.evaluation import primary_score
  return float(primary_score(dict(metrics)) if metric == 'score' or metric not in metrics
               else metrics[metric])


def best_rows(model_dir: str) -> tuple[np.ndarray, dict[str, Any]]:
  """(each task's best row [n, P, d], {task: {step, value, metrics}}) of a stack run."""
  pf = read_prompt(os.path.join(model_dir, BEST_ROWS))
  return np.asarray(pf.value), dict(pf.metadata['rows'])
