"""XPrompt on the lab: accuracy vs pruned fraction, importance vs random masks, cost of scoring.

The logic is `jaxprompt.lab.xprompt_study` (its docstring says what is measured); this script
and `jaxprompt lab report xprompt` only parse and call it (same flags). Here --out defaults to
benchmarks/results/xprompt_lab.json (and .md beside it; refused without --overwrite):

    nice -n 10 python benchmarks/xprompt_lab.py                        # lab:methods, 3 seeds
    python benchmarks/xprompt_lab.py --targets minority --seeds 0 --steps 200 --fractions 0.5
    jaxprompt lab report xprompt --out benchmarks/results/xprompt_lab.json   # the same
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'xprompt_lab.json')


def main(argv=None) -> int:
  from jaxprompt import cli
  argv = list(sys.argv[1:] if argv is None else argv)
  return cli.main(['lab', 'report', 'xprompt', '--out', RESULTS] + argv)  # a later --out wins


if __name__ == '__main__':
  sys.exit(main())
