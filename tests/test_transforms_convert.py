"""convert_norm_act: BatchNorm + activation (module, shared module, functional, Sequential)
-> leanstep layers, exact with abn, explicit with inplace_abn, keys and parameters kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transform_models import MODELS, TimmNet, TorchvisionResNet, vgg

import leanstep
from leanstep.bench.verify import verify_models
from leanstep.layers import ABN, InplaceABN


@pytest.mark.parametrize("name", sorted(MODELS))
def test_abn_conversion_is_exact_and_keeps_keys(name):
    plain = MODELS[name]().double()
    model = copy.deepcopy(plain)
    parameters = [id(p) for p in model.parameters()]
    summary = leanstep.convert_norm_act(model, "abn")
    assert summary.converted and not summary.changes_outputs
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [id(p) for p in model.parameters()] == parameters  # same objects: optimizers hold
    assert verify_models([("plain", plain), ("abn", model)], batch_size=4, image_size=16,
                         tolerance=1e-10)["passed"]
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(model(x), plain(x))


def test_what_is_converted_and_left_in_a_torchvision_resnet():
    model = TorchvisionResNet()
    summary = leanstep.convert_norm_act(model, "abn")
    converted = dict(summary.converted)
    assert converted["layer1.0.bn1"] == "relu" and converted["bn1"] == "relu"
    left = dict(summary.left)
    assert left["layer1.0.bn3"] == "no activation follows it"
    assert left["layer1.0.downsample.1"] == "no activation follows it"
    assert isinstance(model.layer1[0].bn1, ABN) and type(model.layer1[0].bn3) is nn.BatchNorm2d
    # the shared ReLU module is still there (it still activates the residual sum)
    assert isinstance(model.layer1[0].relu, nn.ReLU)
    assert "convert_norm_act(abn): 9 BatchNorm(s) converted, 6 left" in str(summary)


def test_functional_and_sequential_activations():
    model = TimmNet()
    summary = dict(leanstep.convert_norm_act(model, "abn").converted)
    assert summary["bn1"] == "swish" and summary["blocks.0.0.bn1"] == "swish"
    assert summary["blocks.0.0.bn2"] == "relu"
    seq = vgg()
    leanstep.convert_norm_act(seq, "abn")
    assert isinstance(seq[1], ABN) and isinstance(seq[2], nn.Identity)


def test_inplace_abn_refuses_a_relu_model_without_an_activation():
    model = TorchvisionResNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"bn1 is followed by relu, which InplaceABN cannot "
                                         r"invert; pass activation='leaky_relu'"):
        leanstep.convert_norm_act(model, "inplace_abn")
    assert type(model.bn1) is nn.BatchNorm2d  # nothing changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_abn_with_an_explicit_activation_says_outputs_change():
    plain = vgg().double()
    model = copy.deepcopy(plain)
    with pytest.warns(UserWarning, match="outputs change"):
        summary = leanstep.convert_norm_act(model, "inplace_abn", activation="leaky_relu",
                                            activation_param=0.01)
    assert summary.changes_outputs and isinstance(model[1], InplaceABN)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model(x).sum().backward()  # trains


def test_inplace_abn_keeps_an_invertible_activation_exact():
    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                             nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ELU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())

    plain = net().double()
    model = copy.deepcopy(plain)
    summary = leanstep.convert_norm_act(model, "inplace_abn")
    assert dict(summary.converted) == {"1": "leaky_relu(0.1)", "4": "elu(1)"}
    assert verify_models([("plain", plain), ("iabn", model)], batch_size=4, image_size=12,
                         tolerance=1e-10)["passed"]


def test_convert_then_lean_and_idempotence():
    plain = TimmNet().double()
    model = copy.deepcopy(plain)
    leanstep.convert_norm_act(model, "abn")
    with pytest.warns(UserWarning, match="nothing to convert"):
        second = leanstep.convert_norm_act(model, "abn")
    assert not second.converted
    leanstep.lean(model)
    assert verify_models([("plain", plain), ("abn+lean", model)], batch_size=4, image_size=16,
                         tolerance=1e-10)["passed"]


def test_sub_module_and_bad_norm():
    model = TorchvisionResNet()
    summary = leanstep.convert_norm_act(model.layer2, "abn")
    assert {name for name, _ in summary.converted} == {"0.bn1", "0.bn2", "1.bn1", "1.bn2"}
    assert type(model.bn1) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="unknown norm 'iabn'; valid: abn, inplace_abn"):
        leanstep.convert_norm_act(model, "iabn")


def test_untraceable_forward_is_left_with_the_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                return torch.relu(self.bn(x))
            return self.bn(x)

    with pytest.warns(UserWarning, match="nothing to convert"):
        summary = leanstep.convert_norm_act(Branchy(), "abn")
    assert "cannot be traced" in summary.left[0][1]


def test_lean_then_convert_keeps_both_exact():
    plain = TimmNet().double()
    model = copy.deepcopy(plain)
    leanstep.lean(model)
    summary = leanstep.convert_norm_act(model, "abn")
    assert dict(summary.converted)["bn1"] == "swish"  # the stem, inside lean's stem chain
    assert "conv_stem+bn1" in str(leanstep.transforms.last_summary("lean"))
    assert verify_models([("plain", plain), ("lean+abn", model)], batch_size=4, image_size=16,
                         tolerance=1e-10)["passed"]
