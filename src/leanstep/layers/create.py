"""Layer factories in timm's convention: a name, a class or a partial in; a class or module out.

- ``get_act_layer(x)`` -> a class: ``cls(inplace=False, **params)`` builds the activation.
- ``create_act_layer(x, inplace=None, **params)`` -> an instance (``get_activation`` is the
  name-only form).
- ``get_norm_act_layer(norm, act_layer=...)`` -> a norm+activation class with the activation
  bound as its default (``get_norm_act`` is the name-only form, activation left unbound).

Names go through leanstep's registries, so the same validation and messages apply (unknown
names with suggestions, InplaceABN's invertible-activation rule, finite parameters). Classes
and partials are accepted as timm accepts them; the norm factories translate an activation
class (``nn.ReLU``, ``partial(nn.LeakyReLU, negative_slope=0.1)``) to its registry name,
because leanstep's norm layers take activation names.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from torch import nn

from .activations import (
    activation_parameter,
    canonical_activation,
    get_activation,
    list_activations,
)
from .norm_act import (
    ABN,
    BatchNormAct,
    InplaceABN,
    check_norm_activation,
    get_norm_act,
    list_norms,
)

__all__ = [
    "activation_spec",
    "create_act_layer",
    "get_act_layer",
    "get_norm_act_layer",
    "norm_name",
]

# PyTorch classes with a registered equivalent: what timm users pass as act_layer.
_TORCH_ACTIVATIONS: dict[type, str] = {
    nn.Identity: "identity",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardsigmoid: "hard_sigmoid",
    nn.SiLU: "swish",
    nn.Mish: "mish",
    nn.Hardswish: "hard_swish",
}
# The single scalar parameter a partial of a PyTorch class may bind, per registry name.
_TORCH_PARAMETER = {"leaky_relu": "negative_slope", "elu": "alpha", "celu": "alpha"}


class ActLayer(nn.Module):
    """Base of the classes ``get_act_layer`` returns for registry names.

    ``cls(inplace=False, **params)`` builds the registry's module (validated by
    ``get_activation``) and runs it; the inner module is not registered as a child, so the
    layer has the same (empty) state dict and a flat repr.
    """

    activation_name = "identity"

    def __init__(self, inplace: bool = False, **params):
        super().__init__()
        object.__setattr__(self, "_impl", get_activation(self.activation_name, inplace, **params))

    def forward(self, x):
        return self._impl(x)

    def extra_repr(self) -> str:
        return repr(self._impl)


@functools.cache
def _act_class(name: str) -> type[ActLayer]:
    class_name = "".join(part.capitalize() for part in re.split(r"_", name)) + "Act"
    return type(class_name, (ActLayer,), {"activation_name": name, "__module__": __name__})


def _is_module_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, nn.Module)


def _describe(value: object) -> str:
    if isinstance(value, functools.partial):
        return f"partial({getattr(value.func, '__name__', value.func)!r})"
    return getattr(value, "__name__", None) or repr(value)


def get_act_layer(act_layer: Any) -> Any:
    """The activation class for a registry name, or a class / partial of one returned as is.

    ``None`` passes through (timm's "no activation here"). Anything else raises ValueError
    naming the value and what is allowed.
    """
    if act_layer is None:
        return None
    if isinstance(act_layer, str):
        return _act_class(canonical_activation(act_layer))
    if _is_module_class(act_layer):
        return act_layer
    if isinstance(act_layer, functools.partial) and _is_module_class(act_layer.func):
        return act_layer
    raise ValueError(
        f"act_layer={_describe(act_layer)} is not allowed; use an activation name "
        f"({', '.join(list_activations())}), an nn.Module class or a functools.partial of one"
    )


def create_act_layer(act_layer: Any, inplace: bool | None = None, **params) -> nn.Module | None:
    """An activation module built from a name, class or partial (None -> None, as timm).

    ``inplace=None`` leaves the class's own default; classes that take no ``inplace``
    (``nn.GELU``, ``nn.Sigmoid``) are built without it.
    """
    cls = get_act_layer(act_layer)
    if cls is None:
        return None
    if isinstance(act_layer, str):
        return get_activation(act_layer, bool(inplace), **params)
    if inplace is None:
        return cls(**params)
    try:
        return cls(inplace=inplace, **params)
    except TypeError:
        return cls(**params)


def activation_spec(act_layer: Any) -> tuple[str, float | None]:
    """(registry name, scalar parameter or None) of a name, class or partial.

    What leanstep's norm layers and models need, since they take activation names.
    """
    cls = get_act_layer(act_layer)
    if isinstance(act_layer, str):
        return canonical_activation(act_layer), None
    func = cls.func if isinstance(cls, functools.partial) else cls
    bound = dict(cls.keywords) if isinstance(cls, functools.partial) else {}
    if isinstance(cls, functools.partial) and cls.args:
        raise ValueError(f"act_layer={_describe(cls)}: bind parameters by keyword, got {cls.args}")
    bound.pop("inplace", None)
    if issubclass(func, ActLayer):
        name = func.activation_name
    elif func in _TORCH_ACTIVATIONS:
        name = _TORCH_ACTIVATIONS[func]
    else:
        known = ", ".join(sorted(c.__name__ for c in _TORCH_ACTIVATIONS))
        raise ValueError(
            f"act_layer={_describe(cls)} has no leanstep equivalent; use an activation name or "
            f"one of nn.{known.replace(', ', ', nn.')}"
        )
    if not bound:
        return name, None
    key = _TORCH_PARAMETER.get(name)
    if key is None or set(bound) != {key}:
        allowed = key or "none"
        raise ValueError(
            f"act_layer={_describe(cls)} binds {sorted(bound)}; {name} allows: {allowed}"
        )
    return name, activation_parameter(name, bound[key])[key]


# PyTorch's plain BatchNorm counts as "bn" (leanstep's BatchNormAct has BatchNorm2d's keys).
_NORM_CLASSES: dict[type, str] = {nn.BatchNorm2d: "bn", BatchNormAct: "bn", ABN: "abn",
                                  InplaceABN: "inplace_abn"}


def norm_name(norm_layer: Any) -> str:
    """The registry name of a norm given by name or registered class (partials excluded)."""
    if isinstance(norm_layer, str):
        get_norm_act(norm_layer)
        return norm_layer
    if isinstance(norm_layer, type):
        for name in list_norms():
            if get_norm_act(name) is norm_layer:
                return name
        if norm_layer in _NORM_CLASSES:
            return _NORM_CLASSES[norm_layer]
    raise ValueError(
        f"norm_layer={_describe(norm_layer)} is not allowed; use a norm name "
        f"({', '.join(list_norms())}) or its class (nn.BatchNorm2d counts as 'bn')"
    )


@functools.cache
def _bound_norm_class(cls: type, activation: str, activation_param: float | None) -> type:
    """A subclass of ``cls`` whose default activation is ``activation`` (same state dict)."""

    def __init__(self, num_features, *args, activation=activation,
                 activation_param=activation_param, **kwargs):
        cls.__init__(self, num_features, activation, activation_param, *args, **kwargs)

    suffix = "".join(part.capitalize() for part in activation.split("_"))
    return type(f"{cls.__name__}{suffix}", (cls,), {"__init__": __init__,
                                                     "__module__": __name__})


def get_norm_act_layer(norm_layer: Any, act_layer: Any = None) -> Any:
    """A norm+activation class from a name, class or partial, with ``act_layer`` bound.

    ``act_layer=None`` returns the class unchanged (its own default activation). Otherwise the
    activation (a name, class or partial, see ``activation_spec``) becomes the default of a
    subclass, after the same check ``create_model`` makes (InplaceABN needs an invertible
    activation). A partial of a norm class keeps its other keywords (eps, momentum).
    """
    bound: dict[str, Any] = {}
    base = norm_layer
    if isinstance(norm_layer, functools.partial):
        base, bound = norm_layer.func, dict(norm_layer.keywords)
        if norm_layer.args:
            raise ValueError(
                f"norm_layer={_describe(norm_layer)}: bind parameters by keyword, got "
                f"{norm_layer.args}"
            )
    name = norm_name(base)
    cls = get_norm_act(name)
    if act_layer is None and "activation" not in bound:
        return functools.partial(cls, **bound) if bound else cls
    if act_layer is None:
        activation, param = bound.pop("activation"), bound.pop("activation_param", None)
    else:
        if "activation" in bound:
            raise ValueError(
                f"norm_layer={_describe(norm_layer)} already binds activation="
                f"{bound['activation']!r}; drop it or act_layer={_describe(act_layer)}"
            )
        activation, param = activation_spec(act_layer)
    check_norm_activation(name, activation, param)
    result = _bound_norm_class(cls, canonical_activation(activation), param)
    return functools.partial(result, **bound) if bound else result
