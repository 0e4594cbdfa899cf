"""Device mesh and T5X logical axis rules, mapped to `jax.sharding`.

Parameters carry logical axis names (`('embed', 'joined_kv')`, ...) attached
with `flax.linen.partitioning.param_with_axes`; the rules below say which mesh
axis each name is sharded over, exactly as T5X's `standard_logical_axis_rules`.
The mesh always has the two T5X axes `('data', 'model')`: batches are split on
`data`, large weight dimensions on `model`, and a soft prompt is replicated.

A dimension whose size the mesh axis does not divide is replicated instead
(and logged), so tiny test models still run on 8 devices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    'LogicalAxisRules', 'standard_logical_axis_rules', 'make_mesh',
    'logical_to_mesh_sharding', 'batch_sharding', 'replicated',
    'initialize_distributed', 'host_shard_info',
]

LogicalAxisRules = Sequence[tuple[str, str | None]]
MESH_AXES = ('data', 'model')
_AXES_SUFFIX = '_axes'

log = logging.getLogger(__name__)


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: LogicalAxisRules | None = None,
) -> list[tuple[str, str | None]]:
  """T5X's default logical-to-mesh axis rules, plus the prompt axes.

  Rules are in priority order: a logical axis takes the first listed mesh axis
  not already used by another dimension of the same array (so with 2-D
  parameter sharding, `embed` goes to `data` when `model` is taken).

  Args:
    activation_partitioning_dims: 2 also shards `embed` over `model`.
    parameter_partitioning_dims: 2 also shards `embed` over `data`.
    additional_rules: Appended after the standard rules.

  Returns:
    A list of `(logical_axis, mesh_axis_or_None)` pairs.

  Example:
    >>> dict(standard_logical_axis_rules())['joined_kv']
    'model'
  """
  rules = [
      ('batch', 'data'),
      ('vocab', 'model'),
      ('mlp', 'model'),
      ('heads', 'model'),
      ('kv', None),
      ('joined_kv', 'model'),
  ]
  dims = (activation_partitioning_dims, parameter_partitioning_dims)
  if dims == (1, 1):
    rules.insert(2, ('embed', None))
  elif dims == (2, 1):
    rules.append(('embed', 'model'))
  elif dims == (1, 2):
    rules.append(('embed', 'data'))
  elif dims == (2, 2):
    rules += [('embed', 'model'), ('embed', 'data')]
  else:
    raise ValueError(
        f'activation_partitioning_dims={activation_partitioning_dims} and '
        f'parameter_partitioning_dims={parameter_partitioning_dims} are not '
        'supported; each must be 1 or 2.')
  rules += [
      ('relpos_buckets', None),
      ('abspos_buckets', None),
      ('length', None),
      ('layers', None),
      ('stack', None),
      ('mlp_activations', None),
      ('prompt', None),
      ('prompt_embed', None),
  ]
  if additional_rules:
    rules += [tuple(r) for r in additional_rules]
  return rules


def make_mesh(num_partitions: int = 1, devices: Sequence[Any] | None = None
             ) -> Mesh:
  """A `('data', 'model')` mesh with `num_partitions` devices on `model`.

  Args:
    num_partitions: Model-parallel width; `data` gets the remaining
      `len(devices) // num_partitions`.
    devices: Devices to use; all of `jax.devices()` by default.

  Returns:
    A `jax.sharding.Mesh` of shape `(n // num_partitions, num_partitions)`.

  Example:
    >>> make_mesh().axis_names
    ('data', 'model')
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if num_partitions < 1 or n % num_partitions:
    raise ValueError(
        f'num_partitions={num_partitions} must be >= 1 and divide the number '
        f'of devices ({n}).')
  shape = (n // num_partitions, num_partitions)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Unusual device subsets: fall back to the order given.
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def submesh_mesh(submesh: Sequence[int], devices: Sequence[Any]) -> Mesh:
  """T5X's `model_parallel_submesh` on TPU: the `model` axis is an (x, y, z, core) block of the
  physical (X, Y, Z, cores) device grid, and `data` runs over the blocks that tile it.

  Args:
    submesh: (x, y, z, core) chips along each torus axis and cores per chip of one block.
    devices: TPU devices (with `coords` and `core_on_chip`).
  """
  coords = np.array([tuple(d.coords) + (d.core_on_chip,) for d in devices])
  physical = tuple(int(c) for c in coords.max(axis=0) + 1)
  if len(submesh) != 4 or any(p % s for p, s in zip(physical, submesh)):
    raise ValueError(f'model_parallel_submesh {tuple(submesh)} does not tile the devices\' '
                     f'(x, y, z, core) grid {physical}; give 4 sizes that divide it')
  grid = np.empty(physical, dtype=object)
  for device, c in zip(devices, coords):
    grid[tuple(c)] = device
  # (X, Y, Z, C) -> (X/x, x, Y/y, y, ...) -> blocks first, then the position in a block.
  split = grid.reshape([n for p, s in zip(physical, submesh) for n in (p // s, s)])
  blocks = split.transpose(0, 2, 4, 6, 1, 3, 5, 7)
  model = int(np.prod(submesh))
  return Mesh(blocks.reshape(-1, model), MESH_AXES)


def mesh_from_config(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The run's `('data', 'model')` mesh from its options.

  `model_parallel_submesh=(x, y, z, core)` (T5X's) on TPU devices takes that block of the
  physical grid as the `model` axis (`submesh_mesh`); on other devices, which have no torus,
  it means `num_partitions = x * y * z * core` devices on `model` in device order. Otherwise
  `num_partitions` devices on `model`, the rest on `data` (`make_mesh`).
  """
  from jaxprompt.config import ConfigError, option_names
  devices = list(jax.devices() if devices is None else devices)
  submesh = config.model_parallel_submesh
  if submesh is None:
    try:
      return make_mesh(config.num_partitions, devices)
    except ValueError:
      raise ConfigError(f'{option_names("num_partitions")}: {config.num_partitions} does not '
                        f'divide the {len(devices)} devices; choose a divisor') from None
  where = option_names('model_parallel_submesh')
  if (len(submesh) != 4 or not all(isinstance(n, int) and n > 0 for n in submesh)):
    raise ConfigError(f'{where}: give 4 positive sizes (x, y, z, core), got {submesh!r}')
  size = int(np.prod(submesh))
  if config.num_partitions not in (1, size):
    raise ConfigError(f'{where} {tuple(submesh)} makes {size} model partitions but '
                      f'num_partitions is {config.num_partitions}; give one of the two')
  if all(hasattr(d, 'coords') and hasattr(d, 'core_on_chip') for d in devices):
    try:
      return submesh_mesh(submesh, devices)
    except ValueError as e:
      raise ConfigError(f'{where}: {e}') from None
  try:
    return make_mesh(size, devices)
  except ValueError:
    raise ConfigError(f'{where} {tuple(submesh)}: {size} model partitions do not divide the '
                      f'{len(devices)} devices') from None


def rules_from_config(config) -> list[tuple[str, str | None]]:
  """The run's logical axis rules: `RunConfig.logical_axis_rules` when given (pairs of a
  logical axis and a mesh axis or None; the prompt's axes are replicated unless named),
  else T5X's standard rules with the config's partitioning dims."""
  if not config.logical_axis_rules:
    return standard_logical_axis_rules(config.activation_partitioning_dims,
                                       config.parameter_partitioning_dims)
  from jaxprompt.config import ConfigError, option_names
  rules = []
  for rule in config.logical_axis_rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
        or rule[1] not in MESH_AXES + (None,)):
      raise ConfigError(f'{option_names("logical_axis_rules")}: {rule!r} is not a pair '
                        f"(logical axis, 'data' | 'model' | None)")
    rules.append((rule[0], rule[1]))
  return rules


def pjit_partitioner(num_partitions: int | None = None,
                     model_parallel_submesh: Sequence[int] | None = None,
                     logical_axis_rules: LogicalAxisRules | None = None,
                     **t5x_only: Any) -> dict[str, Any]:
  """T5X's `partitioning.PjitPartitioner` as gin binds it (`cli.gin_tune` registers it under
  that name): the mesh and rule options it was given, as `RunConfig` fields. Its other
  arguments (`params_on_devices`, `backend`, ...) are accepted and have no effect here."""
  del t5x_only
  given = dict(num_partitions=num_partitions, model_parallel_submesh=model_parallel_submesh,
               logical_axis_rules=logical_axis_rules)
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None}


def t5x_gin_options() -> dict[str, Any]:
  """`RunConfig` options from T5X's gin spelling of the mesh and rules, bound in the parsed gin
  config: `partitioning.PjitPartitioner.{num_partitions, model_parallel_submesh,
  logical_axis_rules}` and `partitioning.standard_logical_axis_rules.{activation,parameter}_
  partitioning_dims`."""
  import gin
  options = gin.get_configurable('partitioning.PjitPartitioner')()
  for dims in ('activation_partitioning_dims', 'parameter_partitioning_dims'):
    try:
      options[dims] = gin.query_parameter(f'partitioning.standard_logical_axis_rules.{dims}')
    except ValueError:  # not bound
      pass
  return options


def _is_axes_leaf(x: Any) -> bool:
  """True for one array's logical axis names (or None = replicated)."""
  if x is None or isinstance(x, (PartitionSpec, nn_partitioning.AxisMetadata)):
    return True
  return isinstance(x, (tuple, list)) and all(
      e is None or isinstance(e, str) for e in x)


def _strip_axes_metadata(tree: Any) -> Any:
  """Turns a flax `params_axes` collection into a params-shaped tree.

  `<name>_axes: AxisMetadata(names=...)` becomes `<name>: names`; other
  mappings are copied as plain dicts so they match freshly initialised params.
  """
  if isinstance(tree, nn_partitioning.AxisMetadata):
    return tuple(tree.names)
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      if (isinstance(value, nn_partitioning.AxisMetadata)
          and isinstance(key, str) and key.endswith(_AXES_SUFFIX)):
        key = key[:-len(_AXES_SUFFIX)]
      out[key] = _strip_axes_metadata(value)
    return out
  return tree


def _plain(tree: Any) -> Any:
  """Nested Mappings (FrozenDict included) as dicts, other nodes untouched."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                    where: str) -> PartitionSpec:
  """Replaces mesh axes that do not divide their dimension by None."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for i, (entry, size) in enumerate(zip(entries, shape)):
    if entry is None:
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    ways = int(np.prod([mesh.shape[a] for a in names]))
    if size % ways:
      log.info('%s: dim %d of size %d is not divisible by mesh axis %s (%d); '
               'replicating it.', where, i, size, entry, ways)
      entries[i] = None
  return PartitionSpec(*entries)


def logical_to_mesh_sharding(
    axes_tree: Any,
    mesh: Mesh,
    rules: LogicalAxisRules | None = None,
    shapes: Any = None,
) -> Any:
  """Maps logical axis names to a tree of `NamedSharding`.

  Args:
    axes_tree: Either a tree whose leaves are tuples of logical axis names
      (`('embed', 'joined_kv')`, `None` for a replicated leaf), or a flax
      `params_axes` collection (`{'kernel_axes': AxisMetadata(...)}`), whose
      `_axes` suffixes are stripped so the result matches the params tree. A
      variables dict holding `params_axes` is accepted too.
    mesh: The device mesh.
    rules: Logical axis rules; `standard_logical_axis_rules()` by default.
    shapes: Optional tree matching the result, with arrays or
      `jax.ShapeDtypeStruct` leaves (e.g. the params or `jax.eval_shape` of
      init). When given, a dimension that its mesh axes do not divide is
      replicated instead of failing later in `jax.device_put`/`jax.jit`.

  Returns:
    A tree of `jax.sharding.NamedSharding`, params-shaped.

  Example:
    >>> mesh = make_mesh()
    >>> tree = {'query': {'kernel': ('embed', 'joined_kv')}}
    >>> logical_to_mesh_sharding(tree, mesh)['query']['kernel'].spec
    P(None, 'model')
  """
  if rules is None:
    rules = standard_logical_axis_rules()
  rules = tuple(tuple(r) for r in rules)
  if isinstance(axes_tree, Mapping) and 'params_axes' in axes_tree:
    axes_tree = axes_tree['params_axes']
  axes_tree = _strip_axes_metadata(axes_tree)
  used = set(jax.tree.leaves([r[1] for r in rules]))
  unknown = used - set(mesh.axis_names)
  if unknown:
    raise ValueError(f'Rules use mesh axes {sorted(unknown)} that the mesh '
                     f'{dict(mesh.shape)} does not have.')

  def to_spec(names: Any) -> PartitionSpec:
    if names is None:
      return PartitionSpec()
    if isinstance(names, nn_partitioning.AxisMetadata):
      names = names.names
    return nn_partitioning.logical_to_mesh_axes(tuple(names), rules)

  if shapes is None:
    return jax.tree.map(lambda a: NamedSharding(mesh, to_spec(a)), axes_tree,
                        is_leaf=_is_axes_leaf)

  def with_shape(path, names, leaf):
    shape = tuple(getattr(leaf, 'shape', None) or np.shape(leaf))
    spec = to_spec(names)
    if len(spec) > len(shape):
      raise ValueError(f'{jax.tree_util.keystr(path)}: {len(spec)} logical '
                       f'axes {names} for an array of shape {shape}.')
    spec = _divisible_spec(spec, shape, mesh, jax.tree_util.keystr(path))
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      with_shape, axes_tree, _plain(shapes), is_leaf=_is_axes_leaf)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest replicated.

  Example:
    >>> batch_sharding(make_mesh()).spec
    P('data',)
  """
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (prompts, scalars, step counters)."""
  return NamedSharding(mesh, PartitionSpec())


# jax's own verdict on a process that sends no heartbeat (after `PeerWatch` has reported it):
# well under a minute, and long enough for a busy host's compile or checkpoint write.
HEARTBEAT_TIMEOUT_S = 30


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> bool:
  """Starts JAX's multi-host runtime when (and only when) it is configured.

  Call it first thing in a multi-host entry point, before any other JAX call.
  On one host it does nothing, so entry points can always call it.

  Args:
    coordinator_address: `host:port` of process 0; configures multi-host.
    num_processes: Total number of processes (with `coordinator_address`).
    process_id: This process's index (with `coordinator_address`).
    auto: Call `jax.distributed.initialize()` with no arguments, letting JAX
      detect the cluster (Cloud TPU pods, SLURM, ...).

  Returns:
    True if `jax.distributed.initialize` was called.
  """
  if coordinator_address == 'auto':  # the launcher's environment (TPU pods, SLURM, ...)
    coordinator_address, auto = None, True
  if coordinator_address is None and not auto:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(
          'num_processes/process_id were given without coordinator_address; '
          'pass coordinator_address="host:port" of process 0 (or auto=True).')
    return False
  if jax.distributed.is_initialized():
    log.info('jax.distributed is already initialized.')
    return False
  from jaxprompt.host import runs_on_cpu
  if runs_on_cpu():  # CPU processes exchange gradients over gloo
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  log.info('jax.distributed initialized: process %d of %d.',
           jax.process_index(), jax.process_count())
  return True


class PeerWatch:
  """Each process of a multi-host run beats in the coordination service's key-value store every
  second and watches the others' beats; when one stops for `LOST_AFTER_S`, the watcher prints
  one line naming it and what to do, and exits (status 1). jax's own verdict comes later (its
  heartbeat timeout) and aborts with a C++ stack trace; a collective whose peer died fails at
  once, before either (`lost_process_error` waits for the watcher then). A lost coordinator
  (process 0) takes the store with it, which the watcher reports as such."""

  LOST_AFTER_S = 15.0
  _runs = 0  # one key prefix per run of this session (every process counts the same runs)

  def __init__(self, advice: str):
    from jax._src import distributed as dist
    self._client = dist.global_state.client
    self._advice, self._stop = advice, None
    PeerWatch._runs += 1
    self._prefix = f'jaxprompt/run{PeerWatch._runs}'

  def start(self) -> 'PeerWatch':
    import threading
    self._stop = threading.Event()
    threading.Thread(target=self._watch, name='jaxprompt-peer-watch', daemon=True).start()
    return self

  def stop(self) -> None:
    """This process is done: the others no longer expect its beat."""
    if self._stop is not None and not self._stop.is_set():
      self._stop.set()
      try:
        self._client.key_value_set(f'{self._prefix}/done/{jax.process_index()}', '1',
                                   allow_overwrite=True)
      except Exception:  # noqa: BLE001 - the store is gone: nobody is waiting
        pass

  def _lost(self, who: str) -> None:
    import os
    import sys
    sys.stderr.write(f'\njaxprompt: a process of this run was lost: {who}; {self._advice}\n')
    sys.stderr.flush()
    os._exit(1)  # the runtime cannot shut down without its peers

  def _watch(self) -> None:
    import time
    me, count = jax.process_index(), jax.process_count()
    last = {i: (None, time.monotonic()) for i in range(count) if i != me}
    beat = 0
    while not self._stop.wait(1.0):
      beat += 1
      try:
        self._client.key_value_set(f'{self._prefix}/beat/{me}', str(beat), allow_overwrite=True)
        for i in list(last):
          try:
            self._client.key_value_try_get(f'{self._prefix}/done/{i}')
            del last[i]  # finished: no more beats to expect
            continue
          except Exception:  # noqa: BLE001 - not done (NOT_FOUND)
            pass
          try:
            value = self._client.key_value_try_get(f'{self._prefix}/beat/{i}')
          except Exception:  # noqa: BLE001 - no beat yet
            value = None
          if value != last[i][0]:
            last[i] = (value, time.monotonic())
      except Exception:  # noqa: BLE001 - the store is unreachable
        if self._stop.is_set():
          return
        self._lost(f'the coordinator (process 0 of {count}) cannot be reached')
      now = time.monotonic()  # a process not yet seen gets time to start up (compiles)
      gone = sorted(i for i, (value, seen) in last.items()
                    if now - seen > self.LOST_AFTER_S * (1 if value is not None else 8))
      if gone and not self._stop.is_set():
        self._lost(', '.join(f'process {i}' for i in gone) + f' of {count} stopped '
                   f'answering {self.LOST_AFTER_S:.0f} s ago')


def lost_process_error(error: BaseException) -> None:
  """An error in a multi-host run that a dead peer explains (a collective: gloo "Connection
  reset by peer"; a barrier) waits here for the `PeerWatch` verdict, which ends the process
  with one line; other errors return at once to be raised."""
  import re
  import time
  if jax.process_count() == 1 or not re.search(
      r'Gloo|gloo|Connection (reset|closed|refused)|peer|DEADLINE_EXCEEDED|UNAVAILABLE|'
      r'[Bb]arrier|coordination|heartbeat', str(error)):
    return
  time.sleep(PeerWatch.LOST_AFTER_S + 10)


def host_shard_info() -> tuple[int, int]:
  """`(shard_id, num_shards)` for this host's slice of the input data.

  Example:
    >>> host_shard_info()
    (0, 1)
  """
  return jax.process_index(), jax.process_count()
