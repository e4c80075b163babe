"""The activation registry: one string picks an activation everywhere in leanstep.

Swish, Mish and Hard-Swish come in three implementations, chosen by suffix:

- ``swish``: PyTorch's native op (``F.silu``). Autograd saves the input only.
- ``swish_me``: a memory-efficient ``autograd.Function`` that saves only its input and
  recomputes the derivative in backward (the technique of the seed table's "memory-efficient
  Swish/Mish", written before PyTorch had these ops). It now matches the native op.
- ``swish_naive``: composed of elementary ops (``x * sigmoid(x)``), so autograd keeps every
  intermediate. This is the baseline that the memory-efficient versions improve upon.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INVERTIBLE_ACTIVATIONS",
    "get_activation",
    "list_activations",
    "activation_parameter",
]

# Activations whose output determines their input, as InplaceABN requires.
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")


# --- memory-efficient autograd functions: save the input, recompute in backward -------------


def _memory_efficient(name: str, forward, derivative) -> type[torch.autograd.Function]:
    """An autograd Function computing ``forward(x)`` that saves only ``x``.

    Backward recomputes the derivative from ``x`` with ATen's fused backward kernel, so no
    intermediate (sigmoid, softplus, tanh) is kept between the passes or materialised in backward.
    """

    def forward_fn(ctx, x):
        ctx.save_for_backward(x)
        return forward(x)

    def backward_fn(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return derivative(grad_output, x)

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward_fn), "backward": staticmethod(backward_fn)},
    )


_SwishFunction = _memory_efficient("_SwishFunction", F.silu, torch.ops.aten.silu_backward)
_MishFunction = _memory_efficient("_MishFunction", F.mish, torch.ops.aten.mish_backward)
_HardSwishFunction = _memory_efficient(
    "_HardSwishFunction", F.hardswish, torch.ops.aten.hardswish_backward
)


class _FunctionModule(nn.Module):
    """An element-wise activation given as a function; ``inplace`` is accepted and ignored
    where an in-place version would corrupt what autograd saved."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.name = name
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _swish_naive(x):
    return x * torch.sigmoid(x)


def _mish_naive(x):
    return x * torch.tanh(F.softplus(x))


def _hard_swish_naive(x):
    return x * F.relu6(x + 3) / 6


def _finite_number(activation: str, key: str, value, *, zero_allowed: bool) -> float:
    """``value`` as a float, or ValueError naming it: finite, > 0 (or >= 0 if ``zero_allowed``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_allowed):
        bound = ">= 0" if zero_allowed else "> 0"
        raise ValueError(f"{activation}: {key}={value!r}, expected a finite number {bound}")
    return number


def _leaky_relu(inplace, negative_slope=0.01):
    slope = _finite_number("leaky_relu", "negative_slope", negative_slope, zero_allowed=True)
    return nn.LeakyReLU(slope, inplace=inplace)


def _elu(inplace, alpha=1.0):
    return nn.ELU(_finite_number("elu", "alpha", alpha, zero_allowed=False), inplace=inplace)


def _celu(inplace, alpha=1.0):
    return nn.CELU(_finite_number("celu", "alpha", alpha, zero_allowed=False), inplace=inplace)


# name -> (factory(inplace, **params), the parameter names it accepts)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "identity": (lambda inplace: nn.Identity(), ()),
    "relu": (lambda inplace: nn.ReLU(inplace=inplace), ()),
    "relu6": (lambda inplace: nn.ReLU6(inplace=inplace), ()),
    "leaky_relu": (_leaky_relu, ("negative_slope",)),
    "elu": (_elu, ("alpha",)),
    "celu": (_celu, ("alpha",)),
    "selu": (lambda inplace: nn.SELU(inplace=inplace), ()),
    "gelu": (lambda inplace: nn.GELU(), ()),
    "sigmoid": (lambda inplace: nn.Sigmoid(), ()),
    "tanh": (lambda inplace: nn.Tanh(), ()),
    "hard_sigmoid": (lambda inplace: nn.Hardsigmoid(inplace=inplace), ()),
    "swish": (lambda inplace: nn.SiLU(inplace=inplace), ()),
    "swish_me": (lambda inplace: _FunctionModule("swish_me", _SwishFunction.apply), ()),
    "swish_naive": (lambda inplace: _FunctionModule("swish_naive", _swish_naive), ()),
    "mish": (lambda inplace: nn.Mish(inplace=inplace), ()),
    "mish_me": (lambda inplace: _FunctionModule("mish_me", _MishFunction.apply), ()),
    "mish_naive": (lambda inplace: _FunctionModule("mish_naive", _mish_naive), ()),
    "hard_swish": (lambda inplace: nn.Hardswish(inplace=inplace), ()),
    "hard_swish_me": (
        lambda inplace: _FunctionModule("hard_swish_me", _HardSwishFunction.apply),
        (),
    ),
    "hard_swish_naive": (
        lambda inplace: _FunctionModule("hard_swish_naive", _hard_swish_naive),
        (),
    ),
}
_ALIASES = {"silu": "swish", "silu_me": "swish_me", "silu_naive": "swish_naive"}

# The name of each activation's single scalar parameter, for the `activation_param` shorthand.
_PARAMETER_NAME = {name: params[0] for name, (_, params) in _REGISTRY.items() if params}


def list_activations() -> list[str]:
    """Every registered activation name (aliases excluded)."""
    return list(_REGISTRY)


def canonical_activation(name: str) -> str:
    """Resolve aliases and validate ``name``; raise ValueError naming the valid names."""
    if not isinstance(name, str):
        raise ValueError(f"activation must be a name, got {name!r}; valid: {', '.join(_REGISTRY)}")
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY) + list(_ALIASES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown activation {name!r}{hint}; valid: {', '.join(_REGISTRY)}, aliases: "
            f"{', '.join(_ALIASES)}"
        )
    return key


def activation_parameter(name: str, value: float | None) -> dict[str, float]:
    """Keyword form of the single scalar parameter (``activation_param``) of ``name``."""
    if value is None:
        return {}
    key = canonical_activation(name)
    if key not in _PARAMETER_NAME:
        raise ValueError(f"activation {name!r} takes no parameter, got activation_param={value!r}")
    parameter = _PARAMETER_NAME[key]
    return {parameter: _finite_number(key, parameter, value, zero_allowed=True)}


def get_activation(name: str, inplace: bool = False, **params) -> nn.Module:
    """Build activation ``name`` (e.g. ``"leaky_relu"``, ``"mish_me"``) with its parameters."""
    key = canonical_activation(name)
    factory, accepted = _REGISTRY[key]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) or "none"
        raise ValueError(
            f"activation {name!r} got unknown parameter(s) {unknown}; allowed: {allowed}"
        )
    return factory(inplace, **params)
