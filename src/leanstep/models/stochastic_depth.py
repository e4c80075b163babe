"""Stochastic depth ("drop path", "drop connect"): drop a residual branch per sample."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DropPath"]


class DropPath(nn.Module):
    """Zero the residual branch of a random ``rate`` fraction of the samples while training.

    The kept samples are scaled by 1 / (1 - rate) so the expected output is unchanged; in eval
    mode, or with ``rate == 0``, the branch passes through untouched. Out of place, so it never
    touches a tensor another op saved for backward.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"
