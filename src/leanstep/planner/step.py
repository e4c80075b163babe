"""The training step a plan is made for: the benchmark's step with the user's optimizer and an
input of any height and width.

``TrainStep`` fixes SGD with momentum and square inputs; a plan must be made for the step the
user runs (Adam keeps twice SGD's optimizer state), so ``build_step`` swaps both in. Issue 13 adds
the same options to every command; until then they live here, for the planner only.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from leanstep.bench.step import TrainStep

__all__ = ["OPTIMIZERS", "build_step", "make_optimizer", "parse_input_size"]

# Optimizer name -> (class, keyword arguments). SGD's are TrainStep's own.
OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}),
    "adam": ("Adam", {"lr": 1e-3, "weight_decay": 1e-4}),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}),
}


def make_optimizer(name: str, parameters) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of OPTIMIZERS) over ``parameters``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    class_name, options = OPTIMIZERS[name]
    return getattr(torch.optim, class_name)(parameters, **options)


def parse_input_size(value) -> tuple[int, int]:
    """(height, width) from ``224``, ``"224"``, ``"512x1024"`` or ``(512, 1024)``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        height, width = value
    elif isinstance(value, int) and not isinstance(value, bool):
        height = width = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(value))
        if not match:
            raise ValueError(f"bad input size {value!r}; accepted: S or HxW in pixels, e.g. "
                             "160 or 512x1024")
        height = int(match.group(1))
        width = int(match.group(2) or match.group(1))
    for side in (height, width):
        if not isinstance(side, int) or isinstance(side, bool) or side < 1:
            raise ValueError(f"bad input size {value!r}: sides must be ints >= 1")
    return height, width


def build_step(
    model: nn.Module, *, batch_size: int, input_size: tuple[int, int], in_channels: int = 3,
    device: str | torch.device = "cpu", precision: str = "fp32", optimizer: str = "sgd",
    channels_last: bool = False,
) -> TrainStep:
    """``TrainStep`` of ``model`` with ``optimizer`` and an input of ``input_size`` (H, W)."""
    height, width = input_size
    step = TrainStep(
        model, batch_size=batch_size, image_size=height, in_channels=in_channels,
        device=device, precision=precision, channels_last=channels_last,
    )
    if width != height:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        step.input = torch.ones(
            batch_size, in_channels, height, width, device=step.device
        ).contiguous(memory_format=memory_format).requires_grad_(True)
    if optimizer != "sgd":
        step.optimizer = make_optimizer(optimizer, step.model.parameters())
    return step
