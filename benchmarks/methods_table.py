"""The methods comparison as one markdown table (benchmarks/methods_lab.sh writes its inputs).

    python benchmarks/methods_table.py WORK [XPROMPT_STUDY_JSON]

Recorded run: benchmarks/results/methods_lab/.

Rows per target: every method of `jaxprompt compare` (WORK/compare_<target>.json), the SPoT row
(prompt tuning from the top-1 retrieved source: WORK/spot_<target>.json, WORK/rank_<target>.json)
and, given the XPrompt study's JSON, its chosen pruned-and-rewound prompt per seed (validation,
its own schedule). Then one line per method: the mean over targets of the seed means.
"""
import json, os, sys
import numpy as np
W = sys.argv[1]
XP = sys.argv[2] if len(sys.argv) > 2 else None
TARGETS = ('count_numbers', 'minority', 'more_numbers_than_colours')
ORDER = ('prompt_tuning', 'spot', 'xprompt', 'p_tuning', 'residual_prompt', 'multitask_prompt',
         'attempt', 'prefix_tuning', 'model_tuning')
xp = json.load(open(XP)) if XP and os.path.exists(XP) else None
print('| target | method | best validation (mean ± sd, 3 seeds) | seeds | trainable params | step ms | peak RSS MiB |')
print('|---|---|---|---|---|---|---|')
means = {}
for t in TARGETS:
  rows = {}
  f = f'{W}/compare_{t}.json'
  if not os.path.exists(f) or not os.path.getsize(f):
    continue
  for r in json.load(open(f)):
    rows[r['method']] = r
  if os.path.exists(f'{W}/spot_{t}.json') and os.path.getsize(f'{W}/spot_{t}.json'):
    r = json.load(open(f'{W}/spot_{t}.json'))[0]
    src = json.load(open(f'{W}/rank_{t}.json'))['ranking'][0]['task']
    rows['spot'] = dict(r, method=f'SPoT (prompt tuning from {src})')
  if xp:
    vals = [next(x for x in tr['importance']['rows'] if x['fraction'] == tr['importance']['chosen'])['val_after']
            for tr in xp['targets'] if tr['target'] == t]
    if vals:
      rows['xprompt'] = dict(method='XPrompt (chosen fraction, rewound)', scores=vals,
                             score_mean=float(np.mean(vals)),
                             score_std=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                             trainable_params=None, step_ms=None, peak_rss_mib=None)
  for m in ORDER:
    if m not in rows:
      continue
    r = rows[m]
    means.setdefault(m, {})[t] = r['score_mean']
    sc = '/'.join(f'{s:.1f}' for s in r['scores'])
    tp = f"{r['trainable_params']:,}" if r.get('trainable_params') else ''
    st = f"{r['step_ms']:.0f}" if r.get('step_ms') else ''
    pk = f"{r['peak_rss_mib']:.0f}" if r.get('peak_rss_mib') else ''
    print(f"| {t} | {r['method']} | {r['score_mean']:.1f} ± {r['score_std']:.1f} | {sc} | {tp} | {st} | {pk} |")
print()
print('| method | ' + ' | '.join(TARGETS) + ' | mean |')
print('|---|' + '---|' * (len(TARGETS) + 1))
for m in ORDER:
  if m in means and len(means[m]) == len(TARGETS):
    v = [means[m][t] for t in TARGETS]
    print(f'| {m} | ' + ' | '.join(f'{x:.1f}' for x in v) + f' | {np.mean(v):.1f} |')
