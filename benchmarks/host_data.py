"""Host data: one process's share of each global batch, whole read + slice vs per-host read.

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/host_data.py                  # the README table
    python benchmarks/host_data.py --tasks lab --batches 3 --json /tmp/h.json   # a quick look

A process of a multi-host run needs rows `index * B / count` on of every global batch. The
whole read tokenises all B examples and keeps its rows; the per-host read numbers the shuffled
raw stream and tokenises only its rows (`get_dataset(..., process_index, process_count)`). For
each simulated process count (the process index and count are parameters, one real process)
this times the share of process 0: the first batch (pipeline build and shuffle buffer fill)
and, after it, wall and CPU seconds per global batch (CPU: this process's, every tf.data thread
included). Both reads are checked to give the same rows. Tasks:

* `lab`: the lab task `lab_has_red_prefixed` (the lab's SentencePiece word vocabulary, inputs
  of up to 10 tokens);
* `long`: a file task of ~1,600-character passages of Python's own documentation
  (`pydoc_data.topics`, offline), tokenised by a SentencePiece unigram model of 8,000 pieces
  trained on them (inputs budget 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

# (process count, global batch): batch 32 at 1..8 processes; at 64 processes the global batch
# must hold a row per process, so 64 (one row each) and 2048 (32 rows each, a pod's usual share).
LAYOUTS = ((1, 32), (2, 32), (4, 32), (8, 32), (64, 64), (64, 2048))
LENGTHS = {'lab': None, 'long': {'inputs': 512, 'targets': 16}}


def register_long_task(work: str) -> str:
  """A file task of long passages with its own SentencePiece vocabulary; its name."""
  import pydoc_data.topics
  from jaxprompt.data import files, vocab as vocab_lib
  passages = []
  for topic, text in sorted(pydoc_data.topics.topics.items()):
    words = text.split()
    chunk = []
    for word in words:
      chunk.append(word)
      if sum(len(w) + 1 for w in chunk) > 1600:
        passages.append({'input': ' '.join(chunk), 'target': topic})
        chunk = []
  model = vocab_lib.train_sentencepiece([p['input'] for p in passages],
                                        os.path.join(work, 'pydoc_spm'), 8000)
  path = os.path.join(work, 'pydoc.jsonl')
  with open(path, 'w') as f:
    for passage in passages:
      f.write(json.dumps(passage) + '\n')
  files.register_file_task('host_data_pydoc', path,
                           vocabulary=vocab_lib.get_vocabulary(model))
  return 'host_data_pydoc'


def time_share(task: str, lengths, batch: int, count: int, read: str, batches: int) -> dict:
  """Process 0's share of `batches` global batches: first batch and per-batch times."""
  from jaxprompt.data.features import get_dataset
  wall, cpu = time.perf_counter(), time.process_time()
  it = get_dataset(task, lengths, 'train', batch, shuffle=True, seed=0, num_epochs=None,
                   process_index=0, process_count=count, read=read)
  first = next(it)
  first_s = time.perf_counter() - wall
  wall, cpu_after_first = time.perf_counter(), time.process_time()
  rows = [first] + [next(it) for _ in range(batches)]
  return dict(first_s=first_s, first_cpu_s=cpu_after_first - cpu,
              batch_s=(time.perf_counter() - wall) / batches,
              batch_cpu_s=(time.process_time() - cpu_after_first) / batches,
              rows=rows, reading=it.reading['read'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--tasks', default='lab,long')
  parser.add_argument('--batches', type=int, default=20, help='global batches timed after the '
                      'first')
  parser.add_argument('--layouts', default=','.join(f'{c}x{b}' for c, b in LAYOUTS),
                      help='process count x global batch, comma-separated')
  parser.add_argument('--json', help='also write the rows here')
  args = parser.parse_args()
  import logging
  import numpy as np
  from jaxprompt.lab import tasks as lab_tasks
  logging.getLogger('jaxprompt.data.features').setLevel(logging.ERROR)  # truncation counts
  work = tempfile.mkdtemp(prefix='host_data_')
  names = {}
  for kind in args.tasks.split(','):
    if kind == 'lab':
      lab_tasks.register_lab_tasks()
      names[kind] = (lab_tasks.seqio_name('has_red', prefixed=True), lab_tasks.SEQUENCE_LENGTH)
    else:
      names[kind] = (register_long_task(work), LENGTHS['long'])
  layouts = [tuple(map(int, x.split('x'))) for x in args.layouts.split(',')]
  results = []
  print('| task | processes | global batch | rows | read | first batch s | s / batch | '
        'CPU s / batch |')
  print('|---|---:|---:|---:|---|---:|---:|---:|')
  for kind, (task, lengths) in names.items():
    for count, batch in layouts:
      shares = {}
      for read in ('whole', 'per_host'):
        shares[read] = r = time_share(task, lengths, batch, count, read, args.batches)
        print(f'| {kind} | {count} | {batch} | {batch // count} | {r["reading"]} | '
              f'{r["first_s"]:.2f} | {r["batch_s"]:.4f} | {r["batch_cpu_s"]:.4f} |', flush=True)
        results.append(dict(task=kind, processes=count, batch=batch, read=r['reading'],
                            **{k: v for k, v in r.items() if k.endswith('_s')}))
      for a, b in zip(shares['whole']['rows'], shares['per_host']['rows']):
        for key in a:
          np.testing.assert_array_equal(a[key], b[key], err_msg=f'{kind} {count} {key}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
