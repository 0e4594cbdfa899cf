"""The options of a run: one frozen dataclass, the single home of every default.

`jaxprompt.tune(...)` keyword arguments, the `jaxprompt tune` flags and the gin run files
(`tune.NAME = ...`, T5X macros) are all views of `RunConfig`; a test checks that they agree.
A method's own options (XPrompt's pieces, a stack's size, ...) live in that method's
`Options` dataclass (see `jaxprompt.methods`). Values are checked when the config is built,
before anything is written, with one line naming the option, its flag and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Mapping

PROMPT_INITS = ('class_labels', 'sampled_vocab', 'uniform', 'uniform_positive', 'text', 'file')
PROMPT_POSITIONS = ('prefix', 'prefix_after_bos', 'suffix')
EVAL_MODES = ('auto', 'rank', 'greedy', 'beam')
LENGTH_MISMATCH = ('error', 'truncate', 'tile')  # what init_from does with another length
# Used when neither the user nor the task says (lab and file tasks know their own lengths).
FALLBACK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 16}
FALLBACK_PROMPT_LENGTH = 100  # the paper's
# Lester et al. 2021's schedule; used when neither the user nor the task says (lab tasks carry
# their own short schedule).
FALLBACK_SCHEDULE = {'train_steps': 30000, 'batch_size': 32, 'eval_period': 1000}
REMAT_POLICIES = ('none', 'minimal', 'full')  # T5X's names (scalable_t5)
PARAM_DTYPES = ('float32', 'bfloat16')
ACTIVATION_DTYPES = ('float32', 'bfloat16')

# The CLI flag / gin macro of an option, where it has one other than --NAME / tune.NAME.
FLAG_NAMES = {'train_steps': '--steps', 'feature_lengths': '--inputs_length/--targets_length'}
GIN_MACROS = {
    'model_dir': 'MODEL_DIR', 'task': 'MIXTURE_OR_TASK_NAME', 'backbone': 'INITIAL_CHECKPOINT_PATH',
    'train_steps': 'TRAIN_STEPS', 'batch_size': 'BATCH_SIZE', 'prompt_length': 'PROMPT_LENGTH',
    'eval_period': 'EVAL_PERIOD', 'learning_rate': 'LEARNING_RATE', 'num_partitions':
    'NUM_PARTITIONS', 'seed': 'SEED', 'dropout_rate': 'DROPOUT_RATE', 'z_loss': 'Z_LOSS',
    'label_smoothing': 'LABEL_SMOOTHING', 'loss_normalizing_factor': 'LOSS_NORMALIZING_FACTOR',
    'remat_policy': 'REMAT_POLICY', 'dtype': 'ACTIVATION_DTYPE',
    'feature_lengths': 'TASK_FEATURE_LENGTHS', 'accumulate_steps': 'NUM_MICROBATCHES',
}


HELP = {
    'method': 'what is trained: prompt_tuning (default), model_tuning, prompt_stack, ...',
    'prompt_length': 'prompt tokens P (default: the task\'s own, else 100)',
    'prompt_init': 'prompt initialiser: ' + ', '.join(PROMPT_INITS),
    'prompt_init_scale': 'range of the uniform initialisers',
    'prompt_init_text': "the text of --prompt_init text",
    'prompt_init_file': 'prompt file (or PEFT adapter directory) of --prompt_init file',
    'prompt_position': 'where the prompt enters: ' + ', '.join(PROMPT_POSITIONS),
    'init_from': 'initialise the prompt from a source (transfer, SPoT): a prompt file, a PEFT '
                 'adapter directory or LIBRARY_DIR:TASK',
    'init_length_mismatch': 'a source prompt of another length: ' + ', '.join(LENGTH_MISMATCH),
    'train_steps': "training steps (default: the task's own, else 30000)",
    'batch_size': "global batch size (default: the task's own, else 32)",
    'learning_rate': "the method's by default (0.3 for prompts, 1e-3 for model tuning)",
    'weight_decay': "the method's by default (1e-5 for prompts)",
    'feature_lengths': 'text budgets {inputs, targets} (default: the task\'s own, else 512/16)',
    'dropout_rate': "dropout (default: the checkpoint's config)", 'z_loss': 'T5X z-loss',
    'label_smoothing': 'T5X label smoothing',
    'loss_normalizing_factor': 'divides the summed loss (None: T5X default)',
    'seed': 'seed of the initialisation, data order and dropout',
    'num_partitions': 'model-parallel mesh axis size',
    'model_parallel_submesh': "model-parallel submesh of the device grid, e.g. (1,1,1,2) "
                              "(T5X's PjitPartitioner.model_parallel_submesh)",
    'logical_axis_rules': 'logical axis rules replacing the standard ones, '
                          "e.g. (('batch','data'),('embed','model'),...)",
    'parameter_partitioning_dims': '2 also shards embed over data (2-D parameter sharding)',
    'activation_partitioning_dims': '2 also shards activations\' embed over model',
    'accumulate_steps': "microbatches per step (T5X's num_microbatches): the update of one "
                        'batch, in N passes',
    'remat_policy': "recompute the backbone's layers in the backward pass (T5X's policies): "
                    "none, minimal (weight matmuls kept), full (only layer inputs kept)",
    'param_dtype': 'dtype the frozen backbone is held in: ' + ', '.join(PARAM_DTYPES) +
                   ' (the trainable stays float32; model tuning needs float32)',
    'dtype': "activation dtype of the backbone's computation: " + ', '.join(ACTIVATION_DTYPES) +
             " (default: the model's: bfloat16 in the shipped T5 model gin files, as T5X's; "
             'float32 for a checkpoint or config named from Python; the prompt, its optimizer '
             'state and the loss stay float32)',
    'scan_layers': "run each stack's layers with one scanned layer (faster compiles)",
    'eval_period': "steps between validations and checkpoints (default: the task's own, "
                   'else 1000)',
    'log_period': 'steps between training log rows',
    'eval_split': 'split validated on (None: no validation, e.g. pretraining)',
    'eval_mode': 'scoring: ' + ', '.join(EVAL_MODES),
    'eval_batch_size': 'evaluation batch size (default: --batch_size)',
    'max_eval_examples': 'validate on the first N examples only',
    'metric': "validation metric selecting the best checkpoint ('score': the task's first)",
    'higher_is_better': 'direction of --metric', 'patience':
    'stop after N validations without improvement', 'max_norm_growth':
    "stop as diverged when the trainable's norm exceeds N times its initial norm (None: never)",
    'keep_checkpoints':
    'periodic checkpoints kept', 'resume': 'continue the run in --model_dir',
    'progress': 'show a progress bar', 'coordinator_address': "multi-host: host:port of process 0 ('auto': the launcher's "
                           'environment, e.g. TPU pods, SLURM)',
    'num_processes': 'multi-host: number of processes', 'process_id': 'multi-host: this process',
}


class ConfigError(ValueError):
  """A bad option value; the message names the option, its flag and gin name."""


GIN_DIR = os.path.join(os.path.dirname(__file__), 'gin')  # the gin files shipped in the package


def resolve_gin_file(name: str) -> str:
  """A gin file given as a path, else one shipped in the package (`runs/prompt_tune.gin`), as
  an absolute path: gin is never asked to search (its resource lookup imports folders of the
  working directory as packages)."""
  for candidate in (name, os.path.join(GIN_DIR, name)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  shipped = sorted(os.path.relpath(os.path.join(d, f), GIN_DIR)
                   for d, _, fs in os.walk(GIN_DIR) for f in fs if f.endswith('.gin'))
  close = difflib.get_close_matches(name, shipped, n=3, cutoff=0.5)
  hint = f'; did you mean {", ".join(close)}?' if close else f' (shipped: {GIN_DIR})'
  raise ConfigError(f'--gin_file {name}: no such file here or among the shipped gin files{hint}')


def option_names(name: str) -> str:
  """'train_steps' -> "train_steps (--steps, gin TRAIN_STEPS)"."""
  flag = FLAG_NAMES.get(name, f'--{name}')
  gin_name = GIN_MACROS.get(name, f'tune.{name}')
  return f'{name} ({flag}, gin {gin_name})'


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every option of a run but the task, backbone, run directory and method's own options.

  `None` for prompt_length / feature_lengths / train_steps / batch_size / eval_period means
  "the task's own, else the paper's" (`FALLBACK_*`); for learning_rate / weight_decay, "the method's default" (0.3 / 1e-5 for
  prompts, 1e-3 / none for model tuning); for dropout_rate, the checkpoint's.
  """

  method: str = 'prompt_tuning'
  # the prompt
  prompt_length: int | None = None
  prompt_init: str = 'class_labels'
  prompt_init_scale: float = 0.5
  prompt_init_text: str | None = None
  prompt_init_file: str | None = None
  prompt_position: str = 'prefix'
  init_from: str | None = None  # transfer: a prompt file, PEFT adapter dir or LIBRARY_DIR:TASK
  init_length_mismatch: str = 'error'
  # training
  train_steps: int | None = None
  batch_size: int | None = None
  learning_rate: float | None = None
  weight_decay: float | None = None
  feature_lengths: Mapping[str, int] | None = None
  dropout_rate: float | None = None
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: float | None = None
  seed: int = 0
  num_partitions: int = 1
  # scale (T5X's PjitPartitioner / scalable_t5 options; see README "Running T5-XXL")
  model_parallel_submesh: tuple[int, ...] | None = None
  logical_axis_rules: tuple[tuple[str, str | None], ...] | None = None
  parameter_partitioning_dims: int = 1
  activation_partitioning_dims: int = 1
  accumulate_steps: int = 1
  remat_policy: str = 'none'
  param_dtype: str = 'float32'
  dtype: str | None = None  # activations; None: the backbone config's own (T5Config.dtype)
  scan_layers: bool = False
  # validation, checkpoints, logging
  eval_period: int | None = None
  log_period: int = 10
  eval_split: str | None = 'validation'
  eval_mode: str = 'auto'
  eval_batch_size: int | None = None
  max_eval_examples: int | None = None
  metric: str = 'score'
  higher_is_better: bool = True
  patience: int | None = None
  max_norm_growth: float | None = 1e4
  keep_checkpoints: int = 2
  resume: bool = False
  progress: bool = True
  # multi-host (jax.distributed); None lets jax read the launcher's environment
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    check_types(self)
    positive = ('train_steps', 'batch_size', 'eval_period', 'log_period', 'num_partitions',
                'accumulate_steps',
                'prompt_length', 'eval_batch_size', 'max_eval_examples', 'patience', 'max_norm_growth',
                'keep_checkpoints', 'num_processes')
    for name in positive:
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ConfigError(f'{option_names(name)} must be positive, got {value}')
    for name in ('learning_rate', 'weight_decay', 'dropout_rate', 'z_loss', 'label_smoothing',
                 'prompt_init_scale'):
      value = getattr(self, name)
      if value is not None and value < 0:
        raise ConfigError(f'{option_names(name)} must be >= 0, got {value}')
    if self.batch_size is not None and self.batch_size % self.accumulate_steps:
      raise ConfigError(f'{option_names("batch_size")} {self.batch_size} does not split into '
                        f'{option_names("accumulate_steps")} {self.accumulate_steps} '
                        'microbatches; choose a multiple')
    if self.dropout_rate is not None and self.dropout_rate >= 1:
      raise ConfigError(f'{option_names("dropout_rate")} must be below 1, got {self.dropout_rate}')
    for name, choices in (('prompt_init', PROMPT_INITS), ('prompt_position', PROMPT_POSITIONS),
                          ('eval_mode', EVAL_MODES),
                          ('init_length_mismatch', LENGTH_MISMATCH),
                          ('remat_policy', REMAT_POLICIES), ('param_dtype', PARAM_DTYPES),
                          ('dtype', ACTIVATION_DTYPES + (None,)),
                          ('parameter_partitioning_dims', (1, 2)),
                          ('activation_partitioning_dims', (1, 2))):
      check_choice(name, getattr(self, name), choices)
    if self.feature_lengths is not None:
      lengths = dict(self.feature_lengths)
      if not lengths or not set(lengths) <= {'inputs', 'targets'} or not all(
          isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in lengths.values()):
        raise ConfigError(f'{option_names("feature_lengths")} must be {{"inputs": N, "targets": '
                          f'M}} (either may be left to the task) with positive integers, got {self.feature_lengths!r}')
      object.__setattr__(self, 'feature_lengths', lengths)
    if self.prompt_init == 'text' and not self.prompt_init_text:
      raise ConfigError("prompt_init 'text' needs the text: --prompt_init_text")
    if self.prompt_init == 'file' and not self.prompt_init_file:
      raise ConfigError("prompt_init 'file' needs a prompt file: --prompt_init_file")

  def replace(self, **changes) -> 'RunConfig':
    return dataclasses.replace(self, **changes)


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f'{option_names(name)}: unknown value {value!r}; choose one of '
                      f'{", ".join(map(str, choices))}')


def _accepts(annotation, value) -> bool:
  """Whether `value` fits a (string) annotation of the simple kinds used in configs."""
  if annotation is Any:
    return True
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_accepts(a, value) for a in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
    return isinstance(value, Mapping)
  if origin in (tuple, list):
    return isinstance(value, (tuple, list))
  if isinstance(annotation, type):
    return isinstance(value, annotation)
  return True


def check_types(config) -> None:
  """Raises ConfigError for a field whose value is not of its annotated type (int for a float is
  fine; numeric text such as '5' from a command line is converted)."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    annotation = hints[field.name]
    if _accepts(annotation, value):
      continue
    converted = _convert(annotation, value)
    if converted is _NO:
      raise ConfigError(f'{option_names(field.name)} must be {_describe(annotation)}, '
                        f'got {value!r}')
    object.__setattr__(config, field.name, converted)


_NO = object()


def _convert(annotation, value):
  """Text from a command line ('5', '0.3', 'true') to the annotated type, else _NO."""
  if not isinstance(value, str):
    return _NO
  for kind in (int, float):
    if _accepts(annotation, kind(0)) and not _accepts(annotation, ''):
      try:
        return kind(value)
      except ValueError:
        continue
  if _accepts(annotation, True) and value.lower() in ('true', 'false'):
    return value.lower() == 'true'
  return _NO


def _describe(annotation) -> str:
  names = {int: 'an integer', float: 'a number', str: 'a text', bool: 'True or False',
           type(None): 'None'}
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    return ' or '.join(_describe(a) for a in typing.get_args(annotation))
  return names.get(annotation, str(annotation))


def split_options(options: Mapping[str, Any], method_options_type) -> tuple[dict, dict]:
  """Splits keyword options into RunConfig fields and the method's own Options fields.

  An unknown name is an error naming the close matches.
  """
  run_fields = {f.name for f in dataclasses.fields(RunConfig)}
  method_fields = {f.name for f in dataclasses.fields(method_options_type)}
  run, method = {}, {}
  for name, value in options.items():
    if name in run_fields:
      run[name] = value
    elif name in method_fields:
      method[name] = value
    else:
      close = difflib.get_close_matches(name, sorted(run_fields | method_fields), n=3)
      hint = f'; did you mean {" or ".join(close)}?' if close else ''
      raise ConfigError(f'unknown option {name!r}{hint}')
  return run, method


def defaults() -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(RunConfig)}
