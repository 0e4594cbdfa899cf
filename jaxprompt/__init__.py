"""jaxprompt: soft prompts for frozen T5 models in JAX/Flax."""

__version__ = '0.1.0'


def load_t5(path, config=None):
  """Reads a T5 backbone (T5X legacy, T5X Orbax or Hugging Face safetensors).

  Returns `(module, params)`; see `jaxprompt.checkpoints.load_t5`.
  """
  from jaxprompt.checkpoints import load_t5 as _load_t5
  return _load_t5(path, config=config)
