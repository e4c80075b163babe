"""The model registry: one name picks a model, and ``create_model`` builds it.

``create_model`` validates everything it is given (name, norm and activation, checkpoint form,
family options) before a single layer is built, and raises ValueError naming the bad value and
the allowed ones.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from leanstep.layers import check_norm_activation

from . import efficientnet, resnet, vgg
from .checkpointing import check_checkpoint

__all__ = ["create_model", "list_models"]


@dataclass(frozen=True)
class _Family:
    """What the models of one file share: default activation and extra options."""

    name: str
    default_activation: str
    options: Mapping[str, object]


_VGG = _Family("VGG", vgg.DEFAULT_ACTIVATION, vgg.OPTIONS)
_RESNET = _Family("ResNet", resnet.DEFAULT_ACTIVATION, resnet.OPTIONS)
_EFFICIENTNET = _Family("EfficientNet", efficientnet.DEFAULT_ACTIVATION, efficientnet.OPTIONS)

_MODELS: dict[str, tuple[Callable[..., nn.Module], _Family]] = {
    "vgg11_bn": (vgg.vgg11_bn, _VGG),
    "vgg13_bn": (vgg.vgg13_bn, _VGG),
    "vgg16_bn": (vgg.vgg16_bn, _VGG),
    "vgg19_bn": (vgg.vgg19_bn, _VGG),
    "resnet18": (resnet.resnet18, _RESNET),
    "resnet34": (resnet.resnet34, _RESNET),
    "resnet50": (resnet.resnet50, _RESNET),
    "resnet101": (resnet.resnet101, _RESNET),
    "resnet152": (resnet.resnet152, _RESNET),
    "resnext50_32x4d": (resnet.resnext50_32x4d, _RESNET),
    "se_resnext50_32x4d": (resnet.se_resnext50_32x4d, _RESNET),
    "efficientnet_b0": (efficientnet.efficientnet_b0, _EFFICIENTNET),
    "efficientnet_b1": (efficientnet.efficientnet_b1, _EFFICIENTNET),
    "efficientnet_b2": (efficientnet.efficientnet_b2, _EFFICIENTNET),
    "efficientnet_b3": (efficientnet.efficientnet_b3, _EFFICIENTNET),
    "efficientnet_b4": (efficientnet.efficientnet_b4, _EFFICIENTNET),
    "efficientnet_b5": (efficientnet.efficientnet_b5, _EFFICIENTNET),
    "efficientnet_b6": (efficientnet.efficientnet_b6, _EFFICIENTNET),
    "efficientnet_b7": (efficientnet.efficientnet_b7, _EFFICIENTNET),
}


def list_models() -> list[str]:
    """Every registered model name, in registry order (family by family)."""
    return list(_MODELS)


def _check_positive_int(label: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{label} must be an int >= 1, got {value!r}")


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    norm: str = "bn",
    activation: str | None = None,
    checkpoint: None | str | int = None,
    drop_path_rate: float = 0.0,
    **family_options,
) -> nn.Module:
    """Build model ``name`` with the given norm, activation and checkpointing.

    ``activation=None`` picks the family's default (relu for VGG and ResNet, swish for
    EfficientNet). ``checkpoint`` is None, "blocks" or an int N (segments of N blocks).
    ``family_options``: VGG ``pre_act`` (bool) and ``dropout``; EfficientNet ``dropout``.
    """
    if not isinstance(name, str) or name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (valid: {', '.join(_MODELS)})")
    builder, family = _MODELS[name]
    unknown = sorted(set(family_options) - set(family.options))
    if unknown:
        allowed = ", ".join(family.options) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {family.name} model {name!r}; "
            f"allowed: {allowed}"
        )
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    check_checkpoint(checkpoint)
    if not (isinstance(drop_path_rate, (int, float)) and not isinstance(drop_path_rate, bool)
            and math.isfinite(drop_path_rate) and 0.0 <= drop_path_rate < 1.0):
        raise ValueError(f"drop_path_rate must be a float in [0, 1), got {drop_path_rate!r}")
    if activation is None:
        activation = family.default_activation
    check_norm_activation(norm, activation)
    return builder(
        num_classes=num_classes, in_channels=in_channels, norm=norm, activation=activation,
        checkpoint=checkpoint, drop_path_rate=float(drop_path_rate), **family_options,
    )
