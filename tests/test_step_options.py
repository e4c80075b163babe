"""Step options: --optimizer, --loss and non-square --size, predicted as they are measured, and
the predictor's failure modes (data-dependent models, builders that return no module)."""

from __future__ import annotations

import json
import math
import re
from functools import partial

import pytest
import torch
from torch import nn

from leanstep.bench import _torch_internals as internals
from leanstep.bench.cases import Case, make_step
from leanstep.bench.memory import MIB, measured_peak
from leanstep.bench.optimizers import OPTIMIZERS
from leanstep.bench.predict import CUDA_BLOCK_BYTES, UnpredictableModelError, predict_peak
from leanstep.bench.step import TrainStep
from leanstep.bench.validate import validate_case
from leanstep.cli import main
from leanstep.models import create_model


def _measured(model_fn, **step_options) -> dict:
    """MemTracker's peak of the real step after one warm-up step, as the benchmark takes it."""
    step = TrainStep(model_fn(), **step_options)
    step()
    return measured_peak(step, *step.tracked_objects())


def _assert_matches(predicted: dict, measured: dict) -> None:
    assert predicted["predicted_mib"] == pytest.approx(measured["peak_mib"], rel=0.01)
    for category, mib in measured["memory"].items():
        assert predicted["memory"][category] == pytest.approx(mib, rel=0.01, abs=1e-3)


@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_is_predicted_at_a_non_square_size(optimizer):
    # 40x72 images: not square, as none in test_predict.py
    model_fn = partial(create_model, "resnet18", num_classes=10)
    options = dict(batch_size=2, image_size=(40, 72), optimizer=optimizer)
    predicted = predict_peak(model_fn, **options)
    _assert_matches(predicted, _measured(model_fn, **options))


@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize(
    "name, options, optimizer, loss, batch_size, size",
    [
        ("resnet50", {"norm": "inplace_abn", "activation": "leaky_relu"}, "adamw",
         "cross_entropy", 4, (96, 64)),
        ("efficientnet_b0", {"checkpoint": "blocks"}, "rmsprop", "cross_entropy", 2, (32, 48)),
    ],
)
def test_activation_heavy_steps_with_other_optimizers_and_losses(
    name, options, optimizer, loss, batch_size, size
):
    model_fn = partial(create_model, name, num_classes=100, **options)
    step_options = dict(batch_size=batch_size, image_size=size, optimizer=optimizer, loss=loss,
                        num_classes=100)
    predicted = predict_peak(model_fn, **step_options)
    measured = _measured(model_fn, **step_options)
    _assert_matches(predicted, measured)


def test_adam_state_is_twice_sgds_and_cross_entropy_costs_its_own_memory():
    model_fn = partial(create_model, "resnet18", num_classes=10)
    at = dict(batch_size=2, image_size=32)
    sgd = predict_peak(model_fn, **at)
    adam = predict_peak(model_fn, optimizer="adam", **at)
    params = sgd["memory"]["parameters"]
    assert adam["predicted_mib"] > sgd["predicted_mib"] + 0.9 * params
    def wide():  # logits dominate the step's memory
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5000))

    at = dict(batch_size=1024, image_size=4)
    mean = predict_peak(wide, **at)
    ce = predict_peak(wide, loss="cross_entropy", **at)
    assert ce["predicted_mib"] > 1.1 * mean["predicted_mib"]  # log-softmax and its gradient
    for loss, predicted in (("mean", mean), ("cross_entropy", ce)):
        assert predicted["predicted_mib"] == pytest.approx(
            _measured(wide, loss=loss, **at)["peak_mib"], rel=0.01
        )


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.Linear(10, 3))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop"])
def test_cuda_like_runs_the_foreach_path_without_the_host_step_counters(optimizer):
    cpu = predict_peak(_tiny, batch_size=2, image_size=8, optimizer=optimizer)
    cuda = predict_peak(_tiny, batch_size=2, image_size=8, optimizer=optimizer,
                        device_like="cuda")
    sizes = [p.numel() * p.element_size() for p in _tiny().parameters()]
    rounded = sum(math.ceil(size / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES for size in sizes)
    # two state tensors per parameter, plus the foreach path's temporaries; Adam's 0-d step
    # counters stay on the host and are not counted
    assert cuda["memory"]["optimizer_state"] * MIB >= 2 * rounded
    assert (cuda["memory"]["optimizer_state"] * MIB) % CUDA_BLOCK_BYTES == 0
    assert cpu["memory"]["optimizer_state"] * MIB >= 2 * sum(sizes)


def test_train_step_rejects_unknown_optimizer_and_loss_and_non_logits():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; valid: sgd"):
        TrainStep(_tiny(), batch_size=2, image_size=8, optimizer="lamb")
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        TrainStep(_tiny(), batch_size=2, image_size=8, loss="l1")
    step = TrainStep(nn.Conv2d(3, 4, 1), batch_size=2, image_size=8, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"needs \(batch, classes\) logits"):
        step()


def test_cross_entropy_targets_are_fixed_and_in_range():
    first = make_step(Case("s", "g", "n", "resnet18", batch_size=4, image_size=32,
                           num_classes=7, loss="cross_entropy"))
    second = make_step(Case("s", "g", "n", "resnet18", batch_size=4, image_size=32,
                            num_classes=7, loss="cross_entropy"))
    assert torch.equal(first.target, second.target)
    assert first.target.min() >= 0 and first.target.max() < 7
    assert any(obj is first.target for obj in first.tracked_objects())


def test_prediction_does_not_patch_the_model_and_leaves_no_meta_kernel():
    built = []

    def model_fn():
        built.append(create_model("resnet18", norm="inplace_abn", activation="leaky_relu"))
        return built[-1]

    registered_before = internals.has_meta_kernel("aten::batch_norm_update_stats")
    predict_peak(model_fn, batch_size=2, image_size=32)
    assert "to" not in vars(built[0])  # Module.to not monkeypatched
    assert internals.has_meta_kernel("aten::batch_norm_update_stats") == registered_before


def test_meta_kernels_are_registered_only_inside_the_block():
    name = "batch_norm_update_stats"
    if internals.has_meta_kernel(f"aten::{name}"):
        pytest.skip("this torch has its own meta kernel for batch_norm_update_stats")
    with internals.temporary_meta_kernels({name: lambda *args: None}) as registered:
        assert registered == [name]
        assert internals.has_meta_kernel(f"aten::{name}")
    assert not internals.has_meta_kernel(f"aten::{name}")


def test_a_missing_torch_internal_names_the_torch_version(monkeypatch):
    monkeypatch.delattr(torch._C, "_dispatch_has_kernel_for_dispatch_key")
    with pytest.raises(internals.TorchInternalsError, match=re.escape(torch.__version__)):
        internals.has_meta_kernel("aten::add")
    from torch.distributed._tools import mem_tracker

    monkeypatch.delattr(mem_tracker.MemTracker, "_update_peak_stats")
    with pytest.raises(internals.TorchInternalsError, match="_update_peak_stats.*tested with"):
        internals.peak_tracker(512)


class BranchOnValue(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


class NonZero(BranchOnValue):
    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.mean((2, 3))) + x.nonzero().shape[0]


class Item(BranchOnValue):
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3))) * float(x.sum().item())


def not_a_module(num_classes: int = 10):
    return "resnet18"


@pytest.mark.parametrize("cls, op", [(BranchOnValue, "_local_scalar_dense"),
                                     (NonZero, "nonzero"), (Item, "_local_scalar_dense")])
def test_data_dependent_models_cannot_be_predicted(cls, op):
    with pytest.raises(UnpredictableModelError, match=f"{op}.*leanstep bench"):
        predict_peak(cls, batch_size=2, image_size=8)


@pytest.mark.parametrize("command", [["predict"], ["max-batch", "--memory", "1GiB"]])
def test_data_dependent_model_is_one_line_and_exit_2(command, capsys):
    spec = f"{__name__}:BranchOnValue"
    assert main([command[0], spec, "--size", "16", *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "_local_scalar_dense" in err and "leanstep bench" in err


@pytest.mark.parametrize("command", [["predict"], ["max-batch", "--memory", "1GiB"],
                                     ["verify", "--precision", "fp32"]])
def test_builder_returning_no_module_is_one_line(command, capsys):
    assert main([command[0], f"{__name__}:not_a_module", *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "str, not a torch.nn.Module" in err


def test_cli_size_height_by_width_optimizer_and_loss_reach_the_prediction(capsys):
    code = main(["predict", "resnet18", "--size", "32x48,32", "--optimizer", "adamw",
                 "--loss", "cross_entropy", "--bs", "2", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [row["name"] for row in rows] == ["resnet18 size=32x48", "resnet18 size=32"]
    assert [(row["image_size"], row["image_width"], row["size"]) for row in rows] == [
        (32, 48, "32x48"), (32, 32, "32")]
    direct = predict_peak(partial(create_model, "resnet18"), batch_size=2, image_size=(32, 48),
                          optimizer="adamw", loss="cross_entropy", num_classes=1000)
    assert rows[0]["predicted_mib"] == pytest.approx(direct["predicted_mib"])


@pytest.mark.parametrize(
    "flag, value, message",
    [("--size", "32x", "S or HxW"), ("--size", "0x32", "image size must be an int >= 1"),
     ("--optimizer", "lamb", "unknown optimizer 'lamb'; valid: sgd, sgd_nesterov, adam"),
     ("--loss", "l2", "unknown loss 'l2'; valid: mean, cross_entropy")],
)
@pytest.mark.parametrize("command", ["predict", "bench", "verify"])
def test_cli_bad_step_options_exit_2_with_one_line(command, flag, value, message, capsys,
                                                   tmp_path):
    extra = ["--out", str(tmp_path / "r.jsonl")] if command == "bench" else []
    assert main([command, "resnet18", flag, value, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_case_fields_round_trip_and_validate():
    case = Case("s", "g", "n", "resnet18", image_size=32, image_width=48, optimizer="adam",
                loss="cross_entropy")
    assert Case.from_dict(json.loads(json.dumps(case.to_dict()))) == case
    assert case.image_hw == (32, 48) and case.size_label == "32x48"
    assert case.memory_case().image_hw == (32, 48)
    validate_case(case)
    with pytest.raises(ValueError, match="memory_image_size 64 is square"):
        validate_case(Case("s", "g", "n", "resnet18", image_size=32, image_width=48,
                           memory_image_size=64))
