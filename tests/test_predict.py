"""Memory prediction: equal to the measured peak of the real step, batch-independent in cost,
CUDA-like adjustments, and the ``leanstep predict`` command."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
from torch import nn

from leanstep.bench.cases import Case
from leanstep.bench.memory import MIB, measured_peak
from leanstep.bench.predict import CUDA_BLOCK_BYTES, predict_case, predict_peak
from leanstep.bench.step import TrainStep
from leanstep.cli import main
from leanstep.models import create_model
from leanstep.models.vgg import POOL, VGG

BATCH, SIZE = 2, 32


def _measured(model_fn, batch_size=BATCH, image_size=SIZE, **step_options) -> dict:
    """MemTracker's peak of the real step after one warm-up step, as the benchmark takes it."""
    step = TrainStep(model_fn(), batch_size=batch_size, image_size=image_size, **step_options)
    step()
    return measured_peak(step, *step.tracked_objects())


@pytest.mark.filterwarnings("ignore:Module is None")  # MemTracker, on checkpointed segments
@pytest.mark.parametrize(
    "name, options, batch_size, image_size",
    [
        ("resnet18", {"norm": "bn"}, 8, 96),
        ("resnet18", {"norm": "inplace_abn", "activation": "leaky_relu", "checkpoint": "blocks"},
         8, 96),
        ("efficientnet_b0", {}, 8, 64),
        ("vgg", {"norm": "abn", "activation": "leaky_relu", "pre_act": True,
                 "checkpoint": "blocks"}, 8, 64),
    ],
)
def test_prediction_equals_measured_peak(name, options, batch_size, image_size):
    model_fn = partial(create_model, name, **options)
    if name == "vgg":  # vgg11_bn's code with narrower convs: VGG's 100M-weight head is enough
        model_fn = partial(VGG, (16, POOL, 32, POOL, 32, POOL), num_classes=10, **options)
    predicted = predict_peak(model_fn, batch_size=batch_size, image_size=image_size)
    measured = _measured(model_fn, batch_size, image_size)
    assert predicted["predicted_mib"] == pytest.approx(measured["peak_mib"], rel=0.01)
    # each category within 1% of itself, activations included, however small their share
    for category, mib in measured["memory"].items():
        assert predicted["memory"][category] == pytest.approx(mib, rel=0.01, abs=1e-3)


def test_channels_last_prediction_equals_measured_peak():
    model_fn = partial(create_model, "resnet18", norm="abn", activation="leaky_relu")
    predicted = predict_peak(model_fn, batch_size=BATCH, image_size=SIZE, channels_last=True)
    measured = _measured(model_fn, channels_last=True)
    assert predicted["predicted_mib"] == pytest.approx(measured["peak_mib"], rel=0.01)


def _peak_rss_reset() -> int:
    """Reset this process's peak resident set size to its current size, which is returned.

    ``ru_maxrss`` is a process's all-time peak (inherited even across exec from a parent that
    spawned the process), so its growth depends on what ran before; Linux can reset the peak
    (``/proc/self/clear_refs``, value 5) and reports it as ``VmHWM``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:
        pytest.skip(f"resetting the peak resident memory needs Linux's /proc: {error}")
    return _peak_rss()


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def large_batch():
    """A resnet18 InplaceABN step at batch 1024, 224 px (about 16 GiB), and the growth of this
    process's peak resident memory while it was predicted (an operation without a meta kernel
    would run for real on full-size zeros), measured from a peak reset just before."""
    model_fn = partial(create_model, "resnet18", norm="inplace_abn", activation="leaky_relu")
    before = _peak_rss_reset()
    predicted = predict_peak(model_fn, batch_size=1024, image_size=224)
    grown = _peak_rss() - before
    return predicted, grown


def test_large_batch_is_predicted_without_allocating_it(large_batch):
    predicted, grown = large_batch
    input_mib = 1024 * 3 * 224 * 224 * 4 / MIB
    assert predicted["memory"]["input"] == pytest.approx(input_mib)
    assert predicted["predicted_mib"] > 10 * 1024
    assert grown < 0.05 * predicted["predicted_mib"] * MIB


def test_top_modules_are_the_models_modules_largest_first(large_batch):
    predicted, _ = large_batch
    top = predicted["top_modules"]
    names = {name or "(model)" for name, _ in create_model("resnet18").named_modules()}
    sizes = [module["activation_mib"] for module in top]
    assert len(top) == 10
    assert all(module["module"] in names for module in top)
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] > 0
    assert sum(sizes) <= predicted["predicted_mib"]


def _tiny_linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.Linear(10, 3))


def test_cuda_like_rounds_every_storage_to_512_bytes_and_uses_foreach():
    cpu = predict_peak(_tiny_linear, batch_size=BATCH, image_size=8)
    cuda = predict_peak(_tiny_linear, batch_size=BATCH, image_size=8, device_like="cuda")
    sizes = [p.numel() * p.element_size() for p in _tiny_linear().parameters()]
    rounded = sum(math.ceil(size / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES for size in sizes)
    assert cpu["memory"]["parameters"] * MIB == sum(sizes)
    assert cuda["memory"]["parameters"] * MIB == rounded
    assert cuda["predicted_mib"] > cpu["predicted_mib"]
    # foreach SGD holds a weight-decayed copy of every gradient beside the momentum buffers
    assert cuda["memory"]["optimizer_state"] * MIB >= 2 * rounded


@pytest.mark.parametrize(
    "options, message",
    [({"compile": True}, "compile"), ({"device_like": "tpu"}, "device_like")],
)
def test_unpredictable_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        predict_peak(_tiny_linear, batch_size=BATCH, image_size=8, **options)


def test_predict_case_predicts_the_memory_pass_input():
    case = Case(
        suite="t", group="g", name="n", model="resnet18", options={"norm": "abn"},
        batch_size=1, image_size=SIZE, memory_batch_size=BATCH,
    )
    from_case = predict_case(case)
    direct = predict_peak(partial(create_model, "resnet18", norm="abn"), batch_size=BATCH,
                          image_size=SIZE)
    assert from_case["predicted_mib"] == pytest.approx(direct["predicted_mib"])


def test_cli_json_has_one_row_per_variant_and_inplace_abn_is_leaner(capsys):
    code = main(["predict", "resnet18", "--norm", "abn,inplace_abn", "--activation",
                 "leaky_relu", "--bs", "8", "--size", "64", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [row["options"]["norm"] for row in rows] == ["abn", "inplace_abn"]
    for row in rows:
        assert row["batch_size"] == 8 and row["image_size"] == 64 and row["seconds"] > 0
        assert row["predicted_mib"] == pytest.approx(sum(row["memory"].values()), rel=1e-6)
    assert rows[1]["predicted_mib"] < rows[0]["predicted_mib"]  # InplaceABN keeps less


def test_cli_suite_shows_reference_ratio_and_skips_missing_peers(tmp_path, capsys):
    suite = tmp_path / "mini.toml"
    suite.write_text(
        '[defaults]\nimage_size = 32\nbatch_size = 2\n\n[[group]]\nname = "g"\n\n'
        '[[group.case]]\nname = "ours"\nmodel = "resnet18"\nreference_mib = 100.0\n\n'
        '[[group.case]]\nname = "peer"\nmodel = "efficientnet_pytorch:efficientnet-b0"\n'
    )
    code = main(["predict", str(suite)])
    out = capsys.readouterr().out
    ours = next(line for line in out.splitlines() if " ours " in line)
    cells = [cell.strip() for cell in ours.strip("│ ").split("│")]
    predicted, reference, ratio = (float(cell) for cell in cells[4:7])
    assert code == 0
    assert reference == 100.0 and ratio == pytest.approx(predicted / reference, abs=1e-3)
    try:
        import efficientnet_pytorch  # noqa: F401
    except ImportError:
        assert "skipped: g / peer: pip install efficientnet-pytorch" in out


def test_cli_bad_device_like_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "resnet18", "--device-like", "tpu"])
    assert exit_info.value.code == 2
    assert "tpu" in capsys.readouterr().err
