"""The results file: JSON lines, one row per case, one writer at a time, nothing lost.

A row is appended, flushed and fsynced as soon as its case finishes, so an interrupted suite
loses at most the case in progress and ``--resume`` can continue it. ``ResultsFile`` holds an
exclusive lock for the whole run (a second ``bench`` on the same file exits before measuring),
is checked writable before the first case, and sets aside lines that are not rows (a write cut
short) into ``FILE.bad`` instead of losing the good rows around them. Derived files (seed text,
plot) get names of their own that never collide with the results file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .row import FAILED, check_row, row_key

__all__ = [
    "FAILED",
    "ResultsFile",
    "default_out_path",
    "derived_path",
    "environment",
    "latest_rows",
    "read_rows",
    "row_key",
    "utc_now",
]


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_out_path(suite: str, directory: str | Path = "results") -> Path:
    """``results/<suite>-<UTC timestamp>.jsonl`` (``suite`` is a checked suite name)."""
    from .suite import check_suite_name

    check_suite_name(suite)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(directory) / f"{suite}-{stamp}.jsonl"


def derived_path(results: str | Path, suffix: str) -> Path:
    """A file derived from ``results``: ``r.jsonl`` -> ``r{suffix}``; any other name keeps its
    own suffix (``r.png`` -> ``r.png{suffix}``), so it never is the results file itself."""
    results = Path(results)
    base = results.with_suffix("") if results.suffix == ".jsonl" else results
    return base.with_name(base.name + suffix)


def _parse_lines(text: str, source: str) -> tuple[list[dict], list[tuple[int, str, str]]]:
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            check_row(row)
        except json.JSONDecodeError:
            bad.append((number, line, "not JSON (a write cut short?)"))
            continue
        except ValueError as error:
            bad.append((number, line, str(error)))
            continue
        rows.append(row)
    return rows, bad


def _warn_bad(path: Path, bad: list[tuple[int, str, str]], action: str) -> None:
    for number, _, reason in bad:
        print(f"leanstep: line {number} of {str(path)!r} {action}: {reason}", file=sys.stderr)


def read_rows(path: str | Path) -> list[dict]:
    """Every row of a results file; a line that is not a row is skipped with a message on
    stderr (``ResultsFile.open`` sets such lines aside for good)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results file {str(path)!r} not found")
    rows, bad = _parse_lines(path.read_text(errors="replace"), str(path))
    _warn_bad(path, bad, "skipped")
    return rows


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per case (the last one written), ordered by suite position."""
    latest: dict = {}
    for row in rows:
        latest[row_key(row)] = row
    return sorted(latest.values(), key=lambda row: row.get("index", 0))


class ResultsFile:
    """A results file opened for appending by one run: ``with ResultsFile(path) as out``.

    Opening checks that the file can be written (creating its folder), takes an exclusive lock
    (``fcntl.flock``; ValueError if another run holds it) and, for a file that exists, moves lines
    that are not rows to ``PATH.bad`` and ends the file with a newline, so appended rows start
    on a line of their own.
    """

    def __init__(self, path: str | Path, *, new: bool):
        self.path = Path(path)
        self.new = new
        self._stream = None

    def __enter__(self) -> ResultsFile:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        path = self.path
        if self.new and path.exists():
            raise ValueError(f"{str(path)!r} exists; continue it with --resume {path}")
        if not self.new and not path.is_file():
            raise ValueError(f"results file {str(path)!r} not found")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stream = path.open("a+")
        except OSError as error:
            raise ValueError(
                f"cannot write results file {str(path)!r}: {error.strerror or error}"
            ) from None
        try:
            import fcntl

            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: one writer is the user's care
            pass
        except OSError:
            stream.close()
            raise ValueError(
                f"{str(path)!r} is being written by another leanstep bench run; wait for it or "
                f"give another --out"
            ) from None
        self._stream = stream
        self._repair()

    def _repair(self) -> None:
        stream = self._stream
        stream.seek(0)
        text = stream.read()
        rows, bad = _parse_lines(text, str(self.path))
        if bad:
            quarantine = self.path.with_name(self.path.name + ".bad")
            with quarantine.open("a") as aside:
                aside.writelines(line + "\n" for _, line, _ in bad)
            _warn_bad(self.path, bad, f"moved to {str(quarantine)!r}")
            good = "".join(json.dumps(row) + "\n" for row in rows)
            backup = self.path.with_name(self.path.name + ".good")
            backup.write_text(good)  # the good rows are safe on disk before the rewrite
            stream.seek(0)
            stream.truncate()
            stream.write(good)
            self._flush()
            backup.unlink()
            return
        if text and not text.endswith("\n"):
            stream.write("\n")
            self._flush()

    def rows(self) -> list[dict]:
        """The rows in the file now."""
        self._stream.seek(0)
        return _parse_lines(self._stream.read(), str(self.path))[0]

    def _flush(self) -> None:
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def append(self, row: dict) -> None:
        """Append ``row`` as one JSON line and flush it to disk."""
        self._stream.seek(0, os.SEEK_END)
        self._stream.write(json.dumps(row) + "\n")
        self._flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # releases the lock
            self._stream = None


def done_keys(rows: list[dict], *, retry_failed: bool = False) -> set:
    """Keys of the cases a resumed run need not run again: every case with a row, but with
    ``retry_failed`` not those whose latest row failed (error, oom, timeout)."""
    return {
        row_key(row) for row in latest_rows(rows)
        if not (retry_failed and row.get("status") in FAILED)
    }


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


# glibc (MALLOC_*, GLIBC_TUNABLES), jemalloc (MALLOC_CONF, _RJEM_MALLOC_CONF), tcmalloc,
# mimalloc, a preloaded allocator, PyTorch's own.
_ALLOCATOR_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "_RJEM_MALLOC_CONF", "TCMALLOC_",
                       "MIMALLOC_", "LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF", "THP_MEM_ALLOC")


def environment() -> dict:
    """What the numbers depend on besides the case: versions, commit, CPU."""
    import torch

    import leanstep

    from .device import cpu_model

    return {
        "torch": torch.__version__,
        "leanstep": leanstep.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cuda": torch.version.cuda,
        # The allocator's settings: on the CPU they change step times by a tenth (README).
        "allocator_env": {name: value for name, value in sorted(os.environ.items())
                          if name.startswith(_ALLOCATOR_PREFIXES)},
    }
