"""Host-process memory: huge pages for XLA's per-step buffer, and handing freed heap back.

XLA:CPU allocates a step's temporaries as one fresh buffer on every execution (about 1 GB
for T5.1.1-small prompt tuning at batch 8); glibc maps it anew each time, so the kernel
faults in and zeroes ~250k small pages per step (~17% of the step's CPU time). With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc backs such mappings with transparent huge
pages instead. Tunables are read at process start, so the command-line entry points
re-execute themselves once with it set (see `benchmarks/README.md` for the measurements).
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import tempfile
from typing import Sequence

HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'JAXPROMPT_SYSTEM_MALLOC'


def has_gpu() -> bool:
  """An NVIDIA or AMD GPU's device file (what the CUDA and ROCm drivers open)."""
  import glob
  return bool(glob.glob('/dev/nvidia[0-9]*') or os.path.exists('/dev/kfd'))


def runs_on_cpu(environ=None) -> bool:
  """Whether jax will run on the CPU, judged without starting it: no accelerator plugin is
  installed, or JAX_PLATFORMS asks for the CPU first."""
  import importlib.util
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  plugins = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin')
  if any(importlib.util.find_spec(p) is not None for p in plugins) and has_gpu():
    return False  # a plugin alone is no GPU: the gpu-plan extra installs one for `plan`
  # libtpu alone is no TPU: the `tpu` extra installs it on any machine for `jaxprompt plan`'s
  # ahead-of-time compiles. A TPU host also has the chips' device files.
  import glob
  has_tpu = glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')
  return not (has_tpu and importlib.util.find_spec('libtpu') is not None)


def huge_pages_env(environ=None) -> dict[str, str] | None:
  """The environment to re-execute with, or None where nothing should change.

  Nothing changes off Linux/glibc, off the CPU backend, when the user set `GLIBC_TUNABLES`
  themselves (or a previous re-execution did), or when `JAXPROMPT_SYSTEM_MALLOC=1` opts out.
  """
  environ = os.environ if environ is None else environ
  if (sys.platform != 'linux' or 'GLIBC_TUNABLES' in environ or environ.get(OPT_OUT)
      or platform.libc_ver()[0] != 'glibc' or not runs_on_cpu(environ)):
    return None
  return dict(environ, GLIBC_TUNABLES=HUGE_PAGES_TUNABLE)


def reexec_argv(module: str, argv: Sequence[str]) -> list[str]:
  """`python [the interpreter's own flags] -P -m module *argv`: `-P` keeps the working
  directory off `sys.path`, so a folder there named like a package (`runs/`, `models/`, a
  clone of this repository) cannot shadow one."""
  import subprocess
  flags = subprocess._args_from_interpreter_flags()  # noqa: SLF001 - the stdlib's own helper
  return [sys.executable, *flags, '-P', '-m', module, *argv]


def reexec_with_huge_pages(module: str, argv: Sequence[str]) -> None:
  """Replaces this process with `python -P -m module *argv` under `huge_pages_env()`, if any."""
  env = huge_pages_env()
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, reexec_argv(module, argv), env)


def release_host_memory(collect: bool = True) -> None:
  """Returns freed heap pages to the OS (glibc `malloc_trim`); a no-op elsewhere.

  Reading a checkpoint and compiling a step leave hundreds of MB freed but resident;
  without this they add to the training loop's peak. `collect`: run the garbage collector
  first (seconds in a big process; not needed for arrays deleted explicitly).
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  if collect:
    gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _muted(fn):
  """Runs `fn()` with file descriptor 2 muted; what it printed is shown if it raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    failed = True
    try:
      result = fn()
      failed = False
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      if failed:
        captured.seek(0)
        sys.stderr.write(captured.read().decode(errors='replace'))
  return result


def import_quietly(module: str) -> None:
  """Imports `module` with file descriptor 2 muted; what it printed is shown if it fails.

  TensorFlow 2.21 prints absl INFO lines (oneDNN, "could not find cuda drivers") while its
  native libraries load, before any log level it honours is applied.
  """
  if module in sys.modules:
    return
  _muted(lambda: importlib.import_module(module))


def hide_accelerators_from_tensorflow() -> None:
  """TensorFlow only feeds data here (seqio, tf.data on the host): it must not see a GPU.

  Otherwise its first op initialises CUDA and reserves most of the GPU's memory beside jax's,
  and on a machine without one prints "failed call to cuInit". Done once, before any op; a
  TensorFlow already initialised by the user's own code is left as it is.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def hide():
    try:
      tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):  # devices already initialised: the user's choice stands
      pass
  _muted(hide)