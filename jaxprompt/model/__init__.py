"""The frozen backbone: a Flax T5 identical in tree, shapes and logical axes to T5X's."""

from jaxprompt.model.config import NAMED_CONFIGS, T5Config, get_config
from jaxprompt.model.losses import compute_weighted_cross_entropy, loss_and_metrics
from jaxprompt.model.layout import cast_frozen, cast_leaf, stack_layers, unstack_layers
from jaxprompt.model.network import REMAT_POLICIES, Transformer, init_params

__all__ = [
    'NAMED_CONFIGS', 'REMAT_POLICIES', 'T5Config', 'Transformer', 'cast_frozen', 'cast_leaf',
    'compute_weighted_cross_entropy', 'get_config', 'init_params', 'loss_and_metrics',
    'stack_layers', 'unstack_layers',
]
