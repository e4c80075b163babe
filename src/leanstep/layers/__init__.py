"""Drop-in layers that make a training step leaner in memory."""

from .activations import INVERTIBLE_ACTIVATIONS, get_activation, list_activations
from .checkpoint import Checkpointed, CheckpointedSequential, checkpointed_call
from .create import (
    ActLayer,
    activation_spec,
    create_act_layer,
    get_act_layer,
    get_norm_act_layer,
)
from .norm_act import (
    ABN,
    BatchNormAct,
    InplaceABN,
    check_norm_activation,
    get_norm_act,
    list_norms,
    register_norm,
)
from .sync import InplaceABNSync, SyncBatchNormAct, convert_sync

__all__ = [
    "ABN",
    "ActLayer",
    "INVERTIBLE_ACTIVATIONS",
    "BatchNormAct",
    "Checkpointed",
    "CheckpointedSequential",
    "InplaceABN",
    "InplaceABNSync",
    "SyncBatchNormAct",
    "activation_spec",
    "check_norm_activation",
    "checkpointed_call",
    "convert_sync",
    "create_act_layer",
    "get_act_layer",
    "get_activation",
    "get_norm_act",
    "get_norm_act_layer",
    "list_activations",
    "list_norms",
    "register_norm",
]
