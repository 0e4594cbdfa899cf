"""Cross-model prompt projection (Su et al., NAACL 2022, section 5).

    Proj(P) = LayerNorm(W2 act(W1 vec(P) + b1) + b2), reshaped to (p_target, d_target)

with act tanh (the paper) or LeakyReLU (its later code) and a 768-wide hidden layer. LayerNorm
normalises the whole projected vector and has an elementwise scale and bias of shape
(p_target, d_target); the scale starts at the target vocabulary's embedding standard deviation,
so a fresh projector emits prompts of the size of the target's token embeddings.

Two objectives:
* **task tuning** (the paper's better one): the registered method `projector`: its trainable is
  the projector, its frozen extras the source prompt of every task of the run (a
  [n, p_source, d_source] stack; each example projects its own task's prompt, `task_index`),
  `model_inputs = (target backbone, Proj(source prompt))`: the engine's generic step, the
  shared loop, checkpoints and validation;
* **distance minimisation** (`train_distance`): ||Proj(P_s) - P_t||^2 against prompts trained on
  the same tasks on the target backbone (a small full-batch Adam loop: no target model runs).

A projector file is one safetensors file, no pickle: tensors `projector/w1`, `b1`, `w2`, `b2`,
`ln_scale`, `ln_bias`, the training tasks' `source_prompts` and their projections as `prompt`
(so `jaxprompt eval` reads it back as method `projector`), and metadata naming both backbones
(fingerprints), widths, lengths, hidden size, activation, objective and tasks.

    jaxprompt project train --objective task --tasks T1,T2 --source_library LIB_S \
        --target_backbone B --out proj.safetensors
    jaxprompt project apply --projector proj.safetensors --prompt LIB_S:T3 --out t3.safetensors
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt.config import ConfigError
from jaxprompt.methods.library import read_source_prompt
from jaxprompt.methods import Command, register
from jaxprompt.methods.base import Context, Method
from jaxprompt.train import agreement

PROJECTOR_FORMAT = 'jaxprompt.projector/1'
ACTIVATIONS = ('tanh', 'leaky_relu')
LEAKY_SLOPE = 0.01
PARAM_NAMES = ('w1', 'b1', 'w2', 'b2', 'ln_scale', 'ln_bias')


class ProjectionError(ValueError):
  """A bad projector file, prompt or argument; one line naming the fix."""


# ---------------------------------------------------------------------------------------------
# The projector.

def init_projector(rng, source_shape: tuple[int, int], target_shape: tuple[int, int],
                   hidden: int = 768, out_scale: float = 1.0) -> dict[str, jax.Array]:
  """Projector params: LeCun-normal W1 [p_s d_s, h] and W2 [h, p_t d_t], zero biases, LayerNorm
  scale `out_scale` and bias 0, both (p_t, d_t)."""
  k1, k2 = jax.random.split(rng)
  n_in, n_out = int(np.prod(source_shape)), int(np.prod(target_shape))
  init = jax.nn.initializers.lecun_normal()
  return {'w1': init(k1, (n_in, hidden), jnp.float32), 'b1': jnp.zeros((hidden,), jnp.float32),
          'w2': init(k2, (hidden, n_out), jnp.float32), 'b2': jnp.zeros((n_out,), jnp.float32),
          'ln_scale': jnp.full(tuple(target_shape), out_scale, jnp.float32),
          'ln_bias': jnp.zeros(tuple(target_shape), jnp.float32)}


def project(params: Mapping[str, jax.Array], prompt: jax.Array, leaky=0.0) -> jax.Array:
  """Proj of a [p_s, d_s] prompt or a [B, p_s, d_s] batch -> [(B,) p_t, d_t].

  `leaky` > 0 selects LeakyReLU (a traced scalar is fine: it is a method's frozen extra)."""
  target_shape = params['ln_scale'].shape
  batched = prompt.ndim == 3
  x = prompt.reshape((prompt.shape[0], -1) if batched else (-1,)).astype(jnp.float32)
  h = x @ params['w1'] + params['b1']
  h = jnp.where(jnp.asarray(leaky) > 0, jax.nn.leaky_relu(h, LEAKY_SLOPE), jnp.tanh(h))
  y = h @ params['w2'] + params['b2']
  mean = y.mean(-1, keepdims=True)
  var = jnp.square(y - mean).mean(-1, keepdims=True)
  y = (y - mean) * jax.lax.rsqrt(var + 1e-5)
  y = y.reshape(((prompt.shape[0],) if batched else ()) + tuple(target_shape))
  return y * params['ln_scale'] + params['ln_bias']


def _leaky(activation: str) -> float:
  if activation not in ACTIVATIONS:
    raise ProjectionError(f'activation {activation!r}: choose one of {", ".join(ACTIVATIONS)}')
  return 1.0 if activation == 'leaky_relu' else 0.0


def projector_inputs(trainable, frozen, batch):
  """Target backbone, Proj(each example's own task's source prompt)."""
  from jaxprompt.prompts.prompt import select_prompts
  source = select_prompts(frozen['source_prompts'], batch['task_index'])  # [B, p_s, d_s]
  return frozen['backbone'], project(trainable, source, frozen['leaky'])


# ---------------------------------------------------------------------------------------------
# Source prompts.

def _fingerprint_of(meta: Mapping[str, Any]) -> str | None:
  return meta.get('backbone_fingerprint')


def _source_specs(options, tasks: Sequence[str], width: int, length: int) -> list[str]:
  if options.source_library and options.source_prompts:
    raise ConfigError('projector: give source_prompts or source_library, not both')
  if options.source_library:
    return [f'{options.source_library}:{t}' for t in tasks]
  specs = list(options.source_prompts)
  if not specs:  # the no-information baseline: the projector re-parametrises a prompt
    print(f'projector: no source prompts given: projecting fixed random prompts '
          f'(random:{width}:{length}) per task; pass --source_library or --source_prompts',
          file=sys.stderr)
    return [f'random:{width}:{length}'] * len(tasks)
  if len(specs) != len(tasks):
    raise ConfigError(f'projector: {len(specs)} source prompt(s) for {len(tasks)} task(s) '
                      f'({", ".join(tasks)}); give one per task, in order (--source_prompts), or '
                      '--source_library')
  return specs


def load_sources(specs: Sequence[str], seed: int = 0) -> tuple[np.ndarray, str | None]:
  """(stack [n, p, d], the source backbone fingerprint) of one source prompt per task."""
  values, fps = [], set()
  for i, spec in enumerate(specs):
    value, meta = read_source_prompt(spec, seed + i)
    values.append(value)
    if _fingerprint_of(meta):
      fps.add(_fingerprint_of(meta))
  shapes = sorted({v.shape for v in values})
  if len(shapes) > 1:
    raise ProjectionError(f'source prompts differ in shape {shapes}; a projector maps prompts of '
                          'one length and width')
  if len(fps) > 1:
    raise ProjectionError(f'source prompts come from {len(fps)} backbones ({", ".join(sorted(fps))});'
                          ' a projector maps the prompts of one source backbone')
  return np.stack(values), (fps.pop() if fps else None)


# ---------------------------------------------------------------------------------------------
# The method (task-tuning objective).

@dataclasses.dataclass(frozen=True)
class ProjectorOptions:
  """source_prompts: one per task of the run, in order (a prompt file, LIBRARY_DIR:TASK or
  random:WIDTH[:LENGTH]); or source_library: each task's prompt of that library."""

  source_prompts: tuple[str, ...] = ()
  source_library: str | None = None
  hidden: int = 768
  activation: str = 'tanh'
  projected_length: int | None = None  # default: the source prompts' length

  def __post_init__(self):
    if not isinstance(self.hidden, int) or self.hidden < 1:
      raise ConfigError(f'hidden (--hidden) must be a positive integer, got {self.hidden!r}')
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f'activation (--activation) must be one of {", ".join(ACTIVATIONS)}, got '
                        f'{self.activation!r}')
    if isinstance(self.source_prompts, str):
      object.__setattr__(self, 'source_prompts', tuple(
          s for s in self.source_prompts.split(',') if s))


@register
class ProjectorTuning(Method):
  """Trains a cross-model projector with the target model's task loss (Su et al.)."""

  name = 'projector'
  Options = ProjectorOptions
  uses_task_index = True
  learning_rate = 1e-3
  weight_decay = 1e-5

  def init(self, rng, ctx: Context):
    o = ctx.options
    sources, _ = load_sources(
        _source_specs(o, ctx.tasks, ctx.width, ctx.config.prompt_length), ctx.config.seed)
    length = o.projected_length or sources.shape[1]
    scale = float(np.std(ctx.embedding))
    params = init_projector(rng, sources.shape[1:], (length, ctx.width), o.hidden, scale)
    return params, {'source_prompts': jnp.asarray(sources), 'leaky': jnp.float32(
        _leaky(o.activation))}

  model_inputs = staticmethod(projector_inputs)

  def optimizer(self, ctx: Context):
    c = ctx.config
    lr = self.learning_rate if c.learning_rate is None else c.learning_rate
    wd = self.weight_decay if c.weight_decay is None else c.weight_decay
    return optax.adamw(lr, weight_decay=wd or 0.0)

  def identity(self, ctx: Context):
    return {'options': dataclasses.asdict(ctx.options), 'tasks': list(ctx.tasks)}

  def product_value(self, trainable):
    return None

  def product_metadata(self, ctx: Context):
    o = ctx.options
    _, source_fp = load_sources(
        _source_specs(o, ctx.tasks, ctx.width, ctx.config.prompt_length), ctx.config.seed)
    return {'source_fingerprint': source_fp}

  def save_product(self, trainable, extras, path, metadata):
    path = path + '.safetensors'
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(trainable))
    sources = np.asarray(jax.device_get(extras['source_prompts']))
    leaky = float(np.asarray(jax.device_get(extras['leaky'])))
    meta = dict(metadata)
    meta.update(objective='task', activation='leaky_relu' if leaky > 0 else 'tanh',
                source_fingerprint=metadata.get('source_fingerprint'),
                target_fingerprint=metadata.get('backbone_fingerprint'))
    save_projector(path, params, meta, sources)
    return path

  def load_product(self, path: str, ctx: Context):
    params, meta, sources = load_projector(path)
    target_fp = meta.get('target_fingerprint')
    if target_fp and ctx.backbone.fingerprint and target_fp != ctx.backbone.fingerprint:
      raise ProjectionError(f'{path}: a projector onto backbone {target_fp}, not '
                            f'{ctx.backbone.fingerprint}')
    if sources is None:
      raise ProjectionError(f'{path}: holds no source prompts to evaluate')
    return ({k: jnp.asarray(v) for k, v in params.items()},
            {'source_prompts': jnp.asarray(sources),
             'leaky': jnp.float32(_leaky(meta['activation']))})

  def eval_extras(self, task_index: int):
    return {'task_index': np.int32(task_index)}

  def contract_options(self):
    return {}  # random source prompts of the run's length and the target's width


# ---------------------------------------------------------------------------------------------
# Files.

def save_projector(path: str, params: Mapping[str, Any], meta: Mapping[str, Any],
                   source_prompts: np.ndarray | None = None, overwrite: bool = True) -> str:
  """Writes a projector file (see the module docstring); `meta` must name the backbones."""
  from safetensors.numpy import save_file
  from jaxprompt.version import __version__
  from jaxprompt.prompts.files import FORMAT, jsonable as _jsonable
  if os.path.exists(path) and not overwrite:
    raise ProjectionError(f'{path}: already exists; choose another path or pass --overwrite')
  params = {k: np.asarray(params[k], np.float32) for k in PARAM_NAMES}
  p_s_d_s, hidden = params['w1'].shape
  target_shape = params['ln_scale'].shape
  tensors = {f'projector/{k}': v for k, v in params.items()}
  info = dict(meta)
  info.update(format=FORMAT, projector_format=PROJECTOR_FORMAT, jaxprompt_version=__version__,
              method='projector', hidden=int(hidden), target_length=int(target_shape[0]),
              target_width=int(target_shape[1]), source_size=int(p_s_d_s))
  if source_prompts is not None:
    sources = np.asarray(source_prompts, np.float32)
    tensors['source_prompts'] = sources
    projected = np.asarray(project(params, jnp.asarray(sources),
                                   _leaky(info.get('activation', 'tanh'))))
    tensors['prompt'] = projected
    info.update(source_length=int(sources.shape[1]), source_width=int(sources.shape[2]),
                length=int(target_shape[0]), width=int(target_shape[1]))
  info.setdefault('source_length', meta.get('source_length'))
  info.setdefault('source_width', meta.get('source_width'))
  if not info.get('source_length') or not info.get('source_width') or \
      info['source_length'] * info['source_width'] != p_s_d_s:
    raise ProjectionError('projector: source_length x source_width must give W1\'s input size '
                          f'{p_s_d_s}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  save_file(tensors, tmp, metadata={'jaxprompt': json.dumps(info, default=_jsonable)})
  os.replace(tmp, path)
  return path


def load_projector(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None]:
  """(params, metadata, source prompts or None) of a projector file."""
  from safetensors import safe_open
  from safetensors.numpy import load_file
  if not os.path.isfile(path):
    raise ProjectionError(f'{path}: no such projector file')
  try:
    tensors = load_file(path)
    with safe_open(path, 'numpy') as f:
      meta = json.loads((f.metadata() or {}).get('jaxprompt') or '{}')
  except Exception as e:  # safetensors raises its own error types
    raise ProjectionError(f'{path}: not a readable safetensors file ({e})') from None
  if meta.get('projector_format') != PROJECTOR_FORMAT or not all(
      f'projector/{k}' in tensors for k in PARAM_NAMES):
    raise ProjectionError(f'{path}: not a projector file ({PROJECTOR_FORMAT}); train one with '
                          '`jaxprompt project train`')
  params = {k: tensors[f'projector/{k}'] for k in PARAM_NAMES}
  return params, meta, tensors.get('source_prompts')


def apply_projector(projector: str, prompt, *, seed: int = 0, target_backbone=None
                    ) -> tuple[np.ndarray, dict[str, Any]]:
  """(projected [p_t, d_t] prompt, its prompt-file metadata) of a source prompt (a file,
  LIBRARY_DIR:TASK, or an array); every mismatch is a one-line error."""
  params, meta, _ = load_projector(projector)
  if isinstance(prompt, str):
    value, pmeta = read_source_prompt(prompt, seed)
    name = prompt
  else:
    value, pmeta, name = np.asarray(prompt, np.float32), {}, 'prompt'
  if value.ndim != 2:
    raise ProjectionError(f'{name}: a source prompt is one [P, d] prompt, got {value.shape}')
  want = (meta['source_length'], meta['source_width'])
  if tuple(value.shape) != tuple(want):
    raise ProjectionError(f'{name}: prompt of length {value.shape[0]} and width {value.shape[1]},'
                          f' but {projector} projects prompts of length {want[0]} and width '
                          f'{want[1]}')
  src_fp, prompt_fp = meta.get('source_fingerprint'), _fingerprint_of(pmeta)
  if src_fp and prompt_fp and src_fp != 'random' and prompt_fp != src_fp:
    raise ProjectionError(f'{name}: a prompt of backbone {prompt_fp}, but {projector} projects '
                          f'prompts of backbone {src_fp}')
  if target_backbone is not None:
    fp = getattr(target_backbone, 'fingerprint', target_backbone)
    if meta.get('target_fingerprint') and fp != meta['target_fingerprint']:
      raise ProjectionError(f'{projector}: projects onto backbone {meta["target_fingerprint"]}, '
                            f'not {fp}')
  out = np.asarray(project({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(value),
                           _leaky(meta.get('activation', 'tanh'))))
  out_meta = dict(method='prompt_tuning', task=pmeta.get('task'),
                  backbone=meta.get('backbone'), backbone_fingerprint=meta.get('target_fingerprint'),
                  projected_by=os.path.abspath(projector), projected_from=name,
                  source_fingerprint=prompt_fp, position=meta.get('position', 'prefix'))
  return out, out_meta


# ---------------------------------------------------------------------------------------------
# Distance minimisation.

def train_distance(source_prompts, target_prompts, *, hidden: int = 768,
                   activation: str = 'tanh', steps: int = 1000, learning_rate: float = 1e-3,
                   seed: int = 0) -> tuple[dict[str, np.ndarray], list[float]]:
  """A projector minimising mean ||Proj(P_s) - P_t||^2 over pairs of prompts of the same tasks
  ([n, p_s, d_s] and [n, p_t, d_t]); full-batch Adam. Returns (params, loss per step)."""
  src = jnp.asarray(source_prompts, jnp.float32)
  tgt = jnp.asarray(target_prompts, jnp.float32)
  if src.ndim != 3 or tgt.ndim != 3 or src.shape[0] != tgt.shape[0]:
    raise ProjectionError(f'distance objective: source {src.shape} and target {tgt.shape} must '
                          'be [n, p, d] stacks of the same n tasks')
  leaky = _leaky(activation)
  params = init_projector(jax.random.PRNGKey(seed), src.shape[1:], tgt.shape[1:], hidden,
                          float(jnp.std(tgt)))
  tx = optax.adam(learning_rate)
  opt = tx.init(params)

  def loss_fn(p):
    return jnp.mean(jnp.sum(jnp.square(project(p, src, leaky) - tgt), axis=(1, 2)))

  @jax.jit
  def step(p, o):
    value, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  losses = []
  for _ in range(steps):
    params, opt, value = step(params, opt)
    losses.append(float(value))
  return jax.tree_util.tree_map(np.asarray, params), losses


# ---------------------------------------------------------------------------------------------
# The command line: `jaxprompt project train|apply`.

def _split(text: str | None) -> list[str]:
  return [t.strip() for t in (text or '').split(',') if t.strip()]


def _add_arguments(parser) -> None:
  sub = parser.add_subparsers(dest='project_command', required=True)
  t = sub.add_parser('train', help='train a cross-model projector')
  t.add_argument('--objective', choices=('task', 'distance'), default='task',
                 help="'task': the target model's loss (Su et al.'s better one); 'distance': "
                 'match prompts trained on the target backbone')
  t.add_argument('--tasks', required=True, help='comma-separated training tasks')
  t.add_argument('--source_library', required=True,
                 help="the source backbone's prompt library (a prompt per task)")
  t.add_argument('--target_backbone', required=True, help="target checkpoint (or 'lab:PRESET')")
  t.add_argument('--target_library', default=None,
                 help="distance objective: the target backbone's prompts of the same tasks")
  t.add_argument('--out', required=True, help='the projector file (.safetensors)')
  t.add_argument('--model_dir', default=None, help='task objective: the run directory '
                 '(default: OUT without its suffix + _run)')
  t.add_argument('--steps', type=int, default=1000, help='training steps')
  t.add_argument('--batch_size', type=int, default=32, help='task objective: batch size')
  t.add_argument('--eval_period', type=int, default=None, help='task objective: steps between '
                 'validations (default: --steps)')
  t.add_argument('--hidden', type=int, default=768, help='hidden width (768)')
  t.add_argument('--activation', choices=ACTIVATIONS, default='tanh', help='tanh (paper)')
  t.add_argument('--learning_rate', type=float, default=1e-3, help='Adam learning rate')
  t.add_argument('--max_eval_examples', type=int, default=None, help='validate on N per task')
  t.add_argument('--seed', type=int, default=0)
  t.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  t.add_argument('--vocabulary', default=None, help="SentencePiece model (default: T5's)")
  a = sub.add_parser('apply', help='project a source prompt onto the target backbone')
  a.add_argument('--projector', required=True, help='a projector file')
  a.add_argument('--prompt', required=True, help='a source prompt file or LIBRARY_DIR:TASK')
  a.add_argument('--out', required=True, help='the projected prompt file (.safetensors)')
  a.add_argument('--target_backbone', default=None,
                 help='check the projector was trained for this target backbone')
  a.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  from jaxprompt.methods.recycling import add_recycle_parser
  add_recycle_parser(sub)


def train_task_objective(tasks: Sequence[str], source_library: str, target_backbone, out: str, *,
                         model_dir: str, steps: int = 1000, batch_size: int = 32,
                         eval_period: int | None = None, hidden: int = 768,
                         activation: str = 'tanh', learning_rate: float = 1e-3,
                         overwrite: bool = False, **options):
  """The task-tuning objective through the run driver (method `projector`); copies the best
  projector to `out`. Returns the `TuneResult`. The run left in `model_dir` by a killed or
  failed call of the same settings is resumed (one of other settings is refused)."""
  from jaxprompt.methods.spot import register_tasks_mixture
  from jaxprompt.tuning import tune
  if os.path.exists(out) and not overwrite:
    raise ProjectionError(f'{out}: already exists; choose another --out or pass --overwrite')
  task = tasks[0] if len(tasks) == 1 else register_tasks_mixture(tasks, rates=[1.0] * len(tasks))
  result = tune(task, backbone=target_backbone, model_dir=model_dir, method='projector',
                source_library=source_library, hidden=hidden, activation=activation,
                train_steps=steps, batch_size=batch_size, eval_period=eval_period or steps,
                learning_rate=learning_rate, **dict(options, resume=True))
  if result.best_prompt_path:
    def copy() -> None:
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      shutil.copyfile(result.best_prompt_path, out + '.tmp')
      os.replace(out + '.tmp', out)

    agreement.by_writer(f'{out}: copy the best projector', copy)  # one writer; all wait
  return result


def _train_command(args) -> int:
  from jaxprompt.data import setup_tasks
  from jaxprompt.methods import library as lib
  if os.path.exists(args.out) and not args.overwrite:
    raise ProjectionError(f'{args.out}: already exists; choose another --out or pass --overwrite')
  tasks = _split(args.tasks)
  if not tasks:
    raise ProjectionError('--tasks: name at least one task')
  specs = [f'{args.source_library}:{t}' for t in tasks]
  sources, source_fp = load_sources(specs, args.seed)  # checks before anything runs
  if args.objective == 'distance':
    if not args.target_library:
      raise ProjectionError('the distance objective needs --target_library (prompts of the same '
                            'tasks trained on the target backbone)')
    targets = np.stack([lib.load_prompt(args.target_library, t) for t in tasks])
    entries = lib.entries(args.target_library)
    target_fps = {entries[t].get('backbone_fingerprint') for t in tasks} - {None}
    if len(target_fps) > 1:
      raise ProjectionError(f'{args.target_library}: prompts of several backbones for {tasks}')
    from jaxprompt.checkpoints.backbone import load_backbone
    bb = load_backbone(args.target_backbone)
    if targets.shape[-1] != bb.module.config.emb_dim:
      raise ProjectionError(f'{args.target_library}: prompt width {targets.shape[-1]} is not the '
                            f'target backbone width {bb.module.config.emb_dim}')
    params, losses = train_distance(sources, targets, hidden=args.hidden,
                                    activation=args.activation, steps=args.steps,
                                    learning_rate=args.learning_rate, seed=args.seed)
    save_projector(args.out, params, dict(
        objective='distance', activation=args.activation, tasks=tasks,
        source_fingerprint=source_fp, target_fingerprint=bb.fingerprint, backbone=bb.name,
        backbone_fingerprint=bb.fingerprint, source_library=os.path.abspath(
            args.source_library), target_library=os.path.abspath(args.target_library),
        steps=args.steps, final_loss=losses[-1] if losses else None), sources,
        overwrite=True)
    print(f'distance projector: loss {losses[0]:.4g} -> {losses[-1]:.4g} in {args.steps} steps; '
          f'{args.out}')
    return 0
  setup_tasks(args.vocabulary)
  model_dir = args.model_dir or os.path.splitext(args.out)[0] + '_run'
  options = {'max_eval_examples': args.max_eval_examples} if args.max_eval_examples else {}
  r = train_task_objective(tasks, args.source_library, args.target_backbone, args.out,
                           model_dir=model_dir, steps=args.steps, batch_size=args.batch_size,
                           eval_period=args.eval_period, hidden=args.hidden,
                           activation=args.activation, learning_rate=args.learning_rate,
                           overwrite=True, seed=args.seed, **options)
  print(f'task-tuned projector: best score {r.best_metrics and r.best_metrics.get("score")} at '
        f'step {r.best_step}; {args.out} (run: {model_dir})')
  return 0


def _apply_command(args) -> int:
  from jaxprompt.prompts.files import write_prompt
  if os.path.exists(args.out) and not args.overwrite:
    raise ProjectionError(f'{args.out}: already exists; choose another --out or pass --overwrite')
  target = None
  if args.target_backbone:
    from jaxprompt.checkpoints.backbone import load_backbone
    target = load_backbone(args.target_backbone)
  value, meta = apply_projector(args.projector, args.prompt, target_backbone=target)
  write_prompt(args.out, value, overwrite=True, **{k: v for k, v in meta.items()
                                                   if v is not None})
  print(f'projected {args.prompt} -> {args.out} ({value.shape[0]} x {value.shape[1]})')
  return 0


def _run(args) -> int:
  from jaxprompt.methods.recycling import recycle_command
  return {'train': _train_command, 'apply': _apply_command,
          'recycle': recycle_command}[args.project_command](args)


COMMANDS = {'project': Command('cross-model prompt projectors (Su et al. 2022): train, apply; '
                               'prompt recycling (Lester et al. 2022): recycle',
                               _add_arguments, _run)}

__all__ = ['ACTIVATIONS', 'COMMANDS', 'ProjectionError', 'ProjectorOptions', 'ProjectorTuning',
           'apply_projector', 'init_projector', 'load_projector', 'load_sources', 'project',
           'read_source_prompt', 'save_projector', 'train_distance', 'train_task_objective']
