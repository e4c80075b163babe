"""BatchNormAct, ABN and InplaceABN against nn.BatchNorm + activation (torch.nn.functional).

Tolerances. Float64 comparisons use 1e-10. Reduced precision compares against a float64
reference computed on the same (already rounded) input, by the relative error of the whole
tensor, ||a - b|| / ||b||: the rounding of single values cannot make it fail, a wrong channel
does. fp32: 2e-6, about 30 unit roundoffs (6e-8), as BatchNorm gradients are sums over the
batch. bf16: 2e-2 and fp16: 2e-3, about 5x the worst error seen on these shapes (4e-3 and
4e-4, of the order of their machine epsilons 3.9e-3 and 9.8e-4): InplaceABN stores its output
in the input's dtype and its backward rebuilds the input from that rounded output.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from leanstep.bench.memory import saved_tensor_bytes
from leanstep.layers import (
    ABN,
    BatchNormAct,
    InplaceABN,
    check_norm_activation,
    get_norm_act,
    list_norms,
)

EXACT = {"rtol": 1e-10, "atol": 1e-10}
RELATIVE_TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
INVERTIBLE = [("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 2.5), ("elu", None),
              ("elu", 0.5), ("identity", None)]


def _activate(y, activation, param=None):
    """The reference activation, from torch.nn.functional."""
    if activation == "leaky_relu":
        return F.leaky_relu(y, 0.01 if param is None else param)
    if activation == "elu":
        return F.elu(y, 1.0 if param is None else param)
    if activation == "relu":
        return F.relu(y)
    if activation == "swish":
        return F.silu(y)
    assert activation == "identity"
    return y


def _reference_norm(module, dims):
    """nn.BatchNorm1d/2d with ``module``'s settings and current parameters and buffers."""
    cls = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
    reference = cls(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
    ).to(dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    reference.train(module.training)
    return reference


def _relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _gamma(kind, generator):
    magnitude = 0.2 + 1.8 * torch.rand((), generator=generator, dtype=torch.float64).item()
    sign = 1.0 if torch.rand((), generator=generator).item() < 0.5 else -1.0
    return {
        "positive": magnitude,
        "negative": -magnitude,
        "zero": 0.0,
        "tiny": sign * magnitude * 4e-4,
        "threshold": sign * 1e-3,
    }[kind]


@st.composite
def _cases(draw):
    four_d = draw(st.booleans())
    n = draw(st.integers(1, 8))
    spatial = (draw(st.integers(1, 9)), draw(st.integers(1, 9))) if four_d else ()
    if n * math.prod(spatial) == 1:
        n = 2
    channels = draw(st.integers(1, 32))
    kinds = st.sampled_from(["positive", "negative", "zero", "tiny", "threshold"])
    return {
        "shape": (n, channels, *spatial),
        "activation": draw(st.sampled_from(INVERTIBLE)),
        "gammas": draw(st.lists(kinds, min_size=channels, max_size=channels)),
        "momentum": draw(st.sampled_from([0.1, 0.7, None])),
        "seed": draw(st.integers(0, 2**20)),
    }


@settings(max_examples=150, deadline=None, derandomize=True)
@given(case=_cases())
def test_inplace_abn_equals_batchnorm_then_activation_float64(case):
    """Outputs, input/weight/bias gradients over three steps, then running stats and eval."""
    generator = torch.Generator().manual_seed(case["seed"])
    shape, (activation, param) = case["shape"], case["activation"]
    channels = shape[1]
    # protect=1.0: every channel may keep a copy, however many zero or tiny gammas are drawn
    module = InplaceABN(channels, activation, param, momentum=case["momentum"], protect=1.0)
    module = module.double()
    with torch.no_grad():
        gammas = [_gamma(kind, generator) for kind in case["gammas"]]
        module.weight.copy_(torch.tensor(gammas, dtype=torch.float64))
        module.bias.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) * 2 - 1)
    reference = _reference_norm(module, len(shape))

    for _ in range(3):
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5
        grad_output = torch.randn(shape, generator=generator, dtype=torch.float64)
        x_reference = x.clone().requires_grad_()
        expected = _activate(reference(x_reference), activation, param)
        expected.backward(grad_output)

        x_leaf = x.clone().requires_grad_()
        intermediate = x_leaf * 1  # a non-leaf: InplaceABN writes over it
        output = module(intermediate)
        assert output.data_ptr() == intermediate.data_ptr()
        torch.testing.assert_close(output, expected, **EXACT)
        output.backward(grad_output)
        torch.testing.assert_close(x_leaf.grad, x_reference.grad, **EXACT)
        torch.testing.assert_close(module.weight.grad, reference.weight.grad, **EXACT)
        torch.testing.assert_close(module.bias.grad, reference.bias.grad, **EXACT)
        module.zero_grad()
        reference.zero_grad()

    torch.testing.assert_close(module.running_mean, reference.running_mean, **EXACT)
    torch.testing.assert_close(module.running_var, reference.running_var, **EXACT)
    assert module.num_batches_tracked.item() == reference.num_batches_tracked.item() == 3

    module.eval()
    reference.eval()
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    before = x.clone()
    torch.testing.assert_close(module(x), _activate(reference(x), activation, param), **EXACT)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [BatchNormAct, ABN])
@pytest.mark.parametrize(("activation", "param"), [("leaky_relu", 0.2), ("relu", None),
                                                   ("elu", 0.5), ("swish", None)])
def test_batchnorm_act_and_abn_equal_batchnorm_then_activation(cls, activation, param):
    module = cls(6, activation, param).double()
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    reference = _reference_norm(module, 4)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_()
    grad_output = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    output = module(x * 1)
    expected = _activate(reference(x_reference), activation, param)
    torch.testing.assert_close(output, expected, **EXACT)
    output.backward(grad_output)
    expected.backward(grad_output)
    torch.testing.assert_close(x.grad, x_reference.grad, **EXACT)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, **EXACT)
    torch.testing.assert_close(module.running_var, reference.running_var, **EXACT)


def _train_step_pair(module, x, grad_output, activation="leaky_relu", param=None):
    """Output and gradients of ``module`` and of the BatchNorm reference on a non-leaf input."""
    reference = _reference_norm(module, x.dim()).double()
    x_leaf = x.detach().clone().requires_grad_()
    output = module(x_leaf * 1)
    output.backward(grad_output)
    x_reference = x.detach().double().requires_grad_()
    expected = _activate(reference(x_reference), activation, param)
    expected.backward(grad_output.double())
    pairs = {"output": (output, expected), "input grad": (x_leaf.grad, x_reference.grad)}
    if module.affine:
        pairs["weight grad"] = (module.weight.grad, reference.weight.grad)
        pairs["bias grad"] = (module.bias.grad, reference.bias.grad)
    return pairs, reference


def test_momentum_none_is_a_cumulative_average():
    module = InplaceABN(5, momentum=None).double()
    batches = [torch.randn(4, 5, 3, 3, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for batch in batches:
        module(batch.clone().requires_grad_() * 1).sum().backward()
    stacked = torch.stack([b.transpose(0, 1).reshape(5, -1) for b in batches])
    torch.testing.assert_close(module.running_mean, stacked.mean(2).mean(0), **EXACT)
    torch.testing.assert_close(module.running_var, stacked.var(2, correction=1).mean(0), **EXACT)
    assert module.num_batches_tracked.item() == 4


@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats_uses_batch_statistics_in_train_and_eval(training):
    module = InplaceABN(4, "elu", track_running_stats=False).double().train(training)
    assert module.running_mean is None and module.running_var is None
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    pairs, _ = _train_step_pair(module, x, torch.randn_like(x), "elu")
    for actual, expected in pairs.values():
        torch.testing.assert_close(actual, expected, **EXACT)
    batchnorm = nn.BatchNorm2d(4, track_running_stats=False)
    assert set(module.state_dict()) == set(batchnorm.state_dict())


def test_affine_false_equals_batchnorm_without_parameters():
    module = InplaceABN(4, "leaky_relu", 0.1, affine=False).double()
    assert module.weight is None and module.bias is None
    x = torch.randn(3, 4, 2, 6, dtype=torch.float64)
    pairs, reference = _train_step_pair(module, x, torch.randn_like(x), "leaky_relu", 0.1)
    for actual, expected in pairs.values():
        torch.testing.assert_close(actual, expected, **EXACT)
    torch.testing.assert_close(module.running_var, reference.running_var, **EXACT)
    assert set(module.state_dict()) == set(nn.BatchNorm2d(4, affine=False).state_dict())


def test_eval_mode_is_plain_batchnorm_with_running_stats_and_leaves_input_alone():
    module = InplaceABN(4, "leaky_relu", 0.3).double()
    with torch.no_grad():
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
        module.weight.normal_()
    module.eval()
    reference = _reference_norm(module, 4)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    intermediate = x * 1
    before = intermediate.detach().clone()
    output = module(intermediate)
    torch.testing.assert_close(output, F.leaky_relu(reference(x), 0.3), **EXACT)
    torch.testing.assert_close(intermediate.detach(), before, rtol=0, atol=0)
    assert module.num_batches_tracked.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("module_dtype", ["float32", "same"])
def test_reduced_precision_within_documented_tolerance(dtype, module_dtype):
    module = InplaceABN(8, "leaky_relu", 0.1)
    with torch.no_grad():
        gamma = torch.linspace(-2, 2, 8)
        module.weight.copy_(torch.where(gamma.abs() > 0.2, gamma, 0.5))
        module.bias.uniform_(-1, 1)
    if module_dtype == "same":
        module.to(dtype)
    x = (torch.randn(4, 8, 6, 6) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    grad_output = torch.randn(x.shape).to(dtype)
    pairs, reference = _train_step_pair(module, x, grad_output, "leaky_relu", 0.1)
    output = pairs["output"][0]
    assert output.dtype == dtype
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert pairs["input grad"][0].dtype == dtype
    assert module.weight.grad.dtype == module.weight.dtype
    for name, (actual, expected) in pairs.items():
        error = _relative_error(actual, expected)
        assert error < RELATIVE_TOLERANCE[dtype], f"{name}: relative error {error:.2e}"
    for buffer in ("running_mean", "running_var"):
        error = _relative_error(getattr(module, buffer), getattr(reference, buffer))
        assert error < RELATIVE_TOLERANCE[dtype], f"{buffer}: relative error {error:.2e}"


def test_channels_last_float64_is_exact_and_keeps_the_format():
    module = InplaceABN(6, "elu").double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    pairs, _ = _train_step_pair(module, x, torch.randn_like(x), "elu")
    assert pairs["output"][0].is_contiguous(memory_format=torch.channels_last)
    for actual, expected in pairs.values():
        torch.testing.assert_close(actual, expected, **EXACT)


def test_tiny_gamma_channels_within_the_budget_stay_correct_in_float32():
    """With |gamma| < 1e-3 (and beta = 1) rebuilding the input from a float32 output would
    lose it; channels within the protect budget keep their input and stay float32-accurate."""
    module = InplaceABN(6, "identity", protect=4 / 6)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1e-5, 0.0, -2e-4, 9.9e-4, 1.0, -1.5]))
        module.bias.fill_(1.0)
    x = torch.randn(4, 6, 5, 5)
    pairs, _ = _train_step_pair(module, x, torch.randn_like(x), "identity")
    for name, (actual, expected) in pairs.items():
        error = _relative_error(actual, expected)
        assert error < RELATIVE_TOLERANCE[torch.float32], f"{name}: relative error {error:.2e}"
    assert module.unprotected_channels.item() == 0


def test_saved_bytes_are_one_input_plus_the_fixed_budget_whatever_the_weights():
    """The copy has a static size, ceil(protect * C) channels: the weights change its contents,
    never its size (a size set by the weights would need a host-device sync)."""
    x = torch.randn(4, 32, 6, 6, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    per_channel_bytes = input_bytes // 32
    module = InplaceABN(32)
    baseline = saved_tensor_bytes(module, x)
    budget_bytes = input_bytes + 2 * per_channel_bytes  # ceil(32 / 16) channels
    assert budget_bytes <= baseline <= budget_bytes + 64 * 8
    with torch.no_grad():
        module.weight[[1, 5, 6]] = torch.tensor([0.0, 5e-4, -1e-6])
    assert saved_tensor_bytes(module, x) == baseline
    unprotected = saved_tensor_bytes(InplaceABN(32, protect=0.0), x)
    # The copy, its int64 index and five float32 parameters per protected channel (its
    # statistics, gamma and activation branch).
    assert unprotected == baseline - 2 * per_channel_bytes - 2 * 8 - 2 * 5 * 4


def test_saved_bytes_on_six_block_stack_inplace_abn_at_most_055_of_batchnorm_act():
    def stack(norm):
        layers, channels = [], 3
        for _ in range(6):
            layers += [nn.Conv2d(channels, 64, 3, padding=1, bias=False), get_norm_act(norm)(64)]
            channels = 64
        return nn.Sequential(*layers)

    x = torch.ones(2, 3, 32, 32, requires_grad=True)
    saved = {norm: saved_tensor_bytes(stack(norm), x) for norm in ("bn", "abn", "inplace_abn")}
    assert saved["inplace_abn"] <= 0.55 * saved["bn"]
    assert saved["inplace_abn"] < saved["abn"] < saved["bn"]


def test_autocast_bfloat16_on_cpu_matches_batchnorm_act():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    models = {norm: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), get_norm_act(norm)(8))
              for norm in ("bn", "inplace_abn")}
    for model in models.values():
        model[0].load_state_dict(conv.state_dict())
    x = torch.randn(4, 3, 8, 8)
    outputs, grads = {}, {}
    for norm, model in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[norm] = model(x)
        outputs[norm].float().square().mean().backward()
        grads[norm] = (model[0].weight.grad, model[1].weight.grad, model[1].bias.grad)
    assert outputs["inplace_abn"].dtype == outputs["bn"].dtype == torch.bfloat16
    tolerance = RELATIVE_TOLERANCE[torch.bfloat16]
    assert _relative_error(outputs["inplace_abn"], outputs["bn"]) < tolerance
    for actual, expected in zip(grads["inplace_abn"], grads["bn"], strict=True):
        assert actual.dtype == torch.float32
        assert _relative_error(actual, expected) < tolerance


@pytest.mark.parametrize("view", [lambda x: x, lambda x: x.view(2, 3, 4, 4), lambda x: x[:, :3]],
                         ids=["leaf", "view of a leaf", "slice of a leaf"])
def test_leaf_input_that_requires_grad_is_not_modified_and_gets_correct_grads(view):
    """A leaf, or a view of one (which autograd forbids writing in place), is copied first."""
    module = InplaceABN(3, "elu", 0.7).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    reference = _reference_norm(module, 4)
    x_reference = x.detach().clone().requires_grad_()
    grad_output = torch.randn_like(before)
    module(view(x)).backward(grad_output)
    F.elu(reference(x_reference), 0.7).backward(grad_output)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_reference.grad, **EXACT)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_user_tensor_without_grad_is_not_modified(grad_enabled):
    module = InplaceABN(3).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    before = x.clone()
    with torch.set_grad_enabled(grad_enabled):
        output = module(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    expected = F.leaky_relu(F.batch_norm(before, None, None, training=True), 0.01)
    torch.testing.assert_close(output, expected, **EXACT)
    assert output.requires_grad == grad_enabled


def test_input_that_autograd_still_needs_raises_at_backward():
    """sigmoid saves its output for backward: overwriting it must not give silent wrong grads."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    output = InplaceABN(3)(torch.sigmoid(x))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()


@pytest.mark.parametrize("cls", [BatchNormAct, ABN, InplaceABN])
def test_state_dict_is_batchnorm2d_and_loads_its_checkpoints(cls):
    """A BatchNorm2d checkpoint (every entry unlike the defaults) loads into the norm, which
    then holds those values and computes BN + activation with them in eval mode; the norm's
    own checkpoint loads into a fresh BatchNorm2d the same way."""
    batchnorm = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        batchnorm.weight.uniform_(0.5, 1.5)
        batchnorm.bias.normal_()
        batchnorm.running_mean.normal_()
        batchnorm.running_var.uniform_(1, 2)
    batchnorm.num_batches_tracked.fill_(7)
    checkpoint = {key: value.clone() for key, value in batchnorm.state_dict().items()}
    module = cls(5).double()
    assert list(module.state_dict()) == list(checkpoint)
    module.load_state_dict(checkpoint)
    for key, value in checkpoint.items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    expected = F.leaky_relu(batchnorm.eval()(x), 0.01)
    torch.testing.assert_close(module.eval()(x.clone()), expected, **EXACT)

    fresh = nn.BatchNorm2d(5).double()
    fresh.load_state_dict(module.state_dict())
    for key, value in checkpoint.items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_registry_names_and_classes():
    assert {"bn", "abn", "inplace_abn"} <= set(list_norms())
    assert get_norm_act("bn") is BatchNormAct
    assert get_norm_act("abn") is ABN
    assert get_norm_act("inplace_abn") is InplaceABN
    for name in list_norms():
        assert issubclass(get_norm_act(name), nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["batchnorm", "", "ABN", "inplace"])
def test_unknown_norm_raises_naming_it_and_the_valid_ones(name):
    with pytest.raises(ValueError) as error:
        get_norm_act(name)
    assert repr(name) in str(error.value) and "inplace_abn" in str(error.value)


@pytest.mark.parametrize(
    ("activation", "param", "shown"),
    [("relu", None, "'relu'"), ("swish", None, "'swish'"), ("mish_me", None, "'mish_me'"),
     ("leaky_relu", 0.0, "0.0")],
)
def test_inplace_abn_rejects_activations_it_cannot_invert(activation, param, shown):
    with pytest.raises(ValueError, match=shown) as error:
        InplaceABN(4, activation, param)
    assert "abn" in str(error.value) and "leaky_relu" in str(error.value)


@pytest.mark.parametrize("cls", [BatchNormAct, ABN, InplaceABN])
@pytest.mark.parametrize(
    ("activation", "param", "shown"),
    [("tanhh", None, "'tanhh'"), ("elu", -1.0, "-1.0"), ("elu", "big", "big"),
     ("leaky_relu", -0.5, "-0.5"), ("identity", 0.5, "activation_param")],
)
def test_bad_activation_or_parameter_raises_naming_it(cls, activation, param, shown):
    with pytest.raises(ValueError, match=shown):
        cls(4, activation, param)


def test_check_norm_activation_fails_early():
    check_norm_activation("bn", "relu")
    check_norm_activation("inplace_abn", "elu", 0.5)
    with pytest.raises(ValueError, match="'relu'"):
        check_norm_activation("inplace_abn", "relu")
    with pytest.raises(ValueError, match="'nope'"):
        check_norm_activation("nope", "relu")
    with pytest.raises(ValueError, match="'nope'"):
        check_norm_activation("abn", "nope")


@pytest.mark.parametrize("cls", [BatchNormAct, ABN, InplaceABN])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6,), (2, 5), (2, 5, 3, 3), ()])
def test_wrong_input_dims_raise_naming_the_shape(cls, training, shape):
    module = cls(4).train(training)
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        module(torch.randn(shape))


def test_one_value_per_channel_in_training_raises():
    with pytest.raises(ValueError, match="more than 1 value"):
        InplaceABN(4)(torch.randn(1, 4, 1, 1))
