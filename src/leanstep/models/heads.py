"""Classifier heads in timm's convention: global pooling, dropout, and a removable classifier.

``global_pool``: "avg" (the default), "max", or "" for none (then ``num_classes`` must be 0 and
the model returns its unpooled feature map, as timm requires). ``num_classes=0`` replaces the
classifier by ``nn.Identity``: the model returns pooled features of width ``num_features``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GLOBAL_POOLS",
    "GlobalPool",
    "check_drop_rate",
    "check_global_pool",
    "check_head",
    "check_num_classes",
    "classifier",
]

GLOBAL_POOLS = ("avg", "max", "")


def check_global_pool(global_pool: object, num_classes: int) -> None:
    """Raise ValueError unless ``global_pool`` is allowed, and allowed with ``num_classes``."""
    if global_pool not in GLOBAL_POOLS or not isinstance(global_pool, str):
        raise ValueError(f"global_pool={global_pool!r} is not allowed; use 'avg', 'max' or '' "
                         f"(no pooling, with num_classes=0)")
    if global_pool == "" and num_classes != 0:
        raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes="
                         f"{num_classes}: a linear classifier needs pooled features")


def check_drop_rate(label: str, value: object) -> None:
    """Raise ValueError unless ``value`` is a float in [0, 1)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{label} must be a float in [0, 1), got {value!r}")


class GlobalPool(nn.Module):
    """Average or max over the spatial dimensions, flattened to (N, C); "" passes through."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        check_global_pool(pool_type, 0)
        self.pool_type = pool_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.pool_type == "max":
            return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
        return x

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def check_num_classes(num_classes: object) -> None:
    """Raise ValueError unless ``num_classes`` is an int >= 0."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(
            f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}"
        )


def check_head(num_classes: object, global_pool: object) -> None:
    """``check_num_classes`` and ``check_global_pool`` together (``reset_classifier``)."""
    check_num_classes(num_classes)
    check_global_pool(global_pool, num_classes)


def classifier(in_features: int, num_classes: int, like: torch.Tensor | None = None) -> nn.Module:
    """``nn.Linear(in_features, num_classes)``, or ``nn.Identity`` for ``num_classes=0``.

    ``like``: a tensor whose device and dtype the new layer takes (``reset_classifier`` on a
    model already moved).
    """
    if num_classes == 0:
        return nn.Identity()
    layer = nn.Linear(in_features, num_classes)
    return layer if like is None else layer.to(device=like.device, dtype=like.dtype)
