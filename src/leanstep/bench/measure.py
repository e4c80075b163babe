"""Measure one case in this process: prediction, build, compile, warm-up, timing, memory, FLOPs.

Each phase is of its own: compilation (``--compile``: the first step, its seconds and dynamo's
graph and graph-break counts recorded) comes before the warm-up, the warm-up is ``warmup``
ordinary steps, and FLOPs are counted after timing, outside both. The benchmark runs this in a
fresh worker process per case (``leanstep.bench.worker``); it sets the process-wide thread count,
so call it in-process only where that is wanted.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from .cases import Case, make_step
from .device import available_memory_mib, device_name
from .flops import count_step_flops
from .measurement import measure, warm_up
from .memory import measured_peak
from .step import TrainStep

__all__ = ["compile_step", "measure_case", "memory_pass"]

# A CPU case whose predicted peak exceeds this share of the available RAM is not run.
RAM_SHARE = 0.8
_BREAK_REASONS = 5


def _prediction(case: Case) -> dict:
    from .predict import predict_case

    try:
        predicted = predict_case(case.memory_case())
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


def compile_step(step: TrainStep) -> dict:
    """Run the first step of a compiled model (the compilation) and return its seconds and
    dynamo's counts: graphs compiled, graph breaks and the first break reasons."""
    from torch._dynamo.utils import counters

    counters.clear()
    started = time.perf_counter()
    step()
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
    seconds = time.perf_counter() - started
    return {"compile_seconds": seconds, **compile_counts()}


def compile_counts() -> dict:
    """dynamo's graph and graph-break counts since its counters were last cleared."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {
        "compile_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
        "compile_graph_breaks": int(sum(breaks.values())),
        "compile_break_reasons": [
            (str(reason).strip().splitlines() or [""])[0][:200] for reason in breaks
        ][:_BREAK_REASONS],
    }


# A tensor-level tracker is a dispatch mode, and under a dispatch mode a torch.compile'd model
# runs eagerly: its figures would be the eager step's, under the compiled row's name.
COMPILED_CPU_MEMORY = ("not measured: compiled on CPU, where the tensor-level tracker would "
                       "make torch.compile run the step eagerly (on CUDA the compiled peak "
                       "is measured)")
COMPILED_BREAKDOWN = ("peak of the compiled step; no breakdown by category: the tracker would "
                      "make torch.compile run the step eagerly")


def memory_pass(step: TrainStep, case: Case) -> dict:
    """Peak memory of one step after warm-up, at the case's memory batch and image size.

    A compiled step: on CUDA the peak (the allocator's counters) without the breakdown, on the
    CPU nothing; ``memory_note`` says why."""
    if case.compile and step.device.type != "cuda":
        return {"peak_mib": None, "reserved_mib": None, "memory": None,
                "memory_note": COMPILED_CPU_MEMORY}
    memory_case = case.memory_case()
    if (memory_case.batch_size, memory_case.image_hw) != (case.batch_size, case.image_hw):
        step.set_input(memory_case.batch_size, memory_case.image_hw)
        if step.device.type == "cuda":
            warm_up(step, 1)
    peak = measured_peak(step, *step.tracked_objects(), device=step.device,
                         breakdown=not case.compile)
    result = {
        "peak_mib": peak["peak_mib"],
        "reserved_mib": peak.get("reserved_mib"),
        "memory": peak["memory"],
    }
    if case.compile:
        result["memory_note"] = COMPILED_BREAKDOWN
    return result


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
    into: dict | None = None,
) -> dict:
    """Measure ``case``; returns its raw figures (per-iteration times, memory, FLOPs, ...).

    ``runs`` overrides ``case.runs`` (a round of an interleaved group runs its share). ``phase``
    is called with each phase's name as it starts. ``into``: the dict to fill and return, so
    that a caller keeps what was measured before a failure (the prediction of a case that then
    runs out of memory).
    """
    case = case.with_defaults()
    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    phase = _Phases(phase)
    result: dict = {} if into is None else into
    result.update(device_name=device_name(device), phase_seconds=phase.seconds)
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
    if case.compile:
        phase("compile")
        result.update(compile_step(step))
    phase("warmup")
    warm_up(step, case.warmup)
    if case.compile:
        result.update(compile_counts())  # a recompilation in warm-up counts too
    phase("timing")
    gc.collect()
    result.update(measure(step, runs=runs or case.runs, iters=case.iters).to_dict())
    if measure_memory:
        phase("memory")
        result.update(memory_pass(step, case))
    if flops:
        phase("flops")
        result["flops"] = count_step_flops(case, fallback=step)
    result["status"] = "ok"
    phase("done")
    return result
