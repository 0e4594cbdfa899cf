"""Methods: one file each, behind the contract of `jaxprompt.methods.base.Method`.

`get_method(name)` returns a registered method; `register(cls)` adds one (a decorator). The
run driver, the CLI, gin, the manifest, checkpointing, export and evaluation find a method
here by name and need no edit for a new one.
"""

from __future__ import annotations

import difflib

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


def _load_builtin() -> None:
  # The built-in methods register themselves on import.
  from jaxprompt.methods import (model_tuning, prompt_ensemble, prompt_stack,  # noqa: F401
                                 prompt_tuning)


__all__ = ['Context', 'Method', 'NoOptions', 'get_method', 'method_names', 'register']
