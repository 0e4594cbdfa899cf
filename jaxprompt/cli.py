"""The `jaxprompt` command. Every run is a gin run underneath (T5X conventions).

  jaxprompt tune                      # the embedded demo: lab backbone + lab target task
  jaxprompt tune --gin_file=models/t5_1_1/base.gin --gin_file=runs/prompt_tune.gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'jaxprompt_glue_sst2'" \
      --gin.INITIAL_CHECKPOINT_PATH="'/ckpt/checkpoint_1100000'"
  jaxprompt eval --prompt runs/x/prompt_best.safetensors --task jaxprompt_glue_sst2 --backbone CKPT
  jaxprompt info PATH                 # a checkpoint or a prompt file
  jaxprompt lab build | report        # the lab's pretrained backbone and its measurements
  jaxprompt lab report spot | transferability | xprompt   # a method's study on the lab
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
from typing import Any, Sequence

from jaxprompt import host
from jaxprompt import lab  # noqa: F401 - registers the backbone name 'lab' and the lab's tasks
from jaxprompt.flags import Parser

# Flags that set a gin macro of the run files (T5X conventions); every other RunConfig field
# (and every registered method's own option) is a flag --NAME that binds `tune.NAME`.
MACRO_FLAGS = {
    'model_dir': 'MODEL_DIR', 'task': 'MIXTURE_OR_TASK_NAME', 'backbone': 'INITIAL_CHECKPOINT_PATH',
    'steps': 'TRAIN_STEPS', 'batch_size': 'BATCH_SIZE', 'prompt_length': 'PROMPT_LENGTH',
    'eval_period': 'EVAL_PERIOD', 'learning_rate': 'LEARNING_RATE', 'vocabulary': 'VOCABULARY',
    'num_partitions': 'NUM_PARTITIONS', 'seed': 'SEED', 'dropout_rate': 'DROPOUT_RATE',
}
MACRO_HELP = {'model_dir': 'the run directory (written; resumed with --resume)',
              'task': 'seqio task or mixture (e.g. lab_has_dog, jaxprompt_super_glue_rte)',
              'backbone': "T5X / HF checkpoint, or 'lab' for the lab's backbone",
              'steps': 'training steps', 'vocabulary': 'SentencePiece model (default: T5\'s)'}
# Flags (not RunConfig fields) that shape the command itself.
NOT_TUNE = ('feature_lengths', 'train_steps', 'resume', 'progress')
REQUIRED_FLAGS = {'MODEL_DIR': '--model_dir', 'MIXTURE_OR_TASK_NAME': '--task',
                  'INITIAL_CHECKPOINT_PATH': '--backbone'}


class UsageError(ValueError):
  pass


def _fail(message: str) -> int:
  print(f'jaxprompt: error: {message}', file=sys.stderr)
  return 2


def _one_line(e: BaseException) -> str:
  """The error as one line, without gin's "In call to configurable 'tune' (<function ...>)"."""
  text = re.sub(r"\s*In call to configurable '[^']*' \(<[^>]*>\)", '', str(e))
  return ' '.join(text.split()) or type(e).__name__


def _split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """Pulls `--gin_file=F` / `--gin.NAME=VALUE` (either `=` or a separate value) out of argv."""
  rest, files, bindings = [], [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith('--gin_file'):
      files.append(arg.split('=', 1)[1] if '=' in arg else next(it))
    elif arg.startswith('--gin.'):
      name, _, value = arg[len('--gin.'):].partition('=')
      bindings.append(_binding(name, value if _ else next(it)))
    else:
      rest.append(arg)
  return rest, files, bindings


def _literal(value: str) -> str:
  """A gin literal: python/gin syntax as given, else the text as a quoted string."""
  import ast
  v = value.strip()
  if v in ('None', 'True', 'False') or v.startswith(('%', '@')):
    return v
  try:
    ast.literal_eval(v)
    return v
  except (ValueError, SyntaxError):
    return repr(value)


def _binding(name: str, value: str) -> str:
  return f'{name} = {_literal(value)}'


# The shipped gin files, and a gin file by path or shipped name (its home is the config).
from jaxprompt.config import GIN_DIR, resolve_gin_file  # noqa: E402,F401 - re-exported


_MACRO_DEFINITION = re.compile(r'^([A-Z][A-Z0-9_]*)\s*=', re.M)
_MACRO_USE = re.compile(r'%([A-Z][A-Z0-9_]*)')


def _check_macro_bindings(files: Sequence[str], bindings: Sequence[str]) -> None:
  """A `--gin.NAME=` binding of a macro that no loaded file defines or uses is a typo."""
  known: set[str] = set()
  for path in files:
    with open(path) as f:
      text = f.read()
    known |= set(_MACRO_DEFINITION.findall(text)) | set(_MACRO_USE.findall(text))
  from jaxprompt.config import RunConfig
  options = (set(_run_flag_names().values()) | {f.name for f in dataclasses.fields(RunConfig)} |
             {'task', 'backbone', 'model_dir', 'optimizer', 'config'})
  for binding in bindings:
    name = binding.split('=', 1)[0].strip()
    if name.startswith('tune.') and name[len('tune.'):] not in options:
      option = name[len('tune.'):]
      close = difflib.get_close_matches(option, sorted(options), n=3)
      hint = f'; did you mean {" or ".join("tune." + c for c in close)}?' if close else ''
      raise UsageError(f'--gin.{name}: tune has no option {option!r}{hint}')
    if re.fullmatch(r'[A-Z][A-Z0-9_]*', name) and name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f'; did you mean {" or ".join(close)}?' if close else ''
      raise UsageError(f'--gin.{name}: no loaded gin file uses the macro {name}{hint}')


def _guard_gin_package_lookup() -> None:
  """gin tries a relative file name (`runs/prompt_tune.gin`) as a resource of an importable
  package `runs`; a folder `runs/` in the working directory is such a package (a namespace one,
  without a file), on which gin's check raises TypeError instead of answering "not here". The
  check is replaced, in place, by one that answers False for a package without a file, so only
  real files and packages are read."""
  import importlib.util

  from gin import config as gin_config
  for i, (reader, exists) in enumerate(gin_config._FILE_READERS):  # noqa: SLF001
    if getattr(exists, '__name__', '') != 'system_path_file_exists':
      continue

    def package_file_exists(path: str, _exists=exists) -> bool:
      head = os.path.dirname(path)
      try:
        spec = importlib.util.find_spec(head.replace('/', '.')) if head else None
      except (ImportError, ValueError):
        return False
      return bool(spec and spec.origin) and _exists(path)

    package_file_exists.__name__ = 'jaxprompt_package_file_exists'
    gin_config._FILE_READERS[i] = (reader, package_file_exists)  # noqa: SLF001


def _register_configurables() -> None:
  import gin
  _guard_gin_package_lookup()

  from jaxprompt import tuning
  from jaxprompt.data import setup_tasks as data_setup_tasks
  from jaxprompt.model.config import T5Config
  from jaxprompt.train import partitioning
  for name, fn in (('tune', tuning.tune), ('setup_tasks', data_setup_tasks),
                   ('network.T5Config', T5Config),
                   # T5X's spelling of the mesh and axis rules (`partitioning.t5x_gin_options`)
                   ('partitioning.PjitPartitioner', partitioning.pjit_partitioner),
                   ('partitioning.standard_logical_axis_rules',
                    partitioning.standard_logical_axis_rules)):
    if not gin.config._REGISTRY.get(name):  # noqa: SLF001 - gin has no public "is registered"
      gin.external_configurable(fn, name)


def _parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files/bindings (shipped files by their relative name) as a run's config."""
  import gin
  gin.clear_config()
  _register_configurables()
  files = [resolve_gin_file(f) for f in files]
  _check_macro_bindings(files, bindings)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings))
  except (ValueError, IOError, SyntaxError) as e:
    raise _gin_error(e) from None


def gin_tune_options(files: Sequence[str], bindings: Sequence[str]) -> dict[str, Any]:
  """The keyword options the gin files/bindings give `tune` (what `gin_tune` would run), for
  `jaxprompt plan`; required macros left unbound are left out, and tasks are set up only when
  one is named."""
  import gin
  unbound: list[str] = []
  while True:  # a required macro nothing binds (MODEL_DIR, the task, ...) is bound to None
    try:
      _parse_gin(files, list(bindings) + [f'{m} = None' for m in unbound])
      break
    except UsageError as e:
      missing = [m for m in REQUIRED_FLAGS if m in str(e) and m not in unbound]
      if 'REQUIRED' not in str(e) or not missing:
        raise
      unbound.append(missing[0])
  from jaxprompt.train.partitioning import t5x_gin_options
  options = {k: v for k, v in gin.get_bindings('tune').items()
             if v is not gin.REQUIRED and v is not None}
  if options.get('task'):
    gin.get_configurable('setup_tasks')()
  return {**options, **t5x_gin_options()}


def gin_tune(files: Sequence[str], bindings: Sequence[str]):
  """Parses gin files/bindings (shipped files by their relative name) and runs the bound `tune`."""
  import gin
  _parse_gin(files, bindings)
  try:
    gin.get_configurable('setup_tasks')()
    from jaxprompt.train.partitioning import t5x_gin_options
    return gin.get_configurable('tune')(**t5x_gin_options(), **model_config_options())
  except RuntimeError as e:
    if 'REQUIRED' not in str(e) and 'required' not in str(e):
      raise
    raise _gin_error(e) from None


def model_config_options() -> dict[str, Any]:
  """T5X's spelling of the model, `network.T5Config.FIELD = ...` (the shipped model gin files
  bind `dtype`), as `tune` options: the config `tune.config` names with those fields replaced;
  without a named config, `dtype` alone, as the run's activation dtype unless one is set."""
  import gin
  fields = gin.get_bindings('network.T5Config')
  if not fields:
    return {}
  tune = gin.get_bindings('tune')  # macros resolved
  named = tune.get('config')
  if isinstance(named, str):
    from jaxprompt.model import get_config
    return {'config': get_config(named, **fields)}
  if named is None and set(fields) == {'dtype'}:
    return {} if tune.get('dtype') is not None else {'dtype': fields['dtype']}
  if named is None:
    raise UsageError(f'network.T5Config.{sorted(set(fields) - {"dtype"})[0]}: no model gin file '
                     'names the config it changes; add one (e.g. --gin_file=models/t5_1_1/base.gin)'
                     ' or --config NAME')
  return {}  # a config built by gin (`@network.T5Config()`) has its bindings already


def _gin_error(e: Exception) -> UsageError:
  """gin's error as one line; a required macro left unbound names the flag that sets it."""
  if 'REQUIRED' in str(e) or 'required' in str(e):
    missing = [flag for macro, flag in REQUIRED_FLAGS.items() if macro in str(e)]
    hint = f'give {missing[0]}' if missing else 'bind it with --gin.NAME=value'
    return UsageError(f'{hint} (gin: {_one_line(e)})')
  return UsageError('gin: ' + _one_line(e))


def setup_tasks(*args, **kwargs):
  """`jaxprompt.data.setup_tasks` (gin's `setup_tasks`): the TFDS tasks, the lab's (imported
  with the CLI) and, optionally, a task from the user's files."""
  from jaxprompt.data import setup_tasks as data_setup_tasks
  return data_setup_tasks(*args, **kwargs)


def _run_flag_names() -> dict[str, str]:
  """{flag: option} of `jaxprompt tune` beyond the macro flags: RunConfig fields and every
  registered method's own options."""
  from jaxprompt.config import RunConfig
  from jaxprompt.methods import get_method, method_names
  names = {f.name: f.name for f in dataclasses.fields(RunConfig)
           if f.name not in MACRO_FLAGS and f.name not in NOT_TUNE}
  for method in method_names():
    for f in dataclasses.fields(get_method(method).Options):
      names.setdefault(f.name, f.name)
  return names


def _run_bindings(args, skip: Sequence[str] = ()) -> list[str]:
  """The gin bindings of a run's flags (`_add_run_arguments`, but `skip`) that were given."""
  extra = []
  for flag, macro in MACRO_FLAGS.items():
    value = None if flag in skip else getattr(args, flag, None)
    if value is not None:
      extra.append(_binding(macro, str(value)))
  for flag, option in _run_flag_names().items():
    value = getattr(args, flag)
    if value is not None:
      extra.append(_binding(f'tune.{option}', str(value)))
  lengths = {k: getattr(args, f'{k}_length') for k in ('inputs', 'targets')}
  if any(v is not None for v in lengths.values()):
    extra.append(f'TASK_FEATURE_LENGTHS = {({k: v for k, v in lengths.items() if v})!r}')
  if args.config:
    extra.append(_binding('tune.config', args.config))
  return extra


def _add_run_arguments(p, skip: Sequence[str] = ()) -> None:
  """A run's flags (`jaxprompt tune`'s, and `jaxprompt plan`'s but `skip`)."""
  from jaxprompt.config import HELP
  for flag, macro in MACRO_FLAGS.items():
    if flag not in skip:
      help_text = MACRO_HELP.get(flag) or HELP.get(flag, '')
      p.add_argument(f'--{flag}', default=None, help=f'{help_text} (gin macro {macro})')
  for flag, option in _run_flag_names().items():
    p.add_argument(f'--{flag}', default=None,
                   help=HELP.get(option, 'a method option') + f' (gin tune.{option})')
  p.add_argument('--inputs_length', type=int, default=None,
                 help="input text budget in tokens (default: the task's own, else 512)")
  p.add_argument('--targets_length', type=int, default=None,
                 help="target budget in tokens (default: the task's own, else 16)")
  p.add_argument('--config', default=None,
                 help="the backbone's T5 config name (e.g. t5_1_1_base) when the checkpoint "
                      'cannot say (gin tune.config, as the model gin files bind it)')


def _tune_command(args, files: list[str], bindings: list[str]) -> int:
  flags = list(MACRO_FLAGS) + list(_run_flag_names()) + ['train_file', 'inputs_length',
                                                          'targets_length', 'config']
  if not files and not bindings and not any(getattr(args, f) is not None for f in flags):
    from jaxprompt.lab import demo
    demo.run_demo(steps=args.demo_steps)
    return 0
  files = files or ['runs/prompt_tune.gin']
  extra = _run_bindings(args)
  extra.append(f'tune.resume = {bool(args.resume)}')
  if args.train_file:
    extra += [_binding('setup_tasks.train_file', args.train_file),
              _binding('setup_tasks.task_name', args.task or 'user_task'),
              _binding('setup_tasks.input_column', args.input_column),
              _binding('setup_tasks.target_column', args.target_column)]
    if args.validation_file:
      extra.append(_binding('setup_tasks.validation_file', args.validation_file))
    if args.label_column:
      extra.append(_binding('setup_tasks.label_column', args.label_column))
    if args.label_names:
      extra.append(f'setup_tasks.label_names = {args.label_names.split(",")!r}')
    if not args.task:
      extra.append("MIXTURE_OR_TASK_NAME = 'user_task'")
  result = gin_tune(files, extra + bindings)
  _print_result(result)
  return 0


def _print_result(result) -> None:
  print(f'run directory: {result.model_dir}')
  if result.initial_metrics:
    print('validation before training (the initialised prompt): ' +
          _fmt(result.initial_metrics))
  if result.best_metrics:
    print(f'validation best (step {result.best_step}): ' + _fmt(result.best_metrics))
  for label, path in (('prompt (best)', result.best_prompt_path),
                      ('model (best)', result.best_model_path),
                      ('prompt (final)', result.prompt_path), ('plot', result.plot_path)):
    if path:
      print(f'{label}: {path}')


def _fmt(metrics: dict[str, Any]) -> str:
  return ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()
                   if k != 'step' and isinstance(v, (int, float)))


def _info_command(args) -> int:
  """Any artefact the project writes (a run, a prompt, a library, a prune, a projector) or a
  checkpoint, with its provenance (`jaxprompt.artefacts`)."""
  from jaxprompt import artefacts
  from jaxprompt.checkpoints import is_remote
  path = args.path
  if not (os.path.exists(path) or is_remote(path) or path == 'lab' or path.startswith('lab:')):
    raise FileNotFoundError(f'{path}: no such file or directory; jaxprompt info describes a run '
                            'directory, a prompt file (.safetensors, .npy), a PEFT adapter folder, '
                            'a prompt library, a prune, a projector or a checkpoint (T5X or '
                            "Hugging Face; 'lab': the lab backbone)")
  if artefacts.kind_of(path) != 'checkpoint':
    d = artefacts.describe(path)
    print(json.dumps(d, default=str) if args.json else artefacts.format_description(d))
    return 0
  from jaxprompt.checkpoints.inspect import describe, format_description
  d = describe(_backbone_path(path))
  print(json.dumps(d, default=str) if args.json else format_description(d))
  return 0


def _backbone_path(path: str) -> str:
  from jaxprompt.checkpoints.backbone import resolve_backbone_path
  return resolve_backbone_path(path) if path == 'lab' or path.startswith('lab:') else path


def _eval_command(args) -> int:
  from jaxprompt import evaluate
  from jaxprompt.prompts.files import read_prompt
  for path in args.prompt or ():  # a wrong file fails now, not after the backbone has loaded
    if '://' not in path and not os.path.isdir(path):
      read_prompt(path)
  setup_tasks(args.vocabulary)
  prompt = args.prompt[0] if args.prompt and len(args.prompt) == 1 else args.prompt
  lengths = {k: v for k, v in (('inputs', args.inputs_length), ('targets', args.targets_length))
             if v}
  if lengths:
    from jaxprompt.config import FALLBACK_FEATURE_LENGTHS
    from jaxprompt.data.tasks import task_defaults
    lengths = {**task_defaults(args.task).get('feature_lengths', FALLBACK_FEATURE_LENGTHS),
               **lengths}
  metrics = evaluate.evaluate(args.task, backbone=args.backbone, prompt=prompt,
                              split=args.split, mode=args.mode, batch_size=args.batch_size,
                              feature_lengths=lengths or None, max_examples=args.max_examples,
                              config=args.config, dtype=args.dtype)
  if args.json:
    print(json.dumps(metrics))
  else:
    width = max(len(k) for k in metrics)
    what = f' with {" + ".join(args.prompt)}' if args.prompt else ' (backbone alone, no prompt)'
    print(f'{args.task} [{args.split}]{what}')
    for k, v in metrics.items():
      print(f'  {k:<{width}}  {v:10.4f}')
  return 0


def _infer_command(args) -> int:
  """A thin view of `jaxprompt.inference.infer`: flags in, predictions file out."""
  import ast
  from jaxprompt import inference
  from jaxprompt.config import RunConfig
  setup_tasks(args.vocabulary)
  submesh = None
  if args.model_parallel_submesh:
    try:
      submesh = tuple(ast.literal_eval(args.model_parallel_submesh))
    except (ValueError, SyntaxError, TypeError):
      raise UsageError(f'--model_parallel_submesh {args.model_parallel_submesh}: give a tuple, '
                       'e.g. (1,1,1,2)') from None
  placement = RunConfig(num_partitions=args.num_partitions, model_parallel_submesh=submesh,
                        param_dtype=args.param_dtype, dtype=args.dtype,
                        coordinator_address=args.coordinator_address,
                        num_processes=args.num_processes, process_id=args.process_id)
  if args.resume and not args.output:
    raise UsageError('--resume continues an --output file; give --output')
  prompt = args.prompt
  if prompt and len(prompt) == 1:
    prompt = prompt[0]
  rows = inference.infer(
      backbone=args.backbone, prompt=prompt, library=args.library, input=args.input,
      output=args.output, task=args.task, split=args.split, input_column=args.input_column,
      task_column=args.task_column, mode=args.mode, num_beams=args.num_beams,
      label_names=args.label_names.split(',') if args.label_names else None,
      inputs_length=args.inputs_length, max_decode_length=args.max_decode_length,
      batch_size=args.batch_size, max_examples=args.max_examples, vocabulary=args.vocabulary,
      config=args.config, run_config=placement, resume=args.resume, overwrite=args.overwrite,
      progress=args.output is not None and not args.no_progress)
  import jax
  if jax.process_index() == 0:
    if args.output:
      print(f'predictions: {args.output} ({len(rows)} rows)')
    else:
      for row in rows:
        print(json.dumps(row, ensure_ascii=False, default=str))
  return 0


def _add_infer_parser(sub) -> None:
  from jaxprompt.config import ACTIVATION_DTYPES, HELP, PARAM_DTYPES
  p = sub.add_parser('infer', help='predictions of a tuned prompt (or one prompt per task) for '
                     'new inputs: a JSONL/TSV/CSV file or a task split')
  p.add_argument('--backbone', required=True,
                 help="checkpoint (T5X legacy/Orbax, HF), or 'lab' for the lab's backbone")
  p.add_argument('--prompt', default=None, nargs='+',
                 help="what eval takes (a prompt file, .npy, a PEFT adapter, a model-tuned "
                      "checkpoint; several files vote as an ensemble; 'none': the backbone "
                      'alone), or one prompt per task: TASK=FILE,TASK=FILE (mixed-task batches)')
  p.add_argument('--library', default=None,
                 help='a SPoT prompt library: one prompt per task, mixed-task batches')
  p.add_argument('--input', default=None, help='a JSONL/TSV/CSV file of inputs')
  p.add_argument('--output', default=None,
                 help='predictions file (.jsonl; default: print the rows)')
  p.add_argument('--task', default=None,
                 help="a seqio task's examples instead of --input (with --split)")
  p.add_argument('--split', default='validation', help='the --task split (validation)')
  p.add_argument('--input_column', default='input', help='the text column of --input (input)')
  p.add_argument('--task_column', default='task',
                 help="the column naming each row's task, for one prompt per task (task)")
  p.add_argument('--mode', default='auto', choices=('auto', 'greedy', 'beam', 'rank'),
                 help='greedy or beam decoding, rank classification over the label texts '
                      '(auto: rank when the labels are known)')
  p.add_argument('--num_beams', type=int, default=4, help='beam search width (4)')
  p.add_argument('--label_names', default=None,
                 help="comma-separated label texts for --mode rank (default: the tasks' own)")
  p.add_argument('--inputs_length', type=int, default=None,
                 help="input budget in tokens (default: the tasks' own, else 512; longer "
                      'inputs are cut and counted)')
  p.add_argument('--max_decode_length', type=int, default=None,
                 help="output tokens (default: the tasks' targets length, else 16)")
  p.add_argument('--batch_size', type=int, default=32, help='rows per batch (32)')
  p.add_argument('--max_examples', type=int, default=None, help='the first N rows only')
  p.add_argument('--vocabulary', default=None,
                 help="SentencePiece model (default: the tasks', the lab's, else T5's)")
  p.add_argument('--config', default=None, help='T5 config name when the checkpoint has none')
  p.add_argument('--resume', action='store_true',
                 help='finish an interrupted run into --output (rows written are kept)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  p.add_argument('--no_progress', action='store_true', help='no progress bar')
  p.add_argument('--num_partitions', type=int, default=1, help=HELP['num_partitions'])
  p.add_argument('--model_parallel_submesh', default=None, help=HELP['model_parallel_submesh'])
  p.add_argument('--param_dtype', default='float32', choices=PARAM_DTYPES,
                 help=HELP['param_dtype'])
  p.add_argument('--dtype', default=None, choices=ACTIVATION_DTYPES, help=HELP['dtype'])
  p.add_argument('--coordinator_address', default=None, help=HELP['coordinator_address'])
  p.add_argument('--num_processes', type=int, default=None, help=HELP['num_processes'])
  p.add_argument('--process_id', type=int, default=None, help=HELP['process_id'])


def _export_command(args) -> int:
  if args.to == 'stablehlo':
    from jaxprompt.serving import export_stablehlo
    if not args.backbone:
      raise UsageError('export --to stablehlo needs --backbone CKPT (the prompt\'s backbone)')
    out = export_stablehlo(
        args.backbone, None if args.prompt == 'none' else args.prompt, args.out,
        batch_size=args.batch_size, inputs_length=args.inputs_length,
        max_decode_length=args.max_decode_length, overwrite=args.overwrite)
    print(f'greedy-decoding program: {out} (README.txt there says how to call it)')
    return 0
  from jaxprompt.checkpoints.peft import export_peft
  out = export_peft(args.prompt, args.out, base_model_name_or_path=args.base_model,
                    overwrite=args.overwrite)
  print(f'PEFT adapter: {out}')
  return 0


def _lab_command(args) -> int:
  from jaxprompt.lab import backbone, build_steps
  if args.lab_command == 'path':  # answers from the cache's name: no TensorFlow, no seqio
    steps = build_steps()
    if not os.path.exists(os.path.join(backbone.backbone_dir(steps, preset=args.preset),
                                       'manifest.json')):
      host.import_quietly('tensorflow')  # building it reads the lab's data (seqio, TensorFlow)
      quiet_libraries()
    print(backbone.build(steps=steps, preset=args.preset))
    return 0
  from jaxprompt.lab import report
  if args.lab_command == 'build':
    path = backbone.build(steps=build_steps(args.steps), force=args.force, seed=args.seed,
                          preset=backbone.with_width(args.preset, args.width))
    print(f'lab backbone: {path}')
  elif args.what == 'targets':
    tasks = args.tasks.split(',') if args.tasks else report.DEFAULT_TASKS
    report.main(out=args.out, steps=args.steps, tasks=tasks, overwrite=args.overwrite,
                preset=args.preset or 'demo')
  else:  # the sources the methods build on: known with a prefix, and through a prompt
    import tempfile
    out = args.out or f'lab_{args.what}.json'
    if os.path.exists(out) and not args.overwrite:
      raise FileExistsError(f'{out} exists; pass --overwrite or choose another --out')
    tasks = args.tasks.split(',') if args.tasks else None
    steps = {'steps': args.steps} if args.steps else {}
    pairs = report.parse_pairs(args.pairs) if args.pairs else None
    try:
      seeds = [int(x) for x in args.seeds.split(',')]
    except ValueError:
      raise ValueError(f'--seeds {args.seeds}: give comma-separated integers, e.g. 0,1,2') from None
    print(f'lab report {args.what}: writes {os.path.abspath(out)} at the end', file=sys.stderr,
          flush=True)
    ckpt = backbone.build(steps=build_steps(), preset=args.preset or 'methods')
    with tempfile.TemporaryDirectory(prefix='jaxprompt_lab_') as scratch:
      work = args.work or scratch
      if args.what == 'sources':
        rows = report.measure_sources(ckpt, work, tasks=tasks, **steps)
      else:
        rows = report.measure_transfer(ckpt, work, pairs=pairs, seeds=seeds,
                                       eval_period=args.eval_period,
                                       **({'learning_rate': args.learning_rate}
                                          if args.learning_rate is not None else {}), **steps)
    with open(out, 'w') as f:
      json.dump({'backbone': ckpt, args.what: rows}, f, indent=1, default=str)
    print(report.format_sources(rows) if args.what == 'sources' else report.format_transfer(rows))
    print(f'written: {out}')
  return 0


PLAN_SKIPS = ('steps', 'model_dir')  # tune's flags plan has not (--steps is plan's own)


def _add_plan_parser(sub) -> None:
  p = sub.add_parser('plan', help='will a run fit? per-device memory of the steps `tune` would '
                     'compile, for each mesh of a device target (abstract weights, nothing '
                     'allocated)', description='Takes the run as `jaxprompt tune` does: its '
                     'flags, --gin_file=F and --gin.NAME=VALUE, with the same defaults.')
  p.add_argument('--model', default=None,
                 help='a T5 config name (t5_1_1_xxl, as --config), a model gin file '
                      '(models/t5_1_1/xxl.gin, as --gin_file) or a checkpoint (as --backbone)')
  p.add_argument('--target', default='cpu:1',
                 help="cpu:N; a TPU topology with libtpu installed: v3-8, v3-32, v4-16, v5p-8, "
                      "v5p-2 (one chip), libtpu's v4:2x2x2; a GPU with jax's CUDA plugin "
                      'installed (the gpu-plan extra): h100, a100 (80 GB), h100:8 (8 on one '
                      'host), h100:2x8 (hosts x GPUs), or a GPU target config FILE.txtpb '
                      '(default cpu:1)')
  p.add_argument('--tpu_mode', default=None, choices=('megacore', 'per_core'),
                 help="a TPU's devices as JAX sees them: v4 megacore (default, one device per "
                      'chip) or per_core; v2/v3 are per core, v5p megacore, v5e/v6e one core '
                      'per chip')
  p.add_argument('--meshes', default=None,
                 help="(data, model) shapes to try, e.g. 1x8,2x4 (default: the run's own mesh "
                      'when it names one (--num_partitions, --model_parallel_submesh), else '
                      'every factorisation)')
  p.add_argument('--device_memory', default=None,
                 help="memory per device to judge fit against, e.g. 80GB (a GPU's) or 95GiB "
                      "(default: the TPU's own; none for cpu)")
  p.add_argument('--steps', default='train,eval', help='steps to compile (train,eval)')
  p.add_argument('--json', action='store_true', help='print the rows as JSON')
  p.add_argument('--out', default=None, help='also write the rows and settings to this JSON file')
  _add_run_arguments(p, skip=PLAN_SKIPS)


def _plan_command(args, files: list[str], bindings: list[str]) -> int:
  from jax._src import xla_bridge
  from jaxprompt import plan as plan_lib
  from jaxprompt.model import NAMED_CONFIGS
  cpus = re.fullmatch(r'cpu:(\d+)', args.target)
  if cpus and not xla_bridge.backends_are_initialized():  # N host devices, before jax starts
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={cpus.group(1)}')
  if args.out and os.path.exists(args.out):
    raise FileExistsError(f'--out {args.out} exists; choose another file')
  meshes = None
  if args.meshes:
    try:
      meshes = [tuple(int(n) for n in m.split('x')) for m in args.meshes.split(',')]
      assert all(len(m) == 2 for m in meshes)
    except (ValueError, AssertionError):
      raise UsageError(f'--meshes {args.meshes}: give DATAxMODEL shapes, e.g. 1x8,2x4') from None
  files = list(files) or ['runs/prompt_tune.gin']  # tune's run file by default
  extra = _run_bindings(args, skip=PLAN_SKIPS)
  if args.model and args.model.endswith('.gin'):
    files.insert(0, args.model)
  elif args.model:
    extra.append(_binding('tune.config' if args.model in NAMED_CONFIGS else 'tune.backbone',
                          args.model))
  options = gin_tune_options(files, extra + bindings)

  def report(row):
    if not args.json:
      print(plan_lib.format_row(row), flush=True)

  def on_target(target):
    if not args.json:
      print(plan_lib.describe_settings(target.settings), flush=True)
      plan_lib.print_target(target)

  target, rows = plan_lib.plan(
      target=args.target, meshes=meshes, device_memory=args.device_memory,
      steps=args.steps.split(','), tpu_mode=args.tpu_mode, report=report, on_target=on_target,
      **options)
  result = dict(target.settings, target=target.name, devices=len(target.devices),
                device_memory=target.device_memory, compiler=target.compiler,
                rows=[r.to_dict() for r in rows])
  if args.json:
    print(json.dumps(result))
  if args.out:
    with open(args.out, 'x') as f:
      json.dump(result, f, indent=1)
    if not args.json:
      print(f'written: {args.out}')
  return 0


def build_parser() -> argparse.ArgumentParser:
  from jaxprompt.config import HELP
  parser = Parser(prog='jaxprompt', description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--debug', action='store_true', help='show tracebacks')
  sub = parser.add_subparsers(dest='command', required=True)

  tune = sub.add_parser('tune', help='tune a soft prompt (no arguments: the embedded demo)',
                        description='Also accepts --gin_file=F and --gin.NAME=VALUE.')
  _add_run_arguments(tune)
  tune.add_argument('--resume', action='store_true', help='continue the run in --model_dir')
  tune.add_argument('--train_file', help='a JSONL/TSV/CSV file of training examples')
  tune.add_argument('--validation_file', help='a JSONL/TSV/CSV file of validation examples')
  tune.add_argument('--input_column', default='input', help='input column(s) of the files')
  tune.add_argument('--target_column', default='target', help='target column of the files')
  tune.add_argument('--label_column', default=None, help='label column (classification)')
  tune.add_argument('--label_names', default=None, help='comma-separated label texts')
  tune.add_argument('--demo_steps', type=int, default=None, help=argparse.SUPPRESS)

  ev = sub.add_parser('eval', help='evaluate a prompt file (or none) on a task split')
  ev.add_argument('--task', required=True, help='seqio task or mixture')
  ev.add_argument('--backbone', required=True,
                  help="checkpoint (T5X legacy/Orbax, HF), or 'lab' for the lab's backbone")
  ev.add_argument('--prompt', default=None, nargs='+',
                  help='prompt file (.safetensors, .npy or a PEFT adapter directory) or a '
                  'model-tuned checkpoint; several prompt files vote as an ensemble; none: the '
                  'backbone alone')
  ev.add_argument('--split', default='validation', help='split to score')
  ev.add_argument('--mode', default='auto', choices=('auto', 'rank', 'greedy', 'beam'),
                  help='rank classification, greedy or beam decoding (auto: rank if labelled)')
  ev.add_argument('--batch_size', type=int, default=32, help='evaluation batch size')
  ev.add_argument('--inputs_length', type=int, default=None,
                  help="input budget (default: the task's own, else 512)")
  ev.add_argument('--targets_length', type=int, default=None,
                  help="target budget (default: the task's own, else 16)")
  ev.add_argument('--max_examples', type=int, default=None, help='score the first N only')
  ev.add_argument('--config', default=None, help='T5 config name when the checkpoint has none')
  ev.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                  help="activation dtype (default: the checkpoint config's, float32 for T5X and "
                       'HF checkpoints; bfloat16 scores as the shipped model gin files train)')
  ev.add_argument('--vocabulary', default=None, help="SentencePiece model (default: T5's)")
  ev.add_argument('--json', action='store_true', help='print the metrics as JSON')

  info = sub.add_parser('info', help='describe a run directory, a prompt file, a PEFT adapter '
                        'or a checkpoint')
  info.add_argument('path', help="the thing to describe ('lab': the lab backbone)")
  info.add_argument('--json', action='store_true', help='print JSON')

  ex = sub.add_parser('export', help='export a prompt file to another format')
  ex.add_argument('--to', required=True, choices=('peft', 'stablehlo'),
                  help='target format (stablehlo: prompt + backbone + greedy decoding as one '
                       'jax.export program)')
  ex.add_argument('--prompt', required=True,
                  help="a jaxprompt prompt file (stablehlo: also 'none' for the bare backbone)")
  ex.add_argument('--out', required=True, help='directory to write')
  ex.add_argument('--base_model', default=None,
                  help="base_model_name_or_path for PEFT (default: the prompt's backbone)")
  ex.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  ex.add_argument('--backbone', default=None, help='stablehlo: the backbone checkpoint')
  ex.add_argument('--batch_size', type=int, default=1, help='stablehlo: input rows B (1)')
  ex.add_argument('--inputs_length', type=int, default=512, help='stablehlo: input tokens L (512)')
  ex.add_argument('--max_decode_length', type=int, default=64,
                  help='stablehlo: output tokens T (64)')

  from jaxprompt.methods import commands
  for name, command in sorted(commands().items()):
    command.add_arguments(sub.add_parser(name, help=command.help))

  _add_plan_parser(sub)
  _add_infer_parser(sub)

  lab = sub.add_parser('lab', help="the lab: a small pretrained backbone and related tasks")
  lab_sub = lab.add_subparsers(dest='lab_command', required=True)
  b = lab_sub.add_parser('build', help='train (or reuse) the lab backbone')
  b.add_argument('--steps', type=int, default=None, help='pretraining steps')
  b.add_argument('--force', action='store_true', help='rebuild even if cached')
  b.add_argument('--preset', default=None,
                 help="backbone preset: demo (default, the demo's) or methods (stronger sources "
                      'for the methods\' evidence)')
  b.add_argument('--width', type=int, default=None,
                 help="a second backbone of another model width (e.g. 96: the projector's "
                      "source): the preset's settings with d_model WIDTH, mlp 2 x WIDTH, its heads "
                      'of WIDTH / heads; cached next to the first')
  b.add_argument('--seed', type=int, default=0, help='initialisation and data-order seed (0)')
  pa = lab_sub.add_parser('path', help="print the lab backbone's checkpoint path (built if needed)")
  pa.add_argument('--preset', default=None, help='backbone preset (default demo)')
  r = lab_sub.add_parser('report', help='measure prompt tuning vs baselines on the lab; '
                        "a method's study: report spot | transferability | xprompt (-h: its "
                        'options)')
  r.add_argument('what', nargs='?', default='targets', choices=('targets', 'sources', 'transfer'),
                 help='targets: no prompt / random / prompt tuning / model tuning per target '
                      '(default); sources: each source known with its prefix and through a '
                      'prompt; transfer: a related source prompt vs class-label init per target')
  r.add_argument('--preset', default=None,
                 help='backbone preset (default: demo for targets, methods for the others)')
  r.add_argument('--out', default=None, help='JSON file to write (default lab_report.json; '
                 'sources: lab_sources.json; transfer: lab_transfer.json)')
  r.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
  r.add_argument('--steps', type=int, default=None,
                 help='prompt- and model-tuning steps per target (default 1000)')
  r.add_argument('--tasks', default=None, help='comma-separated lab targets (default: 8)')
  r.add_argument('--work', default=None,
                 help='sources/transfer: keep the tuned prompts here (default: a temporary '
                      'directory); finished runs in it are reused, so `transfer` with the '
                      "`sources` report's --work starts from those source prompts")
  r.add_argument('--pairs', default=None,
                 help='transfer: TARGET:SOURCE,... (default: each target with its same-skill '
                      'source)')
  r.add_argument('--seeds', default='0', help='transfer: comma-separated seeds (default 0)')
  r.add_argument('--eval_period', type=int, default=50,
                 help='transfer: steps between validation checks (default 50)')
  r.add_argument('--learning_rate', type=float, default=None,
                 help="transfer: the targets' Adafactor learning rate, both inits (default 0.1)")
  return parser


# A method's study on the lab, `jaxprompt lab report STUDY ...`: each study parses its own
# options. `jaxprompt spot lab` and `jaxprompt transfer lab` are its older names.
LAB_STUDIES = {'spot': 'jaxprompt.lab.spot_study',
               'transferability': 'jaxprompt.lab.transfer_report',
               'xprompt': 'jaxprompt.lab.xprompt_study'}
STUDY_ALIASES = {('spot', 'lab'): 'spot', ('transfer', 'lab'): 'transferability'}


def _lab_study(rest: Sequence[str]) -> tuple[str, list[str], str] | None:
  """(the study's module, its arguments, its prog) when `rest` asks for a study, else None."""
  i = 1 if rest[:1] == ['--debug'] else 0
  head = tuple(rest[i:i + 3])
  if head[:2] == ('lab', 'report') and len(head) == 3 and head[2] in LAB_STUDIES:
    return LAB_STUDIES[head[2]], list(rest[i + 3:]), f'jaxprompt lab report {head[2]}'
  if head[:2] in STUDY_ALIASES:
    return LAB_STUDIES[STUDY_ALIASES[head[:2]]], list(rest[i + 2:]), f'jaxprompt {head[0]} lab'
  return None


def _run_lab_study(module: str, study_args: list[str], prog: str) -> int:
  import importlib
  return importlib.import_module(module).main(study_args, prog=prog)


def main(argv: Sequence[str] | None = None) -> int:
  with plain_warnings():
    return _main(argv)


@contextlib.contextmanager
def plain_warnings():
  """jaxprompt's own warnings (a prompt made for another backbone, ...) as one plain line on
  stderr, `jaxprompt: warning: ...`, without Python's source path and code line."""
  import warnings
  package = os.path.dirname(os.path.abspath(__file__)) + os.sep
  shown = warnings.showwarning

  def show(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package):
      print(f'jaxprompt: warning: {" ".join(str(message).split())}', file=sys.stderr)
    else:
      shown(message, category, filename, lineno, file, line)

  warnings.showwarning = show
  try:
    yield
  finally:
    warnings.showwarning = shown


def _main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, files, bindings = _split_gin_args(argv)
  study = _lab_study(rest)
  if study is not None:  # parsed by the study itself
    args = argparse.Namespace(command='lab', lab_command='report', debug=rest[:1] == ['--debug'])
  else:
    args = build_parser().parse_args(rest)
  light = args.command in ('info', 'export', 'plan') or (
      args.command == 'lab' and args.lab_command == 'path')
  if not light:  # the others read data through seqio (TensorFlow)
    host.import_quietly('tensorflow')
    quiet_libraries()
  if (files or bindings) and args.command not in ('tune', 'plan'):
    return _fail('--gin_file / --gin.NAME apply to `jaxprompt tune` and `plan` only')
  try:
    if study is not None:
      return _run_lab_study(*study)
    if args.command == 'tune':
      return _tune_command(args, files, bindings)
    if args.command == 'eval':
      return _eval_command(args)
    if args.command == 'info':
      return _info_command(args)
    if args.command == 'export':
      return _export_command(args)
    if args.command == 'infer':
      return _infer_command(args)
    if args.command == 'lab':
      return _lab_command(args)
    if args.command == 'plan':
      return _plan_command(args, files, bindings)
    from jaxprompt.methods import commands
    return commands()[args.command].run(args)
  except Exception as e:  # one line for the user; --debug for the traceback
    if args.debug or os.environ.get('JAXPROMPT_DEBUG'):
      raise
    known = (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError,
             RuntimeError, NotImplementedError, OSError)
    if isinstance(e, known):
      return _fail(_one_line(e))
    raise


def quiet_libraries() -> None:
  """Keeps library chatter out of the user's terminal: seqio's per-dataset absl warnings
  ("Using an uncached FunctionDataset ...") and gin's missing-path lines."""
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger('absl').setLevel(logging.ERROR)


def skip_absent_tpu(argv: Sequence[str], environ=None) -> None:
  """On a machine without an accelerator, `JAX_PLATFORMS=cpu` unless the user set it.

  jax tries every installed backend; with libtpu installed (the `tpu` extra, for `plan`) that
  loads libtpu, which prints "Failed to find host bounds ... TPU_WORKER_HOSTNAMES ... Source
  Location Trace" on a machine with no TPU. `host.runs_on_cpu` says no TPU only when there is no
  TPU device file (nor a GPU plugin), so a real accelerator is never hidden; `plan` is left as
  it is (it compiles with libtpu on purpose).
  """
  environ = os.environ if environ is None else environ
  if not environ.get('JAX_PLATFORMS', '').strip() and 'plan' not in argv[:2] and \
      host.runs_on_cpu(environ) and not _google_pci_device():
    environ['JAX_PLATFORMS'] = 'cpu'


def _google_pci_device() -> bool:
  """A PCI device of Google's vendor id (how jax itself looks for TPU chips)."""
  import glob
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      if open(vendor).read().strip() == '0x1ae0':
        return True
    except OSError:
      continue
  return False


def entry() -> None:
  """The `jaxprompt` console script: `main` in a process set up for XLA:CPU (`jaxprompt.host`)."""
  skip_absent_tpu(sys.argv[1:])
  host.reexec_with_huge_pages('jaxprompt.cli', sys.argv[1:])
  sys.exit(main())


if __name__ == '__main__':
  entry()
