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
  """Jitted, sharded steps for one (module, mapping, optimizer) triple."""

  module: Transformer
  mesh: jax.sharding.Mesh
  rules: list
  frozen: Any
  train_step: Callable
  eval_step: Callable
  backbone_shardings: Any

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
    (every host can read them, as evaluation needs)."""
    kwargs.setdefault('out_shardings', partitioning.replicated(self.mesh))
    jitted = jax.jit(fn, **kwargs)

    def call(*args):
      with self.mesh, nn_partitioning.axis_rules(self.rules):
        return jitted(*args)

    return call

  def evaluate_batch(self, trainable, batch: dict[str, np.ndarray]) -> dict[str, float]:
    return jax.device_get(self.eval_step(trainable, self.frozen, self.put_batch(batch)))


def backbone_shardings_for(t5_config, mesh: jax.sharding.Mesh, rules: list,
                           scan_layers: bool = False) -> Any:
  """The backbone's params-shaped tree of `NamedSharding` on `mesh` under `rules` (of the
  scanned tree, layers stacked on a leading 'layers' axis, with `scan_layers`)."""
  return partitioning.logical_to_mesh_sharding(
      params_axes(t5_config, scan_layers), mesh, rules,
      shapes=param_shapes(t5_config, scan_layers))


def _replicate(tree, mesh):
  return jax.device_put(tree, partitioning.replicated(mesh))


def build_engine(module: Transformer, model_inputs: ModelInputs,
                 tx: optax.GradientTransformation | None,
                 frozen: dict[str, Any], trainable: Any, *, loss: LossConfig = LossConfig(),
                 prompt_position: int = 0, num_partitions: int = 1,
                 trainable_is_backbone: bool = False, dropout: bool = True,
                 rules: list | None = None, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[Engine, TrainState]:
  """Places the frozen tree and the trainable on a mesh and jits the steps.

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

  Returns:
    (engine, initial train state).
  """
  mesh = mesh or partitioning.make_mesh(num_partitions)
  rules = rules or partitioning.standard_logical_axis_rules()
  backbone_shardings = backbone_shardings_for(module.config, mesh, rules, module.scan_layers)
  placed = {k: (jax.device_put(v, backbone_shardings) if k == 'backbone' else _replicate(v, mesh))
            for k, v in frozen.items()}
  trainable = (jax.device_put(trainable, backbone_shardings) if trainable_is_backbone
               else _replicate(trainable, mesh))
  if tx is None:
    state = TrainState(_replicate(np.zeros((), np.int32), mesh), trainable, None)
    train_jit = None
  else:
    with mesh, nn_partitioning.axis_rules(rules):
      state = jax.jit(init_state, static_argnums=1)(trainable, tx)
    state = state._replace(step=_replicate(state.step, mesh))
    train_jit = jax.jit(make_train_step(module, model_inputs, tx, loss, prompt_position, dropout),
                        donate_argnums=(0,))
  eval_jit = jax.jit(make_eval_step(module, model_inputs, loss, prompt_position))

  compiled = []

  def train_step(state, frozen, batch, rng):
    with mesh, nn_partitioning.axis_rules(rules):
      out = train_jit(state, frozen, batch, rng)
    if not compiled:  # the compiler's scratch memory is free now; keep it out of the loop's peak
      compiled.append(True)
      release_host_memory()
    return out

  def eval_step(trainable, frozen, batch):
    with mesh, nn_partitioning.axis_rules(rules):
      return eval_jit(trainable, frozen, batch)

  engine = Engine(module, mesh, rules, placed, train_step, eval_step, backbone_shardings)
  return engine, state
