"""The training step a plan is made for: ``TrainStep`` with the user's optimizer and an input of
any height and width (``--optimizer``, ``--size HxW``, as every command takes them).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from leanstep.bench.optimizers import OPTIMIZERS, make_optimizer
from leanstep.bench.step import TrainStep

__all__ = ["OPTIMIZERS", "build_step", "make_optimizer", "parse_input_size"]


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
    channels_last: bool = False, loss: str = "mean", num_classes: int | None = None,
) -> TrainStep:
    """``TrainStep`` of ``model`` with ``optimizer`` and an input of ``input_size`` (H, W)."""
    return TrainStep(
        model, batch_size=batch_size, image_size=tuple(input_size), in_channels=in_channels,
        device=device, precision=precision, channels_last=channels_last, optimizer=optimizer,
        loss=loss, num_classes=num_classes,
    )
