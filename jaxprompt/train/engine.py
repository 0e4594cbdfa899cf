"""The engine: the generic steps jitted over a (data, model) mesh with T5X's axis rules.

The backbone is sharded by its logical axes, batches on `data`, and the trainable
replicated (prompts, masks, projectors are small) unless it *is* the backbone
(model tuning), in which case it takes the backbone's shardings. The train state is
donated to the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax.linen import partitioning as nn_partitioning

from jaxprompt.host import release_host_memory
from jaxprompt.model import Transformer
from jaxprompt.model.network import param_shapes, params_axes
from jaxprompt.train import partitioning
from jaxprompt.train.steps import (LossConfig, ModelInputs, TrainState, init_state,
                                   make_eval_step, make_train_step)


@dataclasses.dataclass
class Engine:
  """Jitted, sharded steps for one (module, mapping, optimizer) triple.

  `train_jit` / `eval_jit` are the jitted programs themselves: `train_step` / `eval_step` call
  them under the mesh and axis rules, `lower_train` / `lower_eval` lower them for abstract
  arguments (`jax.ShapeDtypeStruct`s), so what `jaxprompt plan` compiles is what a run runs.
  An engine built from abstract weights (`build_engine` with structs) can only be lowered.
  """

  module: Transformer
  mesh: jax.sharding.Mesh
  rules: list
  frozen: Any
  backbone_shardings: Any
  train_jit: Any  # jax.jit of steps.make_train_step (None: an evaluation-only engine)
  eval_jit: Any  # jax.jit of steps.make_eval_step
  _compiled: list = dataclasses.field(default_factory=list, repr=False)

  def train_step(self, state: TrainState, frozen, batch, rng):
    with self.mesh, nn_partitioning.axis_rules(self.rules):
      out = self.train_jit(state, frozen, batch, rng)
    if not self._compiled:  # the compiler's scratch memory is free now; keep it out of the peak
      self._compiled.append(True)
      release_host_memory()
    return out

  def eval_step(self, trainable, frozen, batch):
    with self.mesh, nn_partitioning.axis_rules(self.rules):
      return self.eval_jit(trainable, frozen, batch)

  def lower_train(self, state: TrainState, batch, rng=None) -> jax.stages.Lowered:
    """The train step lowered for `state` and `batch` (arrays or structs; see `abstract_batch`)
    with this engine's frozen tree; `rng` defaults to a PRNG key's struct."""
    if rng is None:
      rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    with self.mesh, nn_partitioning.axis_rules(self.rules):
      return self.train_jit.lower(state, self.frozen, batch, rng)

  def lower_eval(self, trainable, batch) -> jax.stages.Lowered:
    """The evaluation (teacher-forced loss) step lowered for `trainable` and `batch`."""
    with self.mesh, nn_partitioning.axis_rules(self.rules):
      return self.eval_jit.lower(trainable, self.frozen, batch)

  def abstract_batch(self, shapes: dict[str, tuple]) -> dict[str, jax.ShapeDtypeStruct]:
    """`{name: (shape, dtype)}` of a global batch -> structs sharded as `put_batch` places it."""
    sharding = partitioning.batch_sharding(self.mesh)
    return {k: jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)
            for k, (shape, dtype) in shapes.items()}

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host batch (this host's share) -> global arrays sharded on `data`."""
    sharding = partitioning.batch_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  def put_full_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A whole global batch that every host holds (evaluation) -> arrays sharded on `data`."""
    return jax.device_put({k: np.asarray(v) for k, v in batch.items()},
                          partitioning.batch_sharding(self.mesh))

  @property
  def data_parallel_size(self) -> int:
    return int(self.mesh.shape['data'])

  def jit(self, fn: Callable, **kwargs) -> Callable:
    """`fn` jitted, called under this engine's mesh and axis rules; its outputs are replicated
    (every host can read them, as evaluation needs); compiled with `compiler_options`."""
    kwargs.setdefault('out_shardings', partitioning.replicated(self.mesh))
    kwargs.setdefault('compiler_options', compiler_options(self.mesh))
    jitted = jax.jit(fn, **kwargs)

    def call(*args):
      with self.mesh, nn_partitioning.axis_rules(self.rules):
        return jitted(*args)

    return call

  def evaluate_batch(self, trainable, batch: dict[str, np.ndarray]) -> dict[str, float]:
    return jax.device_get(self.eval_step(trainable, self.frozen, self.put_batch(batch)))


# XLA:CPU (jax 0.10) fuses dots with their neighbours into YNNPACK calls by default; without
# them every program measured here is faster and smaller on CPU (benchmarks/README.md, 2-vCPU
# AMD EPYC, 2026-12-07, side by side): the T5.1.1-small prompt-tuning step 2.33 vs 2.50-2.60
# s and 1530 vs 1725 MB peak, greedy decoding at batch 16 3.2 vs 4.2-4.7 s, batch 1 level. The
# numbers are the same programs' up to rounding.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def compiler_options(mesh: jax.sharding.Mesh) -> dict | None:
  """The options every program of an engine compiles with: `CPU_COMPILER_OPTIONS` on CPU
  devices, none elsewhere."""
  return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == 'cpu' else None


def backbone_shardings_for(t5_config, mesh: jax.sharding.Mesh, rules: list,
                           scan_layers: bool = False) -> Any:
  """The backbone's params-shaped tree of `NamedSharding` on `mesh` under `rules` (of the
  scanned tree, layers stacked on a leading 'layers' axis, with `scan_layers`)."""
  return partitioning.logical_to_mesh_sharding(
      params_axes(t5_config, scan_layers), mesh, rules,
      shapes=param_shapes(t5_config, scan_layers))


def is_abstract(tree) -> bool:
  """True for a tree of `jax.ShapeDtypeStruct` (weights that are never allocated)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def place(tree, shardings):
  """`tree` on `shardings` (one sharding or a matching tree): arrays are put on the devices,
  structs get the shardings attached and stay unallocated."""
  if not is_abstract(tree):
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _initial_state(trainable, tx, mesh, rules) -> TrainState:
  """The optimizer's initial state (jitted, so it lands where the compiler puts it); for a
  struct trainable, its structs with the shardings that compiled program gives them."""
  init = jax.jit(init_state, static_argnums=1)
  with mesh, nn_partitioning.axis_rules(rules):
    if is_abstract(trainable):
      lowered = init.lower(trainable, tx)
      state = place(lowered.out_info, lowered.compile().output_shardings)
    else:
      state = init(trainable, tx)
  return state._replace(step=place(state.step, partitioning.replicated(mesh)))


def build_engine(module: Transformer, model_inputs: ModelInputs,
                 tx: optax.GradientTransformation | None,
                 frozen: dict[str, Any], trainable: Any, *, loss: LossConfig = LossConfig(),
                 prompt_position: int = 0, num_partitions: int = 1,
                 trainable_is_backbone: bool = False, dropout: bool = True,
                 rules: list | None = None, mesh: jax.sharding.Mesh | None = None,
                 accumulate_steps: int = 1) -> tuple[Engine, TrainState]:
  """Places the frozen tree and the trainable on a mesh and jits the steps.

  Weights may be arrays or `jax.ShapeDtypeStruct`s (the frozen tree and the trainable alike):
  structs are never allocated, they only get their shardings, and the engine is then for
  `lower_train` / `lower_eval` (`jaxprompt plan`); the steps are the same either way.

  Args:
    module: the T5.
    model_inputs: the method's mapping `(trainable, frozen, batch) -> (params, prompt)`.
    tx: the optimizer (of the trainable only); None builds an evaluation-only engine.
    frozen: `{'backbone': params, ...}`; other entries (masks, source prompts) are replicated.
    trainable: the initial trainable pytree.
    loss: loss settings.
    prompt_position: where the prompt enters the input.
    num_partitions: size of the `model` mesh axis (1 = pure data parallelism).
    trainable_is_backbone: model tuning; the trainable takes the backbone's shardings.
    dropout: train with dropout (the config's rate).
    rules: logical axis rules; T5X's standard rules by default.
    mesh: the device mesh; by default `num_partitions` devices on `model`, the rest on `data`.
    accumulate_steps: microbatches per train step (gradient accumulation).

  Returns:
    (engine, initial train state).
  """
  mesh = mesh or partitioning.make_mesh(num_partitions)
  rules = rules or partitioning.standard_logical_axis_rules()
  backbone_shardings = backbone_shardings_for(module.config, mesh, rules, module.scan_layers)
  replicated = partitioning.replicated(mesh)
  placed = {k: place(v, backbone_shardings if k == 'backbone' else replicated)
            for k, v in frozen.items()}
  trainable = place(trainable, backbone_shardings if trainable_is_backbone else replicated)
  if tx is None:
    state = TrainState(place(np.zeros((), np.int32), replicated), trainable, None)
    train_jit = None
  else:
    state = _initial_state(trainable, tx, mesh, rules)
    train_jit = jax.jit(make_train_step(module, model_inputs, tx, loss, prompt_position, dropout,
                                        accumulate_steps), donate_argnums=(0,),
                        compiler_options=compiler_options(mesh))
  eval_jit = jax.jit(make_eval_step(module, model_inputs, loss, prompt_position),
                     out_shardings=replicated, compiler_options=compiler_options(mesh))
  return Engine(module, mesh, rules, placed, backbone_shardings, train_jit, eval_jit), state
