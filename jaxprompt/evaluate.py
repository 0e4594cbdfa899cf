"""Evaluate a method's product (a prompt file, a stack, an ensemble, a model-tuned checkpoint)
or the backbone alone on a task split, through the engine's one evaluation path."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.train import engine as engine_lib, evaluation, steps


def evaluate(task: str, *, backbone, prompt: str | Sequence[str] | None = None,
             split: str = 'validation', mode: str = 'auto', batch_size: int = 32,
             feature_lengths: Mapping[str, int] | None = None, max_examples: int | None = None,
             config=None, prompt_position: str | None = None,
             num_partitions: int = 1, run_config=None,
             dtype: str | None = None) -> dict[str, float]:
  """Task metrics (and teacher-forced loss) of `backbone` with `prompt` on `task`/`split`.

  Args:
    task: a registered seqio task (a mixture: each member, macro-averaged).
    backbone: checkpoint path ('lab' for the lab's), `(module, params)` or a `Backbone`.
    prompt: a prompt file (.safetensors / .npy / a PEFT adapter directory) of any prompt
      method, read back by that method (a stack evaluates each task with its own row); a
      model-tuned checkpoint directory; None evaluates the backbone alone; several files (of
      one task) are an ensemble: each example runs with every prompt and they vote.
    feature_lengths: the task's own lengths when None (else inputs 512, targets 16).
    prompt_position: where the prompt enters; the prompt file's own by default.
    num_partitions: the `model` mesh axis size.
    run_config: a `RunConfig` whose mesh and axis-rule options (`model_parallel_submesh`,
      `logical_axis_rules`, partitioning dims, `num_partitions`) place the backbone.
    dtype: the activation dtype ('float32' | 'bfloat16'); None: `run_config`'s, else the
      backbone config's own (as a run's `RunConfig.dtype`).
  """
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.config import FALLBACK_FEATURE_LENGTHS
  from jaxprompt.data.tasks import check_task_name, member_tasks, task_defaults
  check_task_name(task)
  from jaxprompt.config import RunConfig as _RunConfig
  from jaxprompt.train import partitioning as _partitioning
  placement = run_config or _RunConfig(num_partitions=num_partitions)
  placement = placement.replace(dtype=dtype) if dtype else placement  # checked there
  mesh = _partitioning.mesh_from_config(placement)
  rules = _partitioning.rules_from_config(placement)
  bb = load_backbone(backbone, config,  # straight into the engine's shardings
                     shardings=lambda c: engine_lib.backbone_shardings_for(c, mesh, rules),
                     activation_dtype=placement.dtype)
  lengths = dict(feature_lengths or task_defaults(task).get('feature_lengths',
                                                            FALLBACK_FEATURE_LENGTHS))
  tasks = member_tasks(task)
  method, trainable, extras, position = load_product(bb, prompt, tasks)
  position = prompt_position or position
  position_index = prompt_lib.position_index(position or 'prefix')
  eng, state = engine_lib.build_engine(bb.module, method.eval_inputs, None,
                                       {'backbone': bb.params, **extras}, trainable,
                                       prompt_position=position_index,
                                       mesh=mesh, rules=rules,
                                       trainable_is_backbone=method.trains_backbone)
  validation = evaluation.build_validation(eng, method, tasks, split, lengths, batch_size, mode,
                                           max_examples, position_index, steps.LossConfig())
  return validation(state.trainable)


def load_product(bb, prompt, tasks: Sequence[str]):
  """(method, trainable, frozen extras, the product's prompt position or None) of what
  `evaluate` and `jaxprompt infer` take as `prompt` (see `evaluate`), on backbone `bb` for
  `tasks` (a stack's rows are picked for them)."""
  from jaxprompt.methods import Context, get_method
  from jaxprompt.prompts.files import check_compatible, read_prompt
  position = None
  if prompt is None:
    return get_method('model_tuning'), bb.params, {}, None
  if isinstance(prompt, (list, tuple)) and len(prompt) > 1:
    values = []
    for path in prompt:
      pf = read_prompt(path)
      check_compatible(pf, bb.module.config.emb_dim, bb, path=path)
      if pf.value.ndim == 3:
        raise ValueError(f'{path}: holds a stack of {pf.value.shape[0]} prompts; pass the task '
                         'prompts as separate files to ensemble them')
      values.append(np.asarray(pf.masked_value()))
      position = position or pf.metadata.get('position')
    if len({v.shape for v in values}) > 1:
      raise ValueError(f'ensemble prompts differ in shape: {[v.shape for v in values]}')
    return (get_method('prompt_ensemble'), prompt_lib.prompt_tree(np.stack(values)), {},
            position)
  path = prompt[0] if isinstance(prompt, (list, tuple)) else prompt
  from jaxprompt.checkpoints import exists, join
  if exists(join(str(path), 'config.json')) and not exists(join(str(path),
                                                                'adapter_config.json')):
    method = get_method('model_tuning')  # a model-tuned checkpoint
    metadata = {}
  else:
    pf = read_prompt(path)
    metadata = pf.metadata
    name = metadata.get('method', 'prompt_tuning')
    if name == 'prompt_stack' and pf.value.ndim == 2:
      name = 'prompt_tuning'  # one task's row of a stack (a SPoT library entry): one prompt
    method = get_method(name)
    position = metadata.get('position')
  ctx = Context(bb, tasks[0], tuple(tasks), None, None, None, None)
  trainable, extras = method.load_product(path, ctx)
  if method.uses_task_index:  # a stack: evaluate each task with its own row
    trained_on = list(metadata.get('tasks') or [])
    missing = [t for t in tasks if t not in trained_on]
    if missing:
      raise ValueError(f'{path}: a prompt stack for {", ".join(trained_on) or "unknown tasks"}'
                       f' has no row for {", ".join(missing)}')
    method = _RowsOf(method, [trained_on.index(t) for t in tasks])
  return method, trainable, extras, position


class _RowsOf:
  """A stack method whose i-th evaluated task uses row `rows[i]` of the stack."""

  def __init__(self, method, rows):
    self._method, self._rows = method, rows

  def __getattr__(self, name):
    return getattr(self._method, name)

  def eval_extras(self, task_index):
    return self._method.eval_extras(self._rows[task_index])
