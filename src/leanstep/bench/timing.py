"""Timing a training step: warm-up, R runs x I iterations, FLOPs, and the summary statistics.

Forward and backward (which includes the optimizer step and freeing the step's autograd graph,
as a plain ``step()`` loop pays it) are timed separately, every iteration: perf_counter on CPU;
CUDA events on a GPU, read after one synchronize per run so that timing adds no synchronisation
inside a run. Nothing else is active while timing.
"""

from __future__ import annotations

import statistics
import time

import torch

from .step import TrainStep

__all__ = ["count_flops", "summarize_times", "time_step", "warm_up"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step: TrainStep, steps: int) -> None:
    """Run ``steps`` untimed steps: cudnn.benchmark settles, caches fill, optimizer state exists."""
    for _ in range(steps):
        step()
    _synchronize(step.device)


def _time_cpu(step: TrainStep, runs: int, iters: int) -> tuple[list, list]:
    clock = time.perf_counter
    forward_ms, backward_ms = [], []
    for _ in range(runs):
        run_forward, run_backward = [], []
        for _ in range(iters):
            start = clock()
            loss = step.forward()
            middle = clock()
            step.backward(loss)
            del loss
            end = clock()
            run_forward.append((middle - start) * 1e3)
            run_backward.append((end - middle) * 1e3)
        forward_ms.append(run_forward)
        backward_ms.append(run_backward)
    return forward_ms, backward_ms


def _time_cuda(step: TrainStep, runs: int, iters: int) -> tuple[list, list]:
    forward_ms, backward_ms = [], []
    for _ in range(runs):
        events = [
            tuple(torch.cuda.Event(enable_timing=True) for _ in range(3)) for _ in range(iters)
        ]
        for start, middle, end in events:
            start.record()
            loss = step.forward()
            middle.record()
            step.backward(loss)
            del loss
            end.record()
        torch.cuda.synchronize(step.device)
        forward_ms.append([start.elapsed_time(middle) for start, middle, _ in events])
        backward_ms.append([middle.elapsed_time(end) for _, middle, end in events])
    return forward_ms, backward_ms


def time_step(step: TrainStep, *, runs: int, iters: int) -> tuple[list, list]:
    """Forward and backward milliseconds of every iteration, as ``runs`` lists of ``iters``."""
    if step.device.type == "cuda":
        return _time_cuda(step, runs, iters)
    return _time_cpu(step, runs, iters)


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
    """FLOPs of one step (forward and backward; the optimizer's elementwise work is not counted).

    Runs the eager model even when the step is compiled: the count is of the model's work.
    """
    from torch.utils.flop_counter import FlopCounterMode

    module = step.module
    step.module = step.model
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            step()
    finally:
        step.module = module
    _synchronize(step.device)
    return int(counter.get_total_flops())


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def summarize_times(forward_ms: list, backward_ms: list, batch_size: int) -> dict:
    """The seed's figures and robust ones from per-iteration times.

    ``*_ms_mean`` / ``*_ms_std``: mean and population standard deviation of the per-run averages
    (the seed's "mean of R runs" figures); ``step_ms_median`` / ``step_ms_iqr``: over every
    iteration's forward + backward; ``imgs_per_sec`` = batch * 1000 / (forward + backward mean).
    """
    forward_runs = [statistics.fmean(run) for run in forward_ms]
    backward_runs = [statistics.fmean(run) for run in backward_ms]
    steps = [
        f + b
        for run_f, run_b in zip(forward_ms, backward_ms, strict=True)
        for f, b in zip(run_f, run_b, strict=True)
    ]
    q1, q3 = _quartiles(steps)
    fwd_mean = statistics.fmean(forward_runs)
    bwd_mean = statistics.fmean(backward_runs)
    return {
        "fwd_ms_mean": fwd_mean,
        "fwd_ms_std": statistics.pstdev(forward_runs),
        "bwd_ms_mean": bwd_mean,
        "bwd_ms_std": statistics.pstdev(backward_runs),
        "step_ms_median": statistics.median(steps),
        "step_ms_iqr": q3 - q1,
        "imgs_per_sec": batch_size * 1000.0 / (fwd_mean + bwd_mean),
    }
