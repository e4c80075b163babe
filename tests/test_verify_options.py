"""verify applies --precision, --mode, --channels-last, --compile, --optimizer and --loss (each
variant against the float64 eager step of the first), or refuses them: no silent pass."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leanstep.bench.verify import StepSettings, verify_models
from leanstep.cli import main
from leanstep.layers import norm_act
from leanstep.layers.norm_act import BatchNormAct

SMALL = ["--bs", "2", "--size", "32"]
SEEN: list[dict] = []


class Recorder(nn.Module):
    """A small conv net that records how each forward pass saw its input."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        SEEN.append({
            "dtype": x.dtype,
            "channels_last": x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous(),
            "training": self.training,
            "compiling": torch.compiler.is_compiling(),
        })
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


RECORDER = f"{__name__}:Recorder"


@pytest.fixture
def seen():
    SEEN.clear()
    yield SEEN
    SEEN.clear()


def _verify(argv, capsys) -> tuple[int, dict]:
    code = main(["verify", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_fp32_runs_in_float32_against_the_float64_reference(seen, capsys):
    code, result = _verify([RECORDER, "--precision", "fp32", *SMALL], capsys)
    variant = result["variants"][RECORDER]
    assert code == 0 and result["passed"]
    assert {entry["dtype"] for entry in seen} == {torch.float64, torch.float32}
    assert variant["precision"] == "fp32" and variant["metric"] == "l2"
    assert variant["tolerance"] == 1e-2
    assert 0 < variant["gradients"]["rel"] < 1e-4  # float32 rounding, not nothing


def test_fp32_resnet_passes_and_a_wrong_gradient_fails(monkeypatch, capsys):
    class WrongGradientNorm(BatchNormAct):
        def forward(self, x):
            out = super().forward(x)
            return out + 0.1 * (out - out.detach())  # right value, gradient 10% too large

    monkeypatch.setitem(norm_act._NORMS, "wrong_gradient", WrongGradientNorm)
    # verify's default input (batch 4, 64 px): at batch 2, 32 px resnet18's last BatchNorms see
    # 2 values per channel, which amplifies float32 rounding past the fp32 bound
    code, result = _verify(["resnet18", "--norm", "bn,wrong_gradient", "--precision", "fp32"],
                           capsys)
    good = result["variants"]["resnet18 norm=bn"]
    bad = result["variants"]["resnet18 norm=wrong_gradient"]
    assert code == 1 and good["passed"] and not bad["passed"]
    assert bad["gradients"]["rel"] > 10 * good["gradients"]["rel"]


@pytest.mark.parametrize("precision", ["amp_bf16", "fp32,amp_bf16", "amp_fp16"])
def test_autocast_precisions_are_refused_in_one_line(precision, capsys):
    assert main(["verify", "resnet18", "--precision", precision, *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "verify cannot check precision 'amp_" in err


def test_channels_last_is_applied(seen, capsys):
    code, result = _verify([RECORDER, "--channels-last", *SMALL], capsys)
    assert code == 0 and result["passed"] and RECORDER in result["variants"]
    assert [entry["channels_last"] for entry in seen] == [False, True]  # reference, variant


def test_infer_mode_compares_eval_outputs(seen, capsys):
    code, result = _verify([RECORDER, "--mode", "train,infer", *SMALL], capsys)
    infer = result["variants"][f"{RECORDER} mode=infer"]
    assert code == 0 and result["passed"]
    assert list(result["variants"]) == [f"{RECORDER} mode=infer"]
    assert [entry["training"] for entry in seen] == [False, False]  # its reference and it
    assert infer["gradients"]["count"] == 0 and infer["buffers"]["count"] == 3


def test_compile_is_applied(seen, monkeypatch, capsys):
    monkeypatch.setattr("leanstep.bench.verify.COMPILE_BACKEND", "aot_eager")
    code, result = _verify([RECORDER, "--compile", *SMALL], capsys)
    assert code == 0 and result["passed"]
    assert [entry["compiling"] for entry in seen] == [False, True]


def test_optimizer_and_loss_are_applied():
    def models():
        torch.manual_seed(0)
        return [("a", Recorder()), ("b", Recorder())]

    at = dict(batch_size=2, image_size=8)
    sgd = verify_models(models(), **at)["variants"]["b"]
    adam = verify_models(models(), settings=[StepSettings(optimizer="adam")] * 2,
                         **at)["variants"]["b"]
    assert sgd["parameters"]["count"] == adam["parameters"]["count"] == 6
    # a variant with another optimizer than its reference would differ after the step
    mixed = verify_models(models(), settings=[StepSettings(), StepSettings(
        precision="fp32", optimizer="adam")], **at)
    assert mixed["passed"]
    ce = verify_models(models(), settings=[StepSettings(loss="cross_entropy")] * 2, **at)
    mean = verify_models(models(), **at)
    assert ce["passed"] and mean["passed"]


def test_cross_entropy_cli(capsys):
    code, result = _verify([RECORDER, "--loss", "mean,cross_entropy", "--precision", "fp32",
                            *SMALL], capsys)
    assert code == 0 and len(result["variants"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [(["--runs", "3"], "--runs times a benchmark"), (["--warmup", "1"], "--warmup"),
     (["--device", "cuda"], "verify compares steps on the CPU")],
)
def test_timing_and_device_options_are_refused(extra, message, capsys):
    assert main(["verify", "resnet18", "--norm", "bn,abn", *SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_one_variant_in_the_reference_settings_is_still_refused(capsys):
    assert main(["verify", RECORDER, *SMALL]) == 2
    assert "at least two variants" in capsys.readouterr().err
