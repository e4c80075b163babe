"""InplaceABN with tiny (subnormal) gammas and inf/nan conditioning: ranked worst, exact when
protected, finite when not."""

from __future__ import annotations

import math

import torch
from test_inplace_abn_accuracy import BOUND, _errors

from leanstep.layers.inplace_abn_function import _condition, tiny_gamma

SUBNORMAL = 1.401298464324817e-45  # float32's smallest subnormal

# The hypothesis draw that failed: every channel protected, yet the subnormal-gamma channel's
# output underflowed to 0, so z's sign picked leaky_relu's wrong branch (weight error 0.265).
FAILING_CASE = {"shape": (2, 28), "activation": "leaky_relu", "slope": 2.0,
                "gammas": [0.0] * 27 + [SUBNORMAL], "betas": [0.0] * 28, "seed": 1}


def test_the_subnormal_gamma_draw_is_float32_accurate_when_every_channel_may_keep_a_copy():
    errors, module = _errors(FAILING_CASE, protect=1.0)
    assert module.unprotected_channels.item() == 0
    for name, error in errors.items():
        assert error <= BOUND, f"{name} gradient: relative error {error:.2e}"


def test_a_subnormal_gamma_is_ranked_worst_and_protected_within_the_budget():
    case = {"shape": (4, 16, 3, 3), "activation": "elu", "slope": 0.5,
            "gammas": [1.0] * 15 + [SUBNORMAL], "betas": [0.0] * 16, "seed": 2}
    errors, module = _errors(case, protect=1 / 16)
    assert module.unprotected_channels.item() == 0
    for name, error in errors.items():
        assert error <= BOUND, f"{name} gradient: relative error {error:.2e}"


def test_tiny_gammas_left_out_of_the_budget_get_finite_gradients():
    _, module = _errors(FAILING_CASE, protect=1 / 16)
    assert module.unprotected_channels.item() == 26  # 28 tiny gammas, a budget of 2
    for p in (module.weight, module.bias):
        assert torch.isfinite(p.grad).all()


def test_condition_ranks_tiny_gammas_and_inf_nan_ratios_worst():
    tiny = torch.finfo(torch.float32).tiny
    gamma = torch.tensor([1.0, SUBNORMAL, -tiny, 0.0, 1e-30, 1e-10, math.inf, 2.0, 1e-18])
    beta = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 1e30, math.inf, math.nan, 0.0])
    ratio = _condition(gamma, beta)
    assert not ratio.isnan().any()
    worst = {1, 2, 3, 4, 5, 6, 7}  # tiny/zero gammas, an overflowing, an inf/inf, a nan ratio
    assert set(ratio.topk(len(worst)).indices.tolist()) == worst
    assert ratio[sorted(worst)].eq(math.inf).all()
    assert ratio[0] == 0.5 and ratio[8] == 0.0  # 1e-18 > sqrt(tiny): still invertible
    assert tiny_gamma(gamma).tolist() == [False, True, True, True, True, False, False, False,
                                          False]
