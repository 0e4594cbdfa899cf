"""The transferability evidence on the lab: `jaxprompt transfer lab` (jaxprompt/lab/transfer_report.py),
kept here under its old name for the commands in docs/transferability.md."""

import sys

from jaxprompt.lab.transfer_report import main

if __name__ == '__main__':
  sys.exit(main())
