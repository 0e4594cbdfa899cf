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
import hashlib
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
# How JAX sees a generation's chips on Cloud TPU (the first mode is its default): v4 and v5p run
# in megacore mode, one device per chip holding both TensorCores and the chip's HBM; v2/v3 show
# one device per core; v5e/v6e have one core per chip. libtpu's compile-only default for v4 is
# one device per core, so 'megacore' is asked for by its chip configuration name.
TPU_MODES = {'v2': ('per_core',), 'v3': ('per_core',), 'v4': ('megacore', 'per_core'),
             'v5p': ('megacore',), 'v5e': ('per_chip',), 'v6e': ('per_chip',)}
TPU_3D = ('v4', 'v5p')
STEPS = ('train', 'eval')
# The model's features of a train batch (`jaxprompt.data.features.MODEL_FEATURES`, which
# imports TensorFlow): [batch, inputs] for the encoder, [batch, targets] for the decoder.
MODEL_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
                  'decoder_loss_weights')


class PlanError(ValueError):
  """A bad plan option; the message names it and the fix."""


@dataclasses.dataclass
class Target:
  """Devices to compile for and what one of them holds."""

  name: str
  devices: list
  device_memory: int | None  # bytes per device; None: no budget to judge against
  compiler: str
  settings: dict = dataclasses.field(default_factory=dict)  # the run's, as `plan` compiled it
  compiler_options: dict = dataclasses.field(default_factory=dict)  # passed to each compile
  note: str | None = None  # how to read the budget, printed under the target line


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
  fingerprint: str | None = None  # the program's StableHLO hash (`fingerprint`)
  # The frozen backbone as the run holds it (its dtype, its shardings): the bytes of the largest
  # device's shards, and of the largest host's distinct shards (what that host reads to load).
  backbone_per_device: int | None = None
  backbone_per_host: int | None = None

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


def _compile(lowered, mesh, step, device_memory, compiler_options=None) -> Row:
  program = fingerprint(lowered)
  start = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    stats = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001 - jax's runtime error: only running out of memory is a result
    found = _OUT_OF_HBM.search(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or not found:
      raise
    return Row(mesh, step, None, None, _bytes(*found.group(1, 2)), None, None,
               time.perf_counter() - start, _bytes(*found.group(3, 4)),
               compiler_error=found.group(0), fingerprint=program)
  return Row(mesh, step, stats.argument_size_in_bytes, stats.output_size_in_bytes,
             stats.temp_size_in_bytes, stats.alias_size_in_bytes,
             stats.generated_code_size_in_bytes, time.perf_counter() - start, device_memory,
             fingerprint=program)


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


def tpu_mode(generation: str, mode: str | None) -> str:
  """The device mode of a TPU generation: `mode` if the generation has it, else its default."""
  modes = TPU_MODES.get(generation, ('per_chip',))
  if mode is None:
    return modes[0]
  if mode not in modes:
    raise PlanError(f'--tpu_mode {mode}: a {generation} runs as {" or ".join(modes)}')
  return mode


GPU_TARGETS = ('h100', 'a100')  # jaxprompt/gpu_targets/NAME.txtpb
# jax's GPU client takes this fraction of device memory for its pool by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); a program must fit in the pool.
GPU_POOL_FRACTION = 0.75
# XLA:GPU's Triton GEMM tiling fails on some XXL shapes when it cannot autotune (no device);
# cuBLAS GEMMs instead, as for any compile without autotuning.
GPU_COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False}


def gpu_target(target: str) -> tuple[str, str] | None:
  """'h100', 'a100:8', 'h100:2x8' or 'FILE.txtpb[:N]' -> (target config file, XLA:GPU's
  topology 'slices x hosts x GPUs per host'); None for a target that is no GPU."""
  m = re.fullmatch(r'(.+?)(?::(?:(\d+)x)?(\d+))?', target)
  name, hosts, gpus = m.group(1), int(m.group(2) or 1), int(m.group(3) or 1)
  if name in GPU_TARGETS:
    path = os.path.join(os.path.dirname(__file__), 'gpu_targets', f'{name}.txtpb')
  elif name.endswith(('.txtpb', '.pbtxt')):
    path = name
    if not os.path.isfile(path):
      raise PlanError(f'--target {target}: no GPU target config file {path}')
  else:
    return None
  if hosts < 1 or gpus < 1:
    raise PlanError(f'--target {target}: give a count of at least 1, e.g. {name}:8')
  return path, f'1x{hosts}x{gpus}'


def has_cuda_plugin() -> bool:
  """Whether jax's CUDA 12 plugin (the gpu-plan extra) is installed."""
  import importlib.util
  return importlib.util.find_spec('jax_cuda12_plugin') is not None


def _gpu_devices(target: str, path: str, topology: str, device_memory: int | None) -> Target:
  """XLA:GPU's compile-only devices for the target config in `path` (jax's CUDA plugin, no
  GPU and no CUDA libraries needed)."""
  if not has_cuda_plugin():
    raise PlanError(f"--target {target} compiles with XLA:GPU; install jax's CUDA plugin (pip "
                    "install 'jaxprompt[gpu-plan]') or plan for cpu:N")
  from jax.experimental import topologies
  with open(path) as f:
    config = f.read()
  found = re.search(r'device_memory_size:\s*(\d+)', config)
  try:
    devices = list(topologies.get_topology_desc(platform='cuda', target_config=config,
                                                topology=topology).devices)
  except Exception as e:  # noqa: BLE001 - the plugin's error, named with its file
    if 'topology not implemented' in str(e):  # the plugin did not register: CUDA was asked for
      raise PlanError(f'--target {target}: jax started with its CUDA plugin and no GPU; start '
                      'the process with JAX_PLATFORMS=cpu') from None
    raise PlanError(f'--target {target}: XLA:GPU could not take {path} '
                    f'({" ".join(str(e).split())[:200]})') from None
  fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', GPU_POOL_FRACTION))
  pool = int(int(found.group(1)) * fraction) if found else None
  note = None
  if device_memory is None and pool is not None:
    note = (f"budget: jax's memory pool, {fraction:g} of the GPU's "
            f'{int(found.group(1)) / GiB:.2f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)')
  return Target(f'{target} ({topology})', devices, device_memory or pool,
                f'XLA:GPU ({devices[0].device_kind}), ahead of time', note=note,
                compiler_options=dict(GPU_COMPILER_OPTIONS))


def _plugin_without_gpu() -> None:
  """With jax's CUDA plugin installed (the gpu-plan extra) on a machine with no GPU, jax runs on
  the CPU: the plugin then registers without checking for CUDA (it still compiles for GPUs) and
  prints no CUDA traceback. Before jax starts only; a platform the user chose is kept."""
  import jax
  from jax._src import xla_bridge
  from jaxprompt.host import has_gpu
  if (has_cuda_plugin() and not has_gpu() and not jax.config.jax_platforms
      and not xla_bridge.backends_are_initialized()):
    jax.config.update('jax_platforms', 'cpu')


def target_devices(target: str, device_memory: int | None = None,
                   mode: str | None = None) -> Target:
  """The devices of `target` ('cpu:N', a TPU topology or a GPU) and each one's memory
  (`device_memory` overrides it). A TPU's devices are as JAX sees them on Cloud TPU
  (`TPU_MODES`; `mode` picks the other where the generation has two); a GPU's budget is jax's
  memory pool on it."""
  import jax
  _plugin_without_gpu()
  m = re.fullmatch(r'cpu:(\d+)', target)
  if m and mode is not None:
    raise PlanError(f'--tpu_mode {mode}: for a TPU target; {target} is CPU devices')
  gpu = None if m else gpu_target(target)
  if gpu:
    if mode is not None:
      raise PlanError(f'--tpu_mode {mode}: for a TPU target; {target} is a GPU')
    return _gpu_devices(target, *gpu, device_memory)
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
  mode = tpu_mode(name.split(':')[0], mode)
  if mode == 'megacore':
    kwargs['chip_config_name'] = 'megacore'
  devices = list(topologies.get_topology_desc(name, 'tpu', **kwargs).devices)
  kind = devices[0].device_kind
  chips = len({tuple(d.coords) for d in devices})
  per_device = TPU_CHIP_MEMORY.get(kind)
  if per_device is not None:
    per_device = per_device * chips // len(devices)
  return Target(f'{target} ({name}, {mode})', devices, device_memory or per_device,
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


def _t5_config(model, config, backbone):
  """The backbone's T5 config as the run gets it: the checkpoint's own (read, no weights), else
  the named config (`tune.config`, `--config`), else `model`."""
  from jaxprompt.model import T5Config, get_config
  if backbone:
    from jaxprompt.checkpoints.backbone import resolve_backbone_path
    return resolve_model(resolve_backbone_path(backbone))
  for given, read in ((config, get_config), (model, resolve_model)):
    if isinstance(given, T5Config):
      return given
    if given:
      return read(given)
  raise PlanError('plan needs the backbone: give --model (a config name, model gin file or '
                  'checkpoint), --config or --backbone')


def _abstract_init(method, ctx):
  """The method's initial (trainable, extras) as structs: its `init` traced on the abstract
  weights. Only shapes matter, so prompts are shaped by the 'uniform' initialiser (the
  run's initialiser may need the vocabulary or a file; every one gives the same shape)."""
  import jax
  import numpy as np
  shaped = ctx.config.replace(prompt_init='uniform', init_from=None)
  table = ctx.backbone.params['token_embedder']['embedding']
  # `Context.embedding` reads the table as numpy: a zero view of its shape, no memory.
  zeros = np.broadcast_to(np.zeros((), table.dtype), table.shape)

  def init(params):
    params = {**params, 'token_embedder': {**params['token_embedder'], 'embedding': zeros}}
    bb = dataclasses.replace(ctx.backbone, params=params)
    return method.init(jax.random.PRNGKey(0), dataclasses.replace(ctx, backbone=bb, config=shaped))
  try:
    return jax.eval_shape(init, ctx.backbone.params)
  except (TypeError, ValueError, jax.errors.JAXTypeError) as e:  # needs concrete data
    raise PlanError(f'--method {method.name}: its trainable cannot be shaped without data '
                    f'({" ".join(str(e).split())[:200]})') from None


def plan(model=None, *, target: str = 'cpu:1',
         meshes: Sequence[tuple[int, int]] | None = None, device_memory: int | str | None = None,
         steps: Sequence[str] = STEPS, tpu_mode: str | None = None,
         inputs_length: int | None = None, targets_length: int | None = None,
         task: str | None = None, backbone: str | None = None, method: str = 'prompt_tuning',
         config=None, optimizer=None, model_dir: str | None = None, report=None,
         on_target=None, **options) -> tuple[Target, list[Row]]:
  """Compiles the train and eval steps `jaxprompt.tune` would run, for each mesh of `target`,
  with abstract weights.

  The run is described as `tune` takes it (`task`, `backbone`, `method`, `config` and every
  other option: RunConfig fields and the method's own, with tune's defaults), and goes through
  tune's own pieces: its RunConfig, `tuning.resolve_config` (the task's lengths, else the
  paper's), `load_run_backbone`, the method's `init` (traced), `hold_backbone` and `run_engine`
  (`partitioning.mesh_from_config`: `num_partitions`, `model_parallel_submesh`).

  Args:
    model: a config name, a checkpoint or a `T5Config` (a model gin file goes through the CLI,
      whose gin parsing is tune's);
      stands for `config` / `backbone` when they are not given.
    target: 'cpu:N', a TPU topology ('v3-8', 'v4-16', 'v5p-8', 'v4:2x2x2', ...) or a GPU
      ('h100', 'a100:8', 'h100:2x8', 'FILE.txtpb'; `gpu_target`).
    meshes: (data, model) shapes to compile. By default the run's own mesh when it names one
      (`num_partitions` > 1 or `model_parallel_submesh`), else every factorisation.
    device_memory: bytes (or '80GB') per device to judge fit against; the TPU's own by default.
    steps: which of 'train', 'eval' to compile.
    tpu_mode: 'megacore' or 'per_core' where the TPU generation has both (`target_devices`).
    inputs_length, targets_length: `feature_lengths`, as the CLI's flags.
    model_dir: accepted (a run's option) and unused.
    report: called with each row as it is measured (the CLI prints them as they come).
    on_target: called with the `Target` before the first compile.

  Returns:
    (target, rows): one row per (mesh, step).
  """
  del model_dir
  label = model if isinstance(model, str) else None
  import jax
  import jax.numpy as jnp
  from jaxprompt import tuning
  from jaxprompt.checkpoints.backbone import Backbone
  from jaxprompt.config import ConfigError, RunConfig, split_options
  from jaxprompt.methods import Context, get_method, method_names
  from jaxprompt.model import Transformer
  from jaxprompt.model.network import param_shapes
  if isinstance(model, str) and model.endswith('.gin'):
    raise PlanError(f'{model}: a model gin file binds more than its config (its activation dtype, '
                    'the run file\'s macros); plan it as tune reads it: jaxprompt plan '
                    f'--gin_file={model}, or give plan() the config name and options')
  if method not in method_names():
    raise PlanError(f'--method {method}: no such method; choose one of '
                    f'{", ".join(method_names())}')
  m = get_method(method)
  if inputs_length or targets_length:
    options['feature_lengths'] = {**(options.get('feature_lengths') or {}), **{
        k: v for k, v in (('inputs', inputs_length), ('targets', targets_length)) if v}}
  run_options, method_options = split_options(options, m.Options)
  try:
    run_config = tuning.resolve_config(RunConfig(method=method, **run_options), task)
  except ConfigError as e:  # the run's own check, as tune raises it
    raise PlanError(str(e)) from None
  tuning.check_backbone_options(m, run_config)
  t5_config = _t5_config(model, config, backbone)
  tgt = target_devices(target, parse_memory(device_memory), tpu_mode)
  abstract = Backbone(Transformer(t5_config), param_shapes(t5_config, False), backbone,
                      'abstract')
  own_mesh = run_config.model_parallel_submesh is not None or run_config.num_partitions > 1
  configs = ([run_config] if own_mesh and not meshes else
             [run_config.replace(num_partitions=parts, model_parallel_submesh=None)
              for _, parts in meshes or candidate_meshes(len(tgt.devices))])
  for shape in meshes or ():
    if math.prod(shape) != len(tgt.devices):
      raise PlanError(f'--meshes {shape}: {shape[0]} x {shape[1]} is not the '
                      f'{len(tgt.devices)} devices of {tgt.name}')
  batch_size, accumulate = run_config.batch_size, run_config.accumulate_steps
  lengths = run_config.feature_lengths
  c = run_config
  module = tuning.load_run_backbone(m, abstract, None, configs[0], tgt.devices).module
  tgt.settings = dict(
      model=label or config or backbone, method=method, batch=batch_size,
      inputs=lengths['inputs'], prompt=c.prompt_length, targets=lengths['targets'],
      activations=module.config.dtype, params='float32' if m.trains_backbone else c.param_dtype,
      remat=c.remat_policy, scan_layers=c.scan_layers, accumulate_steps=accumulate,
      parameter_partitioning_dims=c.parameter_partitioning_dims,
      activation_partitioning_dims=c.activation_partitioning_dims,
      dropout=module.config.dropout_rate)
  if on_target:
    on_target(tgt)
  batch_shapes = {k: ((batch_size, lengths['targets' if k.startswith('decoder') else 'inputs']),
                      jnp.int32) for k in MODEL_FEATURES}
  if m.uses_task_index:
    batch_shapes['task_index'] = ((batch_size,), jnp.int32)
  rows = []
  for i, run in enumerate(configs):
    data = len(tgt.devices) // (math.prod(run.model_parallel_submesh)
                                if run.model_parallel_submesh else run.num_partitions)
    if batch_size % (data * accumulate):
      if not meshes and not own_mesh:
        continue  # not a mesh this run can use
      raise PlanError(f'mesh {(data, len(tgt.devices) // data)}: a microbatch of '
                      f'{batch_size // accumulate} does not split over {data} data shards')
    bb = tuning.load_run_backbone(m, abstract, None, run, tgt.devices)
    ctx = Context(bb, task or '', (task,) if task else (), None, None, run,
                  m.Options(**method_options))
    trainable, extras = _abstract_init(m, ctx)
    tx = optimizer or m.optimizer(ctx)
    ctx, trainable = tuning.hold_backbone(m, ctx, trainable)
    eng, state = tuning.run_engine(m, ctx, trainable, extras, tx, tgt.devices)
    shape = (int(eng.mesh.shape['data']), int(eng.mesh.shape['model']))
    batch = eng.abstract_batch(batch_shapes)
    held = held_shares(eng.frozen['backbone'])
    for step in steps:
      lowered = (eng.lower_train(state, batch) if step == 'train'
                 else eng.lower_eval(state.trainable, batch))
      row = _compile(lowered, shape, step, tgt.device_memory, tgt.compiler_options)
      row.backbone_per_device, row.backbone_per_host = held
      rows.append(row)
      if report:
        report(row)
  return tgt, rows


# Measured peak of a sharded load over the bytes a host places (benchmarks/load_memory.py,
# T5.1.1-large shape, 8 CPU devices: Hugging Face safetensors 1.09-1.13x, T5X Orbax 1.18-1.26x).
LOAD_PEAK_MEASURED = '1.1-1.3x'


def held_shares(tree) -> tuple[int, int]:
  """(bytes on the fullest device, bytes of distinct shards on the fullest host) of a tree of
  sharded arrays or structs: counted from each leaf's sharding, nothing allocated."""
  import collections
  import jax
  device, host = collections.Counter(), collections.Counter()
  for leaf in jax.tree_util.tree_leaves(tree):
    seen = collections.defaultdict(set)
    size = leaf.dtype.itemsize
    for d, index in leaf.sharding.devices_indices_map(leaf.shape).items():
      box = tuple(i.indices(n)[:2] for i, n in zip(index, leaf.shape))  # (start, stop) per axis
      n = math.prod(stop - start for start, stop in box) * size
      device[d.id] += n
      if box not in seen[d.process_index]:
        seen[d.process_index].add(box)
        host[d.process_index] += n
  return max(device.values(), default=0), max(host.values(), default=0)


def fingerprint(lowered) -> str:
  """A program's identity: the hash of its StableHLO text."""
  return 'sha256:' + hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]


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
  if row.step == 'train' and row.backbone_per_host:
    line += (f'\n{"":<26}backbone held: {format_size(row.backbone_per_device)} per device, '
             f'{format_size(row.backbone_per_host)} per host (a load peaks at '
             f'{LOAD_PEAK_MEASURED} a host\'s share: benchmarks/load_memory.py)')
  return line


def describe_settings(settings: dict[str, Any]) -> str:
  return 'plan: ' + ', '.join(f'{k} {v}' for k, v in settings.items())


def describe_target(target: Target) -> list[str]:
  """What the rows are measured on and by which compiler, then the table's header."""
  memory = ('no device budget (give --device_memory)' if target.device_memory is None
            else f'{target.device_memory / GiB:.2f} GiB per device')
  lines = [f'target {target.name}: {len(target.devices)} devices, {memory}; compiled by '
           f'{target.compiler}']
  if target.note:
    lines.append(target.note)
  if target.compiler == 'XLA:CPU' and target.device_memory is not None:
    lines.append("note: XLA:CPU is not a GPU's compiler (it fuses and schedules differently); "
                 'plan for h100 / a100 (XLA:GPU, the gpu-plan extra) instead')
  lines += ['per-device memory (memory_analysis() of each compiled step):', HEADER]
  return lines


def print_target(target: Target) -> None:
  print('\n'.join(describe_target(target)), flush=True)
