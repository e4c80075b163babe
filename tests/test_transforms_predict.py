"""Transformed models are predicted (fake tensors, meta-built) as exactly as plain ones: the
prediction equals the measured CPU peak of the same step within 1%."""

from __future__ import annotations

from functools import partial

import pytest
from transform_models import MODELS

import leanstep
from leanstep.bench.memory import measured_peak
from leanstep.bench.predict import predict_peak
from leanstep.bench.step import TrainStep
from leanstep.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore:Module is None")


def _measured(model_fn, batch_size, image_size) -> dict:
    step = TrainStep(model_fn(), batch_size=batch_size, image_size=image_size)
    step()  # warm-up, as the benchmark's
    return measured_peak(step, *step.tracked_objects())


def _transformed(build, transform):
    model = build()
    if "convert" in transform:
        leanstep.convert_norm_act(model, "abn")
    if "lean" in transform:
        leanstep.lean(model)
    if "checkpoint" in transform:
        leanstep.checkpoint_blocks(model, every=2 if "2" in transform else 1)
    return model


CASES = [
    ("torchvision_resnet", "lean"),
    ("torchvision_resnet", "convert+lean"),
    ("timm", "checkpoint2"),
    ("mobilenet", "lean"),
    ("vgg", "lean+checkpoint"),
]


@pytest.mark.parametrize("name, transform", CASES)
def test_prediction_of_transformed_model_equals_measured_peak(name, transform):
    model_fn = partial(_transformed, partial(MODELS[name], width=16), transform)
    predicted = predict_peak(model_fn, batch_size=8, image_size=32)
    measured = _measured(model_fn, 8, 32)
    assert predicted["predicted_mib"] == pytest.approx(measured["peak_mib"], rel=0.01)
    assert predicted["memory"]["activations"] == pytest.approx(
        measured["memory"]["activations"], rel=0.01, abs=1e-3)


def test_zoo_lean_prediction_equals_measured_and_is_leaner():
    build = partial(create_model, "efficientnet_b0", num_classes=10)
    plain = predict_peak(build, batch_size=4, image_size=64)
    model_fn = partial(_transformed, build, "lean")
    predicted = predict_peak(model_fn, batch_size=4, image_size=64)
    measured = _measured(model_fn, 4, 64)
    assert predicted["predicted_mib"] == pytest.approx(measured["peak_mib"], rel=0.01)
    assert predicted["memory"]["activations"] < 0.6 * plain["memory"]["activations"]
