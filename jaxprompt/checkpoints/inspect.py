"""`jaxprompt info PATH`: what a checkpoint holds, from headers and metadata only (no weights read).

Example:
  >>> print(format_description(describe('t5_1_1_small')))
  t5_1_1_small
    format            named config
    family            t5_1_1 (gated gelu-linear MLP, untied logits)
    parameters        76,961,152 in 190 leaves
    ...
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from jaxprompt.checkpoints import (expected_shapes, is_prompt_path, is_remote, path_str,
                                   read_shapes)
from jaxprompt.model.config import NAMED_CONFIGS, T5Config

_FORMATS = {
    't5x_legacy': 'T5X legacy (msgpack + zarr)',
    't5x_orbax': 'T5X Orbax (OCDBT PyTree)',
    'hf': 'Hugging Face safetensors',
    'named': 'named config',
}


def _family(config: T5Config) -> str:
  mlp = ('gated ' + '-'.join(config.mlp_activations) if len(config.mlp_activations) > 1
         else config.mlp_activations[0])
  logits = 'tied logits' if config.logits_via_embedding else 'untied logits'
  return f'{config.family} ({mlp} MLP, {logits})'


def describe_config(config: T5Config) -> dict[str, Any]:
  """The summary of the parameter tree of `config` (shapes only)."""
  shapes = expected_shapes(config)
  return dict(format='named', path=None, step=None, config=config.to_dict(),
              family=config.family, family_text=_family(config), config_source='given',
              num_params=sum(math.prod(s) for s in shapes.values()), num_leaves=len(shapes),
              dtypes={'float32': len(shapes)}, prompt_params=[])


def describe(path: str) -> dict[str, Any]:
  """Summarises a checkpoint (or a named config such as 't5_1_1_small') without loading it.

  Returns:
    {'format', 'path', 'step', 'config' (dict of T5Config fields), 'config_source', 'family'
    ('t5_1_0' | 't5_1_1' | 'custom'), 'family_text', 'num_params', 'num_leaves', 'dtypes'
    ({stored dtype: leaf count}), 'prompt_params' (prompt leaves a backbone load skips)}.
  """
  if path in NAMED_CONFIGS and (is_remote(path) or not os.path.exists(path)):
    out = describe_config(NAMED_CONFIGS[path])
    out['path'] = path
    return out
  shapes, info = read_shapes(path)
  config = info['config']
  backbone = {p: v for p, v in shapes.items() if not is_prompt_path(p)}
  dtypes: dict[str, int] = {}
  for _, dtype in backbone.values():
    dtypes[dtype] = dtypes.get(dtype, 0) + 1
  return dict(format=info['format'], path=info['path'], step=info['step'],
              config=config.to_dict(), config_source=info['config_source'],
              family=config.family, family_text=_family(config),
              num_params=sum(math.prod(s) for s, _ in backbone.values()),
              num_leaves=len(backbone), dtypes=dtypes,
              prompt_params=sorted(path_str(p) for p in shapes if is_prompt_path(p)),
              prompt_shapes={path_str(p): tuple(s) for p, (s, _) in shapes.items()
                             if is_prompt_path(p)})


def format_description(d: Mapping[str, Any]) -> str:
  """The text `jaxprompt info` prints for a `describe` result."""
  c = d['config']
  rows = [
      ('format', _FORMATS.get(d['format'], d['format'])),
      ('family', d['family_text']),
      ('parameters', f'{d["num_params"]:,} in {d["num_leaves"]} leaves'),
      ('stored dtypes', ', '.join(f'{k} x{v}' for k, v in sorted(d['dtypes'].items()))),
      ('vocab x emb', f'{c["vocab_size"]} x {c["emb_dim"]}'),
      ('heads x head_dim', f'{c["num_heads"]} x {c["head_dim"]}'),
      ('mlp', f'{c["mlp_dim"]} ({"-".join(c["mlp_activations"])})'),
      ('layers enc/dec', f'{c["num_encoder_layers"]} / {c["num_decoder_layers"]}'),
      ('config from', d['config_source']),
  ]
  if d.get('step') is not None:
    rows.insert(1, ('step', str(d['step'])))
  if d.get('prompt_params'):
    rows.append(('prompt params', f'{len(d["prompt_params"])} (skipped when loading a backbone)'))
    for name, shape in (d.get('prompt_shapes') or {}).items():  # a prompt-tuning run's prompt
      rows.append(('  prompt', f'{name} {shape}: a prompt input (eval --prompt, --init_from, '
                               'library add)'))
  return '\n'.join([str(d['path'])] + [f'  {k:<17} {v}' for k, v in rows])
