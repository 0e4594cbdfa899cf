"""`python -m jaxprompt.train --gin_file=... --gin.NAME=value`: a T5X-style gin run of `tune`."""

import sys

from jaxprompt import host
from jaxprompt.cli import main

if __name__ == '__main__':
  host.reexec_with_huge_pages('jaxprompt.train', sys.argv[1:])
  sys.exit(main(['tune'] + sys.argv[1:]))
