"""Prompts written by runs of google-research/prompt-tuning (the T5X reference implementation).

Such a run (model directory MODEL_DIR) leaves its prompt in two places:

* `MODEL_DIR/numpy_checkpoints/checkpoint_N/encoder.prompt.prompt.prompt`: the prompt at step
  N as a numpy (.npy format) [P, d] array, in a file named by its parameter path with dots and
  no suffix (the repository's `train.utils.Checkpointer.save_numpy`; a decoder-only model's is
  `decoder.prompt.prompt.prompt`); kept apart from T5X's checkpoint retention;
* `MODEL_DIR/checkpoint_N/`: the T5X checkpoint (legacy msgpack + zarr, or Orbax), the prompt at
  `encoder/prompt/prompt/prompt` of the params beside the frozen weights.

`prompts.files.read_prompt` reads either folder (and the numpy file itself, and a
`numpy_checkpoints` folder: its latest step) through this module's readers, which give the
[P, d] value and the metadata saying where it came from (format, source, step). Nothing here
unpickles.
"""

from __future__ import annotations

import os
import re

import numpy as np

NUMPY_DIR = 'numpy_checkpoints'
ENCODER_PROMPT = 'encoder.prompt.prompt.prompt'
FORMAT_NUMPY = 'prompt-tuning numpy checkpoint'
T5X_PROMPT = ('encoder', 'prompt', 'prompt', 'prompt')


def is_prompt_file_name(name: str) -> bool:
  """A numpy checkpoint's file name: a dotted parameter path ending in a `prompt` module's
  `prompt` parameter (`encoder.prompt.prompt.prompt`)."""
  parts = os.path.basename(name).split('.')
  return len(parts) >= 3 and parts[-1] == 'prompt' and parts[-2] == 'prompt'


def _step(name: str) -> int | None:
  m = re.fullmatch(r'checkpoint_(\d+)', os.path.basename(name.rstrip('/')))
  return int(m.group(1)) if m else None


def numpy_prompt_file(directory: str) -> str | None:
  """The prompt file of a `numpy_checkpoints/checkpoint_N` folder (of the latest complete step
  for a `numpy_checkpoints` folder), or None when `directory` holds none."""
  if os.path.basename(directory.rstrip('/')) == NUMPY_DIR:
    steps = sorted((s, n) for n in os.listdir(directory) for s in [_step(n)]
                   if s is not None and os.path.isdir(os.path.join(directory, n)))
    for _, name in reversed(steps):  # `.tmp-*` / `.backup-*` folders are not steps
      found = numpy_prompt_file(os.path.join(directory, name))
      if found:
        return found
    return None
  names = sorted(n for n in os.listdir(directory)
                 if is_prompt_file_name(n) and os.path.isfile(os.path.join(directory, n)))
  if ENCODER_PROMPT in names:
    return os.path.join(directory, ENCODER_PROMPT)
  return os.path.join(directory, names[0]) if names else None


def read_numpy_prompt(file: str) -> tuple[np.ndarray, dict]:
  """A numpy checkpoint's prompt file -> (value, metadata: format, source, step)."""
  try:
    value = np.load(file, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'{file}: not a plain numpy array ({e}); a prompt-tuning numpy checkpoint '
                     'holds the prompt saved with np.save') from None
  meta = {'format': FORMAT_NUMPY, 'source': os.path.abspath(file),
          'param': os.path.basename(file).replace('.', '/')}
  step = _step(os.path.dirname(os.path.abspath(file)))
  if step is not None:
    meta['step'] = step
  return np.asarray(value, np.float32), meta


def read_t5x_prompt(path: str) -> tuple[np.ndarray, dict] | None:
  """The prompt params of a T5X checkpoint (a prompt-tuning run's) -> (value, metadata), or None when
  `path` is not a T5X checkpoint; a one-line error when it is one without a prompt."""
  from jaxprompt import checkpoints as ckpt  # pylint: disable=g-import-not-at-top
  from jaxprompt.checkpoints.leaves import read_whole  # pylint: disable=g-import-not-at-top
  try:
    fmt, where = ckpt.detect(path)
  except ckpt.CheckpointError:
    return None
  if fmt not in ('t5x_legacy', 't5x_orbax'):
    return None
  found = (ckpt.t5x_legacy if fmt == 't5x_legacy' else ckpt.t5x_orbax).leaves(where)
  prompts = sorted(p for p in found if ckpt.is_prompt_path(p))
  if not prompts:
    raise ValueError(f'{where}: a T5X checkpoint without prompt params (no '
                     f'{"/".join(T5X_PROMPT)}); it is a backbone: pass it as --backbone, and a '
                     'prompt file (or a prompt-tuning run\'s checkpoint) as the prompt')
  param = T5X_PROMPT if T5X_PROMPT in prompts else prompts[0]
  value = np.asarray(read_whole(found[param]), np.float32)
  meta = {'format': f'{fmt} checkpoint', 'source': where, 'param': ckpt.path_str(param)}
  step = ckpt.step_of(where)
  if step is not None:
    meta['step'] = step
  return value, meta


def read_dir_prompt(path: str) -> tuple[np.ndarray, dict] | None:
  """A prompt-tuning numpy checkpoint folder or T5X checkpoint -> (value, metadata), or None when
  `path` is neither; a one-line error for a numpy checkpoint folder without a prompt."""
  file = numpy_prompt_file(path)
  if file:
    return read_numpy_prompt(file)
  name = os.path.basename(os.path.abspath(path))
  parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
  if name == NUMPY_DIR or parent == NUMPY_DIR:
    raise ValueError(f'{path}: a prompt-tuning numpy checkpoint folder without a prompt (no '
                     f'{ENCODER_PROMPT} in {NUMPY_DIR}/checkpoint_N); pass a checkpoint_N folder '
                     'that the run wrote completely')
  return read_t5x_prompt(path)


__all__ = ['ENCODER_PROMPT', 'FORMAT_NUMPY', 'NUMPY_DIR', 'is_prompt_file_name',
           'numpy_prompt_file', 'read_dir_prompt', 'read_numpy_prompt', 'read_t5x_prompt']
