"""Drop-in layers that make a training step leaner in memory."""

from .activations import INVERTIBLE_ACTIVATIONS, get_activation, list_activations
from .checkpoint import Checkpointed, CheckpointedSequential, checkpointed_call
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
    "INVERTIBLE_ACTIVATIONS",
    "BatchNormAct",
    "Checkpointed",
    "CheckpointedSequential",
    "InplaceABN",
    "InplaceABNSync",
    "SyncBatchNormAct",
    "check_norm_activation",
    "checkpointed_call",
    "convert_sync",
    "get_activation",
    "get_norm_act",
    "list_activations",
    "list_norms",
    "register_norm",
]
