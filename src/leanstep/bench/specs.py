"""Model specs: the string that names what a benchmark case builds, and the builder behind it.

A spec is a leanstep model name (``resnet50``), a peer's model (``timm:efficientnet_b0``,
``torchvision:resnet50``, ``efficientnet_pytorch:efficientnet-b0``) or any importable callable
(``package.module:callable``). Peer packages are imported here only, when such a model is built,
so that leanstep itself never depends on them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["PEERS", "MissingPackageError", "ModelSpec", "parse_spec", "build_from_spec"]


class MissingPackageError(ValueError):
    """A spec names a peer package that is not installed."""


@dataclass(frozen=True)
class _Peer:
    module: str
    pip_name: str


# Spec prefix -> the package it needs.
PEERS = {
    "timm": _Peer("timm", "timm"),
    "torchvision": _Peer("torchvision", "torchvision"),
    "efficientnet_pytorch": _Peer("efficientnet_pytorch", "efficientnet-pytorch"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is "leanstep", a key of PEERS, or "callable"."""

    kind: str
    name: str
    module: str = ""

    @property
    def is_callable(self) -> bool:
        return self.kind == "callable"


def parse_spec(spec: str) -> ModelSpec:
    """Split ``spec`` into its kind and name; ValueError for a malformed spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if ":" not in spec:
        return ModelSpec("leanstep", spec)
    prefix, _, name = spec.partition(":")
    if not prefix or not name or ":" in name:
        raise ValueError(
            f"malformed model spec {spec!r}; expected NAME, timm:NAME, torchvision:NAME, "
            "efficientnet_pytorch:NAME or package.module:callable"
        )
    if prefix in PEERS:
        return ModelSpec(prefix, name)
    return ModelSpec("callable", name, module=prefix)


def require_package(kind: str) -> None:
    """Raise MissingPackageError if the peer package behind ``kind`` is not installed."""
    peer = PEERS[kind]
    if importlib.util.find_spec(peer.module) is None:
        raise MissingPackageError(f"pip install {peer.pip_name} to benchmark {kind} models")


def resolve_callable(spec: ModelSpec) -> Callable[..., nn.Module]:
    """Import ``package.module`` and return its ``callable``; ValueError if either is missing."""
    try:
        module = importlib.import_module(spec.module)
    except ImportError as error:
        raise ValueError(
            f"cannot import module {spec.module!r} of model spec "
            f"'{spec.module}:{spec.name}': {error}"
        ) from None
    target = getattr(module, spec.name, None)
    if not callable(target):
        raise ValueError(
            f"module {spec.module!r} has no callable {spec.name!r} (model spec "
            f"'{spec.module}:{spec.name}')"
        )
    return target


def _accepts(function: Callable, keyword: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def build_from_spec(
    spec: str, *, num_classes: int, in_channels: int, options: dict
) -> nn.Module:
    """Build the model that ``spec`` names, with ``options`` as its keyword arguments.

    A ``package.module:callable`` gets ``num_classes`` and ``in_channels`` only if its
    signature takes them (or ``**kwargs``).
    """
    parsed = parse_spec(spec)
    options = dict(options)
    if parsed.kind == "leanstep":
        from leanstep.models import create_model

        return create_model(
            parsed.name, num_classes=num_classes, in_channels=in_channels, **options
        )
    if parsed.kind == "callable":
        builder = resolve_callable(parsed)
        for keyword, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if keyword not in options and _accepts(builder, keyword):
                options[keyword] = value
        return builder(**options)
    require_package(parsed.kind)
    if parsed.kind == "timm":
        import timm

        if not timm.is_model(parsed.name):
            raise ValueError(f"unknown timm model {parsed.name!r}; see timm.list_models()")
        return timm.create_model(
            parsed.name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
            **options,
        )
    if parsed.kind == "torchvision":
        import torchvision

        if parsed.name not in torchvision.models.list_models():
            raise ValueError(
                f"unknown torchvision model {parsed.name!r}; see torchvision.models.list_models()"
            )
        if in_channels != 3:
            raise ValueError("torchvision models take in_channels=3 only")
        return torchvision.models.get_model(
            parsed.name, weights=None, num_classes=num_classes, **options
        )
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name(
        parsed.name, in_channels=in_channels, num_classes=num_classes, **options
    )
