"""``leanstep verify``: variants of the same step agree; a wrong gradient or statistic is caught."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leanstep.bench.verify import compare_tensors, verify_models
from leanstep.cli import main
from leanstep.layers import norm_act
from leanstep.layers.norm_act import BatchNormAct
from leanstep.models import create_model

SMALL = ["--bs", "2", "--size", "32"]


class _ScaledGradient(torch.autograd.Function):
    """Identity forward, backward 10% too large: a bug that only gradients show."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * 1.1


class WrongGradientNorm(BatchNormAct):
    def forward(self, x):
        return _ScaledGradient.apply(super().forward(x))


class WrongStatisticsNorm(BatchNormAct):
    """Right output and gradients, running statistics updated twice as fast."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.momentum = 2 * self.momentum


@pytest.fixture
def broken_norms(monkeypatch):
    monkeypatch.setitem(norm_act._NORMS, "wrong_gradient", WrongGradientNorm)
    monkeypatch.setitem(norm_act._NORMS, "wrong_statistics", WrongStatisticsNorm)


def test_norm_and_checkpoint_variants_agree(capsys):
    code = main(["verify", "resnet18", "--norm", "bn,inplace_abn", "--activation",
                 "leaky_relu", "--checkpoint", "none,blocks", "--json", *SMALL])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["passed"]
    assert len(result["variants"]) == 3
    parameters = len(list(create_model("resnet18").parameters()))
    for variant in result["variants"].values():
        assert variant["gradients"]["count"] == parameters + 1  # and the input's
        assert variant["buffers"]["count"] > 0


def test_wrong_gradient_is_caught(broken_norms, capsys):
    code = main(["verify", "resnet18", "--norm", "bn,wrong_gradient", "--json", *SMALL])
    variant = json.loads(capsys.readouterr().out)["variants"]["resnet18 norm=wrong_gradient"]
    assert code == 1 and not variant["passed"]
    assert variant["loss"]["rel"] == 0  # the forward pass is right
    assert variant["gradients"]["rel"] > 0.01


def test_wrong_running_statistics_are_caught(broken_norms, capsys):
    code = main(["verify", "resnet18", "--norm", "bn,wrong_statistics", *SMALL])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in out and "running_" in out


def test_compare_tensors_is_relative_to_the_largest_reference_value():
    reference = torch.tensor([0.0, 1e-9, -4.0])
    other = torch.tensor([1e-3, 1e-9, -4.0])
    assert compare_tensors(reference, other) == pytest.approx((1e-3, 1e-3 / 4))
    assert compare_tensors(reference, reference.clone()) == (0.0, 0.0)


def test_variants_with_other_weights_are_rejected():
    with pytest.raises(ValueError, match="does not take the weights"):
        verify_models(
            [("a", nn.Sequential(nn.Flatten(), nn.Linear(12, 2))),
             ("b", nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))],
            batch_size=2, image_size=2,
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "resnet18", *SMALL], "at least two variants"),
        (["verify", "resnet18", "--norm", "bn,abn", "--bs", "2,4", "--size", "32"],
         "batch_size differs"),
        (["verify", "resnet18", "--norm", "bn,nope", *SMALL], "nope"),
    ],
)
def test_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
