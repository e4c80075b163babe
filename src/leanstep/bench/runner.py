"""Running a list of cases: interleaved rounds, one worker per case and round, rows appended.

The cases of a comparison group run in rounds (A B A B ...), each round taking its share of the
runs, so that drift of a noisy machine (other load, thermal state) hits every case alike. The
memory pass and the FLOP count happen in the first round only. A case's row is written when its
last round ends, or at once when it fails or is skipped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from .cases import Case
from .measurement import Measurement
from .results import ResultsFile, utc_now
from .row import FAILED, Measured, Row
from .suite import Suite
from .worker import run_worker

__all__ = ["failed", "make_row", "run_suite", "schedule", "split_runs"]

# Figures a row takes from its first round (memory, FLOPs, prediction, compilation).
_FIRST_ROUND = (
    "params", "peak_mib", "reserved_mib", "memory", "memory_note", "predicted_mib",
    "predict_error", "flops",
    "compile_seconds", "compile_graphs", "compile_graph_breaks", "compile_break_reasons",
    "phase_seconds",
)


def split_runs(runs: int, rounds: int) -> list[int]:
    """``runs`` shared as evenly as possible over ``rounds`` (earlier rounds take the rest)."""
    base, extra = divmod(runs, rounds)
    return [base + (1 if index < extra else 0) for index in range(rounds)]


def schedule(cases: list[Case], rounds: int) -> list[tuple[Case, int, int]]:
    """(case, round, runs in that round), group by group, the group's cases interleaved."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    order = []
    for members in groups.values():
        for round_index in range(rounds):
            for case in members:
                runs = split_runs(case.runs, rounds)[round_index]
                if runs:
                    order.append((case, round_index, runs))
    return order


def make_row(case: Case, results: list[dict], env: dict, rounds: int = 1) -> dict:
    """The result row of ``case`` from the results of its rounds (the first has memory/FLOPs).

    A failed or skipped case has a row too, with its status, the reason in ``error`` and None
    for what was not measured.
    """
    case = case.with_defaults()
    first = results[0] if results else {}
    final = results[-1] if results else {"status": "error", "error": "no result"}
    figures = {key: first.get(key) for key in _FIRST_ROUND}
    figures.update(
        status=final.get("status", "error"), error=final.get("error"), rounds=rounds,
        env={**env, "device_name": first.get("device_name")}, timestamp=utc_now(),
        worker_seconds=[round(result.get("worker_seconds", 0.0), 2) for result in results],
    )
    if figures["status"] == "ok":
        measurement = Measurement.merge([Measurement.from_dict(result) for result in results])
        figures.update(measurement.summary(case.batch_size))
        figures.update(
            fwd_ms_iters=measurement.forward_ms, bwd_ms_iters=measurement.backward_ms,
            timing_cpu_share=measurement.cpu_share,
        )
        if figures["flops"] and figures["step_ms_median"]:
            figures["gflops_per_sec"] = figures["flops"] / figures["step_ms_median"] / 1e6
    return Row(case, Measured(**figures)).to_dict()


class _NoProgress:
    def start(self, case: Case, round_index: int, rounds: int) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def advance(self) -> None:
        pass


class _RichProgress:
    """A rich progress bar on stderr: cases done / total, and the current case and phase."""

    def __init__(self, total: int, done: int):
        self.total = total
        self.done = done
        self.progress = None
        self.task = None
        self.label = ""

    @contextlib.contextmanager
    def running(self) -> Iterator[_RichProgress]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task("", total=self.total, completed=self.done)
        with self.progress:
            yield self

    def start(self, case: Case, round_index: int, rounds: int) -> None:
        suffix = f" round {round_index + 1}/{rounds}" if rounds > 1 else ""
        self.label = f"{case.name}{suffix}"
        self.phase("start")

    def phase(self, name: str) -> None:
        self.progress.update(self.task, description=f"{name:<7} {self.label}")

    def advance(self) -> None:
        self.progress.advance(self.task)


def run_suite(
    suite: Suite,
    out: ResultsFile,
    *,
    env: dict,
    skipped: dict | None = None,
    done: set | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] = lambda row: None,
) -> list[dict]:
    """Run the cases of ``suite`` and append a row per case to ``out``; returns the new rows.

    ``skipped`` maps a case key to the reason it is not run (a row with status "skipped");
    ``done`` holds the keys of cases already in the file (``--resume``): not run again.
    """
    cases, rounds, timeout = list(suite.cases), suite.rounds, suite.timeout
    skipped = skipped or {}
    done = done or set()
    pending = [case for case in cases if case.key not in done]
    new_rows: list[dict] = []

    def finish(case: Case, results: list[dict]) -> None:
        row = make_row(case, results, env, rounds)
        out.append(row)
        new_rows.append(row)
        on_row(row)
        reporter.advance()

    context = (
        _RichProgress(total=len(cases), done=len(cases) - len(pending)).running()
        if progress else contextlib.nullcontext(_NoProgress())
    )
    with context as reporter:
        for case in pending:
            if case.key in skipped:
                finish(case, [{"status": "skipped", "error": skipped[case.key]}])
        runnable = [case.with_defaults() for case in pending if case.key not in skipped]
        results: dict[tuple, list[dict]] = {case.key: [] for case in runnable}
        last_round = {
            case.key: max(i for i, runs in enumerate(split_runs(case.runs, rounds)) if runs)
            for case in runnable
        }
        for case, round_index, runs in schedule(runnable, rounds):
            history = results[case.key]
            if history and history[-1].get("status") != "ok":
                continue
            reporter.start(case, round_index, rounds)
            first = round_index == 0
            request = {
                "case": case.to_dict(), "runs": runs, "measure_memory": first,
                "flops": first, "predict": first,
            }
            started = time.perf_counter()
            result = run_worker(
                request, threads=case.threads, timeout=timeout, on_phase=reporter.phase
            )
            result["worker_seconds"] = time.perf_counter() - started
            history.append(result)
            if result.get("status") != "ok" or round_index == last_round[case.key]:
                finish(case, history)
    return new_rows


def failed(rows: list[dict]) -> bool:
    """Whether any row records a failed case."""
    return any(row.get("status") in FAILED for row in rows)

