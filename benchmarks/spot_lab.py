"""SPoT on the lab, end to end (issue 12, section 5): the library of source prompts, the generic
prompt, task embeddings (independent and shared initialisation), retrieval scored against the
lab's relatedness, transfer with equal target budgets, and model tuning as the yardstick.

The logic is `jaxprompt.lab.spot_study.lab_evidence`; this script and `jaxprompt lab report spot`
(alias `jaxprompt spot lab`) only parse and call it (same flags):

    python benchmarks/spot_lab.py --out benchmarks/results/spot_lab_methods --work runs/spot_lab
    jaxprompt lab report spot --out benchmarks/results/spot_lab_methods --work runs/spot_lab
    jaxprompt lab report spot --backbone lab --sources all --target_steps 1000   # other settings

A rerun with the same --work reuses the stages that finished (sources, generic prompt,
embeddings, transfer matrix, each model-tuning run) when their settings are unchanged.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def main(argv=None) -> int:
  from jaxprompt import cli
  return cli.main(['lab', 'report', 'spot'] + list(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
  sys.exit(main())
