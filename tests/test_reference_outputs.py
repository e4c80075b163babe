"""The zoo computes what torchvision and timm compute: float64 logits against reference outputs.

``tests/data/outputs.json`` holds the logits of the torchvision / timm models on a fixed input,
with weights from a deterministic recipe (written in the file, implemented here). Keys, shapes
and parameter counts cannot see stride placement (ResNet v1 vs v1.5), padding, BN eps or the
order of operations in an SE block; these logits can. Each model is built on the meta device and
given the recipe's float64 tensors directly, so no initialisation is paid for (VGG's 138M
parameters included).
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_data import REFERENCE_NAMES, load
from torch import nn

from leanstep.models import create_model

RECIPE = (
    "For every state-dict entry k (name) with shape s and n elements, in float64: u = "
    "sin(arange(n) * 0.61803398875 + h) reshaped to s, where h = (sum of the UTF-8 bytes of k) "
    "% 997 / 97. Then: num_batches_tracked unchanged (0); running_var = 1 + 0.25 * (u + 1); "
    "running_mean = 0.1 * u; any tensor with >= 2 dims = u * 2 / sqrt(fan_in), fan_in = n / "
    "s[0]; other names ending in 'bias' = 0.05 * u; other 1-d tensors (norm weights) = 1 + 0.1 "
    "* u. Input: x = sin(arange(2*3*64*64) * 0.0137 + 0.3) reshaped to (2, 3, 64, 64), float64. "
    "Model in eval mode, float64, no grad; 'logits' is its output (2 x 1000)."
)
MODELS = [
    "vgg16_bn", "resnet34", "resnet50", "resnext50_32x4d", "seresnext50_32x4d",
    *(f"efficientnet_b{i}" for i in range(4)),
]
RTOL = 1e-10


def _outputs() -> dict:
    return load("outputs.json")


def recipe_tensor(key: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """The reference recipe's value for state-dict entry ``key`` of ``shape`` (in-place ops, in
    the recipe's order, so every rounding is the same and VGG's 138M values come quickly)."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=like.dtype)
    n = math.prod(shape)
    h = sum(key.encode("utf-8")) % 997 / 97
    u = torch.arange(n, dtype=torch.float64).mul_(0.61803398875).add_(h).sin_().reshape(shape)
    if key.endswith("running_var"):
        return u.add_(1).mul_(0.25).add_(1)
    if key.endswith("running_mean"):
        return u.mul_(0.1)
    if len(shape) >= 2:
        return u.mul_(2).div_(math.sqrt(n / shape[0]))
    if key.endswith("bias"):
        return u.mul_(0.05)
    return u.mul_(0.1).add_(1)


def recipe_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The recipe's float64 state dict for ``model`` (keys as in torchvision / timm)."""
    return {key: recipe_tensor(key, value.shape, value)
            for key, value in model.state_dict().items()}


def reference_model(name: str, state: dict[str, torch.Tensor] | None = None, **kwargs) -> nn.Module:
    """``create_model(name, **kwargs)`` in float64 eval mode, holding the recipe's weights
    (``state``, shared without copy, or made for it)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    model.load_state_dict(recipe_state(model) if state is None else state, strict=True, assign=True)
    leftovers = [key for key, value in [*model.named_parameters(), *model.named_buffers()]
                 if value.is_meta]
    assert not leftovers, f"tensors outside the state dict stayed on meta: {leftovers}"
    return model.eval()


def reference_input() -> torch.Tensor:
    return torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float64) * 0.0137 + 0.3).reshape(
        2, 3, 64, 64
    )


def test_reference_file_lists_the_models_and_the_recipe_implemented_here():
    """If the data changes its recipe or its models, this file must change with it."""
    outputs = _outputs()
    assert outputs["recipe"] == RECIPE
    assert sorted(outputs["models"]) == sorted(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_reference(name):
    """Norms bn and abn (the same state dict, so one set of recipe weights serves both)."""
    expected = torch.tensor(_outputs()["models"][name]["logits"], dtype=torch.float64)
    scale = expected.abs().max().item()
    ours = REFERENCE_NAMES.get(name, name)
    state = None
    errors = {}
    for norm in ("bn", "abn"):
        model = reference_model(ours, state, norm=norm)
        state = model.state_dict()
        with torch.no_grad():
            got = model(reference_input())
        assert got.dtype == torch.float64 and got.shape == expected.shape == (2, 1000), norm
        errors[norm] = (got - expected).abs().max().item() / scale
        del model, got
    assert all(error <= RTOL for error in errors.values()), (
        f"{name}: logits differ from the reference by "
        + ", ".join(f"{error:.3g} (norm={norm})" for norm, error in errors.items())
        + f" relative to max |logit| {scale:.3g}; allowed {RTOL:g}"
    )
