"""Where checkpoints lie: local paths or remote ones (`gs://...`, through TensorFlow's gfile,
imported only for those), and the refusal of pickle files."""

from __future__ import annotations

import os

from jaxprompt.checkpoints.tree import CheckpointError


def is_remote(path: str) -> bool:
  return '://' in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
  return sorted(n.rstrip('/') for n in names)


def join(*parts: str) -> str:
  return os.path.join(*[str(p) for p in parts])


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _gfile().GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')


def _refuse_pickle(path: str) -> CheckpointError:
  return CheckpointError(
      f'{path}: refusing a PyTorch pickle file (loading pickle can run code); convert it to '
      'safetensors first, e.g. transformers `model.save_pretrained(dir, safe_serialization=True)`')
