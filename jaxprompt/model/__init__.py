"""The frozen backbone: a Flax T5 identical in tree, shapes and logical axes to T5X's."""

from jaxprompt.model.config import NAMED_CONFIGS, T5Config, get_config
from jaxprompt.model.losses import compute_weighted_cross_entropy, loss_and_metrics
from jaxprompt.model.network import Transformer, init_params

__all__ = [
    'NAMED_CONFIGS', 'T5Config', 'Transformer', 'compute_weighted_cross_entropy', 'get_config',
    'init_params', 'loss_and_metrics',
]
