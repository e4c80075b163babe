"""Measure one case in this process: prediction, build, warm-up, timing pass, memory pass, FLOPs.

The benchmark runs this inside a fresh worker process per case (``leanstep.bench.worker``); it
sets the process-wide thread count, so call it in-process only where that is wanted.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .cases import Case, make_step
from .memory import measured_peak
from .step import TrainStep
from .timing import count_flops, time_step, warm_up

__all__ = ["available_memory_mib", "cpu_model", "measure_case", "memory_pass"]

# A CPU case whose predicted peak exceeds this share of the available RAM is not run.
RAM_SHARE = 0.8


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform's answer elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def available_memory_mib() -> float | None:
    """RAM available to new allocations without swapping (MemAvailable), in MiB."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return None


def _memory_case(case: Case) -> Case:
    """The case as the memory pass runs it (its memory batch and image size)."""
    return dataclasses.replace(
        case,
        batch_size=case.memory_batch_size or case.batch_size,
        image_size=case.memory_image_size or case.image_size,
    )


def _prediction(case: Case) -> dict:
    from .predict import predict_case

    try:
        predicted = predict_case(_memory_case(case))
    except Exception as error:  # a prediction failure must not stop the measurement
        return {"predicted_mib": None, "predict_error": f"{type(error).__name__}: {error}"}
    return {"predicted_mib": float(predicted["predicted_mib"]), "predict_error": None}


def _ram_skip_reason(case: Case, predicted_mib: float | None) -> str | None:
    if case.device_type != "cpu" or predicted_mib is None:
        return None
    free_mib = available_memory_mib()
    if free_mib is None or predicted_mib <= RAM_SHARE * free_mib:
        return None
    return f"would need {predicted_mib / 1024:.1f} GiB, {free_mib / 1024:.1f} GiB free"


def memory_pass(step: TrainStep, case: Case) -> dict:
    """Peak memory of one step after warm-up, at the case's memory batch and image size."""
    memory_case = _memory_case(case)
    if (memory_case.batch_size, memory_case.image_size) != (case.batch_size, case.image_size):
        memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
        step.input = torch.ones(
            memory_case.batch_size, case.in_channels, memory_case.image_size,
            memory_case.image_size, device=step.device,
        ).contiguous(memory_format=memory_format)
        step.input.requires_grad_(case.mode == "train")
        if step.device.type == "cuda":
            warm_up(step, 1)
    peak = measured_peak(step, *step.tracked_objects(), device=step.device)
    return {
        "peak_mib": peak["peak_mib"],
        "reserved_mib": peak.get("reserved_mib"),
        "memory": peak["memory"],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


class _Phases:
    """Passes each phase's name on, and records how many seconds each phase took."""

    def __init__(self, report: Callable[[str], None]):
        self.report = report
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self._current is not None:
            self.seconds[self._current[0]] = round(now - self._current[1], 3)
        self._current = (name, now)
        if name != "done":
            self.report(name)


def measure_case(
    case: Case,
    *,
    runs: int | None = None,
    measure_memory: bool = True,
    flops: bool = True,
    predict: bool = True,
    phase: Callable[[str], None] = lambda name: None,
) -> dict:
    """Measure ``case``; returns its raw figures (per-iteration times, memory, FLOPs, ...).

    ``runs`` overrides ``case.runs`` (a round of an interleaved group runs its share). The first
    warm-up step runs under FlopCounterMode: warm-up is untimed, so counting costs no extra
    step. ``phase`` is called with each phase's name as it starts.
    """
    case = case.with_defaults()
    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    phase = _Phases(phase)
    result: dict = {
        "threads": torch.get_num_threads(), "device_name": _device_name(device),
        "phase_seconds": phase.seconds,
    }
    if predict:
        phase("predict")
        result.update(_prediction(case))
        reason = _ram_skip_reason(case, result["predicted_mib"])
        if reason:
            phase("done")
            return {**result, "status": "skipped", "error": reason}
    phase("build")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    step = make_step(case)
    result["params"] = sum(p.numel() for p in step.model.parameters())
    phase("warmup")
    flop_count = None
    if flops and case.warmup > 0:
        flop_count = count_flops(step)
    warm_up(step, case.warmup - (flop_count is not None))
    phase("timing")
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    forward_ms, backward_ms = time_step(step, runs=runs or case.runs, iters=case.iters)
    result.update(
        fwd_ms_iters=forward_ms, bwd_ms_iters=backward_ms,
        timing_wall_s=time.perf_counter() - wall, timing_cpu_s=time.process_time() - cpu,
    )
    if measure_memory:
        phase("memory")
        result.update(memory_pass(step, case))
    if flops and flop_count is None:
        phase("flops")
        flop_count = count_flops(step)
    result["flops"] = flop_count
    result["status"] = "ok"
    phase("done")
    return result

