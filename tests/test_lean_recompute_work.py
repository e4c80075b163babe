"""What a lean region's backward recomputes, counted op by op: batch norms re-apply the batch
statistics of the forward pass (no second reduction, no second running-stat update), the convs
are not run again, region inputs are not copied unless the region writes them, and a region
that starts writing its input later is refused."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transform_models import MobileNet

import leanstep

aten = torch.ops.aten


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.training_norms = 0
        self.large_clones = 0  # copies of activations (buffers are a few channels long)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        if func is aten.native_batch_norm.default and args[5]:
            self.training_norms += 1
        if func is aten.clone.default and args[0].numel() > 1000:
            self.large_clones += 1
        return func(*args, **(kwargs or {}))


def _counted_step(model: nn.Module, x: torch.Tensor) -> _Count:
    with _Count() as counted:
        model(x).sum().backward()
    return counted


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_batch_norms_are_reduced_once_and_convs_kept():
    x = torch.randn(4, 3, 32, 32)
    plain = MobileNet()
    lean = leanstep.lean(copy.deepcopy(plain))
    for model in (plain, lean):
        model(x).sum().backward()  # the first step learns which regions write their inputs
    p, q = _counted_step(plain, x), _counted_step(lean, x)
    assert p.training_norms == q.training_norms == _norms(plain)
    # The recompute re-applies the statistics with an evaluation-mode kernel, once per norm
    # inside a region (the stem's and the heads' norms are outside any region).
    recomputed = q.ops[aten.native_batch_norm.default] - q.training_norms
    assert 0 < recomputed <= _norms(plain)
    # Convolutions run once (their outputs are kept); a squeeze-excitation's global pool (a
    # mean over H, W: a functional call) is recomputed, at most once.
    assert q.ops[aten.convolution.default] == p.ops[aten.convolution.default]
    assert p.ops[aten.mean.dim] < q.ops[aten.mean.dim] <= 2 * p.ops[aten.mean.dim]
    # Region inputs are not copied (no region here writes its input): the lean forward pass
    # clones no more than the plain one (which copies what its in-place activations save; the
    # lean forward records no autograd graph, so it copies none).
    forwards = []
    for model in (plain, lean):
        with _Count() as counted:
            model(x)
        forwards.append(counted.large_clones)
    assert forwards[1] <= forwards[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_statistics_and_gradients_are_those_of_plain_bit_for_bit(dtype):
    """Re-applying the kept statistics reproduces the batch norm's output exactly, so lean's
    gradients and running statistics equal plain's in every bit, in float32 as in float64."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    plain = MobileNet().to(dtype)
    lean = leanstep.lean(copy.deepcopy(plain))
    for _ in range(2):
        for model in (plain, lean):
            model.zero_grad()
            torch.manual_seed(1)  # the same dropout mask for both
            model(x).square().mean().backward()
    for (name, a), b in zip(plain.state_dict().items(), lean.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


class _SometimesInPlace(nn.Module):
    """A block whose forward writes over its input only once ``write`` is set."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.write = False

    def forward(self, x):
        if self.write:
            x.mul_(2)
        return torch.relu(self.norm(self.conv(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(_SometimesInPlace(), _SometimesInPlace())

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_a_region_that_starts_writing_its_input_is_refused():
    model = _Net()
    leanstep.lean(model)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    model.blocks[1].write = True
    with pytest.raises(RuntimeError, match="wrote over its input"):
        model(x).sum().backward()
