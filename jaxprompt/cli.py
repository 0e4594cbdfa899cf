"""The `jaxprompt` command. Every run is a gin run underneath (T5X conventions).

  jaxprompt tune                      # the embedded demo: lab backbone + lab target task
  jaxprompt tune --gin_file=models/t5_1_1/base.gin --gin_file=runs/prompt_tune.gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'jaxprompt_glue_sst2'" \
      --gin.INITIAL_CHECKPOINT_PATH="'/ckpt/checkpoint_1100000'"
  jaxprompt eval --prompt runs/x/prompt_best.safetensors --task jaxprompt_glue_sst2 --backbone CKPT
  jaxprompt info PATH                 # a checkpoint or a prompt file
  jaxprompt lab build | report        # the lab's pretrained backbone and its measurements
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from jaxprompt import host

# Flags that are shorthands for the run file's gin macros.
MACRO_FLAGS = {
    'model_dir': 'MODEL_DIR', 'task': 'MIXTURE_OR_TASK_NAME', 'backbone': 'INITIAL_CHECKPOINT_PATH',
    'steps': 'TRAIN_STEPS', 'batch_size': 'BATCH_SIZE', 'prompt_length': 'PROMPT_LENGTH',
    'eval_period': 'EVAL_PERIOD', 'learning_rate': 'LEARNING_RATE', 'vocabulary': 'VOCABULARY',
    'num_partitions': 'NUM_PARTITIONS', 'seed': 'SEED', 'dropout_rate': 'DROPOUT_RATE',
}
# Flags that bind an argument of `tune` directly.
TUNE_FLAGS = ('prompt_init', 'config', 'method', 'patience', 'eval_mode', 'max_eval_examples',
              'prompt_position')


class UsageError(ValueError):
  pass


def _fail(message: str) -> int:
  print(f'jaxprompt: error: {message}', file=sys.stderr)
  return 2


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


def gin_tune(files: Sequence[str], bindings: Sequence[str]):
  """Parses gin files/bindings (package gin/ on the search path) and runs the bound `tune`."""
  import gin

  from jaxprompt import tuning
  from jaxprompt.model.config import T5Config
  gin.clear_config()
  gin.add_config_file_search_path(os.path.join(os.path.dirname(__file__), 'gin'))
  for name, fn in (('tune', tuning.tune), ('setup_tasks', setup_tasks),
                   ('network.T5Config', T5Config)):
    if not gin.config._REGISTRY.get(name):  # noqa: SLF001 - gin has no public "is registered"
      gin.external_configurable(fn, name)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings))
  except (ValueError, IOError, SyntaxError) as e:
    raise UsageError('gin: ' + ' '.join(str(e).split())) from None
  configured_setup = gin.get_configurable('setup_tasks')
  configured_tune = gin.get_configurable('tune')
  try:
    configured_setup()
    return configured_tune()
  except RuntimeError as e:
    if 'REQUIRED' in str(e) or 'required' in str(e):
      raise UsageError('gin: ' + ' '.join(str(e).split()) +
                       ' (bind it with --gin.NAME=value or the matching flag)') from None
    raise


def setup_tasks(vocabulary: str | None = None, train_file: str | None = None,
                validation_file: str | None = None, task_name: str = 'user_task',
                input_column: str = 'input', target_column: str = 'target',
                label_column: str | None = None, label_names: Sequence[str] | None = None):
  """Registers the TFDS tasks, the lab tasks and (optionally) a task from the user's files."""
  from jaxprompt.data import tasks, vocab as vocab_lib
  from jaxprompt.lab import register_lab_tasks
  vocab = vocab_lib.get_vocabulary(vocabulary) if vocabulary else None
  tasks.register_tasks(vocab)
  register_lab_tasks()
  if train_file:
    from jaxprompt.data.files import register_file_task
    register_file_task(task_name, train_file, validation_file, input_column=input_column,
                       target_column=target_column, label_column=label_column,
                       label_names=list(label_names) if label_names else None, vocabulary=vocab)


def _tune_command(args, files: list[str], bindings: list[str]) -> int:
  if not files and not bindings and not any(
      getattr(args, f) is not None for f in list(MACRO_FLAGS) + list(TUNE_FLAGS) + ['train_file']):
    from jaxprompt.lab import demo
    demo.run_demo(steps=args.demo_steps)
    return 0
  files = files or ['runs/prompt_tune.gin']
  extra = []
  for flag, macro in MACRO_FLAGS.items():
    value = getattr(args, flag)
    if value is not None:
      extra.append(_binding(macro, str(value)))
  for flag in TUNE_FLAGS:
    value = getattr(args, flag)
    if value is not None:
      extra.append(_binding(f'tune.{flag}', str(value)))
  if args.inputs_length or args.targets_length:
    extra.append(f"TASK_FEATURE_LENGTHS = {{'inputs': {args.inputs_length or 512}, "
                 f"'targets': {args.targets_length or 16}}}")
  if args.resume:
    extra.append('tune.resume = True')
  else:
    extra.append('tune.resume = False')
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
    print('validation before: ' + _fmt(result.initial_metrics))
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
  path = args.path
  if path.endswith(('.safetensors', '.npy')) and os.path.isfile(path):
    from jaxprompt.prompts.files import describe_prompt, read_prompt
    if args.json:
      p = read_prompt(path)
      print(json.dumps({'shape': list(p.value.shape), **p.metadata}, default=str))
    else:
      print(describe_prompt(path))
    return 0
  from jaxprompt.checkpoints.inspect import describe, format_description
  d = describe(path)
  print(json.dumps(d, default=str) if args.json else format_description(d))
  return 0


def _eval_command(args) -> int:
  from jaxprompt import evaluate
  setup_tasks(args.vocabulary)
  prompt = args.prompt[0] if args.prompt and len(args.prompt) == 1 else args.prompt
  metrics = evaluate.evaluate(args.task, backbone=args.backbone, prompt=prompt,
                              split=args.split, mode=args.mode, batch_size=args.batch_size,
                              feature_lengths={'inputs': args.inputs_length,
                                               'targets': args.targets_length},
                              max_examples=args.max_examples, config=args.config)
  if args.json:
    print(json.dumps(metrics))
  else:
    width = max(len(k) for k in metrics)
    print(f'{args.task} [{args.split}]' + (f' with {" + ".join(args.prompt)}' if args.prompt
                                            else ''))
    for k, v in metrics.items():
      print(f'  {k:<{width}}  {v:10.4f}')
  return 0


def _lab_command(args) -> int:
  from jaxprompt.lab import backbone, report
  if args.lab_command == 'build':
    path = backbone.build(steps=args.steps, force=args.force)
    print(f'lab backbone: {path}')
  else:
    tasks = args.tasks.split(',') if args.tasks else report.DEFAULT_TASKS
    report.main(out=args.out, steps=args.steps, tasks=tasks, overwrite=args.overwrite)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='jaxprompt', description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--debug', action='store_true', help='show tracebacks')
  sub = parser.add_subparsers(dest='command', required=True)

  tune = sub.add_parser('tune', help='tune a soft prompt (no arguments: the embedded demo)',
                        description='Also accepts --gin_file=F and --gin.NAME=VALUE.')
  for flag in MACRO_FLAGS:
    tune.add_argument(f'--{flag}', default=None, help=f'sets gin macro {MACRO_FLAGS[flag]}')
  for flag in TUNE_FLAGS:
    tune.add_argument(f'--{flag}', default=None, help=f'sets tune.{flag}')
  tune.add_argument('--inputs_length', type=int, default=None)
  tune.add_argument('--targets_length', type=int, default=None)
  tune.add_argument('--resume', action='store_true', help='continue the run in --model_dir')
  tune.add_argument('--train_file', help='a JSONL/TSV/CSV file of training examples')
  tune.add_argument('--validation_file')
  tune.add_argument('--input_column', default='input')
  tune.add_argument('--target_column', default='target')
  tune.add_argument('--label_column', default=None)
  tune.add_argument('--label_names', default=None, help='comma-separated label texts')
  tune.add_argument('--demo_steps', type=int, default=None, help=argparse.SUPPRESS)

  ev = sub.add_parser('eval', help='evaluate a prompt file (or none) on a task split')
  ev.add_argument('--task', required=True)
  ev.add_argument('--backbone', required=True, help='checkpoint (T5X legacy/Orbax, HF)')
  ev.add_argument('--prompt', default=None, nargs='+',
                  help='prompt file (.safetensors or .npy); several files vote as an ensemble')
  ev.add_argument('--split', default='validation')
  ev.add_argument('--mode', default='auto', choices=('auto', 'rank', 'greedy', 'beam'))
  ev.add_argument('--batch_size', type=int, default=32)
  ev.add_argument('--inputs_length', type=int, default=512)
  ev.add_argument('--targets_length', type=int, default=16)
  ev.add_argument('--max_examples', type=int, default=None)
  ev.add_argument('--config', default=None)
  ev.add_argument('--vocabulary', default=None)
  ev.add_argument('--json', action='store_true')

  info = sub.add_parser('info', help='describe a checkpoint or a prompt file')
  info.add_argument('path')
  info.add_argument('--json', action='store_true')

  lab = sub.add_parser('lab', help="the lab: a small pretrained backbone and related tasks")
  lab_sub = lab.add_subparsers(dest='lab_command', required=True)
  b = lab_sub.add_parser('build', help='train (or reuse) the lab backbone')
  b.add_argument('--steps', type=int, default=None)
  b.add_argument('--force', action='store_true')
  r = lab_sub.add_parser('report', help='measure prompt tuning vs baselines on the lab')
  r.add_argument('--out', default=None, help='JSON file to write (default lab_report.json)')
  r.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
  r.add_argument('--steps', type=int, default=None,
                 help='prompt- and model-tuning steps per target (default 1000)')
  r.add_argument('--tasks', default=None, help='comma-separated lab targets (default: 8)')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, files, bindings = _split_gin_args(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  if args.command != 'info':  # the others read data through seqio, which loads TensorFlow
    host.import_quietly('tensorflow')
  if (files or bindings) and args.command != 'tune':
    return _fail('--gin_file / --gin.NAME apply to `jaxprompt tune` only')
  try:
    if args.command == 'tune':
      return _tune_command(args, files, bindings)
    if args.command == 'eval':
      return _eval_command(args)
    if args.command == 'info':
      return _info_command(args)
    return _lab_command(args)
  except Exception as e:  # one line for the user; --debug for the traceback
    if args.debug or os.environ.get('JAXPROMPT_DEBUG'):
      raise
    known = (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError,
             RuntimeError, NotImplementedError)
    if isinstance(e, known):
      return _fail(' '.join(str(e).split()) or type(e).__name__)
    raise


def entry() -> None:
  """The `jaxprompt` console script: `main` in a process set up for XLA:CPU (`jaxprompt.host`)."""
  host.reexec_with_huge_pages('jaxprompt.cli', sys.argv[1:])
  sys.exit(main())


if __name__ == '__main__':
  entry()
