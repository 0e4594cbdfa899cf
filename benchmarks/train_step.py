"""Train-step throughput, peak memory and FLOP utilisation: jaxprompt vs PyTorch/PEFT.

One invocation measures, side by side on this machine, on the same random T5.1.1-small
weights (written once with `save_hf`, read by both sides from the same safetensors file):

  jax_prompt    jaxprompt prompt tuning: `build_engine` + `prompt_inputs` + `t5x_adafactor`
                (lr 0.3, T5X prompt-tuning defaults), dropout 0.1, z_loss 1e-4
  peft_prompt   HF PEFT prompt tuning (`PromptTuningConfig(SEQ_2_SEQ_LM, 100 virtual tokens,
                num_transformer_submodules=1)`), `torch.optim.Adafactor(lr=0.3)`, dropout 0.1
  jax_model     jaxprompt model tuning: `model_tuning_inputs`, `trainable_is_backbone=True`,
                `t5x_adafactor(lr=1e-3, multiply_by_parameter_scale=True, no weight decay)`
  torch_model   transformers full fine-tuning, `torch.optim.Adafactor(lr=1e-3)` (factored
                second moments, parameter-relative step: the same family as T5X's)

Batch: 8 examples, 156 text tokens (+ 100 prompt vectors for prompt tuning, so the encoder
sees 256 positions), 8 target tokens; model tuning uses the same batch without a prompt.

Each case runs in its own child process, so peak memory (VmHWM, the kernel's resident
high-water mark) belongs to one framework alone. Two peaks are reported: the whole process
(imports, checkpoint loading, compilation, warm-up, timed steps) and the training loop alone
(the high-water mark is reset with /proc/self/clear_refs after warm-up). Warm-up steps are
excluded from the throughput; the first step (jax: trace + compile + run) is reported apart.
CPU time (user + sys) per step is reported too: on a shared machine it shows how many cores
a framework actually got, and `sys` is mostly page faults on freshly allocated memory.

Machine load moves while this runs, so each case runs `--rounds` times (default 2), odd rounds
in reverse case order (A B B A), and the median over all timed steps is reported.

FLOP/s: a step's work is XLA's own count for the compiled jaxprompt step
(`cost_analysis()['flops']`, first round), the same number for its PyTorch counterpart (the
same model, batch and gradients); the analytic matmul count (`model_flops`: forward, input
gradients, weight gradients only for model tuning) is reported beside it as a check. Each
framework's peak is measured in the same run: the best of a 2048x2048 @ 2048x2048 float32
matmul, jitted in JAX and in torch. `of peak` is each side's step FLOP/s over its own
framework's peak: how much of what its matmul kernels reach on this CPU the step gets.

Fairness: torch runs with `torch.set_flush_denormal(True)` (XLA:CPU flushes denormals to zero
already; `--no-flush-denormal` turns it off), its default 2 intra-op threads, float32.
`--malloc-hugetlb` (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) and `--malloc-trim` (malloc_trim
after loading and after warm-up) apply to both frameworks' children alike.

  python benchmarks/train_step.py                      # all cases, float32, as shipped
  python benchmarks/train_step.py --malloc-hugetlb --malloc-trim --json /tmp/tuned.json
  python benchmarks/train_step.py --dtype bfloat16     # jaxprompt activations in bfloat16
  python benchmarks/train_step.py --cases jax_prompt,peft_prompt --rounds 1 --steps 3

Writes a table to stdout and JSON to benchmarks/results/train_step.json (see --json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _harness import (HERE, REPO, best_time, child_env, emit_result, machine_facts, memory_mb,
                      release_free_memory, run_child, text_table, timed_loop, write_json)

CASES = ('jax_prompt', 'peft_prompt', 'jax_model', 'torch_model')
CONFIG_NAME = 't5_1_1_small'
BATCH, TEXT_LEN, PROMPT_LEN, TARGET_LEN = 8, 156, 100, 8


# ----------------------------------------------------------------------------- the work


def make_batch(vocab_size: int, seed: int = 0):
  """Full-length random text ending in EOS (1), targets ending in EOS; no padding."""
  import numpy as np
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, (BATCH, TEXT_LEN), dtype=np.int32)
  inputs[:, -1] = 1
  targets = rng.integers(2, vocab_size, (BATCH, TARGET_LEN), dtype=np.int32)
  targets[:, -1] = 1
  decoder_inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
  return {'encoder_input_tokens': inputs, 'decoder_input_tokens': decoder_inputs,
          'decoder_target_tokens': targets,
          'decoder_loss_weights': (targets > 0).astype(np.float32)}


def model_flops(cfg, batch: int, enc_len: int, dec_len: int, mode: str) -> float:
  """Matmul FLOPs of one train step (2 per multiply-add).

  mode 'prompt': forward + gradients of every activation (back to the prompt), no weight
  gradients; 'model': forward + activation gradients + weight gradients. Every matmul
  X[m, k] @ Y[k, n] costs 2mkn forward and 2mkn per operand gradient; attention
  (query-key, weights-value) has two activation operands. Element-wise work is left out.
  """
  d, hd, f, v = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  n_wi = len(cfg.mlp_activations)
  weight, act = 0.0, 0.0  # forward FLOPs of weight matmuls and activation-activation matmuls
  le, ld = enc_len, dec_len
  for _ in range(cfg.num_encoder_layers):
    weight += 2 * le * d * hd * 4  # q, k, v, out
    act += 2 * le * le * hd * 2  # scores, weights @ values
    weight += 2 * le * d * f * (n_wi + 1)  # wi_0, wi_1, wo
  for _ in range(cfg.num_decoder_layers):
    weight += 2 * ld * d * hd * 4  # self-attention q, k, v, out
    act += 2 * ld * ld * hd * 2
    weight += 2 * ld * d * hd * 2 + 2 * le * d * hd * 2  # cross q, out; k, v of the encoder
    act += 2 * ld * le * hd * 2
    weight += 2 * ld * d * f * (n_wi + 1)
  weight += 2 * ld * d * v  # logits
  forward = batch * (weight + act)
  backward_inputs = batch * (weight + 2 * act)
  backward_weights = batch * weight if mode == 'model' else 0.0
  return forward + backward_inputs + backward_weights


# ----------------------------------------------------------------------------- children


def child_prepare(args) -> dict:
  """Writes random T5.1.1-small weights (jaxprompt's T5X initialisers) as an HF directory."""
  from jaxprompt.checkpoints import save_hf
  from jaxprompt.model import get_config, init_params
  config = get_config(CONFIG_NAME)
  params = init_params(config, 0)
  save_hf(params, config, args.checkpoint)
  import jax
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  return {'params': int(n)}


def child_peak(args) -> dict:
  """Best float32 matmul rate of jitted JAX and of torch (n x n @ n x n), FLOP/s."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  n = args.matmul_size
  flops = 2.0 * n ** 3
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), np.float32))
  # compiled as jaxprompt's engine compiles its steps on CPU (`engine.CPU_COMPILER_OPTIONS`)
  from jaxprompt.train.engine import CPU_COMPILER_OPTIONS
  mm = jax.jit(jnp.matmul, compiler_options=CPU_COMPILER_OPTIONS)
  mm(a, b).block_until_ready()
  out = {'jax_matmul_flops_per_s':
         flops / best_time(lambda: mm(a, b).block_until_ready(), args.matmul_reps)}
  del a, b
  import torch
  ta = torch.randn(n, n)
  tb = torch.randn(n, n)
  torch.matmul(ta, tb)
  out['torch_matmul_flops_per_s'] = flops / best_time(lambda: torch.matmul(ta, tb),
                                                      args.matmul_reps)
  out['peak_flops_per_s'] = max(out['jax_matmul_flops_per_s'], out['torch_matmul_flops_per_s'])
  out['matmul_size'] = n
  return out


def child_jax(args, mode: str) -> dict:
  import jax

  from jaxprompt.checkpoints import load_t5
  from jaxprompt.prompts import init_prompt
  from jaxprompt.train.engine import build_engine
  from jaxprompt.train.optimizers import t5x_adafactor
  from jaxprompt.train.steps import LossConfig, make_train_step, model_tuning_inputs, prompt_inputs

  base_mb = memory_mb()['rss']
  module, params = load_t5(args.checkpoint)
  if args.malloc_trim:
    release_free_memory()
  config = module.config.replace(dtype=args.dtype, dropout_rate=0.1)
  module = type(module)(config)
  loaded_mb = memory_mb()['rss']
  if mode == 'prompt':
    tx = t5x_adafactor(learning_rate=0.3)
    trainable = init_prompt(jax.random.PRNGKey(0), PROMPT_LEN, config.emb_dim)
    frozen = {'backbone': params}
    engine, state = build_engine(module, prompt_inputs, tx, frozen, trainable)
    mapping = prompt_inputs
  else:
    tx = t5x_adafactor(learning_rate=1e-3, multiply_by_parameter_scale=True,
                       weight_decay_rate=None)
    frozen = {}
    engine, state = build_engine(module, model_tuning_inputs, tx, frozen, params,
                                 trainable_is_backbone=True)
    mapping = model_tuning_inputs
  del params, frozen
  batch = engine.put_batch(make_batch(config.vocab_size))
  rng = jax.random.PRNGKey(1)
  holder = {'state': state}
  del state

  def step():
    holder['state'], metrics = engine.train_step(holder['state'], engine.frozen, batch, rng)
    jax.block_until_ready((holder['state'], metrics))
    holder['metrics'] = metrics

  out = timed_loop(step, args.warmup, args.steps, args.malloc_trim)
  out['loss_last'] = float(holder['metrics']['loss'])
  out['rss_mb_after_imports'] = base_mb
  out['rss_mb_after_load'] = loaded_mb
  out['trainable_params'] = int(sum(x.size for x in jax.tree_util.tree_leaves(
      holder['state'].trainable)))
  out['backend'] = f'jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} dev)'
  if args.cost_analysis:
    # The same step, compiled again (not donated) only to ask XLA for its FLOP count.
    train = make_train_step(module, mapping, tx, LossConfig(), 0, True)
    with engine.mesh:
      t = time.perf_counter()
      compiled = jax.jit(train).lower(holder['state'], engine.frozen, batch, rng).compile()
      out['compile_s'] = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['xla_flops'] = float(cost.get('flops', float('nan'))) if cost else float('nan')
  return out


def child_torch(args, mode: str) -> dict:
  import numpy as np
  import torch
  import transformers

  torch.manual_seed(0)
  # XLA:CPU flushes denormals to zero; torch does not unless asked, and T5X-initialised
  # random weights produce denormal attention probabilities that make MKL ~5x slower.
  flush = bool(torch.set_flush_denormal(args.flush_denormal))
  base_mb = memory_mb()['rss']
  model = transformers.T5ForConditionalGeneration.from_pretrained(args.checkpoint,
                                                                  dtype=torch.float32)
  if args.malloc_trim:
    release_free_memory()
  loaded_mb = memory_mb()['rss']
  if mode == 'prompt':
    import peft
    config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM,
                                     num_virtual_tokens=PROMPT_LEN,
                                     num_transformer_submodules=1)
    model = peft.get_peft_model(model, config)
    lr = 0.3
    backend = f'torch {torch.__version__} + transformers {transformers.__version__} + peft ' \
              f'{peft.__version__}'
  else:
    lr = 1e-3
    backend = f'torch {torch.__version__} + transformers {transformers.__version__}'
  model.train()  # dropout 0.1, as the jax side
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.Adafactor(params, lr=lr)
  b = make_batch(model.config.vocab_size)
  input_ids = torch.from_numpy(b['encoder_input_tokens'].astype(np.int64))
  attention_mask = (input_ids > 0).long()
  decoder_input_ids = torch.from_numpy(b['decoder_input_tokens'].astype(np.int64))
  labels = torch.from_numpy(b['decoder_target_tokens'].astype(np.int64))
  labels[labels == 0] = -100
  holder = {}

  def step():
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids, labels=labels)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    holder['loss'] = float(out.loss.detach())

  out = timed_loop(step, args.warmup, args.steps, args.malloc_trim)
  out['loss_last'] = holder['loss']
  out['rss_mb_after_imports'] = base_mb
  out['rss_mb_after_load'] = loaded_mb
  out['trainable_params'] = int(sum(p.numel() for p in params))
  out['backend'] = f'{backend} ({torch.get_num_threads()} threads)'
  out['flush_denormal'] = flush
  return out


def run_case(kind: str, common: list[str], env) -> dict:
  """One child of this script: `kind` is prepare, peak or a case."""
  return run_child([os.path.abspath(__file__), '--child', kind] + common, env,
                   what=['--child', kind])


# ----------------------------------------------------------------------------- parent


def aggregate(runs: list[dict]) -> dict:
  """Pools the child runs of one case (one per round): medians of the step times."""
  times = [t for r in runs for t in r['step_times_s']]
  out = dict(runs[0])
  out.update(
      rounds=len(runs),
      step_times_s=times,
      step_s_median=statistics.median(times),
      step_s_min=min(times),
      first_step_s=statistics.median(r['first_step_s'] for r in runs),
      user_s_per_step=statistics.median(r['user_s_per_step'] for r in runs),
      sys_s_per_step=statistics.median(r['sys_s_per_step'] for r in runs),
      minor_faults_per_step=statistics.median(r['minor_faults_per_step'] for r in runs),
      peak_rss_mb_process=max(r['peak_rss_mb_process'] for r in runs),
      peak_rss_mb_train=max(r['peak_rss_mb_train'] for r in runs),
      loss_last=runs[-1]['loss_last'],
  )
  return out


def table(results: dict) -> str:
  rows = [('case', 'dtype', 's/step', 'ex/s', 'tok/s', 'cpu s/step', 'sys s', 'peak RSS MB',
           'loop RSS MB', '1st step s', 'GFLOP/s', 'of own peak')]
  for name, r in results.items():
    cpu = r['user_s_per_step'] + r['sys_s_per_step']
    rows.append((name, r['dtype'], f"{r['step_s_median']:.2f}", f"{r['examples_per_s']:.2f}",
                 f"{r['tokens_per_s']:.0f}", f"{cpu:.2f}", f"{r['sys_s_per_step']:.2f}",
                 f"{r['peak_rss_mb_process']:.0f}", f"{r['peak_rss_mb_train']:.0f}",
                 f"{r['first_step_s']:.1f}", f"{r['step_flops_per_s'] / 1e9:.0f}",
                 f"{100 * r['fraction_of_peak']:.0f}%"))
  return text_table(rows)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--cases', default=','.join(CASES), help=f'comma list of {CASES}')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='jaxprompt activation dtype (params stay float32); torch runs float32')
  p.add_argument('--steps', type=int, default=5, help='timed steps per case and round')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps (the first compiles)')
  p.add_argument('--rounds', type=int, default=2,
                 help='runs per case; odd rounds go through the cases in reverse (ABBA), '
                      'so a change in machine load hits both frameworks alike')
  p.add_argument('--matmul-size', type=int, default=2048)
  p.add_argument('--matmul-reps', type=int, default=3)
  p.add_argument('--no-cost-analysis', dest='cost_analysis', action='store_false',
                 help="skip XLA's FLOP count (saves one compile per jax case)")
  p.add_argument('--no-flush-denormal', dest='flush_denormal', action='store_false',
                 help='leave torch denormals on (XLA:CPU always flushes them)')
  p.add_argument('--malloc-hugetlb', action='store_true',
                 help='run every child with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 '
                      '(transparent huge pages for large mallocs)')
  p.add_argument('--jax-system-malloc', action='store_true',
                 help="run the jax children without the huge-page tunable that the `jaxprompt` "
                      'command sets for itself (see jaxprompt/host.py)')
  p.add_argument('--malloc-trim', action='store_true',
                 help='every child calls malloc_trim(0) after loading the weights and after '
                      'the warm-up steps (returns freed heap, e.g. compiler memory, to the OS)')
  p.add_argument('--xla-flags', default=None, help='extra XLA_FLAGS for the jax children')
  p.add_argument('--json', default=os.path.join(HERE, 'results', 'train_step.json'))
  p.add_argument('--checkpoint', default=None, help=argparse.SUPPRESS)
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  return p


def child_main(args) -> int:
  kind = args.child
  if kind == 'prepare':
    result = child_prepare(args)
  elif kind == 'peak':
    result = child_peak(args)
  elif kind.startswith('jax_'):
    result = child_jax(args, kind[len('jax_'):])
  else:
    result = child_torch(args, 'prompt' if kind == 'peft_prompt' else 'model')
  emit_result(result)
  return 0


def environments(args) -> tuple[dict, dict]:
  """(the torch children's environment, the jax children's): the same malloc settings, and
  for jax the huge-page tunable `jaxprompt` sets for itself and any extra XLA flags."""
  env = child_env()
  if args.malloc_hugetlb:
    env['GLIBC_TUNABLES'] = ':'.join(
        t for t in (env.get('GLIBC_TUNABLES', ''), 'glibc.malloc.hugetlb=1') if t)
  jax_env = dict(env)
  if not args.jax_system_malloc:  # what the `jaxprompt` command does for itself (jaxprompt.host)
    from jaxprompt import host
    jax_env = host.huge_pages_env(jax_env) or jax_env
  if args.xla_flags:
    jax_env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  return env, jax_env


def child_flags(args) -> list[str]:
  common = ['--steps', str(args.steps), '--warmup', str(args.warmup), '--dtype', args.dtype,
            '--matmul-size', str(args.matmul_size), '--matmul-reps', str(args.matmul_reps)]
  if not args.flush_denormal:
    common.append('--no-flush-denormal')
  if args.malloc_trim:
    common.append('--malloc-trim')
  return common


def run_rounds(args, cases, env, jax_env) -> tuple[dict, list[dict], dict[str, list[dict]]]:
  """Writes the weights once, then per round the matmul peak and every case (ABBA order)."""
  common = child_flags(args)
  with tempfile.TemporaryDirectory(prefix='jaxprompt_bench_') as tmp:
    checkpoint = os.path.join(tmp, 't5_1_1_small_random')
    common += ['--checkpoint', checkpoint]
    print(f'writing random {CONFIG_NAME} weights to {checkpoint} ...', flush=True)
    prep = run_case('prepare', common, env)
    peaks = []
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for rnd in range(args.rounds):
      print(f'round {rnd + 1}/{args.rounds}: float32 matmul peak ({args.matmul_size}^3) ...',
            flush=True)
      peaks.append(run_case('peak', common, env))
      order = cases if rnd % 2 == 0 else cases[::-1]
      for case in order:
        extra = [] if (rnd == 0 and args.cost_analysis) else ['--no-cost-analysis']
        r = run_case(case, common + extra, jax_env if case.startswith('jax_') else env)
        runs[case].append(r)
        print(f"  {case}: median {statistics.median(r['step_times_s']):.2f} s/step, "
              f"peak RSS {r['peak_rss_mb_process']:.0f} MB", flush=True)
  return prep, peaks, runs


def best_peak(peaks: list[dict], matmul_size: int) -> dict:
  peak = {k: max(q[k] for q in peaks) for k in
          ('jax_matmul_flops_per_s', 'torch_matmul_flops_per_s', 'peak_flops_per_s')}
  peak['matmul_size'] = matmul_size
  peak['per_round'] = peaks
  return peak


def case_results(args, cases, runs, peak) -> dict:
  """Each case pooled over its rounds, with throughput and FLOP utilisation."""
  from jaxprompt.model import get_config
  config = get_config(CONFIG_NAME)
  results = {}
  for case in cases:
    r = aggregate(runs[case])
    mode = 'prompt' if case.endswith('_prompt') else 'model'
    enc_len = TEXT_LEN + (PROMPT_LEN if mode == 'prompt' else 0)
    flops = model_flops(config, BATCH, enc_len, TARGET_LEN, mode)
    jax_case = 'jax_' + mode
    step_flops = runs[jax_case][0].get('xla_flops') if runs.get(jax_case) else None
    step_flops = step_flops or flops  # the analytic count without XLA's (--no-cost-analysis)
    framework = 'jax' if case.startswith('jax_') else 'torch'
    r.update(
        dtype=args.dtype if case.startswith('jax_') else 'float32',
        encoder_length=enc_len,
        examples_per_s=BATCH / r['step_s_median'],
        tokens_per_s=BATCH * (enc_len + TARGET_LEN) / r['step_s_median'],
        model_flops=flops,
        model_flops_per_s=flops / r['step_s_median'],
        step_flops=step_flops,
        step_flops_source='xla' if step_flops != flops else 'analytic',
        step_flops_per_s=step_flops / r['step_s_median'],
        framework_peak_flops_per_s=peak[f'{framework}_matmul_flops_per_s'],
        fraction_of_peak=step_flops / r['step_s_median'] / peak[f'{framework}_matmul_flops_per_s'],
    )
    results[case] = r
  return results


def framework_ratios(results: dict) -> dict:
  """jaxprompt against its PyTorch counterpart, where both ran: throughput and memory."""
  ratios = {}
  for a, b in [('jax_prompt', 'peft_prompt'), ('jax_model', 'torch_model')]:
    if a in results and b in results:
      ratios[f'{a}_vs_{b}'] = {
          'throughput_ratio': results[b]['step_s_median'] / results[a]['step_s_median'],
          'peak_rss_ratio': results[a]['peak_rss_mb_process'] / results[b]['peak_rss_mb_process'],
          'loop_rss_ratio': results[a]['peak_rss_mb_train'] / results[b]['peak_rss_mb_train'],
      }
  return ratios


def print_summary(args, prep, peak, results, ratios, env, jax_env, load_start, load_end):
  print()
  print(f'{CONFIG_NAME} ({prep["params"] / 1e6:.1f}M params), batch {BATCH}, {TEXT_LEN} text '
        f'+ {PROMPT_LEN} prompt input tokens (prompt tuning), {TARGET_LEN} target tokens; '
        f'{args.rounds} rounds x {args.steps} timed steps after {args.warmup} warm-up; '
        f'torch flush-denormal {args.flush_denormal}; GLIBC_TUNABLES jax '
        f'{jax_env.get("GLIBC_TUNABLES")}, torch {env.get("GLIBC_TUNABLES")}; '
        f'malloc_trim {args.malloc_trim}')
  print(f"float32 matmul peak ({args.matmul_size}^2, this run): jax "
        f"{peak['jax_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, torch "
        f"{peak['torch_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; load average "
        f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end on {os.cpu_count()} CPUs")
  print(table(results))
  for name, q in ratios.items():
    a, b = name.split('_vs_')
    print(f"{a} vs {b}: {q['throughput_ratio']:.2f}x throughput, "
          f"{q['peak_rss_ratio']:.2f}x peak RSS ({q['loop_rss_ratio']:.2f}x in the loop)")
  for name, r in results.items():
    framework = 'jax' if name.startswith('jax_') else 'torch'
    print(f"{name}: {r['step_flops'] / 1e9:.1f} GFLOP per step ({r['step_flops_source']} count) "
          f"in {r['step_s_median']:.2f} s = {r['step_flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"{100 * r['fraction_of_peak']:.0f}% of {framework}'s float32 matmul peak")
  for name, r in results.items():
    if 'xla_flops' in r:
      print(f"{name}: XLA counts {r['xla_flops'] / 1e9:.1f} GFLOP per step (analytic matmul "
            f"count {r['model_flops'] / 1e9:.1f}); XLA compile {r['compile_s']:.1f} s")


def main(argv=None) -> int:
  p = build_parser()
  args = p.parse_args(argv)
  if args.child:
    return child_main(args)
  cases = [c for c in args.cases.split(',') if c]
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    p.error(f'unknown cases {unknown}; choose from {CASES}')
  sys.path.insert(0, REPO)
  env, jax_env = environments(args)
  load_start = os.getloadavg()
  started = time.time()
  prep, peaks, runs = run_rounds(args, cases, env, jax_env)
  peak = best_peak(peaks, args.matmul_size)
  results = case_results(args, cases, runs, peak)
  ratios = framework_ratios(results)
  load_end = os.getloadavg()
  print_summary(args, prep, peak, results, ratios, env, jax_env, load_start, load_end)

  report = {
      'time': time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(started)),
      'wall_s': time.time() - started,
      'machine': dict(machine_facts(), loadavg_start=load_start, loadavg_end=load_end),
      'config': CONFIG_NAME, 'params': prep['params'],
      'batch': BATCH, 'text_tokens': TEXT_LEN, 'prompt_tokens': PROMPT_LEN,
      'target_tokens': TARGET_LEN, 'steps': args.steps, 'warmup': args.warmup,
      'rounds': args.rounds, 'jax_dtype': args.dtype, 'xla_flags': args.xla_flags,
      'torch_flush_denormal': args.flush_denormal, 'malloc_hugetlb': args.malloc_hugetlb,
      'glibc_tunables': {'jax': jax_env.get('GLIBC_TUNABLES'), 'torch': env.get('GLIBC_TUNABLES')},
      'malloc_trim': args.malloc_trim,
      'peak': peak, 'results': results, 'ratios': ratios,
  }
  write_json(args.json, report, indent=2)
  print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
