"""Result rows: what one measured case records, and the JSON-lines file that holds them.

One row per case, appended (and flushed) as soon as the case finishes, so an interrupted suite
loses at most the case in progress and ``--resume`` can continue it. Besides the figures, a row
records how the case ran: ``timing_cpu_share`` (CPU time of the worker during the timing pass /
(wall time x threads): well below 1 means other load shared the cores), ``phase_seconds`` and
``worker_seconds``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

__all__ = [
    "FAILED",
    "ROW_FIELDS",
    "append_row",
    "default_out_path",
    "drop_partial_line",
    "environment",
    "latest_rows",
    "read_rows",
    "row_key",
    "utc_now",
]

# Statuses that count as a failed case (exit code 1); "skipped" is not one.
FAILED = ("error", "oom", "timeout")

ROW_FIELDS = (
    "suite", "group", "name", "index", "model", "options", "batch_size", "image_size",
    "in_channels", "num_classes", "device", "precision", "channels_last", "compile", "mode",
    "memory_batch_size", "memory_image_size", "params", "runs", "iters", "warmup", "threads",
    "rounds", "fwd_ms_mean", "fwd_ms_std", "bwd_ms_mean", "bwd_ms_std", "step_ms_median",
    "step_ms_iqr", "imgs_per_sec", "peak_mib", "reserved_mib", "memory", "predicted_mib",
    "predict_error", "flops", "gflops_per_sec", "status", "error", "reference", "fwd_ms_iters",
    "bwd_ms_iters", "timing_cpu_share", "phase_seconds", "worker_seconds", "env", "timestamp",
)


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_out_path(suite: str, directory: str | Path = "results") -> Path:
    """``results/<suite>-<UTC timestamp>.jsonl``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(directory) / f"{suite}-{stamp}.jsonl"


def row_key(row: dict) -> tuple[str, str, str]:
    """The identity of a row's case, as ``Case.key``."""
    return (row.get("suite"), row.get("group"), row.get("name"))


def append_row(path: str | Path, row: dict) -> None:
    """Append ``row`` as one JSON line and flush it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        stream.write(json.dumps(row) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def read_rows(path: str | Path) -> list[dict]:
    """Every row of a results file. A truncated last line (a run killed mid-write) is ignored;
    any other line that is not a JSON object is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results file {str(path)!r} not found")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"line {number} of {str(path)!r} is not JSON") from None
        if not isinstance(row, dict) or "name" not in row:
            raise ValueError(f"line {number} of {str(path)!r} is not a result row")
        rows.append(row)
    return rows


def drop_partial_line(path: str | Path) -> None:
    """Remove a last line cut short by an interrupted write, so that rows appended next start on
    a line of their own."""
    path = Path(path)
    text = path.read_text()
    if not text or text.endswith("\n"):
        return
    head, _, last = text.rpartition("\n")
    try:
        json.loads(last)
    except json.JSONDecodeError:
        path.write_text(head + "\n" if head else "")
    else:
        path.write_text(text + "\n")


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per case (the last one written), ordered by suite position."""
    latest: dict = {}
    for row in rows:
        latest[row_key(row)] = row
    return sorted(latest.values(), key=lambda row: row.get("index", 0))


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        completed = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def environment() -> dict:
    """What the numbers depend on besides the case: versions, commit, CPU."""
    import torch

    import leanstep

    from .measure import cpu_model

    return {
        "torch": torch.__version__,
        "leanstep": leanstep.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cuda": torch.version.cuda,
    }
