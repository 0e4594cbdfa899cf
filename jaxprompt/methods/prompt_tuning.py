"""Prompt tuning (Lester et al. 2021): one trainable [P, d] prompt before a frozen T5.

The base `Method` is exactly this method: the prompt at `encoder/prompt/prompt/prompt`,
the initialiser named by `--prompt_init`, T5X's Adafactor (lr 0.3, weight decay 1e-5),
and a self-describing prompt file as the product.
"""

from jaxprompt.methods import register
from jaxprompt.methods.base import Method


@register
class PromptTuning(Method):
  name = 'prompt_tuning'
