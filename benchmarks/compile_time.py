"""Compile time of the prompt-tuning train step at T5.1.1-XL/XXL shapes: scanned vs unrolled.

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/compile_time.py                  # every case
    python benchmarks/compile_time.py --cases xl:unrolled:none,xl:scan:none  # a few

Nothing is allocated: the frozen backbone, the prompt and its optimizer state are
`jax.ShapeDtypeStruct`s, and the library's own train step (`steps.make_train_step` with
`prompt_inputs` and T5X Adafactor, jitted with the state donated as the engine does) is
lowered and compiled for one CPU device. Each case runs in a fresh subprocess (no compile
cache shared). Prints a table and writes `benchmarks/results/compile_time.json`.
A case is `SIZE:LAYOUT:REMAT` (`xl`/`xxl`, `unrolled`/`scan`, `none`/`minimal`/`full`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _harness import HERE, child_env, run_child, write_json

CASES = [f'{size}:{layout}:{remat}' for size in ('xl', 'xxl') for layout in ('unrolled', 'scan')
         for remat in ('none', 'full')]
# The papers' SuperGLUE setting (issue 20): batch 32, 512 inputs + 100 prompt tokens, 8 targets.
BATCH, INPUTS, PROMPT, TARGETS = 32, 512, 100, 8


def measure(case: str, activations: str, param_dtype: str) -> dict:
  """Lower + compile one case in this process; seconds and the compiled memory figures."""
  import jax
  import jax.numpy as jnp

  from jaxprompt.model import Transformer, get_config
  from jaxprompt.model.layout import cast_frozen
  from jaxprompt.model.network import param_shapes
  from jaxprompt.prompts.prompt import prompt_tree
  from jaxprompt.train import optimizers, steps

  size, layout, remat = case.split(':')
  cfg = get_config(f't5_1_1_{size}', dtype=activations)
  scan = layout == 'scan'
  module = Transformer(cfg, remat_policy=remat, scan_layers=scan)
  frozen = {'backbone': cast_frozen(param_shapes(cfg, scan_layers=scan), param_dtype)}
  tx = optimizers.t5x_adafactor(learning_rate=0.3, weight_decay_rate=1e-5)
  trainable = jax.eval_shape(lambda: prompt_tree(jnp.zeros((PROMPT, cfg.emb_dim), jnp.float32)))
  state = jax.eval_shape(lambda t: steps.init_state(t, tx), trainable)
  tokens = lambda n: jax.ShapeDtypeStruct((BATCH, n), jnp.int32)  # noqa: E731
  batch = {'encoder_input_tokens': tokens(INPUTS), 'decoder_input_tokens': tokens(TARGETS),
           'decoder_target_tokens': tokens(TARGETS),
           'decoder_loss_weights': jax.ShapeDtypeStruct((BATCH, TARGETS), jnp.float32)}
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  step = jax.jit(steps.make_train_step(module, steps.prompt_inputs, tx), donate_argnums=(0,))
  start = time.perf_counter()
  lowered = step.lower(state, frozen, batch, rng)
  lowered_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return dict(case=case, size=size, layout=layout, remat=remat, activations=activations,
              param_dtype=param_dtype, lower_s=round(lowered_s, 2),
              compile_s=round(compile_s, 2),
              argument_gib=round(memory.argument_size_in_bytes / 2**30, 2),
              temp_gib=round(memory.temp_size_in_bytes / 2**30, 2),
              devices=len(jax.devices()), backend=jax.default_backend())


def _child(case: str, args) -> dict:
  env = child_env(TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device
  code = (f'import sys; sys.path.insert(0, {HERE!r}); import _harness, compile_time as c; '
          f'_harness.emit_result(c.measure({case!r}, {args.activations!r}, '
          f'{args.param_dtype!r}))')
  return run_child(['-c', code], env, timeout=args.timeout, what=case)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default=','.join(CASES), help='comma-separated SIZE:LAYOUT:REMAT')
  parser.add_argument('--activations', default='bfloat16', help='activation dtype')
  parser.add_argument('--param_dtype', default='float32', help="the frozen backbone's dtype")
  parser.add_argument('--timeout', type=int, default=3600, help='seconds per case')
  parser.add_argument('--json', default=os.path.join(HERE, 'results', 'compile_time.json'))
  args = parser.parse_args(argv)
  rows = []
  print(f'{"case":<22} {"lower s":>8} {"compile s":>10} {"args GiB":>9} {"temp GiB":>9}')
  for case in args.cases.split(','):
    row = _child(case, args)
    rows.append(row)
    print(f'{case:<22} {row["lower_s"]:>8} {row["compile_s"]:>10} {row["argument_gib"]:>9} '
          f'{row["temp_gib"]:>9}', flush=True)
  write_json(args.json, dict(rows=rows, batch=BATCH, inputs=INPUTS, prompt=PROMPT,
                             targets=TARGETS, load_average=os.getloadavg()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
