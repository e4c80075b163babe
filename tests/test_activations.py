"""The activation registry: forward values, memory-efficient backward passes, saved memory."""

import math

import pytest
import torch

from leanstep.bench.memory import saved_tensor_bytes
from leanstep.layers import get_activation, list_activations

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _softplus(v):
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _relu6(v):
    return min(max(v, 0.0), 6.0)


def _elu(v, alpha):
    return v if v > 0 else alpha * math.expm1(v)


# Scalar reference formulas, written from the definitions, evaluated with Python's math module.
REFERENCE = {
    "identity": lambda v: v,
    "relu": lambda v: max(v, 0.0),
    "relu6": _relu6,
    "leaky_relu": lambda v: v if v >= 0 else 0.01 * v,
    "elu": lambda v: _elu(v, 1.0),
    "celu": lambda v: _elu(v, 1.0),
    "selu": lambda v: SELU_SCALE * (v if v > 0 else SELU_ALPHA * math.expm1(v)),
    "gelu": lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))),
    "sigmoid": _sigmoid,
    "tanh": math.tanh,
    "hard_sigmoid": lambda v: _relu6(v + 3.0) / 6.0,
    "swish": lambda v: v * _sigmoid(v),
    "mish": lambda v: v * math.tanh(_softplus(v)),
    "hard_swish": lambda v: v * _relu6(v + 3.0) / 6.0,
}
ISSUE_NAMES = [
    "identity", "relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "sigmoid", "tanh",
    "swish", "mish", "hard_sigmoid", "hard_swish",
    "swish_me", "swish_naive", "mish_me", "mish_naive", "hard_swish_me", "hard_swish_naive",
]
EFFICIENT = ["swish_me", "mish_me", "hard_swish_me"]
NAIVE = ["swish_naive", "mish_naive", "hard_swish_naive"]


def _reference_name(name):
    return name.removesuffix("_me").removesuffix("_naive")


def _points():
    """Float64 points over the interesting range, the kinks of the piecewise ones included."""
    grid = torch.linspace(-8.0, 8.0, 160, dtype=torch.float64)
    extra = torch.tensor([-3.0, 0.0, 3.0, 6.0, -30.0, 30.0, 1e-8, -1e-8], dtype=torch.float64)
    return torch.cat([grid, extra, torch.randn(64, dtype=torch.float64) * 4]).reshape(8, -1)


def _reference(name, x, **params):
    formula = REFERENCE[_reference_name(name)]
    if params:
        value = next(iter(params.values()))
        formula = {
            "leaky_relu": lambda v: v if v >= 0 else value * v,
            "elu": lambda v: _elu(v, value),
            "celu": lambda v: max(v, 0.0) + min(0.0, value * math.expm1(v / value)),
        }[name]
    values = [formula(v) for v in x.flatten().tolist()]
    return torch.tensor(values, dtype=torch.float64).reshape(x.shape)


def test_registry_has_every_name_of_the_issue():
    assert set(ISSUE_NAMES) <= set(list_activations())


@pytest.mark.parametrize("name", ISSUE_NAMES)
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_equals_float64_reference(name, inplace):
    x = _points()
    y = get_activation(name, inplace=inplace)(x.clone())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _reference(name, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("leaky_relu", {"negative_slope": 0.2}),
        ("leaky_relu", {"negative_slope": 0.0}),
        ("elu", {"alpha": 0.5}),
        ("celu", {"alpha": 2.0}),
    ],
)
def test_forward_with_parameter_equals_reference(name, params):
    x = _points()
    torch.testing.assert_close(get_activation(name, **params)(x), _reference(name, x, **params))


@pytest.mark.parametrize(("alias", "name"), [("silu", "swish"), ("silu_me", "swish_me")])
def test_alias_is_the_same_activation(alias, name):
    x = _points()
    torch.testing.assert_close(get_activation(alias)(x), get_activation(name)(x))


def _away_from_kinks(x):
    """Move points off hard_swish's kinks at -3 and 3, where the derivative jumps."""
    near = ((x.abs() - 3).abs() < 1e-2)
    return torch.where(near, x + 0.05, x)


@pytest.mark.parametrize("name", EFFICIENT)
def test_memory_efficient_backward_passes_gradcheck(name):
    x = _away_from_kinks(torch.rand(4, 6, dtype=torch.float64) * 12 - 6).requires_grad_()
    assert torch.autograd.gradcheck(get_activation(name), (x,))


@pytest.mark.parametrize("name", EFFICIENT + NAIVE)
def test_gradient_equals_native_op(name):
    x = _away_from_kinks(torch.randn(5, 7, dtype=torch.float64) * 4).requires_grad_()
    grad_output = torch.randn(5, 7, dtype=torch.float64)
    (grad,) = torch.autograd.grad(get_activation(name)(x), x, grad_output)
    (expected,) = torch.autograd.grad(get_activation(_reference_name(name))(x), x, grad_output)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["swish", "mish", "hard_swish"])
def test_saved_bytes_efficient_keeps_one_input_naive_keeps_more(name):
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    efficient = saved_tensor_bytes(get_activation(f"{name}_me"), x)
    naive = saved_tensor_bytes(get_activation(f"{name}_naive"), x)
    native = saved_tensor_bytes(get_activation(name), x)
    assert efficient == input_bytes
    assert native == input_bytes
    assert naive >= 2 * input_bytes


@pytest.mark.parametrize("name", EFFICIENT + NAIVE)
def test_inplace_request_leaves_input_alone_where_it_would_corrupt_gradients(name):
    """``inplace=True`` is ignored by the recomputing forms: the activation's input (not a leaf,
    so autograd would allow writing over it) keeps its value, is read again after the
    activation, and every gradient equals the out-of-place native op's."""
    x = _away_from_kinks(torch.randn(3, 4, dtype=torch.float64) * 4).requires_grad_()
    weight = torch.randn(3, 4, dtype=torch.float64)

    def loss(activation):
        y = x * 1.5  # not a leaf: an in-place activation could overwrite it
        before = y.detach().clone()
        out = activation(y)
        torch.testing.assert_close(y.detach(), before, rtol=0, atol=0)
        # y is read again after the activation: an overwritten y changes the loss and gradient
        return (out * weight).sum() + (y * y).sum() / 2

    expected_loss = loss(get_activation(_reference_name(name)))
    (expected,) = torch.autograd.grad(expected_loss, x)
    got_loss = loss(get_activation(name, inplace=True))
    (got,) = torch.autograd.grad(got_loss, x)
    torch.testing.assert_close(got_loss, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["relu_typo", "Swish", "", "batchnorm"])
def test_unknown_name_raises_naming_it_and_the_valid_ones(name):
    with pytest.raises(ValueError) as error:
        get_activation(name)
    message = str(error.value)
    assert repr(name) in message
    assert "leaky_relu" in message and "mish_me" in message


def test_non_string_name_raises():
    with pytest.raises(ValueError, match="None"):
        get_activation(None)


@pytest.mark.parametrize(
    ("name", "params", "shown"),
    [
        ("leaky_relu", {"negative_slope": -0.1}, "-0.1"),
        ("leaky_relu", {"negative_slope": float("nan")}, "nan"),
        ("leaky_relu", {"negative_slope": "steep"}, "steep"),
        ("elu", {"alpha": 0.0}, "alpha=0.0"),
        ("elu", {"alpha": float("inf")}, "inf"),
        ("celu", {"alpha": -1.0}, "-1.0"),
        ("relu", {"negative_slope": 0.1}, "negative_slope"),
        ("elu", {"slope": 0.1}, "slope"),
    ],
)
def test_bad_parameter_raises_naming_it(name, params, shown):
    with pytest.raises(ValueError, match=shown):
        get_activation(name, **params)
