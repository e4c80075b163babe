"""Norm layers whose batch statistics span every process of a torch.distributed group.

With DistributedDataParallel each process sees only its share of the batch; a plain BatchNorm
normalises that share alone. The layers here normalise the whole (global) batch instead:

- ``InplaceABNSync``: InplaceABN whose per-channel count, mean and variance are combined across
  the group in forward, and whose per-channel gradient sums are all-reduced in backward. Ranks
  may hold different batch sizes. Memory is InplaceABN's: one full-size tensor per layer.
- ``SyncBatchNormAct``: torch's ``nn.SyncBatchNorm`` followed by an activation, the synchronised
  counterpart of ``BatchNormAct`` and ``ABN``. torch synchronises CUDA (and other accelerator)
  inputs only: on CPU inside an initialised process group it raises; use InplaceABNSync there.
- ``convert_sync(model)``: swaps a model's norm layers for these, keeping weights and statistics.

Without an initialised process group, or in a group of one, every layer here computes exactly
what its unsynchronised counterpart computes.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import activation_parameter, canonical_activation, get_activation
from .norm_act import ABN, DEFAULT_PROTECT, BatchNormAct, InplaceABN, register_norm

__all__ = ["InplaceABNSync", "SyncBatchNormAct", "convert_sync"]


def _distributed_group(group):
    """``group`` (default: the world) if a process group is initialised and holds more than one
    process; None otherwise, meaning "this process alone"."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if group is None else group
    return group if dist.get_world_size(group) > 1 else None


class InplaceABNSync(InplaceABN):
    """InplaceABN with batch statistics synchronised across a torch.distributed process group.

    ``group`` is the process group whose batches are normalised together (default: the world).
    Forward all-gathers each rank's per-channel (count, mean, variance) and combines them, so
    ranks with different batch sizes are weighted by their counts; every rank then updates its
    running statistics with the same global figures. Backward all-reduces the two per-channel
    sums the input gradient needs. Weight and bias gradients stay local, because
    DistributedDataParallel all-reduces them like any other parameter's.

    Works with any backend that supports all_gather and all_reduce on the input's device (gloo on
    CPU, nccl on CUDA).
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        activation_param: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group=None,
        protect: float = DEFAULT_PROTECT,
    ):
        super().__init__(
            num_features, activation, activation_param, eps, momentum, affine, track_running_stats,
            protect,
        )
        self.group = group

    def _group(self):
        return _distributed_group(self.group)


class SyncBatchNormAct(nn.SyncBatchNorm):
    """torch's SyncBatchNorm followed by an activation; same state-dict keys as BatchNormAct.

    ``activation_inplace`` applies the activation in place on the normalised output, as ``ABN``
    does (SyncBatchNorm's backward does not need its output, so this is safe).
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        activation_param: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group=None,
        activation_inplace: bool = False,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, group)
        self.activation_name = canonical_activation(activation)
        self.activation_param = activation_param
        self.activation_inplace = activation_inplace
        self.act = get_activation(
            activation,
            inplace=activation_inplace,
            **activation_parameter(activation, activation_param),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))

    def extra_repr(self) -> str:
        param = "" if self.activation_param is None else f"({self.activation_param})"
        return f"{super().extra_repr()}, activation={self.activation_name}{param}"


def _synchronised(module: nn.Module, group) -> nn.Module | None:
    """The synchronised counterpart of ``module``, or None if it has none.

    Types are matched exactly: a subclass of one of these may add behaviour that a replacement
    would silently drop, so it is left as it is.
    """
    kind = type(module)
    if kind is nn.BatchNorm2d:
        return nn.SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, group,
        )
    if kind not in (BatchNormAct, ABN, InplaceABN):
        return None
    options = {
        "activation": module.activation_name,
        "activation_param": module.activation_param,
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
        "group": group,
    }
    if kind is InplaceABN:
        return InplaceABNSync(module.num_features, **options, protect=module.protect)
    return SyncBatchNormAct(
        module.num_features, **options, activation_inplace=kind.activation_inplace
    )


def _adopt_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the very parameter and buffer objects of ``old`` (so optimizers that hold
    them, and the state dict, are unchanged) and its training flag."""
    for name, value in old._parameters.items():
        new._parameters[name] = value
    for name, value in old._buffers.items():
        new._buffers[name] = value
    new.train(old.training)
    return new


def convert_sync(model: nn.Module, group=None) -> nn.Module:
    """Replace the norm layers of ``model`` by their synchronised counterparts, in place.

    ``nn.BatchNorm2d`` becomes ``nn.SyncBatchNorm``; ``BatchNormAct`` and ``ABN`` become
    ``SyncBatchNormAct`` (the same activation, in place for ABN); ``InplaceABN`` becomes
    ``InplaceABNSync``. Parameters and running statistics are kept (the same tensors), so the
    state dict is unchanged. ``group`` is the process group to synchronise over (default: the
    world). Returns ``model``, or the replacement if ``model`` itself is such a norm layer.
    """
    replacement = _synchronised(model, group)
    if replacement is not None:
        return _adopt_state(replacement, model)
    for name, child in model.named_children():
        converted = convert_sync(child, group)
        if converted is not child:
            setattr(model, name, converted)
    return model


register_norm("inplace_abn_sync", InplaceABNSync)
