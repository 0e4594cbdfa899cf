"""The Method contract: what a method supplies to the one run driver and the one engine.

A method is a small object that says
  * how to initialise its trainable pytree and its frozen extras (`init`),
  * how the trainable becomes the backbone's params and prompt (`model_inputs`, the engine's
    seam: `(trainable, frozen, batch) -> (backbone params, prompt or None)`; the prompt may be
    a `jaxprompt.model.network.PromptInputs` that also carries per-layer key/value prefixes,
    as prefix tuning's does),
  * its default optimizer (`optimizer`),
  * what identifies a run of it, for the manifest and resume (`identity`),
  * how its product is written and read back for evaluation (`save_product`, `load_product`),
  * how evaluation feeds it (`eval_extras`: e.g. the task row of a prompt stack; `ensemble`).
Everything else (data, sharding, the loop, checkpoints, validation, the CLI and gin) is shared
and picks a registered method up by name. See docs/design.md, "How to add a method".
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np
import optax

from jaxprompt.config import RunConfig
from jaxprompt.prompts import prompt as prompt_lib
from jaxprompt.prompts.files import read_prompt, write_prompt
from jaxprompt.train import steps
from jaxprompt.train.optimizers import t5x_adafactor


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """A method without options of its own."""


@dataclasses.dataclass
class Context:
  """What a method may read when it initialises: the backbone, the task(s), the options.

  `config` is resolved: prompt_length and feature_lengths are filled in from the task.
  """

  backbone: Any  # jaxprompt.checkpoints.Backbone
  task: str  # the training task or mixture
  tasks: tuple[str, ...]  # the tasks evaluated (a mixture's members, or the task itself)
  vocabulary: Any
  labels: list[str] | None  # the (first) task's label verbalizers
  config: RunConfig
  options: Any

  @property
  def embedding(self) -> np.ndarray:
    value = self.backbone.params['token_embedder']['embedding']
    if isinstance(value, jax.Array) and not value.is_fully_addressable:  # sharded over hosts
      from jax.experimental import multihost_utils
      value = multihost_utils.process_allgather(value, tiled=True)  # every process calls this
    return np.asarray(value)

  @property
  def width(self) -> int:
    return int(self.backbone.module.config.emb_dim)


class Method:
  """Base class: a prompt method with one [P, d] prompt (override what differs)."""

  name: ClassVar[str] = ''
  Options: ClassVar[type] = NoOptions
  trains_backbone: ClassVar[bool] = False  # model tuning: the trainable *is* the backbone
  learning_rate: ClassVar[float] = 0.3
  weight_decay: ClassVar[float | None] = 1e-5
  ensemble: ClassVar[bool] = False  # evaluation: rows of a stack vote on every example
  uses_task_index: ClassVar[bool] = False  # training batches carry `task_index`

  # ---- training ----
  def init(self, rng: jax.Array, ctx: Context) -> tuple[Any, dict[str, Any]]:
    """(initial trainable, frozen extras besides the backbone)."""
    from jaxprompt.prompts.init import prompt_initializer
    init_fn = prompt_initializer(ctx)
    return prompt_lib.init_prompt(rng, ctx.config.prompt_length, ctx.width, init_fn), {}

  model_inputs = staticmethod(steps.prompt_inputs)

  def eval_inputs(self, trainable, frozen, batch):
    """The mapping used at evaluation (an ensemble returns its whole stack here)."""
    return self.model_inputs(trainable, frozen, batch)

  def optimizer(self, ctx: Context) -> optax.GradientTransformation:
    c = ctx.config
    lr = self.learning_rate if c.learning_rate is None else c.learning_rate
    wd = self.weight_decay if c.weight_decay is None else (c.weight_decay or None)
    return t5x_adafactor(learning_rate=lr, weight_decay_rate=wd)

  def identity(self, ctx: Context) -> dict[str, Any]:
    """Manifest entries that must agree for a run directory to be resumed."""
    return {'prompt_length': ctx.config.prompt_length,
            'options': dataclasses.asdict(ctx.options)}

  # ---- the product ----
  def product_value(self, trainable) -> np.ndarray:
    return np.asarray(jax.device_get(prompt_lib.get_prompt(trainable)))

  def save_product(self, trainable, extras: dict[str, Any], path: str,
                   metadata: dict[str, Any]) -> str:
    """Writes what a run produced (a prompt file; `.npy` copy beside it) and returns its path."""
    path = path + '.safetensors'
    value = self.product_value(trainable)
    write_prompt(path, value, overwrite=True, method=self.name, **self.product_masks(extras),
                 **metadata)
    write_prompt(path.replace('.safetensors', '.npy'), self.masked(value, extras),
                 overwrite=True)
    return path

  def after_validation(self, trainable, extras: dict[str, Any], step: int,
                       metrics: dict[str, float], model_dir: str, ctx: Context) -> None:
    """Called (on the writing process) after every validation, once its checkpoint is written,
    and again for the restored step when a run resumes (so: idempotent). The driver keeps the
    one best state by the run's metric; a method that must keep more (each task's best row of
    a stack) writes it here."""
    del trainable, extras, step, metrics, model_dir, ctx

  def product_metadata(self, ctx: Context) -> dict[str, Any]:
    """What this method adds to the metadata of its products (the driver gives backbone, task,
    tasks, init, step and metrics): facts of the run that the product must carry."""
    del ctx
    return {}

  def product_masks(self, extras: dict[str, Any]) -> dict[str, Any]:
    del extras
    return {}

  def masked(self, value: np.ndarray, extras: dict[str, Any]) -> np.ndarray:
    del extras
    return value

  def load_product(self, path: str, ctx: Context) -> tuple[Any, dict[str, Any]]:
    """(trainable, frozen extras) of a product written by `save_product`, for evaluation."""
    from jaxprompt.prompts.files import check_compatible
    pf = read_prompt(path)
    check_compatible(pf, ctx.width, ctx.backbone, path=path)
    return self.from_prompt_file(pf, path)

  def from_prompt_file(self, pf, path: str) -> tuple[Any, dict[str, Any]]:
    if pf.value.ndim != 2:
      raise ValueError(f'{path}: holds a stack of {pf.value.shape[0]} prompts, but method '
                       f'{self.name} takes one [P, d] prompt')
    return prompt_lib.prompt_tree(np.asarray(pf.masked_value())), {}

  # ---- testing ----
  def contract_options(self) -> dict[str, Any]:
    """Options that let the contract suite (tests/test_methods_contract.py) run this method
    on a tiny backbone and file task, e.g. a method option that has no default."""
    return {}

  # ---- evaluation ----
  def eval_extras(self, task_index: int) -> dict[str, Any]:
    """Constant batch entries when evaluating the `task_index`-th task of the run."""
    del task_index
    return {}
