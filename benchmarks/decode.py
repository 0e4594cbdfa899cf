"""Decoding throughput and peak memory: jaxprompt's Python API and `jaxprompt infer` vs Hugging
Face `generate` with a PEFT prompt-tuning adapter.

One invocation measures, side by side on this machine, on the same random T5.1.1-small
weights (written once with `save_hf`, read by both sides from the same safetensors file) and
the same random 100-token prompt (a jaxprompt prompt file, exported to a PEFT adapter with
`jaxprompt export --to peft`'s function):

  jax_api    `jaxprompt.inference.Predictor(...).predict_tokens(tokens)`: the compiled cached
             decoding program plus turning the output ids into texts; timed in-process after
             a first (compiling) call, which is reported apart.
  peft       `PeftModel.from_pretrained(T5ForConditionalGeneration, adapter).generate(...)`,
             torch float32, `torch.inference_mode()`, flush-denormal on (XLA:CPU flushes them).
  jax_cli    `jaxprompt infer --input rows.jsonl --output out.jsonl` as a subprocess, run twice:
             with one batch and with 16 x `--cli-batches` more rows (32 more batches of 1, 2
             of 16); the difference of the two wall times is the time of the extra batches
             (file reading, tokenising, decoding, writing), so the process start, imports,
             checkpoint load and compile cancel out.

Work: inputs of 128 tokens (random words through a SentencePiece model trained on them; the
jax side adds the 100 prompt vectors, PEFT prepends its 100 virtual tokens: 228 encoder
positions), 32 output tokens, greedy and beam search (4 beams), batch 1 and 16. tokens/s counts
batch x 32 output tokens per call (random weights almost never emit EOS; the PEFT child checks
its outputs' lengths and the report says how many rows ended early).

Where the time goes: each in-process side also times the encoder pass alone on the same batch
(jax: the jitted encoder with the prompt; PEFT: the T5 encoder on the prompt-prefixed
embeddings); the decoder steps are the rest.

Memory: each config's column is the child's peak resident memory (VmHWM, reset before the
config's timed calls) during those calls; the line under the table gives each child's peak over
its whole life (imports, load, compiles, all configs).

Each side runs in its own child process (so its peak resident memory, VmHWM, is its own),
`--rounds` times, odd rounds in reverse order (A B C C B A): a change in machine load hits the
sides alike. `--busy` runs a CPU-heavy job (a numpy matmul loop) beside the whole measurement.

  python benchmarks/decode.py                        # all sides, 2 rounds
  python benchmarks/decode.py --busy                 # beside a CPU-heavy job
  python benchmarks/decode.py --sides jax_api,peft --rounds 1 --configs greedy:16

Writes a table to stdout and JSON to benchmarks/results/decode.json (see --json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _harness import (HERE, REPO, child_env, emit_result, machine_facts, memory_mb,
                      reset_peak_memory, run_child, text_table, write_json)

CONFIG_NAME = 't5_1_1_small'
TEXT_LEN, PROMPT_LEN, OUT_LEN, BEAMS = 128, 100, 32, 4
CLI_ROWS = 16  # the command's extra rows come in these units (--cli-batches)
SIDES = ('jax_api', 'peft', 'jax_cli')
CONFIGS = ('greedy:1', 'greedy:16', 'beam:1', 'beam:16')
WORDS = ('the quick brown fox jumps over lazy dog river stone cloud paper lamp music garden '
         'window yellow seven planet orange silver basket winter market bridge forest').split()


def parse_config(text: str) -> tuple[str, int]:
  mode, batch = text.split(':')
  return mode, int(batch)


# ----------------------------------------------------------------------------- the work


def child_prepare(args) -> dict:
  """Random T5.1.1-small weights (HF folder), a random prompt file and its PEFT adapter, a
  SentencePiece model, the input rows (JSONL) and their [N, 128] token ids."""
  import numpy as np

  import jax
  from jaxprompt.checkpoints import save_hf
  from jaxprompt.checkpoints.peft import export_peft
  from jaxprompt.data.vocab import train_sentencepiece
  from jaxprompt.inference import encode_texts
  from jaxprompt.model import get_config, init_params
  from jaxprompt.prompts import init_prompt, get_prompt
  from jaxprompt.prompts.files import write_prompt
  import seqio
  d = args.workdir
  config = get_config(CONFIG_NAME)
  params = init_params(config, 0)
  checkpoint = os.path.join(d, 'checkpoint')
  save_hf(params, config, checkpoint)
  prompt = np.asarray(get_prompt(init_prompt(jax.random.PRNGKey(0), PROMPT_LEN, config.emb_dim)))
  write_prompt(os.path.join(d, 'prompt.safetensors'), prompt, method='prompt_tuning',
               backbone=checkpoint)
  export_peft(os.path.join(d, 'prompt.safetensors'), os.path.join(d, 'adapter'),
              base_model_name_or_path=checkpoint)
  rng = np.random.default_rng(0)
  texts = [' '.join(rng.choice(WORDS, 200)) for _ in range(CLI_ROWS * (1 + args.cli_batches))]
  spm = train_sentencepiece(texts, os.path.join(d, 'spm'), 200)
  vocab = seqio.SentencePieceVocabulary(spm)
  tokens, cut = encode_texts(vocab, texts, TEXT_LEN)
  assert cut == len(texts) and (tokens > 0).all(), 'every input fills its 128 tokens'
  np.save(os.path.join(d, 'tokens.npy'), tokens)
  with open(os.path.join(d, 'rows.jsonl'), 'w') as f:
    for t in texts:
      f.write(json.dumps({'input': t}) + '\n')
  return {'params': int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
          'rows': len(texts)}


_PROCESS_PEAK = [0.0]  # the child's peak RSS over every window: VmHWM restarts at each reset


def process_peak_mb() -> float:
  _PROCESS_PEAK[0] = max(_PROCESS_PEAK[0], memory_mb()['hwm'])
  return _PROCESS_PEAK[0]


def _timed(fn, repeats: int) -> tuple[float, list[float], float]:
  """(first call s, the timed calls' s, peak RSS MB during the timed calls)."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  process_peak_mb()
  reset_peak_memory()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  loop_peak = memory_mb()['hwm']
  process_peak_mb()
  return first, times, loop_peak


def child_jax_api(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.inference import Predictor
  from jaxprompt.model import decoding
  from jaxprompt.prompts.files import read_prompt
  d = args.workdir
  tokens = np.load(os.path.join(d, 'tokens.npy'))
  bb = load_backbone(os.path.join(d, 'checkpoint'))
  prompt = jnp.asarray(read_prompt(os.path.join(d, 'prompt.safetensors')).value)
  from jaxprompt.train.engine import CPU_COMPILER_OPTIONS  # as the predictor's program compiles
  encode = jax.jit(lambda p, ids, pr: decoding._encode(bb.module, p, ids, pr, 0),  # noqa: SLF001
                   compiler_options=CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu'
                   else None)
  out = {'backend': f'jax {jax.__version__} ({jax.default_backend()})'}
  for text in args.configs.split(','):
    mode, batch = parse_config(text)
    predictor = Predictor(bb, os.path.join(d, 'prompt.safetensors'), mode=mode,
                          num_beams=BEAMS, inputs_length=TEXT_LEN, max_decode_length=OUT_LEN,
                          batch_size=batch, vocabulary=os.path.join(d, 'spm.model'))
    rows = tokens[:batch]
    holder = {}

    def call():
      holder['rows'] = predictor.predict_tokens(rows)
    first, times, loop_peak = _timed(call, args.repeats)
    _, enc_times, _ = _timed(
        lambda: encode(bb.params, rows, prompt).block_until_ready(), args.repeats)
    out[text] = {'first_call_s': first, 'times_s': times, 'encoder_s': min(enc_times),
                 'loop_peak_rss_mb': loop_peak,
                 'predictions': [r['prediction'] for r in holder['rows']]}
    del predictor
  out['peak_rss_mb'] = process_peak_mb()
  return out


def child_peft(args) -> dict:
  import numpy as np
  import peft
  import seqio
  import torch
  import transformers
  d = args.workdir
  torch.set_flush_denormal(True)  # XLA:CPU flushes denormals to zero; see train_step.py
  tokens = np.load(os.path.join(d, 'tokens.npy'))
  base = transformers.T5ForConditionalGeneration.from_pretrained(
      os.path.join(d, 'checkpoint'), dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, os.path.join(d, 'adapter')).eval()
  vocab = seqio.SentencePieceVocabulary(os.path.join(d, 'spm.model'))
  out = {'backend': f'torch {torch.__version__} + transformers {transformers.__version__} + '
                    f'peft {peft.__version__} ({torch.get_num_threads()} threads)'}
  prompt_embeds = model.get_prompt_embedding_to_save('default').detach()  # [100, d]
  for text in args.configs.split(','):
    mode, batch = parse_config(text)
    ids = torch.from_numpy(tokens[:batch].astype(np.int64))
    mask = (ids > 0).long()
    holder = {}

    def call():
      with torch.inference_mode():
        holder['out'] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=OUT_LEN, do_sample=False,
            num_beams=1 if mode == 'greedy' else BEAMS)

    def encoder():
      with torch.inference_mode():
        embeds = torch.cat([prompt_embeds[None].expand(batch, -1, -1),
                            base.get_input_embeddings()(ids)], dim=1)
        full = torch.cat([torch.ones(batch, PROMPT_LEN, dtype=mask.dtype), mask], dim=1)
        base.get_encoder()(inputs_embeds=embeds, attention_mask=full)
    first, times, loop_peak = _timed(call, args.repeats)
    _, enc_times, _ = _timed(encoder, args.repeats)
    generated = holder['out'][:, 1:].numpy()  # after the decoder's start token
    ended = [int(np.argmax(row == 1)) + 1 if (row == 1).any() else len(row) for row in generated]
    out[text] = {'first_call_s': first, 'times_s': times, 'encoder_s': min(enc_times),
                 'loop_peak_rss_mb': loop_peak,
                 'rows_ended_early': sum(n < OUT_LEN for n in ended),
                 'predictions': [vocab.decode([int(t) for t in row[:n] if t > 1])
                                 for row, n in zip(generated, ended)]}
  out['peak_rss_mb'] = process_peak_mb()
  return out


def child_jax_cli(args, env) -> dict:
  """`jaxprompt infer` on one batch and on 1 + 16 x cli_batches / batch batches (the same 16 x
  cli_batches extra rows at every batch size): the difference is the time of the extra batches
  (start, imports, load and compile cancel out)."""
  d = args.workdir
  out = {}
  for text in args.configs.split(','):
    mode, batch = parse_config(text)
    walls = {}
    extra_batches = CLI_ROWS * args.cli_batches // batch
    for batches in (1, 1 + extra_batches):
      argv = [os.path.join(os.path.dirname(sys.executable), 'jaxprompt'), 'infer',
              '--backbone', os.path.join(d, 'checkpoint'),
              '--prompt', os.path.join(d, 'prompt.safetensors'),
              '--input', os.path.join(d, 'rows.jsonl'), '--output', os.path.join(d, 'out.jsonl'),
              '--overwrite', '--no_progress', '--mode', mode, '--num_beams', str(BEAMS),
              '--batch_size', str(batch), '--max_examples', str(batch * batches),
              '--inputs_length', str(TEXT_LEN), '--max_decode_length', str(OUT_LEN),
              '--vocabulary', os.path.join(d, 'spm.model')]
      t = time.perf_counter()
      proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
      walls[batches] = time.perf_counter() - t
      if proc.returncode:
        raise RuntimeError(f'jaxprompt infer failed: {proc.stderr[-2000:]}')
    with open(os.path.join(d, 'out.jsonl')) as f:
      predictions = [json.loads(line)['prediction'] for line in f][:batch]
    extra = walls[1 + extra_batches] - walls[1]
    out[text] = {'first_call_s': walls[1], 'times_s': [extra / extra_batches],
                 'wall_s': walls, 'predictions': predictions}
  return out


# ----------------------------------------------------------------------------- parent


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--sides', default=','.join(SIDES), help=f'comma list of {SIDES}')
  p.add_argument('--configs', default=','.join(CONFIGS),
                 help='comma list of MODE:BATCH (greedy or beam)')
  p.add_argument('--rounds', type=int, default=2, help='runs per side (ABC CBA order)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per config (in-process)')
  p.add_argument('--cli-batches', type=int, default=2,
                 help='extra rows of the longer `jaxprompt infer` run, in 16s')
  p.add_argument('--busy', action='store_true',
                 help='run a CPU-heavy job (numpy matmuls on every core) beside the measurement')
  p.add_argument('--json', default=os.path.join(HERE, 'results', 'decode.json'))
  p.add_argument('--workdir', default=None, help=argparse.SUPPRESS)
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  return p


def child_main(args) -> int:
  kind = args.child
  if kind == 'prepare':
    result = child_prepare(args)
  elif kind == 'jax_api':
    result = child_jax_api(args)
  elif kind == 'peft':
    result = child_peft(args)
  else:
    result = child_jax_cli(args, child_env())
  emit_result(result)
  return 0


def busy_job() -> subprocess.Popen:
  """A CPU-heavy neighbour: float64 matmuls on every core, until killed."""
  code = ('import numpy as np\na = np.random.default_rng(0).random((1500, 1500))\n'
          'while True:\n  a = a @ a\n  a /= np.abs(a).max()\n')
  return subprocess.Popen([sys.executable, '-c', code])


def summarise(runs: dict[str, list[dict]], configs: list[str]) -> dict:
  """Per side and config: median tokens/s over every timed call of every round."""
  results = {}
  for side, side_runs in runs.items():
    for text in configs:
      mode, batch = parse_config(text)
      times = [t for r in side_runs for t in r[text]['times_s']]
      per_round = [statistics.median(r[text]['times_s']) for r in side_runs]
      entry = {'call_s_median': statistics.median(times),
               'tokens_per_s': batch * OUT_LEN / statistics.median(times),
               'tokens_per_s_per_round': [batch * OUT_LEN / t for t in per_round],
               'first_call_s': statistics.median(r[text]['first_call_s'] for r in side_runs)}
      if 'encoder_s' in side_runs[0][text]:
        enc = statistics.median(r[text]['encoder_s'] for r in side_runs)
        entry['encoder_s'] = enc
        entry['encoder_share'] = enc / entry['call_s_median']
      if 'peak_rss_mb' in side_runs[0]:
        entry['peak_rss_mb'] = max(r['peak_rss_mb'] for r in side_runs)
        entry['loop_peak_rss_mb'] = max(r[text]['loop_peak_rss_mb'] for r in side_runs)
      if 'rows_ended_early' in side_runs[0][text]:
        entry['rows_ended_early'] = max(r[text]['rows_ended_early'] for r in side_runs)
      results[f'{side} {text}'] = entry
  return results


def agreement(runs: dict[str, list[dict]], configs: list[str]) -> dict:
  """Share of rows whose prediction text equals PEFT's (the same weights, prompt and inputs)."""
  out = {}
  if 'peft' not in runs:
    return out
  for side in runs:
    for text in configs:
      if side == 'peft':
        continue
      a, b = runs[side][0][text]['predictions'], runs['peft'][0][text]['predictions']
      out[f'{side} {text}'] = sum(x == y for x, y in zip(a, b)) / len(b)
  return out


def table(results: dict, sides: list[str], configs: list[str]) -> str:
  rows = [('config', *(f'{s} tok/s' for s in sides), *(f'{s}/peft' for s in sides if s != 'peft'
                                                      and 'peft' in sides),
           *(f'{s} enc' for s in sides if s != 'jax_cli'),
           *(f'{s} MB' for s in sides if s != 'jax_cli'))]  # peak RSS during the config's calls
  for text in configs:
    r = {s: results[f'{s} {text}'] for s in sides}
    rows.append((text, *(f"{r[s]['tokens_per_s']:.0f}" for s in sides),
                 *(f"{r[s]['tokens_per_s'] / r['peft']['tokens_per_s']:.2f}x" for s in sides
                   if s != 'peft' and 'peft' in sides),
                 *(f"{100 * r[s]['encoder_share']:.0f}%" for s in sides if s != 'jax_cli'),
                 *(f"{r[s]['loop_peak_rss_mb']:.0f}" for s in sides if s != 'jax_cli')))
  return text_table(rows)


def main(argv=None) -> int:
  p = build_parser()
  args = p.parse_args(argv)
  if args.child:
    return child_main(args)
  sides = [s for s in args.sides.split(',') if s]
  configs = [c for c in args.configs.split(',') if c]
  if set(sides) - set(SIDES):
    p.error(f'unknown sides {sorted(set(sides) - set(SIDES))}; choose from {SIDES}')
  sys.path.insert(0, REPO)
  env = child_env()
  started, load_start = time.time(), os.getloadavg()
  neighbour = busy_job() if args.busy else None
  try:
    with tempfile.TemporaryDirectory(prefix='jaxprompt_decode_') as tmp:
      common = ['--workdir', tmp, '--configs', ','.join(configs), '--repeats', str(args.repeats),
                '--cli-batches', str(args.cli_batches)]
      me = os.path.abspath(__file__)
      print(f'writing random {CONFIG_NAME} weights, prompt, adapter, inputs to {tmp} ...',
            flush=True)
      prep = run_child([me, '--child', 'prepare'] + common, env, what='prepare')
      runs: dict[str, list[dict]] = {s: [] for s in sides}
      for rnd in range(args.rounds):
        for side in (sides if rnd % 2 == 0 else sides[::-1]):
          t = time.time()
          r = run_child([me, '--child', side] + common, env, what=side)
          runs[side].append(r)
          print(f'  round {rnd + 1} {side}: ' + ', '.join(
              f"{c} {parse_config(c)[1] * OUT_LEN / statistics.median(r[c]['times_s']):.0f} tok/s"
              for c in configs) + f' ({time.time() - t:.0f} s)', flush=True)
  finally:
    if neighbour is not None:
      neighbour.kill()
      neighbour.wait()
  load_end = os.getloadavg()
  results = summarise(runs, configs)
  same = agreement(runs, configs)
  print()
  print(f'{CONFIG_NAME} ({prep["params"] / 1e6:.1f}M params), {TEXT_LEN} input tokens + '
        f'{PROMPT_LEN} prompt vectors, {OUT_LEN} output tokens, beams {BEAMS}; {args.rounds} '
        f'rounds; busy neighbour {args.busy}; load average {load_start[0]:.1f} at start, '
        f'{load_end[0]:.1f} at end on {os.cpu_count()} CPUs')
  print(table(results, sides, configs))
  print('peak RSS over the whole child (imports, load, compiles, every config): ' + ', '.join(
      f"{s} {max(r['peak_rss_mb'] for r in runs[s]):.0f} MB" for s in sides if s != 'jax_cli'))
  print('predictions equal to PEFT\'s: ' + ', '.join(f'{k} {100 * v:.0f}%'
                                                     for k, v in same.items()))
  report = {
      'time': time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(started)),
      'wall_s': time.time() - started,
      'machine': dict(machine_facts(), loadavg_start=load_start, loadavg_end=load_end),
      'config': CONFIG_NAME, 'params': prep['params'], 'text_tokens': TEXT_LEN,
      'prompt_tokens': PROMPT_LEN, 'output_tokens': OUT_LEN, 'beams': BEAMS,
      'rounds': args.rounds, 'repeats': args.repeats, 'cli_batches': args.cli_batches,
      'busy': args.busy, 'backends': {s: runs[s][0].get('backend') for s in sides},
      'results': results, 'same_predictions_as_peft': same,
  }
  write_json(args.json, report, indent=2)
  print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
