"""The lab backbone: a tiny T5.1.1-shaped model pretrained by multi-task model tuning.

It is trained on the prefixed SOURCE tasks (`lab_sources`), as T5's multi-task
pretraining, through the same engine as everything else (`tune(method='model_tuning')`),
and saved as a real T5X checkpoint (Orbax) with its vocabulary, config and a manifest in
the cache. A fixed seed gives the same checkpoint; a second call reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # JAX, optax and the model load when a backbone is built, not for its path
  import optax

  from jaxprompt.model import T5Config

BUILD_STEPS = 1200
BATCH_SIZE = 64
# Pretraining from scratch uses AdamW (warm-up + cosine): on this model and mixture it reached
# 100% on the membership sources in 1000 steps where T5X's Adafactor (lr 0.01, no momentum)
# was at 52-100% after 1500 (this note is the only record). Prompt tuning on top of the
# frozen backbone uses T5X's Adafactor as the paper does.
LEARNING_RATE = 3e-3

# A preset is everything that shapes a backbone besides the seed: model size, pretraining
# steps, batch, peak learning rate, warm-up, the target length the mixture is trained at and the
# mixture's rate per source skill (missing skills: rate 1). All of it goes into the cache digest.
# Measurements behind each choice: the configurations table in docs/lab-results.md.
PRESETS: dict[str, dict] = {
    # The demo's backbone (`jaxprompt tune` with no arguments): 1.35 min on 2 Zen 5 cores.
    'demo': dict(steps=BUILD_STEPS, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                 warmup=200, emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256, layers=3,
                 rates={}, targets_length=None, relpos_lr_scale=1.0),
    # The methods' evidence (SPoT transfer, transferability, XPrompt): every source skill with a
    # target counterpart known at >= 97.5% with its prefix (configuration E, docs/lab-results.md).
    # 900 steps of batch 128, 8 heads of 16, the relative-position tables at 10x the learning
    # rate, and the mixture re-weighted towards counting, position, extreme and filter: about 1.2x
    # the demo's build time.
    'methods': dict(steps=900, batch_size=128, num_heads=8, head_dim=16, relpos_lr_scale=10.0,
                    rates={'membership': 0.5, 'parity': 0.5, 'order': 0.5, 'count': 2.0,
                           'position': 2.0, 'extreme': 2.0, 'filter': 3.0}),
    # Configuration C, the `methods` preset until 2026-12-01 (filter ~68% with its prefix): the
    # backbone of the SPoT and transferability evidence measured before then; kept to reproduce it.
    'methods_c': dict(batch_size=128, num_heads=8, head_dim=16, relpos_lr_scale=10.0,
                      rates={'membership': 0.5, 'parity': 0.5, 'order': 0.25, 'count': 2.0,
                             'position': 2.0, 'extreme': 2.0, 'filter': 1.5}),
}
DEFAULT_PRESET = 'demo'


def preset_config(preset: str | dict | None = None, steps: int | None = None) -> dict:
  """The full settings of a preset (a name of `PRESETS` or a dict overriding 'demo')."""
  if preset is None:
    preset = DEFAULT_PRESET
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f'unknown lab backbone preset {preset!r}; choose from {", ".join(PRESETS)}')
    cfg = dict(PRESETS['demo'], **PRESETS[preset], name=preset)
  else:
    cfg = dict(PRESETS['demo'], **preset)
    cfg.setdefault('name', 'custom')
  cfg['rates'] = dict(sorted(dict(cfg.get('rates') or {}).items()))
  if steps:
    cfg['steps'] = int(steps)
  return cfg


def with_width(preset: str | dict | None, width: int | None) -> str | dict | None:
  """`preset` at another model width (a second lab backbone, e.g. the projector's source):
  emb_dim = width, mlp_dim = 2 x width, the preset's number of heads of width // heads each,
  every other setting the preset's; named '<preset>_w<width>'. None or the preset's own width:
  the preset unchanged (same cache path)."""
  cfg = preset_config(preset)
  if not width or int(width) == cfg['emb_dim']:
    return preset
  width, heads = int(width), cfg['num_heads']
  if width <= 0 or width % heads:
    raise ValueError(f'width {width}: must be a positive multiple of the preset\'s {heads} heads')
  cfg.pop('steps')
  return dict(cfg, emb_dim=width, mlp_dim=2 * width, head_dim=width // heads,
              name=f'{cfg["name"]}_w{width}')


def lab_config(vocab_size: int, preset: str | dict | None = None) -> 'T5Config':
  """The T5.1.1 config of a preset; 'demo': ~1.2M parameters, d 128, 4 heads of 32, mlp 256,
  3 + 3 layers, gated-gelu, untied."""
  from jaxprompt.model import T5Config
  p = preset_config(preset)
  padded = -(-vocab_size // 8) * 8
  return T5Config(vocab_size=padded, emb_dim=p['emb_dim'], num_heads=p['num_heads'],
                  head_dim=p['head_dim'], mlp_dim=p['mlp_dim'], num_encoder_layers=p['layers'],
                  num_decoder_layers=p['layers'], dropout_rate=0.0,
                  mlp_activations=('gelu', 'linear'), logits_via_embedding=False)


def _cache_dir(cache_dir: str | None) -> str:
  from jaxprompt.lab.cache import default_cache_dir
  return cache_dir or default_cache_dir()


def _digest_key(p: dict, seed: int) -> dict:
  """What the cache digest covers. The 'demo' preset keeps the key it had before presets."""
  from jaxprompt.lab.cache import vocabulary_digest
  from jaxprompt.version import __version__
  key = dict(steps=p['steps'], seed=seed, batch=p['batch_size'], lr=p['learning_rate'],
             opt='adamw', vocab=vocabulary_digest(), version=__version__)
  rest = {k: v for k, v in p.items() if k not in ('steps', 'batch_size', 'learning_rate')}
  if rest != {**{k: v for k, v in preset_config('demo').items()
                 if k not in ('steps', 'batch_size', 'learning_rate')}, 'name': 'demo'}:
    key['preset'] = rest  # every other setting and the preset's name
  return key


def backbone_dir(steps: int | None = None, seed: int = 0, cache_dir: str | None = None,
                 preset: str | dict | None = None) -> str:
  """Where the backbone of these settings lives (a digest of everything that shapes it)."""
  p = preset_config(preset, steps)
  key = json.dumps(_digest_key(p, seed), sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  name = '' if p['name'] == 'demo' else f'{p["name"]}_'
  return os.path.join(_cache_dir(cache_dir), f'backbone_{name}{p["steps"]}steps_seed{seed}_{digest}')


def checkpoint_path(directory: str, steps: int) -> str:
  return os.path.join(directory, f'checkpoint_{steps}')


def _optimizer(schedule, relpos_lr_scale: float, params) -> 'optax.GradientTransformation':
  """AdamW on the schedule; the relative-position bias tables at `relpos_lr_scale` times it.

  Those tables are scalars (one per head and distance bucket) that must grow to several units
  before a head attends sharply to a neighbour (what position and order tasks need), while Adam
  moves a parameter by about the learning rate per step: at 3e-3 and ~1,000 steps they can move
  by ~2 at most.
  """
  import jax
  import optax
  base = optax.adamw(schedule, weight_decay=0.0)
  if relpos_lr_scale == 1.0:
    return base
  fast = optax.adamw(lambda step: schedule(step) * relpos_lr_scale, weight_decay=0.0)
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: 'relpos' if 'relpos_bias' in jax.tree_util.keystr(path) else 'base', params)
  return optax.multi_transform({'base': base, 'relpos': fast}, labels)


def build(steps: int | None = None, seed: int = 0, cache_dir: str | None = None,
          force: bool = False, progress: bool = True, preset: str | dict | None = None) -> str:
  """Trains (or reuses) the lab backbone of `preset` and returns its checkpoint path.

  Args:
    steps: pretraining steps; the preset's when None.
    seed: initialisation and data-order seed.
    cache_dir: `$JAXPROMPT_CACHE/lab` when None.
    force: rebuild even when cached.
    progress: show a progress bar.
    preset: a name of `PRESETS` ('demo' by default) or a dict of settings overriding 'demo'.
  """
  p = preset_config(preset, steps)
  steps = p['steps']
  out = backbone_dir(steps, seed, cache_dir, p)
  ckpt = checkpoint_path(out, steps)
  built = os.path.join(out, 'manifest.json')
  if os.path.exists(built) and not force:
    if progress:
      print(f'lab: using the cached lab backbone ({ckpt})', file=sys.stderr)
    return ckpt
  # Processes sharing a cache (parallel jobs, test workers) build each backbone once: the first
  # holds the lock while it builds, the others wait for it and then use its result.
  with _build_lock(out, progress):
    if os.path.exists(built) and not force:
      if progress:
        print(f'lab: using the lab backbone another process built ({ckpt})', file=sys.stderr)
      return ckpt
    from jaxprompt.lab.tasks import register_lab_tasks, registration
    # The backbone pretrains on the world of its own seed; the lab tasks the caller evaluates
    # on stay as they were (a second backbone of another seed built mid-study must not swap
    # them).
    previous = registration()
    try:
      return _build(p, steps, seed, cache_dir, out, ckpt, progress,
                    register_lab_tasks(cache_dir=cache_dir, seed=seed))
    finally:
      register_lab_tasks(**(previous or {'cache_dir': cache_dir}))


@contextlib.contextmanager
def _build_lock(out: str, progress: bool):
  """An exclusive `fcntl` lock on `out.lock` for the block (released if the process dies)."""
  import fcntl
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + '.lock', 'a') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if progress:
        print(f'lab: waiting for another process building {out}', file=sys.stderr)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _build(p, steps, seed, cache_dir, out, ckpt, progress, vocab) -> str:
  """Pretrains and writes the backbone (`build`'s work, its tasks registered with `seed`)."""
  import jax
  import numpy as np
  import optax

  from jaxprompt.checkpoints import save_t5x_orbax
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH, lab_vocabulary_path, register_sources_mixture
  from jaxprompt.model import Transformer, init_params
  from jaxprompt.tuning import tune
  mixture = register_sources_mixture(p['rates'])
  cfg = lab_config(vocab.vocab_size, p)
  module = Transformer(cfg)
  params = init_params(cfg, seed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  print(f'lab: pretraining a {n_params / 1e6:.2f}M-parameter T5.1.1-shaped backbone '
        f'(preset {p["name"]}) on {mixture} for {steps} steps of batch {p["batch_size"]} '
        f'(first use only; cached in {out})', file=sys.stderr)
  start = time.time()
  work = tempfile.mkdtemp(prefix='jaxprompt_lab_build_')
  lr = p['learning_rate']
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(p['warmup'], steps // 10), steps,
                                                lr * 0.1)
  optimizer = _optimizer(schedule, p['relpos_lr_scale'], params)
  lengths = dict(SEQUENCE_LENGTH)
  if p['targets_length']:
    lengths['targets'] = p['targets_length']
  result = tune(mixture, backbone=(module, params), model_dir=os.path.join(work, 'run'),
                method='model_tuning', train_steps=steps, batch_size=p['batch_size'],
                feature_lengths=lengths, eval_period=steps, log_period=50, seed=seed,
                eval_split=None, progress=progress, keep_checkpoints=1,
                optimizer=optimizer)  # no validation: `source_accuracy` measures the result
  minutes = (time.time() - start) / 60
  tmp_out = tempfile.mkdtemp(prefix=os.path.basename(out) + '.tmp', dir=os.path.dirname(out))
  os.chmod(tmp_out, 0o755)  # as a plain directory would be (mkdtemp's is the owner's only)
  try:
    save_t5x_orbax(jax.device_get(result.trainable), tmp_out, steps)
    with open(os.path.join(tmp_out, 'config.json'), 'w') as f:
      json.dump({'t5x_T5Config': cfg.to_dict()}, f, indent=1)
    shutil.copy(lab_vocabulary_path(cache_dir), os.path.join(tmp_out, 'vocabulary.model'))
    manifest = dict(kind='jaxprompt lab backbone', preset=p['name'], settings=p, steps=steps,
                    seed=seed, batch_size=p['batch_size'], optimizer='adamw, warm-up + cosine',
                    learning_rate=lr, parameters=n_params, minutes=round(minutes, 2),
                    mixture=mixture, vocabulary=os.path.basename(lab_vocabulary_path(
                        cache_dir)), t5_config=cfg.to_dict())
    with open(os.path.join(tmp_out, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
  except BaseException:  # a failed write leaves no partial folder in the cache
    shutil.rmtree(tmp_out, ignore_errors=True)
    raise
  shutil.rmtree(work, ignore_errors=True)
  print(f'lab: backbone built in {minutes:.1f} min: {ckpt}', file=sys.stderr)
  return ckpt


def source_accuracy(checkpoint: str, max_examples: int = 200,
                    tasks=None) -> dict[str, float]:
  """Validation score of the backbone on every source task (or `tasks`), asked with its prefix."""
  from jaxprompt.evaluate import evaluate
  from jaxprompt.lab.world import SOURCE_TASKS
  from jaxprompt.lab.tasks import SEQUENCE_LENGTH, register_lab_tasks, seqio_name
  from jaxprompt.checkpoints.backbone import load_backbone
  register_lab_tasks()
  from jaxprompt.train.evaluation import primary_score
  backbone = load_backbone(checkpoint)
  scores = {}
  for task in tasks or SOURCE_TASKS:
    metrics = evaluate(seqio_name(task, prefixed=True), backbone=backbone, split='validation',
                       feature_lengths=SEQUENCE_LENGTH, max_examples=max_examples, batch_size=100)
    scores[task] = primary_score(metrics)
  return scores
