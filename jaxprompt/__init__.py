"""jaxprompt: soft prompts for frozen T5 models in JAX/Flax."""

from jaxprompt.version import __version__  # noqa: F401


def load_t5(path, config=None):
  """Reads a T5 backbone (T5X legacy, T5X Orbax or Hugging Face safetensors).

  Returns `(module, params)`; see `jaxprompt.checkpoints.load_t5`.
  """
  from jaxprompt.checkpoints import load_t5 as _load_t5
  return _load_t5(path, config=config)


def tune(task, **kwargs):
  """Tunes a soft prompt on a seqio task; see `jaxprompt.tuning.tune`."""
  from jaxprompt import lab  # noqa: F401 - the backbone name 'lab' and the lab's tasks
  from jaxprompt.tuning import tune as _tune
  return _tune(task, **kwargs)


def infer(**kwargs):
  """Predictions of a tuned prompt (or one per task) for new inputs; see
  `jaxprompt.inference.infer`."""
  from jaxprompt import lab  # noqa: F401 - the backbone name 'lab' and the lab's tasks
  from jaxprompt.inference import infer as _infer
  return _infer(**kwargs)


def Predictor(*args, **kwargs):  # noqa: N802 - a class, imported on first use
  """A backbone and prompts loaded once, answering `predict(texts, task=...)`; see
  `jaxprompt.inference.Predictor`."""
  from jaxprompt import lab  # noqa: F401
  from jaxprompt.inference import Predictor as _Predictor
  return _Predictor(*args, **kwargs)


def __getattr__(name):
  # Submodules on first use (`jaxprompt.evaluate.evaluate(...)`), keeping `import jaxprompt` light.
  if name in ('evaluate', 'tuning', 'model', 'prompts', 'checkpoints', 'data', 'train', 'lab',
              'inference'):
    import importlib
    return importlib.import_module(f'jaxprompt.{name}')
  raise AttributeError(f'module jaxprompt has no attribute {name!r}')
