"""The time estimate: what each choice's extra work costs, in seconds.

Every operation of a traced step is costed by a roofline:

    seconds = max(FLOPs / F, bytes / B)  for compute operations (convolutions, matmuls: torch's
                                         FLOP formulas; a depthwise convolution is bound by B)
            = bytes / B                  for every other operation (bytes read and written:
                                         normalisation, activations, elementwise, pooling)
            + o                          per operation (dispatch and launch overhead)

A choice's cost in a block is the work of that block's forward and backward, recomputation
included, so the estimate sees what lean recomputes (cheap, bandwidth-bound operations) and what
checkpointing recomputes (the whole block, convolutions included). F, B and o are defaults for
the device kind, or measured on this machine by ``calibrate``: one plain step whose operations
are timed one by one; B = bytes / time of the non-compute ops, F = FLOPs / time of the compute
ops that B does not bound, o = the time of a tiny op; the whole step is timed without
instrumentation too, and estimates are scaled to it (real seconds).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from leanstep.bench._torch_internals import dispatch_mode_class

from .trace import Work, _flop_formulas, _nbytes, _returns_tensor

__all__ = ["DEFAULT_RATES", "ESTIMATE", "Rates", "calibrate", "default_rates"]

ESTIMATE = (
    "estimated step time: every operation of the traced step (recomputation included) costs "
    "max(FLOPs / F, bytes / B) (convolutions, matmuls) or bytes moved / B (the rest), plus o"
)


@dataclass(frozen=True)
class Rates:
    """Throughputs of a device: ``flops`` per second, ``bytes`` per second, ``op`` seconds per
    operation; ``source`` says where
    they come from; ``plain_step_s``: the measured plain step (calibrated only), which estimates
    are scaled to."""

    flops: float
    bytes: float
    op: float
    source: str
    plain_step_s: float | None = None

    def seconds(self, work: Work) -> float:
        compute = sum(max(f / self.flops, b / self.bytes) for f, b in work.compute)
        return compute + work.bytes / self.bytes + work.ops * self.op

    def describe(self) -> str:
        return (
            f"F = {self.flops / 1e9:.0f} GFLOP/s, B = {self.bytes / 1e9:.1f} GB/s, "
            f"o = {self.op * 1e6:.0f} us ({self.source})"
        )

    def to_dict(self) -> dict:
        return asdict(self)


# Typical throughputs where nothing was measured. CPU: convolutions reach about 16 GFLOP/s per
# thread on AVX2 cores with oneDNN (measured here: 32 GFLOP/s on 2 threads), so F follows
# ``torch.get_num_threads()``; a recent GPU in fp32.
CPU_FLOPS_PER_THREAD = 16e9
DEFAULT_RATES = {
    "cpu": Rates(flops=CPU_FLOPS_PER_THREAD, bytes=10e9, op=5e-6,
                 source="cpu defaults, F per thread; --calibrate measures"),
    "cuda": Rates(
        flops=20e12, bytes=1e12, op=8e-6, source="cuda defaults; --calibrate measures"
    ),
}


def default_rates(device_like: str) -> Rates:
    """The defaults for a device kind; on the CPU, F is scaled to this process's threads."""
    rates = DEFAULT_RATES[device_like if device_like in DEFAULT_RATES else "cpu"]
    if device_like != "cuda":
        threads = torch.get_num_threads()
        rates = replace(rates, flops=CPU_FLOPS_PER_THREAD * threads,
                        source=f"cpu defaults for {threads} threads; --calibrate measures")
    return rates


class _OpTimer(dispatch_mode_class()):
    """Times every operation (synchronising on CUDA) and sums time and work by kind."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.cuda = device.type == "cuda"
        self.formulas = _flop_formulas()
        self.compute: list[tuple[float, float, float]] = []  # (seconds, flops, bytes) per op
        self.other = [0.0, 0.0, 0]  # seconds, bytes, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = func(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            flops = float(formula(*args, **kwargs, out_val=result))
            self.compute.append((elapsed, flops, _nbytes(args) + _nbytes(result)))
        elif not func.is_view and _returns_tensor(result):
            self.other[0] += elapsed
            self.other[1] += _nbytes(args) + _nbytes(list(kwargs.values())) + _nbytes(result)
            self.other[2] += 1
        return result


def _op_overhead(device: torch.device) -> float:
    """Seconds one tiny operation takes (dispatch and launch), median of a few hundred."""
    x = torch.ones(1, device=device)
    times = []
    for _ in range(300):
        start = time.perf_counter()
        x = x + 1
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def _step_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        start = time.perf_counter()
        step()
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(step, *, repeats: int = 3) -> Rates:
    """Measure F, B and o on ``step``'s device with ``step`` (a plain ``TrainStep``).

    Runs 1 warm-up step, ``repeats`` timed steps and one step with every operation timed.
    """
    device = step.device
    step()
    plain = _step_seconds(step, repeats)
    overhead = _op_overhead(device)
    timer = _OpTimer(device)
    with timer:
        step()
    # The timer's own per-op cost is in every measured op: take what a tiny op measures out.
    tiny = _timed_tiny_op(device, timer)
    defaults = default_rates(device.type)
    other_s = max(timer.other[0] - timer.other[2] * tiny, 1e-9)
    moved = timer.other[1] / other_s if timer.other[1] else defaults.bytes
    # F from the compute ops that bandwidth does not explain (bytes / B under half their time).
    bound = [(max(t - tiny, 1e-9), f) for t, f, b in timer.compute
             if f and b / moved < 0.5 * max(t - tiny, 1e-9)]
    flops = (sum(f for _, f in bound) / sum(t for t, _ in bound)) if bound else defaults.flops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Rates(
        flops=flops, bytes=moved, op=overhead,
        source=f"measured on this machine's {name}, {torch.get_num_threads()} threads",
        plain_step_s=plain,
    )


def _timed_tiny_op(device: torch.device, timer: _OpTimer) -> float:
    """Seconds a tiny operation measures under ``timer`` (its instrumentation included)."""
    x = torch.ones(1, device=device)
    saved = (list(timer.compute), list(timer.other))
    with timer:
        for _ in range(100):
            x = x + 1
    measured = (timer.other[0] - saved[1][0]) / 100
    timer.compute, timer.other = saved
    return measured
