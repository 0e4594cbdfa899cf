"""The lab: a small artificial world of related tasks, for demos and tests.

`jaxprompt.lab.world` defines the language, the tasks and their relatedness (pure Python and
NumPy); `jaxprompt.lab.tasks` registers them as seqio tasks with the lab's vocabulary (imports
seqio and TensorFlow, so it is loaded only when `register_lab_tasks` is called). See README.md.
"""

from jaxprompt.lab.world import (  # noqa: F401
    SOURCE_TASKS, TARGET_TASKS, TASKS, LabTask, generate_examples, get_task, related_sources,
    relatedness, relatedness_matrix)


def register_lab_tasks(cache_dir=None, seed=0, sizes=None):
  """Registers the lab's seqio tasks and returns its vocabulary; see `jaxprompt.lab.tasks`."""
  import jaxprompt.data  # noqa: F401 - TensorFlow and seqio imported quietly, before tasks does
  from jaxprompt.lab import tasks  # pylint: disable=g-import-not-at-top
  return tasks.register_lab_tasks(cache_dir=cache_dir, seed=seed, sizes=sizes)
