"""The one measuring function and what it returns.

``measure(step, runs=R, iters=I)`` times R runs of I training steps, forward and backward apart,
every iteration (perf_counter on CPU; CUDA events read after one synchronize per run, so timing
adds no synchronisation inside a run). The worker, every DDP rank and the layer benchmark call
it; nothing else times steps. A ``Measurement`` keeps the raw per-iteration times and derives
every statistic from them; measurements of the same case in several rounds ``merge``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .step import TrainStep

__all__ = ["Measurement", "measure", "warm_up"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step: TrainStep, steps: int) -> None:
    """Run ``steps`` untimed steps: cudnn.benchmark settles, caches fill, optimizer state exists."""
    for _ in range(steps):
        step()
    _synchronize(step.device)


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@dataclass(frozen=True)
class Measurement:
    """Per-iteration forward and backward milliseconds (``runs`` lists of ``iters``), and the
    wall and CPU seconds of the process while they ran (CPU: ``time.process_time``)."""

    forward_ms: list[list[float]]
    backward_ms: list[list[float]]
    wall_s: float = 0.0
    cpu_s: float = 0.0
    threads: int = 1

    @classmethod
    def merge(cls, parts: Sequence[Measurement]) -> Measurement:
        """One measurement of every run of ``parts`` (rounds of the same case)."""
        return cls(
            forward_ms=[run for part in parts for run in part.forward_ms],
            backward_ms=[run for part in parts for run in part.backward_ms],
            wall_s=sum(part.wall_s for part in parts),
            cpu_s=sum(part.cpu_s for part in parts),
            threads=parts[0].threads if parts else 1,
        )

    @property
    def step_ms(self) -> list[float]:
        """Forward + backward of every iteration."""
        return [
            f + b
            for run_f, run_b in zip(self.forward_ms, self.backward_ms, strict=True)
            for f, b in zip(run_f, run_b, strict=True)
        ]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def iqr_ms(self) -> float:
        q1, q3 = _quartiles(self.step_ms)
        return q3 - q1

    @property
    def cpu_share(self) -> float | None:
        """CPU time / (wall time x threads) while timing: well below 1 means other load took
        a share of the cores (CPU only; a GPU run waits on the device)."""
        if not self.wall_s or not self.threads:
            return None
        return self.cpu_s / (self.wall_s * self.threads)

    def summary(self, batch_size: int) -> dict:
        """The seed's figures and robust ones.

        ``*_ms_mean`` / ``*_ms_std``: mean and population standard deviation of the per-run
        averages (the seed's "mean of R runs" figures); ``step_ms_median`` / ``step_ms_iqr``:
        over every iteration; ``imgs_per_sec`` = batch * 1000 / step median (a median, so that
        one stalled iteration does not drag it).
        """
        forward_runs = [statistics.fmean(run) for run in self.forward_ms]
        backward_runs = [statistics.fmean(run) for run in self.backward_ms]
        median = self.median_ms
        return {
            "fwd_ms_mean": statistics.fmean(forward_runs),
            "fwd_ms_std": statistics.pstdev(forward_runs),
            "bwd_ms_mean": statistics.fmean(backward_runs),
            "bwd_ms_std": statistics.pstdev(backward_runs),
            "step_ms_median": median,
            "step_ms_iqr": self.iqr_ms,
            "imgs_per_sec": batch_size * 1000.0 / median if median > 0 else None,
        }

    def to_dict(self) -> dict:
        return {
            "fwd_ms_iters": self.forward_ms, "bwd_ms_iters": self.backward_ms,
            "timing_wall_s": self.wall_s, "timing_cpu_s": self.cpu_s, "threads": self.threads,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(
            forward_ms=data["fwd_ms_iters"], backward_ms=data["bwd_ms_iters"],
            wall_s=data.get("timing_wall_s", 0.0), cpu_s=data.get("timing_cpu_s", 0.0),
            threads=data.get("threads", 1),
        )


def _time_cpu(step: TrainStep, iters: int) -> tuple[list, list]:
    clock = time.perf_counter
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
    return run_forward, run_backward


def _time_cuda(step: TrainStep, iters: int) -> tuple[list, list]:
    events = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(3)) for _ in range(iters)]
    for start, middle, end in events:
        start.record()
        loss = step.forward()
        middle.record()
        step.backward(loss)
        del loss
        end.record()
    torch.cuda.synchronize(step.device)
    return (
        [start.elapsed_time(middle) for start, middle, _ in events],
        [middle.elapsed_time(end) for _, middle, end in events],
    )


def measure(
    step: TrainStep,
    *,
    runs: int,
    iters: int,
    before_run: Callable[[], None] | None = None,
) -> Measurement:
    """Time ``runs`` x ``iters`` steps. ``before_run`` is called (untimed) before each run: DDP
    ranks start every run together with a barrier."""
    time_run = _time_cuda if step.device.type == "cuda" else _time_cpu
    forward_ms, backward_ms = [], []
    wall_s = cpu_s = 0.0
    for _ in range(runs):
        if before_run is not None:
            before_run()
        wall, cpu = time.perf_counter(), time.process_time()
        run_forward, run_backward = time_run(step, iters)
        wall_s += time.perf_counter() - wall
        cpu_s += time.process_time() - cpu
        forward_ms.append(run_forward)
        backward_ms.append(run_backward)
    return Measurement(forward_ms, backward_ms, wall_s, cpu_s, torch.get_num_threads())
