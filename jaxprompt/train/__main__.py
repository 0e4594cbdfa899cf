"""`python -m jaxprompt.train --gin_file=... --gin.NAME=value`: a T5X-style gin run of `tune`."""

import sys

from jaxprompt.cli import main

if __name__ == '__main__':
  sys.exit(main(['tune'] + sys.argv[1:]))
