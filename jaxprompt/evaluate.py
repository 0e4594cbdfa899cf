"""Evaluate a prompt file (or no prompt, or a model-tuned checkpoint) on a task split."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.prompts.files import check_compatible, read_prompt
from jaxprompt.train import evaluation, steps


def evaluate(task: str, *, backbone, prompt: str | Sequence[str] | None = None,
             split: str = 'validation',
             mode: str = 'auto', batch_size: int = 32,
             feature_lengths: Mapping[str, int] | None = None, max_examples: int | None = None,
             config=None, prompt_position: str = 'prefix') -> dict[str, float]:
  """Task metrics (and teacher-forced loss) of `backbone` with `prompt` on `task`/`split`.

  Args:
    task: a registered seqio task.
    backbone: checkpoint path or `(module, params)`.
    prompt: a prompt file (.safetensors / .npy); None evaluates the backbone alone; several
      files (of one task) are an ensemble: each example runs with every prompt and they vote.
    split: the split to score.
    mode: 'rank', 'greedy', 'beam' or 'auto'.
  """
  from jaxprompt.tuning import load_backbone
  module, params, name = load_backbone(backbone, config)
  lengths = dict(feature_lengths or {'inputs': 512, 'targets': 16})
  ensemble = isinstance(prompt, (list, tuple))
  if prompt is None:
    trainable, frozen, model_inputs = params, {}, steps.model_tuning_inputs
  else:
    values = []
    for path in (prompt if ensemble else [prompt]):
      pf = read_prompt(path)
      check_compatible(pf, module.config.emb_dim, name, path=path)
      if pf.value.ndim == 3:
        raise ValueError(f'{path}: holds a stack of {pf.value.shape[0]} prompts; pass the task '
                         'prompts as separate files to ensemble them')
      values.append(np.asarray(pf.masked_value()))
    if len({v.shape for v in values}) > 1:
      raise ValueError(f'ensemble prompts differ in shape: {[v.shape for v in values]}')
    trainable = prompt_lib.prompt_tree(np.stack(values) if ensemble else values[0])
    frozen, model_inputs = {'backbone': params}, steps.prompt_inputs
  examples = evaluation.load_examples(task, split, lengths, max_examples)
  evaluator = evaluation.Evaluator(module, frozen, model_inputs, task, examples, batch_size, mode,
                                   prompt_lib.position_index(prompt_position),
                                   eval_step=None if ensemble else _eval_step(
                                       module, model_inputs, prompt_position),
                                   ensemble=ensemble)
  return evaluator(trainable)


def _eval_step(module, model_inputs, prompt_position):
  import jax
  return jax.jit(steps.make_eval_step(module, model_inputs,
                                      prompt_position=prompt_lib.position_index(prompt_position)))
