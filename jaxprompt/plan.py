"""`jaxprompt plan`: will a run fit? Compiles the run's own train and eval steps ahead of time
with abstract weights, for every candidate mesh of a device target, and reports the compiled
programs' per-device memory.

Nothing is estimated and no weight is allocated: the backbone and the trainable are
`jax.ShapeDtypeStruct`s, `engine.build_engine` attaches the run's shardings to them, and
`Engine.lower_train` / `lower_eval` lower the very jitted steps `tune` calls; XLA's
`memory_analysis()` of each compiled program gives the figures. Targets:

  cpu:N      N CPU devices (always available; XLA:CPU's compiler, so a stand-in for a GPU)
  v3-8, v3-32, v4-16, v5p-8, v5p-2 (one chip), or libtpu's own 'v4:2x2x2' spelling: a TPU
             topology compiled by libtpu's compiler without a TPU (`pip install
             'jaxprompt[tpu]'`)

    >>> rows = plan('t5_1_1_xxl', target='v3-8', batch_size=32, inputs_length=512,
    ...             targets_length=8, prompt_length=100)            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Sequence

GiB = 1 << 30
# HBM per chip (nominal; the runtime keeps a few hundred MB of it), by `device_kind`.
TPU_CHIP_MEMORY = {'TPU v2': 16 * GiB, 'TPU v3': 32 * GiB, 'TPU v4': 32 * GiB,
                   'TPU v5': 95 * GiB, 'TPU v5p': 95 * GiB, 'TPU v5 lite': 16 * GiB,
                   'TPU v5e': 16 * GiB, 'TPU v6 lite': 32 * GiB, 'TPU v6e': 32 * GiB}
TPU_CORES_PER_CHIP = {'v2': 2, 'v3': 2, 'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1}
TPU_3D = ('v4', 'v5p')
STEPS = ('train', 'eval')
METHODS = ('prompt_tuning', 'model_tuning')


class PlanError(ValueError):
  """A bad plan option; the message names it and the fix."""


@dataclasses.dataclass
class Target:
  """Devices to compile for and what one of them holds."""

  name: str
  devices: list
  device_memory: int | None  # bytes per device; None: no budget to judge against
  compiler: str


@dataclasses.dataclass
class Row:
  """One compiled step on one mesh: XLA's per-device memory analysis, in bytes.

  A TPU compile that runs out of HBM stops with an error instead of a program; the row then
  holds what the compiler said it needed (`temporaries`, the rest None) and its message.
  """

  mesh: tuple[int, int]
  step: str
  arguments: int | None
  outputs: int | None
  temporaries: int | None
  alias: int | None
  generated_code: int | None
  compile_seconds: float
  device_memory: int | None
  compiler_error: str | None = None

  @property
  def total(self) -> int | None:
    """Arguments + outputs + temporaries, less what outputs reuse of donated arguments."""
    if self.compiler_error:
      return None
    return self.arguments + self.outputs + self.temporaries - self.alias

  @property
  def fits(self) -> bool | None:
    if self.compiler_error:
      return False
    return None if self.device_memory is None else self.total <= self.device_memory

  def to_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), total=self.total, fits=self.fits)


# libtpu's verdict on a program that does not fit (sizes in binary units: 25.44G = 25.44 GiB).
_OUT_OF_HBM = re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available '
                         r'HBM \(([\d.]+)([KMGT]?)\)')


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * 1024 ** ' KMGT'.index(unit or ' '))


def _compile(lowered, mesh, step, device_memory) -> Row:
  start = time.perf_counter()
  try:
    stats = lowered.compile().memory_analysis()
  except Exception as e:  # noqa: BLE001 - jax's runtime error: only running out of memory is a result
    found = _OUT_OF_HBM.search(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or not found:
      raise
    return Row(mesh, step, None, None, _bytes(*found.group(1, 2)), None, None,
               time.perf_counter() - start, _bytes(*found.group(3, 4)),
               compiler_error=found.group(0))
  return Row(mesh, step, stats.argument_size_in_bytes, stats.output_size_in_bytes,
             stats.temp_size_in_bytes, stats.alias_size_in_bytes,
             stats.generated_code_size_in_bytes, time.perf_counter() - start, device_memory)


def parse_memory(text: str | float | int | None) -> int | None:
  """'80GB' (1e9), '95GiB' (2**30), '16000MB', or a number of bytes."""
  if text is None or isinstance(text, (int, float)):
    return None if text is None else int(text)
  m = re.fullmatch(r'\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*', text, re.I)
  if not m:
    raise PlanError(f'--device_memory {text!r}: give a size such as 80GB or 95GiB')
  unit = (m.group(2) or 'B').upper().rstrip('B')
  scale = {'': 1, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12,
           'KI': 2**10, 'MI': 2**20, 'GI': 2**30, 'TI': 2**40}[unit]
  return int(float(m.group(1)) * scale)


def _tpu_topology(name: str) -> tuple[str, dict]:
  """'v3-8' (cores, Cloud TPU's names) or 'v4:2x2x2' (chips, libtpu's) -> libtpu's topology
  name and arguments."""
  m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', name)
  if m:
    gen, cores = m.group(1), int(m.group(2))
    per_chip = TPU_CORES_PER_CHIP.get(gen)
    if per_chip is None or cores % per_chip:
      raise PlanError(f'--target {name}: unknown TPU generation or core count; give e.g. v3-8, '
                      "v4-16, v5p-8 or libtpu's 'v4:2x2x2'")
    dims = [1, 1, 1] if gen in TPU_3D else [1, 1]
    while math.prod(dims) < cores // per_chip:  # grow the smallest axis: 2x2, 4x4, 2x2x2, ...
      dims[dims.index(min(dims))] *= 2
    if math.prod(dims) != cores // per_chip:
      raise PlanError(f'--target {name}: {cores // per_chip} chips make no torus; give a power '
                      'of two')
    name = f'{gen}:' + 'x'.join(map(str, dims))
  m = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+)*)', name)
  if not m:
    raise PlanError(f'--target {name}: give cpu:N, a TPU such as v3-8, v4-16, v5p-8, or '
                    "libtpu's 'v4:2x2x2'")
  dims = [int(d) for d in m.group(2).split('x')]
  kwargs = {}
  if math.prod(dims) < 4:  # smaller than one host: say so, libtpu assumes 2x2(x1) per host
    kwargs['chips_per_host_bounds'] = tuple(dims) + (1,) * (3 - len(dims))
  return name, kwargs


def target_devices(target: str, device_memory: int | None = None) -> Target:
  """The devices of `target` ('cpu:N' or a TPU topology) and each one's memory (`device_memory`
  overrides it, e.g. a GPU's budget judged on a stand-in)."""
  import jax
  m = re.fullmatch(r'cpu:(\d+)', target)
  if m:
    n = int(m.group(1))
    devices = jax.devices('cpu')
    if len(devices) < n:
      raise PlanError(f'--target {target}: this process has {len(devices)} CPU devices; set '
                      f'XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts')
    return Target(target, devices[:n], device_memory, 'XLA:CPU')
  name, kwargs = _tpu_topology(target)
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise PlanError(f'--target {target} compiles with libtpu; install it (pip install '
                    "'jaxprompt[tpu]') or plan for cpu:N") from None
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compiling only: share the library
  from jax.experimental import topologies
  devices = list(topologies.get_topology_desc(name, 'tpu', **kwargs).devices)
  kind = devices[0].device_kind
  chips = len({tuple(d.coords) for d in devices})
  per_device = TPU_CHIP_MEMORY.get(kind)
  if per_device is not None:
    per_device = per_device * chips // len(devices)
  return Target(f'{target} ({name})', devices, device_memory or per_device,
                f"libtpu ({kind}), ahead of time")


def resolve_model(model: str):
  """A T5 config name ('t5_1_1_xxl'), a model gin file (`models/t5_1_1/xxl.gin`, shipped or a
  path) or a checkpoint (its config is read, no weights) -> `T5Config`."""
  from jaxprompt.model import NAMED_CONFIGS, get_config
  if model in NAMED_CONFIGS:
    return get_config(model)
  if model.endswith('.gin'):
    from jaxprompt.config import ConfigError, resolve_gin_file
    try:
      path = resolve_gin_file(model)
    except ConfigError as e:
      raise PlanError(str(e)) from None
    with open(path) as f:
      found = re.search(r"^tune\.config\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    if not found:
      raise PlanError(f'--model {model}: binds no tune.config; give a config name instead')
    return get_config(found.group(1))
  from jaxprompt.checkpoints import read_shapes
  try:
    return read_shapes(model)[1]['config']
  except (FileNotFoundError, ValueError) as e:
    raise PlanError(f'--model {model}: not a config name ({", ".join(sorted(NAMED_CONFIGS)[:4])}'
                    f', ...), a model gin file or a readable checkpoint ({e})') from None


def candidate_meshes(device_count: int) -> list[tuple[int, int]]:
  """Every (data, model) factorisation of the device count."""
  return [(device_count // m, m) for m in range(1, device_count + 1) if device_count % m == 0]


def _backbone(config, remat_policy: str, scan_layers: bool, param_dtype: str):
  """The module and its frozen params as a run holds them (`tuning.hold_backbone`): remat and
  scan set on the module, the params (stacked when scanned) in `param_dtype`, as structs."""
  from jaxprompt.model import Transformer, layout
  from jaxprompt.model.network import param_shapes
  module = Transformer(config).clone(remat_policy=remat_policy, scan_layers=scan_layers)
  return module, layout.cast_frozen(param_shapes(config, scan_layers), param_dtype)


def plan(model, *, batch_size: int, inputs_length: int, targets_length: int,
         prompt_length: int = 100, method: str = 'prompt_tuning', target: str = 'cpu:1',
         meshes: Sequence[tuple[int, int]] | None = None, dtype: str = 'bfloat16',
         param_dtype: str = 'float32', remat_policy: str = 'none', scan_layers: bool = False,
         accumulate_steps: int = 1, device_memory: int | str | None = None,
         parameter_partitioning_dims: int = 1, activation_partitioning_dims: int = 1,
         logical_axis_rules=None, steps: Sequence[str] = STEPS,
         report=None, on_target=None) -> tuple[Target, list[Row]]:
  """Compiles `method`'s train and eval steps for each mesh of `target` with abstract weights.

  Args:
    model: a config name, a model gin file, a checkpoint path, or a `T5Config`.
    batch_size, inputs_length, targets_length, prompt_length: the global batch's shapes.
    method: prompt_tuning (the prompt trains, the backbone is frozen) or model_tuning.
    target: 'cpu:N' or a TPU topology ('v3-8', 'v4-16', 'v5p-8', 'v4:2x2x2', ...).
    meshes: (data, model) shapes; every factorisation of the device count by default.
    dtype: activation dtype; param_dtype: the frozen backbone's dtype.
    remat_policy, scan_layers: the model's (when it has them).
    accumulate_steps: microbatches per train step.
    parameter_partitioning_dims, activation_partitioning_dims, logical_axis_rules: the axis
      rules, as `RunConfig` takes them.
    device_memory: bytes (or '80GB') per device to judge fit against; the TPU's own by default.
    report: called with each row as it is measured (the CLI prints them as they come).
    on_target: called with the `Target` before the first compile.

  Returns:
    (target, rows): one row per (mesh, step).
  """
  import jax
  import jax.numpy as jnp
  from jaxprompt.config import RunConfig
  from jaxprompt.methods import Context, get_method
  from jaxprompt.model import T5Config
  from jaxprompt.prompts import prompt as prompt_lib
  from jaxprompt.train import engine as engine_lib, partitioning
  if method not in METHODS:
    raise PlanError(f'--method {method}: plan knows {", ".join(METHODS)}')
  if batch_size % accumulate_steps:
    raise PlanError(f'--batch_size {batch_size} does not split into --accumulate_steps '
                    f'{accumulate_steps} microbatches')
  config = model if isinstance(model, T5Config) else resolve_model(model)
  config = config.replace(dtype=dtype)
  tgt = target_devices(target, parse_memory(device_memory))
  if on_target:
    on_target(tgt)
  if method == 'model_tuning' and param_dtype != 'float32':
    raise PlanError('--param_dtype: model tuning trains the backbone, which is kept float32')
  module, backbone = _backbone(config, remat_policy, scan_layers, param_dtype)
  m = get_method(method)
  run_config = RunConfig(method=method, batch_size=batch_size, prompt_length=prompt_length,
                         accumulate_steps=accumulate_steps, param_dtype=param_dtype,
                         remat_policy=remat_policy, scan_layers=scan_layers,
                         parameter_partitioning_dims=parameter_partitioning_dims,
                         activation_partitioning_dims=activation_partitioning_dims,
                         logical_axis_rules=logical_axis_rules)
  rules = partitioning.rules_from_config(run_config)
  tx = m.optimizer(Context(None, '', (), None, None, run_config, None))
  if m.trains_backbone:  # the trainable backbone (and its optimizer state) stays float32
    frozen = {}
    trainable = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                       backbone)
  else:
    frozen = {'backbone': backbone}
    trainable = jax.eval_shape(
        lambda: prompt_lib.prompt_tree(jnp.zeros((prompt_length, config.emb_dim), jnp.float32)))
  lengths = {'encoder_input_tokens': inputs_length, 'decoder_input_tokens': targets_length,
             'decoder_target_tokens': targets_length, 'decoder_loss_weights': targets_length}
  batch_shapes = {k: ((batch_size, n), jnp.int32) for k, n in lengths.items()}
  rows = []
  for shape in meshes or candidate_meshes(len(tgt.devices)):
    data, parts = shape
    if data * parts != len(tgt.devices):
      raise PlanError(f'--meshes {shape}: {data} x {parts} is not the {len(tgt.devices)} devices '
                      f'of {tgt.name}')
    if batch_size % (data * accumulate_steps):
      if meshes:
        raise PlanError(f'--meshes {shape}: a microbatch of {batch_size // accumulate_steps} '
                        f'does not split over {data} data shards')
      continue  # not a mesh this run can use
    mesh = partitioning.make_mesh(parts, tgt.devices)
    eng, state = engine_lib.build_engine(
        module, m.model_inputs, tx, frozen, trainable, mesh=mesh,
        rules=rules,
        trainable_is_backbone=m.trains_backbone, accumulate_steps=accumulate_steps)
    batch = eng.abstract_batch(batch_shapes)
    for step in steps:
      lowered = (eng.lower_train(state, batch) if step == 'train'
                 else eng.lower_eval(state.trainable, batch))
      row = _compile(lowered, (data, parts), step, tgt.device_memory)
      rows.append(row)
      if report:
        report(row)
  return tgt, rows


def format_size(n: int | None) -> str:
  """Bytes in binary units: '12.70 GiB', '340.0 MiB', '118.0 KiB'."""
  if n is None:
    return '?'
  for unit, size in (('GiB', GiB), ('MiB', 1 << 20), ('KiB', 1 << 10)):
    if n >= size:
      return f'{n / size:.2f} {unit}' if unit == 'GiB' else f'{n / size:.1f} {unit}'
  return f'{n} B'


HEADER = (f'{"mesh (data, model)":<19} {"step":<5} {"arguments":>10} {"outputs":>10} '
          f'{"temporaries":>11} {"alias":>10} {"total":>10}  {"fits":<4} {"compile s":>9}')


def format_row(row: Row) -> str:
  fits = '-' if row.fits is None else ('yes' if row.fits else 'no')
  sizes = [format_size(n) for n in (row.arguments, row.outputs, row.temporaries, row.alias,
                                     row.total)]
  line = (f'{str(row.mesh):<19} {row.step:<5} {sizes[0]:>10} {sizes[1]:>10} {sizes[2]:>11} '
          f'{sizes[3]:>10} {sizes[4]:>10}  {fits:<4} {row.compile_seconds:9.1f}')
  if row.compiler_error:
    line += (f'\n{"":<26}compiler: out of HBM, temporaries {format_size(row.temporaries)} > '
             f'{format_size(row.device_memory)} available')
  return line


def describe_settings(settings: dict[str, Any]) -> str:
  return 'plan: ' + ', '.join(f'{k} {v}' for k, v in settings.items())


def describe_target(target: Target) -> list[str]:
  """What the rows are measured on and by which compiler, then the table's header."""
  memory = ('no device budget (give --device_memory)' if target.device_memory is None
            else f'{target.device_memory / GiB:.2f} GiB per device')
  lines = [f'target {target.name}: {len(target.devices)} devices, {memory}; compiled by '
           f'{target.compiler}']
  if target.compiler == 'XLA:CPU' and target.device_memory is not None:
    lines.append("note: XLA:CPU is not a GPU's compiler (it fuses and schedules differently); "
                 'read this as a stand-in, or plan for v5p-2 (one 95 GiB chip)')
  lines += ['per-device memory (memory_analysis() of each compiled step):', HEADER]
  return lines


def print_target(target: Target) -> None:
  print('\n'.join(describe_target(target)), flush=True)
