"""find_blocks: the units lean and checkpointing work on, found as timm's checkpoint_seq would,
or named by the user; clear errors when there are none."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transform_models import MobileNet, TimmNet, TorchvisionResNet, vgg

import leanstep
from leanstep.models import create_model


def _names(model, blocks=None):
    return [name for name, _ in leanstep.find_blocks(model, blocks)]


def test_auto_blocks_of_the_world_styles():
    assert _names(TorchvisionResNet()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert _names(TimmNet()) == ["blocks.0.0", "blocks.0.1", "blocks.1.0"]
    assert _names(MobileNet()) == ["features.0", "features.1", "features.2", "features.3"]
    assert _names(vgg()) == ["[0:3]", "[3:7]", "[7:13]", "[13:14]"]


def test_names_are_module_paths_and_units_are_slices():
    model = TorchvisionResNet()
    modules = dict(model.named_modules())
    for name, block in leanstep.find_blocks(model):
        assert modules[name] is block
    seq = vgg()
    name, unit = leanstep.find_blocks(seq)[1]
    assert list(unit) == list(seq[3:7])


def test_zoo_blocks():
    with torch.device("meta"):
        resnet = create_model("resnet50")
        efficientnet = create_model("efficientnet_b0")
        vgg16 = create_model("vgg16_bn")
    assert len(_names(resnet)) == 16 and _names(resnet)[0] == "layer1.0"
    assert len(_names(efficientnet)) == 16 and _names(efficientnet)[-1] == "blocks.6.0"
    assert _names(vgg16)[:2] == ["features[0:2]", "features[2:5]"] and len(_names(vgg16)) == 13


def test_user_given_names_and_classes():
    model = TorchvisionResNet()
    assert _names(model, ["layer2.1", "layer1.0"]) == ["layer2.1", "layer1.0"]
    assert _names(model, "Bottleneck") == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert _names(vgg(), ["[0:3]"]) == ["[0:3]"]


def test_errors_name_the_value():
    with pytest.raises(ValueError, match=r"no blocks found in Conv2d.*pass blocks="):
        leanstep.find_blocks(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="'Nope' is neither a module name nor a class name"):
        leanstep.find_blocks(TorchvisionResNet(), ["Nope"])
    with pytest.raises(ValueError, match="slice out of range"):
        leanstep.find_blocks(vgg(), ["[0:99]"])
    with pytest.raises(ValueError, match="not an nn.Sequential"):
        leanstep.find_blocks(TorchvisionResNet(), ["layer1.0[0:1]"])
