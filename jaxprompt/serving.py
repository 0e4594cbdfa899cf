"""`jaxprompt export --to stablehlo`: a prompt, its frozen backbone and the cached greedy
decoding loop as one serialized program (`jax.export`) that runs without jaxprompt.

The program takes the token ids and the weights as arguments: the weights travel beside it in
an `.npz` (numpy's own format, read with `allow_pickle=False`), so the program stays small and
the same program serves another prompt of the same shape. README.txt in the folder is the
calling convention; `signature.json` the same facts for programs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

PROGRAM = 'greedy_decode.jax_exported'
WEIGHTS = 'weights.npz'
SIGNATURE = 'signature.json'
README = 'README.txt'
# The README's example between these lines is what the test runs in a fresh process.
EXAMPLE_START, EXAMPLE_END = '--- example ---', '--- end of example ---'


def _names(tree, prefix: str) -> tuple[list[str], list[np.ndarray], object]:
  """'prefix/a/b/...' names, float32/int arrays and the treedef of a pytree of arrays."""
  import jax
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names, values = [], []
  for path, leaf in leaves:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path]
    names.append('/'.join([prefix] + keys))
    value = np.asarray(jax.device_get(leaf))
    if value.dtype.kind == 'f' and value.dtype != np.float64:
      value = value.astype(np.float32)  # bfloat16 is no numpy dtype: plain numpy cannot read it
    values.append(value)
  return names, values, treedef


def _product(bb, prompt: str | None):
  """(model_inputs(weights, input_ids) -> (params, prompt), weights tree, prompt position,
  description) of a prompt file, PEFT adapter or model-tuned checkpoint on backbone `bb`."""
  from jaxprompt.prompts import prompt as prompt_lib
  if prompt is None:
    return (lambda w, ids: (w['backbone'], None)), {'backbone': bb.params}, 0, 'none'
  from jaxprompt.checkpoints import exists, join
  from jaxprompt.methods import Context, get_method
  from jaxprompt.prompts.files import read_prompt
  if exists(join(str(prompt), 'config.json')) and not exists(join(str(prompt),
                                                                  'adapter_config.json')):
    method, metadata = get_method('model_tuning'), {}  # a model-tuned checkpoint
  else:
    metadata = read_prompt(prompt).metadata
    method = get_method(metadata.get('method', 'prompt_tuning'))
  if method.uses_task_index or method.ensemble:
    raise ValueError(f'{prompt}: a {method.name} product holds several prompts; export one '
                     "task's prompt file (the stack's rows are written per task)")
  ctx = Context(bb, metadata.get('task', ''), tuple(metadata.get('tasks') or ()), None, None,
                None, None)
  trainable, extras = method.load_product(prompt, ctx)
  position = prompt_lib.position_index(metadata.get('position') or 'prefix')
  if method.trains_backbone:  # the trainable is the whole model: no second copy of the backbone
    weights = {'trainable': trainable}
    return (lambda w, ids: method.eval_inputs(w['trainable'], {}, {})), weights, position, \
        method.name

  def model_inputs(w, ids):
    return method.eval_inputs(w['trainable'], {'backbone': w['backbone'], **w['extras']},
                              {'encoder_input_tokens': ids})
  return model_inputs, {'backbone': bb.params, 'trainable': trainable, 'extras': extras}, \
      position, method.name


def export_stablehlo(backbone, prompt: str | None, out_dir: str, *, batch_size: int = 1,
                     inputs_length: int = 512, max_decode_length: int = 64,
                     overwrite: bool = False, config=None,
                     platforms: tuple[str, ...] | None = None) -> str:
  """Writes `out_dir` with the serialized greedy-decoding program, its weights and README.txt.

  Args:
    backbone: checkpoint path ('lab' for the lab's), `(module, params)` or a `Backbone`.
    prompt: a prompt file / PEFT adapter / model-tuned checkpoint, or None (the bare backbone).
    batch_size, inputs_length: the program's input shape [batch_size, inputs_length] int32.
    max_decode_length: output steps T; the output is [batch_size, T] int32.
    platforms: the platforms the program runs on ('cpu', 'cuda', 'tpu'); this machine's
      default backend when None.
  """
  import jax
  import jax.numpy as jnp
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.model import decoding
  from jaxprompt.version import __version__
  for flag, value in (('--batch_size', batch_size), ('--inputs_length', inputs_length),
                      ('--max_decode_length', max_decode_length)):
    if int(value) < 1:
      raise ValueError(f'{flag} {value}: must be at least 1')
  if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir)
                                                    or os.listdir(out_dir)):
    raise FileExistsError(f'{out_dir}: already exists and is not empty; choose another --out or '
                          'pass --overwrite')
  if isinstance(backbone, str) and (backbone == 'lab' or backbone.startswith('lab:')):
    import jaxprompt.lab  # noqa: F401 - registers the name 'lab'
  bb = load_backbone(backbone, config)
  model_inputs, tree, position, method = _product(bb, prompt)
  groups = [_names(value, key) for key, value in tree.items()]
  names = [n for g in groups for n in g[0]]
  values = dict(zip(names, [v for g in groups for v in g[1]]))
  module, steps = bb.module, int(max_decode_length)

  def serve(input_ids, weights):
    rebuilt = {key: jax.tree_util.tree_unflatten(treedef, [weights[n] for n in group_names])
               for key, (group_names, _, treedef) in zip(tree, groups)}
    params, p = model_inputs(rebuilt, input_ids)
    return decoding.greedy_decode(module, params, input_ids, steps, prompt=p,
                                  prompt_position=position)

  ids_spec = jax.ShapeDtypeStruct((int(batch_size), int(inputs_length)), jnp.int32)
  weight_specs = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in values.items()}
  try:
    exported = jax.export.export(jax.jit(serve), platforms=platforms)(ids_spec, weight_specs)
  except KeyError as e:
    raise ValueError(f'{prompt}: a {method} product needs more than the token ids to decode '
                     f'({e}); export --to stablehlo takes one prompt per program') from None
  signature = {
      'program': PROGRAM, 'weights': WEIGHTS, 'format': 'jax.export (StableHLO)',
      'input': {'shape': [int(batch_size), int(inputs_length)], 'dtype': 'int32', 'pad_id': 0},
      'output': {'shape': [int(batch_size), steps], 'dtype': 'int32', 'eos_id': decoding.EOS_ID,
                 'after_eos': 0},
      'decoding': 'greedy', 'platforms': list(exported.platforms),
      'backbone': bb.name, 'backbone_fingerprint': bb.fingerprint,
      'prompt': None if prompt is None else str(prompt), 'method': method,
      'prompt_position': position, 'weights_count': len(values),
      'jax_version': jax.__version__, 'jaxprompt_version': __version__,
      'calling_convention_version': exported.calling_convention_version}
  _write_folder(out_dir, {
      PROGRAM: bytes(exported.serialize()),
      SIGNATURE: json.dumps(signature, indent=2).encode(),
      README: readme(signature).encode()}, values)
  return out_dir


def readme(s) -> str:
  b, l = s['input']['shape']
  t = s['output']['shape'][1]
  return f"""A greedy-decoding program exported by jaxprompt {s['jaxprompt_version']} (jax.export).

Backbone: {s['backbone']}
Prompt:   {s['prompt'] or 'none (the bare backbone)'} (method {s['method']})
Runs on:  {', '.join(s['platforms'])}; needs jax (>= {s['jax_version']} to be safe) and numpy,
          not jaxprompt.

Files
  {PROGRAM}   the serialized program (jax.export.Exported)
  {WEIGHTS}   its weights: the backbone's parameters and the prompt, by name
  {SIGNATURE}   these facts as JSON

Calling convention
  input_ids: int32 [{b}, {l}], token ids of the SentencePiece vocabulary the backbone was
    trained with (T5's: end each input with EOS = 1), right-padded with 0. Exactly this
    shape: pad a shorter batch with rows of 0 and drop their outputs; cut longer inputs.
  weights:   dict(np.load('{WEIGHTS}')), all {s['weights_count']} arrays, unchanged.
  returns:   int32 [{b}, {t}] output token ids; the row's first EOS ({s['output']['eos_id']}) ends
    it and every position after it is 0. Decode with the same SentencePiece model.

{EXAMPLE_START}
import jax
import numpy as np


def load(folder):  # the program as a function: int32 [{b}, {l}] ids -> int32 [{b}, {t}]
  with open(f'{{folder}}/{PROGRAM}', 'rb') as f:
    program = jax.export.deserialize(bytearray(f.read()))
  weights = dict(np.load(f'{{folder}}/{WEIGHTS}'))
  return lambda input_ids: np.asarray(program.call(np.asarray(input_ids, np.int32), weights))
{EXAMPLE_END}

Then, for example:
  decode = load('path/to/this/folder')
  input_ids = np.zeros(({b}, {l}), np.int32)
  input_ids[0, :4] = [37, 423, 55, 1]  # your token ids, ending in EOS (1)
  print(decode(input_ids))
"""


def _write_folder(out_dir: str, files: dict[str, bytes], arrays: dict[str, np.ndarray]) -> None:
  """Writes the files and the arrays (as WEIGHTS) to a temporary folder beside `out_dir`, then
  renames it into place: an old `out_dir` is replaced only once the new one is complete."""
  out_dir = out_dir.rstrip(os.sep) or out_dir
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  old = None
  try:
    for name, data in files.items():
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(data)
    np.savez(os.path.join(tmp, WEIGHTS), **arrays)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)
    elif os.path.lexists(out_dir):  # --overwrite: move the old one aside, then drop it
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-', dir=parent)
      os.replace(out_dir, os.path.join(old, 'x'))
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.lexists(out_dir):
      os.replace(os.path.join(old, 'x'), out_dir)  # put the old one back
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
