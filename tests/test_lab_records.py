"""The recorded lab tables are what their scripts make of the recorded rows (nothing edited by
hand): docs/methods.md's comparison and docs/xprompt.md's XPrompt study."""

import json
import subprocess
import sys

from conftest import REPO_ROOT

RESULTS = REPO_ROOT / 'benchmarks' / 'results'


def test_methods_table_is_made_from_the_recorded_rows():
  made = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / 'methods_table.py'),
                         str(RESULTS / 'methods_lab'), str(RESULTS / 'xprompt_lab.json')],
                        capture_output=True, text=True, check=True).stdout
  assert made.strip() == (RESULTS / 'methods_lab' / 'methods_table.md').read_text().strip()
  docs = (REPO_ROOT / 'docs' / 'methods.md').read_text()
  assert made.strip() in docs


def test_xprompt_table_in_the_docs_is_the_recorded_one():
  table = (RESULTS / 'xprompt_lab.md').read_text().strip()
  assert table in (REPO_ROOT / 'docs' / 'xprompt.md').read_text()
  from jaxprompt.lab import xprompt_study
  report = json.loads((RESULTS / 'xprompt_lab.json').read_text())
  assert xprompt_study.markdown(report).strip() == table
