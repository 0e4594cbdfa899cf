"""The prompt initialiser a run asks for, by name (`RunConfig.prompt_init`)."""

from __future__ import annotations

import sys

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
    pf = read_prompt(file)
    check_compatible(pf, embedding.shape[-1], backbone, path=file)
    value = pf.masked_value()
    if length is not None and value.shape[-2] != length:
      raise ValueError(f'{file}: prompt length {value.shape[-2]} differs from the run\'s '
                       f'prompt length {length}; set --prompt_length {value.shape[-2]}')
    return initializers.from_array(value)
  raise ValueError(f'unknown prompt init {kind!r}')


def prompt_initializer(ctx):
  """The initialiser of a run's `Context` (jaxprompt.methods.base)."""
  c = ctx.config
  return make_prompt_init(c.prompt_init, ctx.embedding, ctx.vocabulary, ctx.labels,
                          c.prompt_init_scale, c.prompt_init_text, c.prompt_init_file,
                          backbone=ctx.backbone, length=c.prompt_length)
