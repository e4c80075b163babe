"""Benchmark training steps: time, peak memory and FLOPs of a model's variants or a suite."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanstep.bench.cases import (
    MissingPackageError,
    add_case_arguments,
    cases_from_args,
    is_suite_path,
    load_suite_file,
    validate_case,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_arguments(parser)
    run = parser.add_argument_group("running")
    run.add_argument(
        "--rounds", type=int,
        help="interleave each group's cases over N rounds, A B A B (default: the suite's, or 1)",
    )
    run.add_argument(
        "--timeout", type=float, help="seconds before a case's worker is killed (default: the "
        "suite's, or none)",
    )
    run.add_argument(
        "--out", help="results file (default results/<suite>-<UTC timestamp>.jsonl)"
    )
    run.add_argument("--resume", metavar="FILE", help="continue FILE, skipping the cases in it")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--ddp", action="store_true",
        help="under torchrun: DistributedDataParallel on every rank, --bs the global batch",
    )


def _settings(args: argparse.Namespace) -> tuple[str | None, int, float | None]:
    settings = load_suite_file(args.target)[1] if is_suite_path(args.target) else {}
    rounds = args.rounds if args.rounds is not None else settings.get("rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    timeout = args.timeout if args.timeout is not None else settings.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return settings.get("name"), rounds, timeout


def _out_path(args: argparse.Namespace, suite: str) -> tuple[Path, set]:
    from leanstep.bench.results import default_out_path, drop_partial_line, read_rows, row_key

    if args.resume:
        resume = Path(args.resume)
        if args.out and Path(args.out) != resume:
            raise ValueError("--resume FILE appends to FILE; give no other --out")
        done = {row_key(row) for row in read_rows(resume)}
        drop_partial_line(resume)
        return resume, done
    out = Path(args.out) if args.out else default_out_path(suite)
    if out.exists():
        raise ValueError(f"{str(out)!r} exists; continue it with --resume {out}")
    return out, set()


def _write_reports(rows: list[dict], out: Path) -> None:
    from leanstep.bench.plot import plot_rows
    from leanstep.bench.report import format_seed, render_table

    render_table(rows)
    seed_path = out.with_suffix(".seed.md")
    seed_path.write_text(format_seed(rows))
    print(f"results: {out}\nseed format: {seed_path}")
    try:
        print(f"plot: {plot_rows(rows, out.with_suffix('.png'))}")
    except ValueError as error:
        print(f"plot: not written ({error})")


def run(args: argparse.Namespace) -> int:
    if args.ddp:
        from leanstep.bench.ddp import run_from_args

        return run_from_args(args)
    cases = cases_from_args(args)
    _, rounds, timeout = _settings(args)
    from_suite = is_suite_path(args.target)
    skipped = {}
    for case in cases:
        try:
            validate_case(case)
        except MissingPackageError as error:
            if not from_suite:
                raise
            skipped[case.key] = str(error)
    out, done = _out_path(args, cases[0].suite)

    from leanstep.bench.results import environment, latest_rows, read_rows, row_key
    from leanstep.bench.runner import failed, run_cases

    try:
        run_cases(
            cases, out_path=out, env=environment(), rounds=rounds, timeout=timeout,
            skipped=skipped, done=done, progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"interrupted; continue with: leanstep bench {args.target} --resume {out}",
              file=sys.stderr)
        return 130
    keys = {case.key for case in cases}
    rows = [row for row in latest_rows(read_rows(out)) if row_key(row) in keys]
    _write_reports(rows, out)
    return 1 if failed(rows) else 0
