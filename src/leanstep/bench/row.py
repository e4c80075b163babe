"""The result row: the one schema from which the JSONL file, CSV and every table derive.

A row is a case's settings (every ``Case`` field, flat, defaults resolved) followed by what was
measured. Adding a Case field adds its column here by itself. ``flags`` says when a row's
timing cannot be trusted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .cases import Case

__all__ = [
    "CASE_FIELDS",
    "FAILED",
    "IQR_LIMIT",
    "MEASURED_FIELDS",
    "NUMERIC_FIELDS",
    "ROW_FIELDS",
    "SHARE_LIMIT",
    "Row",
    "check_row",
    "flags",
    "row_key",
]

# Statuses that count as a failed case (exit code 1, re-run by --retry-failed); "skipped" is
# not one.
FAILED = ("error", "oom", "timeout")
# A row's timing is flagged when the case had less than this share of its cores...
SHARE_LIMIT = 0.85
# ... or when the interquartile range of its step times exceeds this share of their median.
IQR_LIMIT = 0.10


@dataclass(frozen=True)
class Measured:
    """What one case's run recorded besides its settings; None where it was not measured."""

    status: str = "error"
    error: str | None = None
    params: int | None = None
    rounds: int = 1
    fwd_ms_mean: float | None = None
    fwd_ms_std: float | None = None
    bwd_ms_mean: float | None = None
    bwd_ms_std: float | None = None
    step_ms_median: float | None = None
    step_ms_iqr: float | None = None
    imgs_per_sec: float | None = None
    peak_mib: float | None = None
    reserved_mib: float | None = None
    memory: dict | None = None
    memory_note: str | None = None
    predicted_mib: float | None = None
    predict_error: str | None = None
    flops: int | None = None
    gflops_per_sec: float | None = None
    compile_seconds: float | None = None
    compile_graphs: int | None = None
    compile_graph_breaks: int | None = None
    compile_break_reasons: list | None = None
    timing_cpu_share: float | None = None
    fwd_ms_iters: list | None = None
    bwd_ms_iters: list | None = None
    phase_seconds: dict | None = None
    worker_seconds: list | None = None
    env: dict = field(default_factory=dict)
    timestamp: str | None = None


CASE_FIELDS = tuple(f.name for f in dataclasses.fields(Case))
MEASURED_FIELDS = tuple(f.name for f in dataclasses.fields(Measured))
ROW_FIELDS = CASE_FIELDS + MEASURED_FIELDS
NUMERIC_FIELDS = (
    "batch_size", "image_size", "runs", "iters", "warmup", "threads", "memory_batch_size",
    "memory_image_size", "index", "params", "rounds", "fwd_ms_mean", "fwd_ms_std", "bwd_ms_mean",
    "bwd_ms_std", "step_ms_median", "step_ms_iqr", "imgs_per_sec", "peak_mib", "reserved_mib",
    "predicted_mib", "flops", "gflops_per_sec", "compile_seconds", "compile_graphs",
    "compile_graph_breaks", "timing_cpu_share",
)


@dataclass(frozen=True)
class Row:
    """One case and what its run measured."""

    case: Case
    measured: Measured

    def to_dict(self) -> dict:
        return {**self.case.to_dict(), **dataclasses.asdict(self.measured)}

    @classmethod
    def from_dict(cls, data: dict) -> Row:
        """The row in a results file's line (checked with ``check_row``)."""
        check_row(data)
        case = Case(**{k: data[k] for k in CASE_FIELDS if k in data})
        return cls(case, Measured(**{k: data[k] for k in MEASURED_FIELDS if k in data}))


def row_key(row: dict) -> tuple[str, str, str]:
    """The identity of a row's case, as ``Case.key``."""
    return (row.get("suite"), row.get("group"), row.get("name"))


def check_row(row: object) -> None:
    """ValueError (one line) unless ``row`` is a result row whose figures are numbers."""
    if not isinstance(row, dict) or not all(key in row for key in ("suite", "group", "name")):
        raise ValueError("not a result row (no suite, group and name)")
    for key in NUMERIC_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"field {key!r} of row {row['name']!r} is not a number: {value!r}")
    for key in ("memory", "options", "reference", "env"):
        if row.get(key) is not None and not isinstance(row[key], dict):
            raise ValueError(f"field {key!r} of row {row['name']!r} is not a table: {row[key]!r}")


def flags(row: dict) -> list[str]:
    """Why the row's timing cannot be trusted (empty: nothing known against it).

    A CPU case that had less than 85% of its cores (``timing_cpu_share``), step times whose IQR
    exceeds 10% of their median, or a compiled model with graph breaks.
    """
    if row.get("status") != "ok":
        return []
    found = []
    share = row.get("timing_cpu_share")
    if share is not None and str(row.get("device", "cpu")).startswith("cpu") and (
        share < SHARE_LIMIT
    ):
        found.append(f"cpu share {share:.2f}")
    median, iqr = row.get("step_ms_median"), row.get("step_ms_iqr")
    if median and iqr is not None and iqr > IQR_LIMIT * median:
        found.append(f"IQR {100 * iqr / median:.0f}% of median")
    breaks = row.get("compile_graph_breaks")
    if breaks:
        found.append(f"{breaks} graph break{'s' if breaks != 1 else ''}")
    return found
