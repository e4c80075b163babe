"""timm-style layer factories: names, classes and partials in; leanstep's validation kept."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from leanstep.layers import (
    ABN,
    BatchNormAct,
    InplaceABN,
    create_act_layer,
    get_act_layer,
    get_activation,
    get_norm_act,
    get_norm_act_layer,
)
from leanstep.layers.create import activation_spec


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "gelu", "swish_me", "mish_naive",
                                  "hard_swish", "identity", "silu"])
def test_get_act_layer_name_gives_a_class_computing_the_registry_activation(name):
    cls = get_act_layer(name)
    assert isinstance(cls, type) and issubclass(cls, nn.Module)
    assert get_act_layer(name) is cls  # one class per name
    layer = cls(inplace=False)
    assert isinstance(layer, cls)
    assert layer.state_dict() == {}
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), get_activation(name)(x))


def test_get_act_layer_passes_classes_and_partials_and_none():
    partial = functools.partial(nn.LeakyReLU, negative_slope=0.2)
    assert get_act_layer(nn.ReLU) is nn.ReLU
    assert get_act_layer(partial) is partial
    assert get_act_layer(None) is None


@pytest.mark.parametrize(
    "value, message",
    [
        ("reluu", r"unknown activation 'reluu' \(did you mean relu"),
        (3, r"act_layer=3 is not allowed; use an activation name"),
        (torch.relu, r"act_layer=relu is not allowed.*nn.Module class or a functools.partial"),
        (functools.partial(torch.relu), r"is not allowed"),
    ],
)
def test_get_act_layer_refuses_with_one_line(value, message):
    with pytest.raises(ValueError, match=message) as info:
        get_act_layer(value)
    assert "\n" not in str(info.value)


def test_create_act_layer_builds_instances_from_any_form():
    assert isinstance(create_act_layer("relu", inplace=True), nn.ReLU)
    assert create_act_layer("relu", inplace=True).inplace
    leaky = create_act_layer("leaky_relu", negative_slope=0.3)
    assert leaky.negative_slope == 0.3
    assert isinstance(create_act_layer(nn.GELU, inplace=True), nn.GELU)  # takes no inplace
    assert create_act_layer(functools.partial(nn.ELU, alpha=0.5)).alpha == 0.5
    assert create_act_layer(None) is None
    with pytest.raises(ValueError, match=r"negative_slope=nan, expected a finite number"):
        create_act_layer("leaky_relu", negative_slope=float("nan"))
    with pytest.raises(ValueError, match=r"activation 'relu' got unknown parameter"):
        get_act_layer("relu")(alpha=1.0)


@pytest.mark.parametrize(
    "act, expected",
    [
        ("silu", ("swish", None)),
        (nn.SiLU, ("swish", None)),
        (functools.partial(nn.LeakyReLU, negative_slope=0.1), ("leaky_relu", 0.1)),
        (functools.partial(nn.ReLU, inplace=True), ("relu", None)),
        (get_act_layer("mish_me"), ("mish_me", None)),
    ],
)
def test_activation_spec_maps_classes_to_registry_names(act, expected):
    assert activation_spec(act) == expected


def test_get_norm_act_layer_binds_the_activation():
    cls = get_norm_act_layer("inplace_abn", act_layer=functools.partial(nn.LeakyReLU,
                                                                        negative_slope=0.1))
    assert issubclass(cls, InplaceABN)
    layer = cls(8)
    assert layer.activation_name == "leaky_relu" and layer.slope == 0.1
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(8).state_dict())
    assert get_norm_act_layer("inplace_abn", "leaky_relu") is get_norm_act_layer(
        InplaceABN, nn.LeakyReLU
    )
    # The bound default can still be overridden per layer, as timm's partials allow.
    assert cls(8, activation="elu").activation_name == "elu"


def test_get_norm_act_layer_computes_bn_then_activation():
    layer = get_norm_act_layer(nn.BatchNorm2d, act_layer="relu")(4).double()
    assert issubclass(type(layer), BatchNormAct)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    reference = nn.BatchNorm2d(4).double()
    torch.testing.assert_close(layer(x), torch.relu(reference(x)))


def test_get_norm_act_layer_without_activation_and_partials():
    assert get_norm_act_layer("abn") is ABN is get_norm_act("abn")
    bound = get_norm_act_layer(functools.partial(ABN, eps=1e-3), act_layer="elu")
    layer = bound(4)
    assert isinstance(layer, ABN) and layer.eps == 1e-3 and layer.activation_name == "elu"


@pytest.mark.parametrize(
    "norm, act, message",
    [
        ("inplace_abn", nn.ReLU, r"InplaceABN needs an invertible activation.*norm='abn'"),
        ("group", "relu", r"unknown norm 'group'"),
        (nn.GroupNorm, "relu", r"norm_layer=GroupNorm is not allowed; use a norm name"),
        ("bn", nn.Softmax, r"act_layer=Softmax has no leanstep equivalent"),
        ("bn", functools.partial(nn.ReLU6, x=1), r"binds \['x'\]; relu6 allows: none"),
        (functools.partial(ABN, activation="elu"), "relu", r"already binds activation='elu'"),
    ],
)
def test_get_norm_act_layer_refuses_with_one_line(norm, act, message):
    with pytest.raises(ValueError, match=message) as info:
        get_norm_act_layer(norm, act_layer=act)
    assert "\n" not in str(info.value)
