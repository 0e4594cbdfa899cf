"""XPrompt's importance pass against one train step: same model, batch and prompt, on CPU.

    python benchmarks/xprompt_importance.py                     # lab-sized T5 (d 128), batch 16
    python benchmarks/xprompt_importance.py --config t5_1_1_small --inputs 156 --targets 8 \
        --batch 8 --repeats 5                                    # T5.1.1-small shapes

The train step is the `xprompt` method's (the masked prompt mapping, T5X Adafactor lr 0.3 with
weight decay 1e-5, dropout 0.1: a rewinding run's step). The importance pass is one `Scorer` pass
on the same batch (masks at 1, dropout off, the result fetched to the host), per example (the
default, one backward pass with one mask copy per example) and per batch. Random weights (timing
does not depend on their values). The three are interleaved, each call synchronised, so a change
in machine load hits all alike; the median of --repeats is reported, and the median of each
repeat's own ratio (paired). --json FILE writes all times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # noqa: E402
from _harness import processor, write_json  # noqa: E402

PROMPT_LENGTH = 20  # the paper's
PIECES = 16


def model_config(name: str, vocab: int):
  from jaxprompt.lab.backbone import lab_config
  from jaxprompt.model import get_config
  if name == 'lab':  # the lab's `methods` backbone: d 128, 8 heads of 16, mlp 256, 3 + 3 layers
    return lab_config(vocab, 'methods').replace(dropout_rate=0.1)
  return get_config(name, dropout_rate=0.1)


def random_batch(rs, batch: int, inputs: int, targets: int, vocab: int) -> dict[str, np.ndarray]:
  tgt = rs.randint(2, vocab, (batch, targets)).astype(np.int32)
  return {'encoder_input_tokens': rs.randint(2, vocab, (batch, inputs)).astype(np.int32),
          'decoder_input_tokens': np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
          'decoder_target_tokens': tgt, 'decoder_loss_weights': np.ones_like(tgt),
          'example_mask': np.ones((batch,), np.int32)}


def measure(args) -> dict:
  import jax
  from jaxprompt.checkpoints.backbone import load_backbone
  from jaxprompt.methods import xprompt as xp
  from jaxprompt.model import Transformer, init_params
  cfg = model_config(args.config, args.vocab)
  params = init_params(cfg, 0)
  bb = load_backbone((Transformer(cfg), params))
  rs = np.random.RandomState(0)
  batch = random_batch(rs, args.batch, args.inputs, args.targets, cfg.vocab_size)
  value = rs.uniform(-0.5, 0.5, (PROMPT_LENGTH, cfg.emb_dim)).astype(np.float32)
  eng, state = xp.unpruned_train_engine(bb, value, PIECES)
  dev_batch = eng.put_batch(batch)
  rng = jax.random.PRNGKey(0)
  scorers = {per: xp.Scorer(bb, value, None, None, None, pieces=PIECES, batches=1, per=per,
                            batch_source=[batch]) for per in ('example', 'batch')}

  def train_step():
    nonlocal state
    state, metrics = eng.train_step(state, eng.frozen, dev_batch, rng)
    jax.block_until_ready(metrics)

  calls = {'train_step': train_step}
  for per, scorer in scorers.items():
    calls[f'importance_per_{per}'] = lambda s=scorer: s.batch_sums(ones_t, ones_p)
  for fn in calls.values():  # compile and warm up
    fn()
    fn()
  times = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, fn in calls.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  median = {name: float(np.median(t)) for name, t in times.items()}
  step = median['train_step']
  return {'config': args.config, 'emb_dim': cfg.emb_dim, 'batch': args.batch,
          'inputs': args.inputs, 'targets': args.targets, 'prompt': [PROMPT_LENGTH, PIECES],
          'repeats': args.repeats, 'median_s': median,
          'ratio_to_train_step': {n: median[n] / step for n in median if n != 'train_step'},
          # the median of each repeat's own ratio: steadier when the machine's load drifts
          'paired_ratio': {n: float(np.median(np.array(t) / np.array(times['train_step'])))
                           for n, t in times.items() if n != 'train_step'},
          'times_s': times, 'machine': processor(),
          'cpus': os.cpu_count(), 'load_average': os.getloadavg()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='lab', help="'lab' or a named T5 config (t5_1_1_small)")
  p.add_argument('--vocab', type=int, default=256, help="vocabulary size of the 'lab' config")
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--inputs', type=int, default=10, help='text tokens (the lab: 10)')
  p.add_argument('--targets', type=int, default=9, help='target tokens (the lab: 9)')
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--json', default=None, help='write the result here')
  args = p.parse_args(argv)
  out = measure(args)
  for name, t in out['median_s'].items():
    ratio = out['ratio_to_train_step'].get(name)
    print(f'{name:24s} {1e3 * t:9.1f} ms' + (
        f'   {ratio:.2f}x train step (paired {out["paired_ratio"][name]:.2f}x)' if ratio else ''))
  print(f'({out["config"]}, batch {args.batch}, {args.inputs}+{PROMPT_LENGTH} encoder positions, '
        f'{args.targets} targets; median of {args.repeats}; load {out["load_average"][0]:.2f})')
  if args.json:
    if os.path.exists(args.json):
      print(f'{args.json}: exists; not replaced', file=sys.stderr)
      return 2
    write_json(args.json, out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
