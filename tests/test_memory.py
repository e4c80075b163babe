"""Memory helpers: bytes saved for backward, and the categorised peak of a training step."""

import pytest
import torch
from torch import nn

from leanstep.bench.memory import CATEGORIES, MIB, measured_peak, saved_tensor_bytes
from leanstep.bench.step import TrainStep
from leanstep.layers import get_norm_act


def _bytes(tensor):
    return tensor.numel() * tensor.element_size()


def test_each_storage_counts_once():
    x = torch.randn(4, 5, requires_grad=True)
    assert saved_tensor_bytes(lambda t: t * t, x) == _bytes(x)  # mul saves x twice
    assert saved_tensor_bytes(lambda t: t[:2] * t[2:], x) == _bytes(x)  # two views, one storage


def test_counts_what_autograd_saves():
    x = torch.randn(3, 7, requires_grad=True)
    assert saved_tensor_bytes(torch.sigmoid, x) == _bytes(x)  # its output
    assert saved_tensor_bytes(lambda t: t.sin().cos(), x) == 2 * _bytes(x)
    assert saved_tensor_bytes(lambda t: t + 1, x) == 0
    assert saved_tensor_bytes(torch.sigmoid, x.detach()) == 0


def test_module_parameters_and_buffers_are_not_counted():
    linear = nn.Linear(64, 32)
    x = torch.randn(2, 64, requires_grad=True)
    assert saved_tensor_bytes(linear, x) == _bytes(x)
    norm = nn.BatchNorm2d(8).eval()
    image = torch.randn(2, 8, 4, 4, requires_grad=True)
    saved = saved_tensor_bytes(norm, image)
    assert _bytes(image) <= saved < _bytes(image) + 4 * _bytes(norm.running_var)


def test_keyword_arguments_are_passed():
    x = torch.randn(6, requires_grad=True)
    assert saved_tensor_bytes(torch.nn.functional.leaky_relu, x, negative_slope=0.2) == _bytes(x)


def _stack(norm):
    layers, channels = [], 3
    for _ in range(3):
        layers += [nn.Conv2d(channels, 16, 3, padding=1, bias=False), get_norm_act(norm)(16)]
        channels = 16
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def peaks():
    """measured_peak of one warmed-up training step per norm variant."""
    results = {}
    for norm in ("bn", "inplace_abn"):
        torch.manual_seed(0)
        step = TrainStep(_stack(norm), batch_size=4, image_size=16)
        step()
        parameter_bytes = sum(_bytes(p) for p in step.model.parameters())
        results[norm] = (measured_peak(step, *step.tracked_objects()), parameter_bytes, step)
    return results


def test_measured_peak_reports_categories_and_a_peak_of_at_least_the_parameters(peaks):
    result, parameter_bytes, step = peaks["bn"]
    assert set(result) >= {"peak_mib", "memory"}
    memory = result["memory"]
    assert set(memory) <= set(CATEGORIES.values())
    assert {"parameters", "activations", "optimizer_state", "input"} <= set(memory)
    assert memory["parameters"] == pytest.approx(parameter_bytes / MIB, rel=1e-6)
    assert memory["optimizer_state"] == pytest.approx(parameter_bytes / MIB, rel=1e-6)  # momentum
    assert memory["input"] == pytest.approx(_bytes(step.input) / MIB, rel=1e-6)
    assert memory["activations"] > 0
    assert result["peak_mib"] >= parameter_bytes / MIB
    assert result["peak_mib"] == pytest.approx(sum(memory.values()), rel=1e-6)


def test_measured_peak_sees_inplace_abn_keep_fewer_activations(peaks):
    plain, inplace = peaks["bn"][0], peaks["inplace_abn"][0]
    assert inplace["memory"]["activations"] < 0.6 * plain["memory"]["activations"]
    assert inplace["peak_mib"] < plain["peak_mib"]
