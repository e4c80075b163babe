"""The optimizers a training step can use, by name: the registry behind ``--optimizer``.

Each is PyTorch's own optimizer with common ImageNet hyper-parameters. What matters for memory is
its state (bytes per parameter element, besides the gradient) and the temporaries its step
allocates, which PyTorch's implementation decides; the predictor runs that very step on fake
tensors, so both are predicted as they are. ``foreach`` is left to PyTorch's default: the
per-parameter loop for CPU tensors, the multi-tensor path (larger temporaries) for CUDA ones.

=============  ==============================================  ========================
name           torch.optim                                     state per element
=============  ==============================================  ========================
sgd            SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)   1 (momentum)
sgd_nesterov   SGD(..., nesterov=True)                         1 (momentum)
adam           Adam(lr=1e-3)                                   2 (exp_avg, exp_avg_sq)
adamw          AdamW(lr=1e-3, weight_decay=0.05)               2 (exp_avg, exp_avg_sq)
rmsprop        RMSprop(lr=0.01, alpha=0.9, momentum=0.9,       2 (square_avg, momentum)
               eps=1e-3, weight_decay=1e-5)
=============  ==============================================  ========================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS: dict[str, Callable[[Iterable], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
    "sgd_nesterov": lambda params: torch.optim.SGD(
        params, lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True
    ),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
    "rmsprop": lambda params: torch.optim.RMSprop(
        params, lr=0.01, alpha=0.9, momentum=0.9, eps=1e-3, weight_decay=1e-5
    ),
}


def make_optimizer(name: str, params: Iterable) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``; ValueError for an unknown name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params)
