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

__all__ = ["BUDGET_FORMS", "MAX_BATCH", "case_max_batch", "largest_batch", "parse_budget"]

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
    ``start`` when nothing fits) and ``probes`` ({batch size: predicted MiB}, every prediction
    made). ``peak_mib`` must not decrease as the batch grows.
    """
    probes: dict[int, float] = {}

    def fits(batch: int) -> bool:
        if batch not in probes:
            probes[batch] = peak_mib(batch)
        return probes[batch] <= budget_mib

    if not fits(start):
        return {"batch_size": 0, "predicted_mib": probes[start], "probes": probes}
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
    return {"batch_size": low, "predicted_mib": probes[low], "probes": probes}


def case_max_batch(case, budget_bytes: int, *, device_like: str | None = None) -> dict:
    """``largest_batch`` for a benchmark case at its image size, over ``predict_case``.

    The search starts at batch 1, or 2 where batch 1 cannot run a training step (a BatchNorm
    that would see one value per channel). Adds ``seconds`` (the whole search) to the result.
    """
    import dataclasses
    import time

    from .predict import predict_case

    started = time.perf_counter()

    predictions: dict[int, float] = {}

    def peak(batch_size: int) -> float:
        if batch_size not in predictions:
            at_batch = dataclasses.replace(
                case, batch_size=batch_size, memory_batch_size=None, memory_image_size=None
            )
            predictions[batch_size] = predict_case(at_batch, device_like=device_like)[
                "predicted_mib"
            ]
        return predictions[batch_size]

    start = 1
    try:
        peak(1)
    except ValueError:  # e.g. a BatchNorm seeing one value per channel: batch 1 cannot train
        start = 2
    result = largest_batch(peak, budget_bytes / 2**20, start=start)
    return {**result, "seconds": time.perf_counter() - started}
