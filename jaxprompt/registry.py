"""Names that a higher floor of the house fills in for a lower one.

A lower module sometimes needs, at run time, code that lives above it: `load_backbone('lab')`
needs the lab's build, `setup_tasks()` the lab's tasks. Rather than import upwards, the lower
module looks the name up here and the higher one registers it when it is imported
(`jaxprompt.lab` registers the backbone name 'lab' and its tasks; the CLI and `jaxprompt.tune`
import the lab). Plain Python: importing this loads nothing else.
"""

from __future__ import annotations

from typing import Callable

_BACKBONES: dict[str, Callable[[str], str]] = {}
_TASK_SOURCES: dict[str, Callable[[], object]] = {}


def register_backbone(name: str, resolve: Callable[[str], str]) -> None:
  """Makes the backbone path `name` (and `name:ARG`) resolve through `resolve(path)`, which
  returns a checkpoint path."""
  _BACKBONES[name] = resolve


def backbone_resolver(path: str) -> Callable[[str], str] | None:
  """The resolver registered for `path`'s name (the part before ':'), if any."""
  return _BACKBONES.get(str(path).partition(':')[0])


def register_task_source(name: str, register: Callable[[], object]) -> None:
  """Adds a source of seqio tasks: `register()` registers them (idempotently)."""
  _TASK_SOURCES[name] = register


def task_sources() -> dict[str, Callable[[], object]]:
  return dict(_TASK_SOURCES)
