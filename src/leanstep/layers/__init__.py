"""Drop-in layers that make a training step leaner in memory."""

from .activations import INVERTIBLE_ACTIVATIONS, get_activation, list_activations
from .checkpoint import Checkpointed, CheckpointedSequential
from .norm_act import (
    ABN,
    BatchNormAct,
    InplaceABN,
    check_norm_activation,
    get_norm_act,
    list_norms,
    register_norm,
)

__all__ = [
    "ABN",
    "INVERTIBLE_ACTIVATIONS",
    "BatchNormAct",
    "Checkpointed",
    "CheckpointedSequential",
    "InplaceABN",
    "check_norm_activation",
    "get_activation",
    "get_norm_act",
    "list_activations",
    "list_norms",
    "register_norm",
]
