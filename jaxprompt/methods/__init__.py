"""Methods: one file each, behind the contract of `jaxprompt.methods.base.Method`.

Every module of this package is imported on first use; a module registers its methods with
`@register` and may offer command-line subcommands in a `COMMANDS` dict
(`{name: Command(help, add_arguments, run)}`), which `jaxprompt NAME ...` picks up. The run
driver, the CLI, gin, the manifest, checkpointing, export and evaluation find a method here by
name: adding a method is adding a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Callable

from jaxprompt.methods.base import Context, Method, NoOptions

_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
  """Registers a Method subclass under `cls.name` (a class decorator)."""
  if not cls.name:
    raise ValueError(f'{cls.__name__} has no name')
  _REGISTRY[cls.name] = cls()
  return cls


def get_method(name: str) -> Method:
  _load_builtin()
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, sorted(_REGISTRY), n=3)
    hint = f' (did you mean {" or ".join(close)}?)' if close else ''
    raise ValueError(f'unknown method {name!r}{hint}; choose one of {", ".join(sorted(_REGISTRY))}')
  return _REGISTRY[name]


def method_names() -> list[str]:
  _load_builtin()
  return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Command:
  """A `jaxprompt NAME` subcommand a method module offers: it only parses and calls."""

  help: str
  add_arguments: Callable  # (argparse parser) -> None
  run: Callable  # (parsed args) -> exit code


def commands() -> dict[str, Command]:
  """Every method module's `COMMANDS`."""
  out: dict[str, Command] = {}
  for module in _load_builtin():
    out.update(getattr(module, 'COMMANDS', {}))
  return out


_MODULES: list = []


def _load_builtin() -> list:
  """Imports every module of this package once (they register themselves)."""
  if not _MODULES:
    for info in pkgutil.iter_modules(__path__):
      if info.name != 'base' and not info.name.startswith('_'):
        _MODULES.append(importlib.import_module(f'{__name__}.{info.name}'))
  return _MODULES


__all__ = ['Command', 'Context', 'Method', 'NoOptions', 'commands', 'get_method', 'method_names',
           'register']
