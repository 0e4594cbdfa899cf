"""Multitask prompt tuning (MPT; Wang et al., ICLR 2023): one shared prompt, rank-r task factors.

    P_k = P* o (U_k V_k)        P* [P, d] shared, U_k [P, r], V_k [r, d], o the Hadamard product

(the paper's W_k = u_k v_k^T is r = 1). Training on a mixture of source tasks (a SPoT library's
sources, registered with `spot.register_tasks_mixture`) learns P* and every task's factors in
mixed-task batches (`uses_task_index`: example b uses its task's factors); adapting to a target
is a second run of this method on the target (or a mixture of targets) that starts from the
source run's product (`--mpt_source FILE`): P* copied, the factors
  * 'average': the mean of the source tasks' U and the mean of their V (PEFT's
    AVERAGE_SOURCE_TASKS),
  * 'exact': the factors of source task `--mpt_init_task` (EXACT_SOURCE_TASK),
  * 'shared': fresh factors, only P* transferred (ONLY_SOURCE_SHARED);
and P* and the factors are all trained, as in PEFT.

Equal to PEFT's `MultitaskPromptTuningConfig` / `MultitaskPromptEmbedding` (peft 0.21) where the
semantics match: the prompt of task k is `embedding * (prefix_task_cols[k] @
prefix_task_rows[k])`, factors start N(0, 0.02) (so a fresh P_k starts near zero, as PEFT's),
and the product holds PEFT's tensors `prompt_embeddings`, `prefix_task_cols`,
`prefix_task_rows`, so it is a `prompt_tuning_init_state_dict_path` PEFT reads (tested); the
other way, `--mpt_source` (and `jaxprompt eval --prompt`) take a PEFT MULTITASK_PROMPT_TUNING
adapter directory, its tasks named by PEFT's task ids ('0', '1', ...: `--mpt_init_task 1`). Where
it differs:
  * the paper's source stage distils per-task teacher prompts into the student (a KL and a
    hidden-state loss); that distillation is not implemented (nor is it in PEFT): source
    training is the task loss on the mixture;
  * the shared prompt starts from `--prompt_init` / `--init_from` (T5's initialisers), not
    PEFT's RANDOM (N(0, 1)) / TEXT;
  * one prompt in front of the encoder only (PEFT's seq2seq default also prompts the decoder:
    num_transformer_submodules=2; the parity test uses 1);
  * the default optimizer is AdamW at lr 0.3, weight decay 1e-5 (this project's choice, not the
    paper's; pass --learning_rate).

The product (`prompt_best.safetensors`) also holds each task's prompt P_k as the stack `prompt`
[n, P, d] with the task names, so `jaxprompt eval` and `info` read it as a stack; evaluation
recomputes P_k from the factors, exactly as training did.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.config import ConfigError
from jaxprompt.methods import register
from jaxprompt.methods.base import Context, Method
from jaxprompt.methods.p_tuning import adamw
from jaxprompt.prompts import prompt as prompt_lib

MPT_INITS = ('average', 'exact', 'shared')
FACTOR_STD = 0.02  # PEFT's N(0, 0.02) for prefix_task_cols / prefix_task_rows
PEFT_NAMES = {'shared': 'prompt_embeddings', 'task_cols': 'prefix_task_cols',
              'task_rows': 'prefix_task_rows'}


# ---------------------------------------------------------------------------------------------
# Product files with more tensors than a prompt (shared with `attempt`).

def write_tensors(path: str, prompt, tensors: dict[str, Any], **metadata) -> str:
  """A prompt file (`read_prompt` reads its `prompt`) that also holds `tensors`."""
  from safetensors.numpy import save_file
  from jaxprompt.version import __version__
  from jaxprompt.prompts.files import FORMAT, jsonable
  prompt = np.asarray(prompt, np.float32)
  meta = dict(metadata, format=FORMAT, jaxprompt_version=__version__,
              length=int(prompt.shape[-2]), width=int(prompt.shape[-1]))
  out = {'prompt': prompt, **{k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  save_file(out, tmp, metadata={'jaxprompt': json.dumps(meta, default=jsonable)})
  os.replace(tmp, path)
  return path


def read_tensors(path: str, names, made_by: str) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, metadata) of a product written by `write_tensors`; a one-line error when it
  lacks one of `names` (it is not a `made_by` product)."""
  from safetensors import safe_open
  from safetensors.numpy import load_file
  from jaxprompt.prompts.files import is_peft_dir, read_peft_prompt, read_peft_tensors
  if is_peft_dir(path):  # PEFT's MPT adapter: the same tensor names, task ids as names
    meta = read_peft_prompt(path).metadata  # checks its type, shapes and submodules
    if meta.get('method') != made_by:
      raise ValueError(f'{path}: a PEFT {meta.get("peft_type")} adapter; pass a '
                       f'MULTITASK_PROMPT_TUNING adapter or the prompt_best.safetensors of a '
                       f'{made_by} run')
    return read_peft_tensors(path)[0], meta
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    tensors = load_file(path)
    with safe_open(path, 'numpy') as f:
      meta = json.loads((f.metadata() or {}).get('jaxprompt') or '{}')
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f'{path}: not a readable safetensors file ({e})') from None
  missing = [n for n in names if n not in tensors]
  if missing:
    raise ValueError(f'{path}: not a {made_by} product (no {", ".join(missing)}); pass the '
                     f'prompt_best.safetensors of a {made_by} run')
  return tensors, meta


# ---------------------------------------------------------------------------------------------
# The prompts.

def task_prompts(trainable) -> jax.Array:
  """[n, P, d]: P* o (U_k V_k) for every task k."""
  return trainable['shared'] * jnp.einsum('npr,nrd->npd', trainable['task_cols'],
                                          trainable['task_rows'])


def mpt_inputs(trainable, frozen, batch):
  """Frozen backbone; example b gets the prompt of its task, P* o (U_k V_k), k = task_index[b]."""
  index = batch['task_index']
  cols = jnp.take(trainable['task_cols'], index, axis=0)
  rows = jnp.take(trainable['task_rows'], index, axis=0)
  return frozen['backbone'], trainable['shared'] * jnp.einsum('bpr,brd->bpd', cols, rows)


def source_init(path: str, length: int, width: int, rank: int, tasks: int, mode: str,
                task: str | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """(P*, U, V) to start a target from a source product; U, V None for mode 'shared'."""
  t, meta = read_tensors(path, PEFT_NAMES.values(), 'multitask_prompt')
  shared, cols, rows = (t[PEFT_NAMES[k]] for k in ('shared', 'task_cols', 'task_rows'))
  if shared.shape != (length, width):
    raise ConfigError(f'{path}: a shared prompt of shape {shared.shape}, but this run\'s prompt '
                      f'is ({length}, {width}); pass --prompt_length {shared.shape[0]}')
  if cols.shape[-1] != rank:
    raise ConfigError(f'{path}: factors of rank {cols.shape[-1]}; pass --mpt_rank {cols.shape[-1]}')
  if mode == 'shared':
    return shared, None, None
  if mode == 'average':
    cols, rows = cols.mean(0, keepdims=True), rows.mean(0, keepdims=True)
  else:
    names = list(meta.get('tasks') or [])
    if task not in names:
      raise ConfigError(f'--mpt_init_task {task!r}: {path} was trained on '
                        f'{", ".join(names) or "unknown tasks"}; name one of them')
    i = names.index(task)
    cols, rows = cols[i:i + 1], rows[i:i + 1]
  return shared, np.repeat(cols, tasks, axis=0), np.repeat(rows, tasks, axis=0)


# ---------------------------------------------------------------------------------------------
# The method.

@dataclasses.dataclass(frozen=True)
class MPTOptions:
  mpt_rank: int = 1  # r (the paper's rank-one W_k = u_k v_k^T)
  mpt_source: str | None = None  # a multitask_prompt product to start from (target adaptation)
  mpt_init: str = 'average'  # with mpt_source: 'average', 'exact' (mpt_init_task) or 'shared'
  mpt_init_task: str | None = None  # the source task whose factors 'exact' copies

  def __post_init__(self):
    if not isinstance(self.mpt_rank, int) or self.mpt_rank < 1:
      raise ConfigError(f'mpt_rank (--mpt_rank) must be a positive integer, got '
                        f'{self.mpt_rank!r}')
    if self.mpt_init not in MPT_INITS:
      raise ConfigError(f'mpt_init (--mpt_init) must be one of {", ".join(MPT_INITS)}, got '
                        f'{self.mpt_init!r}')
    if self.mpt_init == 'exact' and not self.mpt_init_task:
      raise ConfigError('mpt_init exact copies one source task\'s factors: pass --mpt_init_task')


@register
class MultitaskPrompt(Method):
  """MPT: a shared prompt times each task's rank-r matrix, on mixed-task batches."""

  name = 'multitask_prompt'
  Options = MPTOptions
  uses_task_index = True
  learning_rate = 0.3
  weight_decay = 1e-5

  def init(self, rng, ctx: Context):
    o, c = ctx.options, ctx.config
    prompt_rng, cols_rng, rows_rng = jax.random.split(rng, 3)
    n, length, width = len(ctx.tasks), c.prompt_length, ctx.width
    shared = prompt_lib.get_prompt(Method.init(self, prompt_rng, ctx)[0])
    cols = FACTOR_STD * jax.random.normal(cols_rng, (n, length, o.mpt_rank), jnp.float32)
    rows = FACTOR_STD * jax.random.normal(rows_rng, (n, o.mpt_rank, width), jnp.float32)
    if o.mpt_source:
      source, source_cols, source_rows = source_init(o.mpt_source, length, width, o.mpt_rank, n,
                                                     o.mpt_init, o.mpt_init_task)
      shared = jnp.asarray(source)
      if source_cols is not None:
        cols, rows = jnp.asarray(source_cols), jnp.asarray(source_rows)
    return {'shared': jnp.asarray(shared, jnp.float32), 'task_cols': cols, 'task_rows': rows}, {}

  model_inputs = staticmethod(mpt_inputs)

  def optimizer(self, ctx: Context):
    return adamw(self, ctx)

  def identity(self, ctx: Context):
    return dict(super().identity(ctx), tasks=list(ctx.tasks))

  def eval_extras(self, task_index: int):
    return {'task_index': np.int32(task_index)}

  def save_product(self, trainable, extras, path, metadata):
    del extras
    path = path + '.safetensors'
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(trainable))
    write_tensors(path, np.asarray(jax.jit(task_prompts)(trainable)),
                  {PEFT_NAMES[k]: host[k] for k in PEFT_NAMES}, method=self.name,
                  mpt_rank=int(host['task_cols'].shape[-1]), **metadata)
    return path

  def load_product(self, path, ctx: Context):
    t, _ = read_tensors(path, PEFT_NAMES.values(), self.name)
    shared = t[PEFT_NAMES['shared']]
    if shared.shape[-1] != ctx.width:
      raise ValueError(f'{path}: prompts of width {shared.shape[-1]}, but the model width is '
                       f'{ctx.width}')
    return {k: jnp.asarray(t[PEFT_NAMES[k]]) for k in PEFT_NAMES}, {}

  def contract_options(self):
    return {'mpt_rank': 2}


__all__ = ['MPTOptions', 'MPT_INITS', 'MultitaskPrompt', 'PEFT_NAMES', 'mpt_inputs',
           'read_tensors', 'source_init', 'task_prompts', 'write_tensors']
