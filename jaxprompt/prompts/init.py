"""The prompt initialiser a run asks for, by name (`RunConfig.prompt_init`)."""

from __future__ import annotations

import sys
from typing import Callable

from jaxprompt.prompts import initializers
from jaxprompt.prompts.files import check_compatible, read_prompt


def make_prompt_init(kind: str, embedding, vocabulary=None, labels=None, scale: float = 0.5,
                     text: str | None = None, file: str | None = None, population: int = 5000,
                     backbone=None, length: int | None = None):
  """An initialiser by name (see `jaxprompt.prompts.initializers`)."""
  if kind == 'uniform':
    return initializers.uniform(scale, symmetric=True)
  if kind == 'uniform_positive':
    return initializers.uniform(scale, symmetric=False)
  if kind == 'sampled_vocab':
    return initializers.sampled_vocab(embedding, population)
  if kind == 'class_labels':
    if not labels:
      print('prompt init: the task has no label verbalizers; using sampled vocabulary',
            file=sys.stderr)
      return initializers.sampled_vocab(embedding, population)
    ids = [list(vocabulary.encode(label)) for label in labels]
    return initializers.class_labels(embedding, ids,
                                     initializers.sampled_vocab(embedding, population))
  if kind == 'text':
    return initializers.text(embedding, list(vocabulary.encode(text)))
  if kind == 'file':
    return initializers.from_array(source_prompt(file, embedding.shape[-1], backbone, length))
  raise ValueError(f'unknown prompt init {kind!r}')


_SOURCE_RESOLVERS: list[Callable[[str], str | None]] = []


def register_source_resolver(resolve: Callable[[str], str | None]) -> None:
  """Adds a way to name a prompt source: `resolve(spec)` returns the prompt file it names, or
  None when `spec` is not its kind. The prompt library (`jaxprompt.methods.library`, imported
  with every method) registers `LIBRARY_DIR:TASK`."""
  if resolve not in _SOURCE_RESOLVERS:
    _SOURCE_RESOLVERS.append(resolve)


def resolve_source(spec: str) -> str:
  """A prompt source: a prompt file, a PEFT adapter directory, or a registered kind of name
  (`LIBRARY_DIR:TASK`, the library's prompt of TASK) -> a path `read_prompt` reads."""
  for resolve in _SOURCE_RESOLVERS:
    path = resolve(spec)
    if path is not None:
      return path
  return spec


def source_prompt(spec: str, width: int, backbone=None, length: int | None = None,
                  mismatch: str = 'error'):
  """The [P, d] value of a source prompt, fitted to `length` as `mismatch` says ('error',
  'truncate' to the first positions, or 'tile' the source's rows cyclically)."""
  import numpy as np
  path = resolve_source(spec)
  pf = read_prompt(path)
  check_compatible(pf, width, backbone, path=path)
  value = np.asarray(pf.masked_value())
  if value.ndim != 2:
    raise ValueError(f'{path}: holds a stack of {value.shape[0]} prompts; a source is one prompt')
  if length is None or value.shape[0] == length:
    return value
  if mismatch == 'truncate' and value.shape[0] > length:
    return value[:length]
  if mismatch == 'tile':
    return value[np.arange(length) % value.shape[0]]
  raise ValueError(f'{path}: source prompt length {value.shape[0]} differs from the run\'s '
                   f'prompt length {length}; set --prompt_length {value.shape[0]} or '
                   '--init_length_mismatch truncate (when longer) / tile')


def prompt_initializer(ctx):
  """The initialiser of a run's `Context` (jaxprompt.methods.base): `init_from` (transfer) when
  given, else `prompt_init`."""
  c = ctx.config
  if c.init_from:
    return initializers.from_array(source_prompt(c.init_from, ctx.width, ctx.backbone,
                                                 c.prompt_length, c.init_length_mismatch))
  return make_prompt_init(c.prompt_init, ctx.embedding, ctx.vocabulary, ctx.labels,
                          c.prompt_init_scale, c.prompt_init_text, c.prompt_init_file,
                          backbone=ctx.backbone, length=c.prompt_length)
