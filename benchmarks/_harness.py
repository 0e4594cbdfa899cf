"""What the benchmarks share: child processes, timing loops, memory, machine facts, results.

A benchmark that measures in a fresh process (so a peak RSS or a compile belongs to one case
alone) runs itself, or a snippet, as a child that prints one `RESULT <json>` line
(`emit_result`); the parent reads it back with `run_child`. Every figure a benchmark writes
comes with the machine it ran on and its load, since the machines here are shared.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'results')
RESULT_PREFIX = 'RESULT '


# ----------------------------------------------------------------------------- child processes


def child_env(**overrides: str) -> dict[str, str]:
  """This process's environment for a child: TensorFlow quiet, the checkout importable."""
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.update(overrides)
  return env


def emit_result(result: Any) -> None:
  """The child's answer, one line on stdout for `run_child`."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(argv: Sequence[str], env: dict[str, str] | None = None,
              timeout: float | None = None, what: str | None = None) -> Any:
  """Runs `python ARGV...` and returns the last `RESULT` line it printed, decoded.

  A child that fails, or prints no result, raises with the end of its stderr."""
  proc = subprocess.run([sys.executable, *argv], env=env, check=False, capture_output=True,
                        text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f'child {what or list(argv[:3])} failed with exit code {proc.returncode}')
  return json.loads(lines[-1][len(RESULT_PREFIX):])


# ----------------------------------------------------------------------------- memory


def memory_mb() -> dict[str, float]:
  """Current and peak resident set size of this process, MiB (from /proc/self/status)."""
  out = {}
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(('VmRSS:', 'VmHWM:')):
        out[line.split(':')[0]] = int(line.split()[1]) / 1024
  return {'rss': out.get('VmRSS', float('nan')), 'hwm': out.get('VmHWM', float('nan'))}


def release_free_memory() -> None:
  """Returns freed heap pages to the OS (glibc `malloc_trim`); a no-op elsewhere."""
  import ctypes
  import gc
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def reset_peak_memory() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


# ----------------------------------------------------------------------------- timing


def timed_loop(step: Callable[[], Any], warmup: int, steps: int, trim: bool = False) -> dict:
  """Runs `step()` (which must block until done) `warmup` times, then `steps` timed times.

  Returns the first (compiling) step's seconds apart, every timed step's seconds, CPU time
  and minor page faults per step, and the peak RSS of the whole process and of the timed loop
  alone (the high-water mark is reset after the warm-up; `trim` returns freed heap first)."""
  import resource
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(max(warmup - 1, 0)):
    step()
  if trim:
    release_free_memory()
  mem_before = memory_mb()
  reset = reset_peak_memory()
  times = []
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  mem_after = memory_mb()
  return {
      'first_step_s': first,
      'step_times_s': times,
      'user_s_per_step': (r1.ru_utime - r0.ru_utime) / steps,
      'sys_s_per_step': (r1.ru_stime - r0.ru_stime) / steps,
      'minor_faults_per_step': (r1.ru_minflt - r0.ru_minflt) / steps,
      'peak_rss_mb_process': max(mem_before['hwm'], mem_after['hwm']),
      'peak_rss_mb_train': mem_after['hwm'] if reset else float('nan'),
      'rss_mb_end': mem_after['rss'],
  }


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` timed calls of `fn` (which must block until done), seconds."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


# ----------------------------------------------------------------------------- the machine


def processor() -> str:
  """The processor's name as Python sees it (the architecture where it has none)."""
  return platform.processor() or platform.machine()


def machine_facts() -> dict:
  """The platform, processor, CPU count and model (with its vector extensions), Python."""
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'cpus': os.cpu_count(), 'cpu': cpu_identity(), 'python': platform.python_version()}


def cpu_identity() -> dict:
  """The CPU model and its vector extensions: step times differ a lot between machines."""
  info = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key in ('model name', 'cpu family', 'model', 'flags') and key not in info:
          info[key] = value.strip()
  except OSError:
    return {}
  flags = set(info.pop('flags', '').split())
  info['vector'] = sorted(f for f in flags if f.startswith(('avx512f', 'avx512_bf16', 'avx2',
                                                           'amx')))
  return info


# ----------------------------------------------------------------------------- results


def write_json(path: str, report: Any, indent: int = 1, **dump_kwargs: Any) -> str:
  """Writes a benchmark's JSON report, creating its folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=indent, **dump_kwargs)
  return path


def text_table(rows: Sequence[Sequence[str]]) -> str:
  """Fixed-width columns for a terminal: a header row, a rule, the first column left-aligned."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in rows]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)
