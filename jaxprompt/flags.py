"""Command-line parsing with one-line errors: an unknown flag names its close matches among the
options of the (sub)command it was given to (`jaxprompt`'s commands and the lab's studies)."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Sequence

_TYPO_OWNER = '_jaxprompt_unrecognized_by'


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors: an unknown flag names the close matches among the options
  of the (sub)command it was given to. `add_subparsers` makes its parsers of this class too;
  the lab's studies build theirs with it."""

  def parse_known_args(self, args=None, namespace=None):
    ns, extras = super().parse_known_args(args, namespace)
    if extras and getattr(ns, _TYPO_OWNER, None) is None:
      # A subcommand's extras reach the top parser's error() through the namespace argparse
      # copies upwards: the innermost parser that had extras (its options are the candidates).
      setattr(ns, _TYPO_OWNER, self)
    return ns, extras

  def parse_args(self, args=None, namespace=None):
    ns, extras = self.parse_known_args(args, namespace)
    owner = vars(ns).pop(_TYPO_OWNER, None) or self
    if extras:
      self.error(owner.unrecognized(extras))
    return ns

  def unrecognized(self, extras: Sequence[str]) -> str:
    options = sorted(s for a in self._actions for s in a.option_strings
                     if s.startswith('--') and s != '--help' and a.help != argparse.SUPPRESS)
    flags = [a for a in extras if re.match(r'-+[A-Za-z_]', a)] or list(extras)
    parts = []
    for flag in flags:
      name = flag.split('=', 1)[0]
      score = {o: difflib.SequenceMatcher(None, name, o).ratio() for o in options}
      top = max(score.values(), default=0.0)
      close = sorted((o for o in options if score[o] >= max(0.75, top - 0.1)), key=score.get,
                     reverse=True)[:3]  # the closest, and those nearly as close
      parts.append((name, f'did you mean {" or ".join(close)}?' if close else None))
    if len(parts) == 1:
      name, hint = parts[0]
      return f'unrecognized argument {name}; {hint or f"{self.prog} -h lists the options"}'
    return 'unrecognized arguments ' + ', '.join(
        f'{name} ({hint})' if hint else name for name, hint in parts) + f' ({self.prog} -h)'

  def error(self, message: str):
    if message.startswith('the following arguments are required'):
      message += f' ({self.prog} -h lists them)'
    self.exit(2, f'{self.prog.split()[0]}: error: {" ".join(message.split())}\n')


__all__ = ['Parser']
