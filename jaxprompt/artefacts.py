"""What `jaxprompt info PATH` says of every artefact the project writes, with its provenance.

Kinds, recognised from their own files (nothing is loaded but headers, metadata and indexes):

| kind | recognised by |
|---|---|
| run | a directory with `manifest.json` (tune, spot sources, a rewound prune stage, ...) |
| prompt_library | a directory with `index.json` of format `jaxprompt.library/*` |
| prune | a directory with `prune.json` (`jaxprompt prune`) |
| projector | a safetensors file with `projector/*` tensors (`jaxprompt project train`) |
| prompt | a prompt file (`.safetensors` / `.npy`), a PEFT adapter directory or a prompt-tuning
  `numpy_checkpoints` folder; projected, pruned and library prompts name their projector, masks
  or source; one from another tool's files names its format and source |
| checkpoint | anything else: a T5X / HF checkpoint (`jaxprompt.checkpoints.inspect`) |
"""

from __future__ import annotations

import json
import os
from typing import Any

KINDS = ('run', 'prompt_library', 'prune', 'projector', 'prompt', 'checkpoint')


def kind_of(path: str) -> str:
  """The kind of artefact at `path` (see the module docstring)."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, 'manifest.json')):
      return 'run'
    if os.path.isfile(os.path.join(path, 'index.json')):
      return 'prompt_library'
    if os.path.isfile(os.path.join(path, 'prune.json')):
      return 'prune'
    if os.path.isfile(os.path.join(path, 'adapter_config.json')):
      return 'prompt'
    from jaxprompt.prompts import prompt_tuning_files as ptf
    if ptf.numpy_prompt_file(path):  # prompt-tuning's numpy_checkpoints(/checkpoint_N)
      return 'prompt'
    return 'checkpoint'
  if os.path.isfile(path) and os.path.basename(path).endswith('.prompt.prompt.prompt'):
    return 'prompt'
  if path.endswith('.safetensors') and os.path.isfile(path):
    if _safetensors_keys(path) & {'projector/w1'}:
      return 'projector'
    if not os.path.exists(os.path.join(os.path.dirname(path) or '.', 'config.json')):
      return 'prompt'
  if path.endswith('.npy') and os.path.isfile(path):
    return 'prompt'
  return 'checkpoint'


def describe(path: str) -> dict[str, Any]:
  """`{'kind': ..., 'path': ..., ...}`: what the artefact is and where it came from."""
  kind = kind_of(path)
  out = {'kind': kind, 'path': os.path.abspath(path)}
  out.update(_DESCRIBERS[kind](path))
  return out


def format_description(d: dict[str, Any]) -> str:
  """Aligned lines for a terminal."""
  d = dict(d)
  lines = [f'{d.pop("kind")}: {d.pop("path")}']
  for key, value in d.items():
    if value is None or value == [] or value == {}:
      continue
    if isinstance(value, dict):
      value = ', '.join(f'{k} {_short(v)}' for k, v in value.items())
    elif isinstance(value, (list, tuple)):
      value = ', '.join(map(str, value))
    lines.append(f'  {key:<18} {value}')
  return '\n'.join(lines)


def _short(value) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def _safetensors_keys(path: str) -> set[str]:
  from safetensors import safe_open
  try:
    with safe_open(path, framework='numpy') as f:
      return set(f.keys())
  except Exception:  # noqa: BLE001 - not a safetensors file: not a projector
    return set()


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _run(path: str) -> dict[str, Any]:
  """A run directory: method, task, backbone, how far it got and its best, from its files."""
  manifest = _read_json(os.path.join(path, 'manifest.json'))
  config = manifest.get('config') or {}
  out = {k: manifest.get(k) for k in ('method', 'task', 'backbone_path', 'backbone')}
  out['init'] = (f'from {manifest["init_from"]}' if manifest.get('init_from')
                 else manifest.get('prompt_init'))
  out.update({k: config.get(k, manifest.get(k)) for k in ('batch_size', 'prompt_length', 'seed')})
  summary_path = os.path.join(path, 'summary.json')
  if os.path.exists(summary_path):
    summary = _read_json(summary_path)
    # The steps the run was last asked for: a run resumed to more steps (spot sources' embedding
    # stage, then the rest) says so in its summary, not in the manifest of its first start.
    out.update(state='finished', train_steps=summary.get('train_steps', manifest.get(
        'train_steps')), step=summary.get('step'), best_step=summary.get('best_step'),
               best_metrics=summary.get('best_metrics'))
  else:
    ckpts = os.path.join(path, 'checkpoints')
    done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
    out.update(state='unfinished (resume with --resume)', train_steps=manifest.get('train_steps'),
               step=max(done) if done else 0)
  out['files'] = sorted(f for f in os.listdir(path)
                        if f.endswith(('.safetensors', '.npy', '.jsonl', '.png', '.json'))
                        or f == 'model_best')
  return out


def _library(path: str) -> dict[str, Any]:
  from jaxprompt.methods import library as lib
  index = lib.read_index(path)
  entries = index.get('entries', {})
  backbones = sorted({str(e.get('backbone_fingerprint')) for e in entries.values()})
  return {'format': index.get('format'), 'prompts': len(entries),
          'with_embeddings': sum(bool(e.get('embedding_file')) for e in entries.values()),
          'backbones': backbones,
          'tasks': {t: f'step {e.get("steps")}, {e.get("method") or "?"}'
                       + (f', {_score(e.get("metrics"))}' if e.get('metrics') else '')
                    for t, e in sorted(entries.items())}}


def _score(metrics) -> str:
  if not metrics:
    return ''
  name = next((k for k in ('score', 'accuracy') if k in metrics), next(iter(metrics)))
  return f'{name} {_short(metrics[name])}'


def _prune(path: str) -> dict[str, Any]:
  state = _read_json(os.path.join(path, 'prune.json'))
  identity = state.get('identity', {})
  rows = state.get('rows', {})
  unpruned = state.get('unpruned') or {}
  out = {'method': 'xprompt prune', 'task': identity.get('task'),
         'backbone': identity.get('backbone'), 'state': 'finished' if 'chosen' in state
         else 'unfinished (rerun the same prune to resume)',
         'chosen_fraction': state.get('chosen'),
         'unpruned': _short(unpruned.get('val_before')) if unpruned else None,
         'fractions': {r.get('fraction'): _short(r.get('val_after')) for r in rows.values()}}
  best = os.path.join(path, 'xprompt_best.safetensors')
  out['product'] = best if os.path.exists(best) else None
  return out


def _projector(path: str) -> dict[str, Any]:
  from jaxprompt.methods.projection import load_projector
  _, meta, sources = load_projector(path)
  return {'method': 'projector', 'objective': meta.get('objective') or meta.get('mode'),
          'maps': f'{meta.get("source_length")} x {meta.get("source_width")} -> '
                  f'{meta.get("target_length")} x {meta.get("target_width")}',
          'hidden': meta.get('hidden'), 'activation': meta.get('activation'),
          'source_backbone': meta.get('source_backbone') or meta.get('source_fingerprint'),
          'target_backbone': meta.get('backbone') or meta.get('target_fingerprint'),
          'trained_on': meta.get('task') or meta.get('tasks'),
          'source_prompts': None if sources is None else int(sources.shape[0])}


def _prompt(path: str) -> dict[str, Any]:
  from jaxprompt.prompts.files import read_prompt
  p = read_prompt(path)
  meta = p.metadata
  out = {'shape': f'{tuple(p.value.shape)} (length {p.length}, width {p.width})'}
  if p.token_mask is not None:
    out['token_mask'] = f'{int(p.token_mask.sum())}/{p.token_mask.size} tokens kept'
  if p.piece_mask is not None:
    out['piece_mask'] = f'{int(p.piece_mask.sum())}/{p.piece_mask.size} pieces kept'
  if meta.get('projected_by'):
    out['method'] = 'projected prompt'
    out['projector'] = meta['projected_by']
    out['projected_from'] = meta.get('projected_from')
  else:
    out['method'] = meta.get('method')
  if meta.get('kind'):
    out['kind_of_prompt'] = meta['kind']
  for key in ('format', 'source', 'param', 'peft_type', 'task', 'backbone',
              'backbone_fingerprint', 'source_fingerprint', 'step', 'init', 'masks', 'metrics',
              'jaxprompt_version'):
    if meta.get(key) is not None:
      out[key] = meta[key]
  return out


def _checkpoint(path: str) -> dict[str, Any]:
  from jaxprompt.checkpoints.inspect import describe as describe_checkpoint
  return {'description': describe_checkpoint(path)}


_DESCRIBERS = {'run': _run, 'prompt_library': _library, 'prune': _prune,
               'projector': _projector, 'prompt': _prompt, 'checkpoint': _checkpoint}
