"""The largest batch size whose predicted peak fits a memory budget, and budget strings.

The search runs over predictions (``leanstep.bench.predict``), which take seconds whatever the
batch size. A step's peak grows with the batch in an almost straight line (each phase of the
step is affine in the batch; the peak is the largest of them), so the search extrapolates:

- exponential phase: from batch 1, each probe at least doubles the largest batch that fits,
  and jumps further, to just past where the line through the last two probes crosses the
  budget, until a probe does not fit;
- binary phase: inside that bracket each probe is where the chord between its ends crosses
  the budget (checked with the batch after it), or the midpoint when the chord makes little
  progress, until the bracket is one apart.

A straight line is usually found in four or five predictions, a bent one in a few more; the
result is the same as a plain bisection's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = [
    "BUDGET_FORMS",
    "FIXED_CATEGORIES",
    "MAX_BATCH",
    "case_max_batch",
    "confirm_case",
    "largest_batch",
    "parse_budget",
    "parse_margin",
]

MAX_BATCH = 1 << 20

_UNITS = {
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
BUDGET_FORMS = (
    '"16 GB", "16GiB", "800MiB", "1.5 TiB": a number > 0 and a unit, KB MB GB TB (powers of '
    "1000) or KiB MiB GiB TiB (powers of 1024)"
)
_BUDGET = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*")
_MARGIN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*")
# What a step holds whatever its batch size: the prediction's categories that do not grow.
FIXED_CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state")


def parse_budget(text: str) -> int:
    """The number of bytes ``text`` ("16 GB", "16GiB", "800MiB", ...) names; ValueError if
    it is not such a string."""
    match = _BUDGET.fullmatch(str(text))
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"bad memory budget {text!r}; accepted: {BUDGET_FORMS}")
    nbytes = int(float(match.group(1)) * unit)
    if nbytes <= 0:
        raise ValueError(f"memory budget {text!r} is not more than 0; accepted: {BUDGET_FORMS}")
    return nbytes


def parse_margin(text: str) -> float:
    """The share of the budget that ``text`` ("10%", "10", "0%") keeps free, in [0, 1)."""
    match = _MARGIN.fullmatch(str(text))
    percent = float(match.group(1)) if match else -1.0
    if not 0 <= percent < 100:
        raise ValueError(f"bad margin {text!r}; give a percentage from 0 to below 100, e.g. 10%")
    return percent / 100


def _crossing(b1: int, m1: float, b2: int, m2: float, budget: float) -> float:
    """Where the line through (b1, m1) and (b2, m2) reaches ``budget``; inf if it never does."""
    slope = (m2 - m1) / (b2 - b1)
    if slope <= 0:
        return math.inf
    return b1 + (budget - m1) / slope


def largest_batch(
    peak_mib: Callable[[int], float], budget_mib: float, *, start: int = 1,
    limit: int = MAX_BATCH,
) -> dict:
    """The largest batch size ``start <= b <= limit`` with ``peak_mib(b) <= budget_mib``.

    Returns ``batch_size`` (0 if not even ``start`` fits), ``predicted_mib`` (its peak; that of
    ``start`` when nothing fits), ``capped`` (``limit`` fits: the answer is at least that) and
    ``probes`` ({batch size: predicted MiB}, every prediction made). ``peak_mib`` must not
    decrease as the batch grows.
    """
    probes: dict[int, float] = {}

    def fits(batch: int) -> bool:
        if batch not in probes:
            probes[batch] = peak_mib(batch)
        return probes[batch] <= budget_mib

    if not fits(start):
        return {"batch_size": 0, "predicted_mib": probes[start], "probes": probes,
                "capped": False}
    low, high, previous = start, None, None
    while high is None and low < limit:
        target = 2 * low
        if previous is not None:
            crossing = _crossing(previous, probes[previous], low, probes[low], budget_mib)
            if crossing < limit:
                target = max(target, math.floor(crossing) + 1)
        target = min(target, limit)
        if fits(target):
            previous, low = low, target
        else:
            high = target
    bisect = False
    while high is not None and high - low > 1:
        width = high - low
        if bisect:
            probe = (low + high) // 2
        else:
            crossing = _crossing(low, probes[low], high, probes[high], budget_mib)
            probe = min(max(math.floor(crossing), low + 1), high - 1)
        if fits(probe):
            low = probe
            if probe + 1 < high:
                if fits(probe + 1):
                    low = probe + 1
                else:
                    high = probe + 1
        else:
            high = probe
        bisect = not bisect and (high - low) * 2 > width
    return {"batch_size": low, "predicted_mib": probes[low], "probes": probes,
            "capped": low >= limit}


def case_max_batch(
    case, budget_bytes: int, *, device_like: str | None = None, margin: float = 0.0,
    limit: int = MAX_BATCH, progress: Callable[[int, float, bool], None] | None = None,
) -> dict:
    """``largest_batch`` for a benchmark case at its image size, over ``predict_case``.

    The search aims at ``budget_bytes * (1 - margin)``: the margin is left for what the
    prediction does not count (see ``leanstep.bench.predict``). It starts at batch 1, or 2
    where batch 1 cannot run a training step (a BatchNorm that would see one value per
    channel). ``progress(batch, predicted MiB, fits)`` is called after each prediction.

    Adds to ``largest_batch``'s result: ``budget_mib`` (after the margin), ``start``,
    ``fixed_mib`` and ``fixed`` (MiB of what does not grow with the batch: parameters, buffers,
    gradients, optimizer state, at the first probe's peak), ``seconds`` (the whole search).
    """
    import dataclasses
    import time

    from .predict import predict_case

    started = time.perf_counter()
    budget_mib = budget_bytes * (1 - margin) / 2**20
    predictions: dict[int, dict] = {}

    def predict(batch_size: int) -> dict:
        if batch_size not in predictions:
            at_batch = dataclasses.replace(
                case, batch_size=batch_size, memory_batch_size=None, memory_image_size=None
            )
            predictions[batch_size] = predict_case(at_batch, device_like=device_like)
            if progress is not None:
                mib = predictions[batch_size]["predicted_mib"]
                progress(batch_size, mib, mib <= budget_mib)
        return predictions[batch_size]

    start = 1
    try:
        predict(1)
    except ValueError as error:
        if "one value per channel" not in str(error) and "more than 1 value" not in str(error):
            raise
        start = 2  # a BatchNorm seeing one value per channel: batch 1 cannot train
    result = largest_batch(
        lambda batch: predict(batch)["predicted_mib"], budget_mib, start=start, limit=limit
    )
    memory = predictions[start].get("memory") or {}
    fixed = {name: memory.get(name, 0.0) for name in FIXED_CATEGORIES}
    return {
        **result, "budget_mib": budget_mib, "start": start, "fixed": fixed,
        "fixed_mib": sum(fixed.values()), "limit": limit,
        "seconds": time.perf_counter() - started,
    }


def confirm_case(case, batch_sizes: list[int]) -> list[dict]:
    """Run one real training step (after a warm-up step) of ``case`` at each batch size on its
    CUDA device; per batch: ``batch_size``, ``peak_mib`` (``max_memory_allocated``),
    ``reserved_mib`` and ``status`` ("ok" or "oom")."""
    import dataclasses
    import gc

    import torch

    from .cases import make_step
    from .memory import measured_peak

    if case.device_type != "cuda":
        raise ValueError("--confirm runs real steps on CUDA; give --device cuda")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--confirm runs real steps on CUDA, and this machine has none (torch "
            f"{torch.__version__}); drop --confirm"
        )
    results = []
    for batch_size in batch_sizes:
        at_batch = dataclasses.replace(
            case, batch_size=batch_size, memory_batch_size=None, memory_image_size=None
        )
        step = None
        try:
            torch.manual_seed(0)
            step = make_step(at_batch)
            step()
            peak = measured_peak(step, *step.tracked_objects(), device=step.device)
            results.append({"batch_size": batch_size, "status": "ok",
                            "peak_mib": peak["peak_mib"],
                            "reserved_mib": peak.get("reserved_mib")})
        except torch.OutOfMemoryError:
            results.append({"batch_size": batch_size, "status": "oom", "peak_mib": None,
                            "reserved_mib": None})
        finally:
            del step
            gc.collect()
            torch.cuda.empty_cache()
    return results
