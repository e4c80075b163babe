"""The model registry: one name picks a model, and ``create_model`` builds it.

``create_model`` validates everything it is given (name, norm and activation, checkpoint form,
family options) before a single layer is built, and raises ValueError naming the bad value and
the allowed ones.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from leanstep.layers import activation_spec, check_norm_activation
from leanstep.layers.create import norm_name

from . import efficientnet, resnet, vgg
from .checkpointing import check_checkpoint
from .features import as_features, check_out_indices
from .heads import check_drop_rate, check_global_pool, check_num_classes
from .pretrained import check_pretrained, load_pretrained, reference_source

__all__ = ["create_model", "list_models"]


@dataclass(frozen=True)
class _Family:
    """What the models of one file share: default activation and extra options."""

    name: str
    default_activation: str
    options: Mapping[str, object]
    num_features: int  # feature points for features_only
    drop_rate_option: str  # the builder keyword timm's drop_rate maps to
    check_global_pool: Callable[[object, int], None] = check_global_pool


def _vgg_global_pool(global_pool: object, num_classes: int) -> None:
    vgg.check_head_options(global_pool)
    check_global_pool(global_pool, num_classes)


_VGG = _Family("VGG", vgg.DEFAULT_ACTIVATION, vgg.OPTIONS, vgg.NUM_FEATURES, "dropout",
               _vgg_global_pool)
_RESNET = _Family("ResNet", resnet.DEFAULT_ACTIVATION, resnet.OPTIONS, resnet.NUM_FEATURES,
                  "drop_rate")
_EFFICIENTNET = _Family("EfficientNet", efficientnet.DEFAULT_ACTIVATION, efficientnet.OPTIONS,
                        efficientnet.NUM_FEATURES, "dropout")

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


def _pick(label: str, value: object, alias: str, alias_value: object, default: object) -> object:
    """One of two spellings of the same keyword (timm's and leanstep's); both only if equal."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{label}={value!r} and {alias}={alias_value!r} name the same thing; "
                         f"give one of them")
    for candidate in (value, alias_value):
        if candidate is not None:
            return candidate
    return default


def _norm_and_activation(norm, activation, norm_layer, act_layer):
    """Resolve timm's ``norm_layer`` / ``act_layer`` (names or classes) to leanstep's names."""
    if norm_layer is not None:
        if norm != "bn":
            raise ValueError(f"norm={norm!r} and norm_layer={norm_layer!r} name the same thing; "
                             f"give one of them")
        norm = norm_name(norm_layer)
    if act_layer is not None:
        name, param = activation_spec(act_layer)
        if param is not None:
            raise ValueError(
                f"act_layer binds a parameter ({param}); zoo models take the activation's "
                f"default parameter: pass act_layer={name!r}"
            )
        activation = _pick("activation", activation, "act_layer", name, None)
    return norm, activation


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike = False,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    in_channels: int | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float = 0.0,
    global_pool: str | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    norm: str = "bn",
    activation: str | None = None,
    norm_layer: object = None,
    act_layer: object = None,
    checkpoint: None | str | int = None,
    checkpoint_path: str | os.PathLike | None = None,
    **family_options,
) -> nn.Module:
    """Build model ``name``; timm's keywords and leanstep's own, all validated before building.

    timm's: ``pretrained`` (True: the reference torchvision/timm weights through that package;
    a path: a .pth/.pt/.safetensors state dict; ``checkpoint_path`` is the same as a path),
    ``num_classes`` (default 1000; 0: no classifier, the model returns pooled features),
    ``in_chans`` (alias ``in_channels``), ``drop_rate`` (dropout before the classifier; for
    VGG and EfficientNet the same as their ``dropout`` option), ``drop_path_rate`` (stochastic
    depth; residual families only), ``global_pool`` ("avg", "max", "" with num_classes=0),
    ``features_only`` / ``out_indices`` (the model returns a list of feature maps, see
    ``feature_info``), ``norm_layer`` / ``act_layer`` (names or registered classes).

    leanstep's: ``norm``, ``activation`` (None: relu for VGG and ResNet, swish for
    EfficientNet), ``checkpoint`` (None, "blocks" or an int N: segments of N blocks) and the
    family options (VGG ``pre_act``, ``dropout``; EfficientNet ``dropout``).

    ``features_only=True`` builds no classifier, so ``num_classes`` (other than 0),
    ``global_pool`` and ``drop_rate`` are refused with it, and ``out_indices`` without it.
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
    check_pretrained(pretrained, checkpoint_path)
    if pretrained is True:
        reference_source(name)  # the package to download with, or one line naming it
    if not isinstance(features_only, bool):
        raise ValueError(f"features_only must be True or False, got {features_only!r}")
    if features_only:
        for label, value in (("num_classes", num_classes), ("global_pool", global_pool),
                             ("drop_rate", drop_rate)):
            if value is not None and not (label == "num_classes" and value == 0):
                raise ValueError(
                    f"{label}={value!r} is not allowed with features_only=True, which builds no "
                    f"classifier head; leave {label} out"
                )
        indices = check_out_indices(
            tuple(range(family.num_features)) if out_indices is None else out_indices,
            family.num_features, name,
        )
    elif out_indices is not None:
        raise ValueError(f"out_indices={out_indices!r} needs features_only=True")
    num_classes = 1000 if num_classes is None else num_classes
    check_num_classes(num_classes)
    in_channels = _pick("in_chans", in_chans, "in_channels", in_channels, 3)
    _check_positive_int("in_chans", in_channels)
    check_checkpoint(checkpoint)
    check_drop_rate("drop_path_rate", drop_path_rate)
    head: dict[str, object] = {}
    if global_pool is not None:
        family.check_global_pool(global_pool, num_classes)
        head["global_pool"] = global_pool
    if drop_rate is not None:
        check_drop_rate("drop_rate", drop_rate)
        if family.drop_rate_option in family_options:
            raise ValueError(
                f"drop_rate={drop_rate!r} and {family.drop_rate_option}="
                f"{family_options[family.drop_rate_option]!r} name the same dropout; give one"
            )
        head[family.drop_rate_option] = float(drop_rate)
    norm, activation = _norm_and_activation(norm, activation, norm_layer, act_layer)
    if activation is None:
        activation = family.default_activation
    check_norm_activation(norm, activation)
    if features_only and family is _VGG:
        head["features_until"] = max(indices)
    model = builder(
        num_classes=num_classes, in_channels=in_channels, norm=norm, activation=activation,
        checkpoint=checkpoint, drop_path_rate=float(drop_path_rate), **head, **family_options,
    )
    if features_only:
        as_features(model, indices)
    source = checkpoint_path if checkpoint_path is not None else pretrained
    if source is not False and source is not None:
        load_pretrained(model, name, source, default_activation=family.default_activation)
    return model
