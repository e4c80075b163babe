"""InplaceABN's protected channels cost their copy and nothing more at the step's peak."""

from __future__ import annotations

import torch
from torch import nn

from leanstep.bench.memory import measured_peak
from leanstep.layers import InplaceABN

MIB = 2**20


def _peak(protect: float, activation: str) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1, bias=False),
                          InplaceABN(64, activation, protect=protect),
                          nn.Conv2d(64, 8, 3, padding=1, bias=False))
    x = torch.randn(4, 8, 32, 32)

    def step():
        model(x).square().mean().backward()

    return measured_peak(step, model, x)["peak_mib"]


def test_protected_channels_add_their_copy_to_the_peak_and_no_more():
    layer_bytes = 4 * 64 * 32 * 32 * 4
    copy_mib = layer_bytes / 16 / MIB  # ceil(64 / 16) = 4 channels
    # leaky_relu: the copy (plus per-channel vectors and indices: a few hundred bytes).
    # identity: the copy and, while the layer's input gradient is formed, the saved channels'.
    for activation, bound in (("leaky_relu", copy_mib), ("identity", 2 * copy_mib)):
        extra = _peak(1 / 16, activation) - _peak(0.0, activation)
        assert copy_mib <= extra <= bound + 0.01, (activation, extra, bound)
