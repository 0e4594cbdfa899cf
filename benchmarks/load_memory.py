"""Peak host memory of loading a big backbone straight into its shardings (issue 25 item 1).

For each format (Hugging Face safetensors, T5X Orbax, T5X legacy zarr) a random checkpoint of
the config's shape (T5.1.1-large by default: 783M params, ~2.9 GiB float32) is written with
the library's own writers, then loaded over 8 CPU devices on each mesh. Every write and every
load runs in a fresh process, whose peak RSS is the kernel's high-water mark (`VmHWM` from
/proc/self/status); the RSS left after placement is `VmRSS` once loading returns.

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/load_memory.py --work /tmp/load_memory
    python benchmarks/load_memory.py --config t5_1_1_base --formats hf --meshes 1x8   # quick
    python benchmarks/load_memory.py --formats t5x_orbax --meshes none   # writing only

Meshes: `1x8` = (data 1, model 8) with T5X's standard rules; `8x1_2d` = (data 8, model 1) with
2-D parameter sharding (`parameter_partitioning_dims=2`: `embed` on `data`). With 1-D rules an
(8, 1) mesh replicates every weight on all 8 devices; on CPU devices are host memory, so that
case holds 8 copies by design and is not run (`--meshes 8x1` runs it anyway).

Writes JSON to `benchmarks/results/load_memory.json` (or `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {'1x8': (8, 1), '8x1_2d': (1, 2), '8x1': (1, 1), '2x4': (4, 1)}  # (model, param dims)
FORMATS = ('hf', 't5x_orbax', 't5x_legacy')


def memory() -> dict[str, float]:
  """VmHWM and VmRSS of this process, GiB."""
  out = {}
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(('VmHWM', 'VmRSS')):
        out[line.split(':')[0]] = int(line.split()[1]) / 2**20
  return out


def disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def write_case(fmt: str, config_name: str, work: str) -> dict:
  """(child) Random params of the config's shape, then the format's writer; the write's peak
  is measured above the params held in memory (`rss_before`), and `runtime_gib` is the RSS of
  the writer's imports before the params exist."""
  import numpy as np
  import orbax.checkpoint  # noqa: F401  the writers' runtime, imported before the mark
  import tensorstore  # noqa: F401
  from jaxprompt import checkpoints
  from jaxprompt.model import get_config
  runtime = memory()['VmRSS']
  config = get_config(config_name)
  rng = np.random.default_rng(0)
  flat = {}
  for path, shape in checkpoints.expected_shapes(config).items():
    value = rng.standard_normal(shape, dtype=np.float32)
    value *= np.float32(1.0 if path == ('token_embedder', 'embedding') else 0.05)
    flat[path] = (value + np.float32(1.0)) if path[-1] == 'scale' else value
  params = checkpoints.unflatten(flat)
  del flat
  before = memory()
  start = time.perf_counter()
  target = os.path.join(work, fmt)
  if fmt == 'hf':
    path = checkpoints.save_hf(params, config, target)
  elif fmt == 't5x_orbax':
    path = checkpoints.save_t5x_orbax(params, target, step=1)
  else:
    path = checkpoints.save_t5x_legacy(params, target, step=1)
  seconds = time.perf_counter() - start
  params_bytes = sum(v.nbytes for v in checkpoints.flatten(params).values())
  return dict(case='write', format=fmt, path=path, seconds=seconds, params_gib=params_bytes / 2**30,
              checkpoint_gib=disk_bytes(target) / 2**30, runtime_gib=runtime,
              rss_before_gib=before['VmRSS'],
              peak_gib=memory()['VmHWM'])


def load_case(path: str, mesh_name: str, dtype: str) -> dict:
  """(child, 8 CPU devices) Loads `path` into the engine's shardings of the mesh."""
  import jax
  from jaxprompt.checkpoints import flatten, load_checkpoint
  from jaxprompt.train import partitioning
  from jaxprompt.train.engine import backbone_shardings_for
  parts, dims = MESHES[mesh_name]
  mesh = partitioning.make_mesh(parts)
  rules = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=dims)
  jax.device_put(0.0).block_until_ready()  # the runtime and its devices exist before the mark
  before = memory()
  start = time.perf_counter()
  _, params, info = load_checkpoint(
      path, shardings=lambda c: backbone_shardings_for(c, mesh, rules), dtype=dtype)
  seconds = time.perf_counter() - start
  after = memory()
  placed = sum(s.data.nbytes for leaf in flatten(params).values() for s in leaf.addressable_shards)
  return dict(case='load', format=info['format'], mesh=mesh_name, dtype=dtype,
              mesh_shape=dict(mesh.shape), seconds=seconds, rss_before_gib=before['VmRSS'],
              peak_gib=after['VmHWM'], resident_after_gib=after['VmRSS'],
              placed_gib=placed / 2**30, fingerprint=info['fingerprint'])


def child(argv: list[str], devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, __file__, '--child', *argv], env=env,
                       capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f'child {argv} failed:\n{out.stderr[-4000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--work', default='/tmp/jaxprompt_load_memory')
  parser.add_argument('--config', default='t5_1_1_large')
  parser.add_argument('--formats', default=','.join(FORMATS))
  parser.add_argument('--meshes', default='1x8,8x1_2d', help="'none': write only")
  parser.add_argument('--dtypes', default='float32')
  parser.add_argument('--json', default=os.path.join(REPO, 'benchmarks', 'results',
                                                     'load_memory.json'))
  parser.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    kind, *rest = args.child
    result = write_case(*rest) if kind == 'write' else load_case(*rest)
    print(json.dumps(result))
    return
  rows = []
  os.makedirs(args.work, exist_ok=True)
  for fmt in args.formats.split(','):
    written = child(['write', fmt, args.config, args.work], devices=1)
    rows.append(written)
    ckpt = written['checkpoint_gib']
    print(f'{fmt:11s} write   peak {written["peak_gib"]:.2f} GiB = params '
          f'{written["params_gib"]:.2f} + runtime {written["runtime_gib"]:.2f} + '
          f'{written["peak_gib"] - written["rss_before_gib"]:.2f} GiB; checkpoint {ckpt:.2f} GiB; '
          f'{written["seconds"]:.0f} s', flush=True)
    for mesh in [] if args.meshes == 'none' else args.meshes.split(','):
      for dtype in args.dtypes.split(','):
        row = child(['load', written['path'], mesh, dtype], devices=8)
        row['checkpoint_gib'] = ckpt
        rows.append(row)
        print(f'{fmt:11s} {mesh:7s} {dtype:8s} peak {row["peak_gib"]:.2f} GiB '
              f'({row["peak_gib"] / ckpt:.2f}x checkpoint), resident after '
              f'{row["resident_after_gib"]:.2f} GiB, placed {row["placed_gib"]:.2f} GiB, '
              f'before {row["rss_before_gib"]:.2f} GiB; {row["seconds"]:.0f} s', flush=True)
    shutil.rmtree(os.path.join(args.work, fmt), ignore_errors=True)
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, 'w') as f:
    json.dump(dict(config=args.config, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
