"""FLOPs of one training step, counted in a step of its own (never a warm-up or timed one).

The count runs on the meta device where the model allows it (shapes only: no compute, no
memory), else as one eager step on the case's device.
"""

from __future__ import annotations

import torch

from .step import TrainStep

__all__ = ["count_flops", "count_step_flops"]


def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
    _output_padding, _groups, output_mask, out_shape=None, **kwargs,
) -> int:
    """Each gradient of a convolution (input, weight) costs what its forward costs.

    Replaces torch's formula, whose weight-gradient term ignores ``groups``: it counts a
    depthwise convolution's weight gradient ``groups`` times over (EfficientNet's backward came
    out 40x its forward). Equal to torch's formula when groups == 1.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(step: TrainStep) -> int:
    """FLOPs of one step of ``step`` (forward and backward; the optimizer's elementwise work is
    not counted). Runs the eager model even when the step is compiled: the count is of the
    model's work. The step runs once, so call it where an extra step does not matter."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with step.eager(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
    return int(counter.get_total_flops())


def count_step_flops(case, fallback: TrainStep | None = None) -> int:
    """FLOPs of ``case``'s step, counted on the meta device; where the model cannot run there
    (data-dependent operations, autocast), one eager step of ``fallback``.

    A ``lean`` case is counted without its lean regions: lean recomputes no convolution or
    matmul (the ops counted), so the count is the same (a plan's lean blocks are counted with
    them, and count the same: tested)."""
    import dataclasses

    from .cases import make_step

    if getattr(case, "lean", False):
        case = dataclasses.replace(case, lean=False)
        if fallback is not None and case.precision != "fp32":
            fallback = make_step(case)

    if case.precision == "fp32":
        try:
            with torch.device("meta"):
                meta_step = make_step(dataclasses.replace(case, device="meta", compile=False))
            return count_flops(meta_step)
        except (NotImplementedError, RuntimeError, ValueError, TypeError):
            if fallback is None:
                raise
    if fallback is None:
        raise ValueError(f"cannot count the FLOPs of {case.name!r} on the meta device")
    return count_flops(fallback)
