"""The lab: a small artificial world of related tasks, for demos and tests.

`jaxprompt.lab.world` defines the language, the tasks and their relatedness (pure Python and
NumPy); `jaxprompt.lab.tasks` registers them as seqio tasks with the lab's vocabulary (imports
seqio and TensorFlow, so it is loaded only when `register_lab_tasks` is called). See README.md.

Importing the lab registers, in `jaxprompt.registry`, the backbone name 'lab' ('lab:PRESET')
for `load_backbone` and the lab's tasks for `jaxprompt.data.setup_tasks`; neither loads
anything until it is used.
"""

import os

from jaxprompt import registry
from jaxprompt.lab.world import (  # noqa: F401
    SOURCE_TASKS, TARGET_TASKS, TASKS, LabTask, generate_examples, get_task, related_sources,
    relatedness, relatedness_matrix)


def register_lab_tasks(cache_dir=None, seed=0, sizes=None):
  """Registers the lab's seqio tasks and returns its vocabulary; see `jaxprompt.lab.tasks`."""
  import jaxprompt.data  # noqa: F401 - TensorFlow and seqio imported quietly, before tasks does
  from jaxprompt.lab import tasks  # pylint: disable=g-import-not-at-top
  return tasks.register_lab_tasks(cache_dir=cache_dir, seed=seed, sizes=sizes)


def resolve_backbone(path: str) -> str:
  """'lab' or 'lab:PRESET' -> the lab backbone's checkpoint, built on first use
  (`$JAXPROMPT_LAB_STEPS` asks for a quicker, smaller build: tests, quick looks)."""
  from jaxprompt.lab import backbone  # pylint: disable=g-import-not-at-top
  preset = str(path).partition(':')[2] or None
  kwargs = {'preset': preset} if preset else {}
  return backbone.build(steps=build_steps(), **kwargs)


def build_steps(steps: int | None = None) -> int | None:
  """Pretraining steps of a lab backbone: `steps` if given, else `$JAXPROMPT_LAB_STEPS`, else
  None (the preset's). One rule for `--backbone lab`, `lab path` and `lab build`, so they name
  the same backbone."""
  if steps:
    return steps
  return int(os.environ['JAXPROMPT_LAB_STEPS']) if os.environ.get('JAXPROMPT_LAB_STEPS') else None


registry.register_backbone('lab', resolve_backbone)
registry.register_task_source('lab', register_lab_tasks)
