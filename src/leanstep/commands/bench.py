"""Benchmark training steps: time, peak memory and FLOPs of a model's variants or a suite."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from leanstep.bench.suite import Suite, is_suite
from leanstep.bench.validate import MissingPackageError, validate_case
from leanstep.commands.case_args import add_case_arguments, suite_from_args


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
    run.add_argument(
        "--retry-failed", action="store_true",
        help="with --resume: run again the cases whose row failed (error, oom, timeout)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--ddp", action="store_true",
        help="under torchrun: DistributedDataParallel on every rank, --bs the global batch",
    )


@dataclass(frozen=True)
class Output:
    """Where a run writes: a new results file, or one it resumes (``--retry-failed``: failed
    rows run again)."""

    path: Path
    resume: bool = False
    retry_failed: bool = False


def _output(args: argparse.Namespace, suite: Suite) -> Output:
    from leanstep.bench.results import default_out_path

    if args.retry_failed and not args.resume:
        raise ValueError("--retry-failed goes with --resume FILE")
    if args.resume:
        resume = Path(args.resume)
        if args.out and Path(args.out) != resume:
            raise ValueError("--resume FILE appends to FILE; give no other --out")
        return Output(resume, resume=True, retry_failed=args.retry_failed)
    return Output(Path(args.out) if args.out else default_out_path(suite.name))


def _run_settings(args: argparse.Namespace, suite: Suite) -> Suite:
    changes = {}
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.timeout is not None:
        changes["timeout"] = args.timeout
    return suite.replace(**changes) if changes else suite


def check_resume(suite: Suite, rows: list[dict]) -> None:
    """ValueError (listing the differences) when a case of ``suite`` has a row in the file
    measured with other settings: resuming would mix two experiments in one report."""
    from leanstep.bench.cases import legacy_row
    from leanstep.bench.results import latest_rows, row_key

    by_key = {row_key(row): legacy_row(row) for row in latest_rows(rows)}
    differences = []
    for case in suite.cases:
        row = by_key.get(case.key)
        if row is None:
            continue
        for key, value in case.settings().items():
            if key in row and row[key] != value:
                differences.append(f"{case.name}: {key} {row[key]!r} in the file, {value!r} now")
    if differences:
        shown = "; ".join(differences[:4])
        more = f" (and {len(differences) - 4} more)" if len(differences) > 4 else ""
        raise ValueError(
            f"--resume with other settings than the file's: {shown}{more}; resume with the "
            f"same options, or give a new --out"
        )


def _resume_command(argv: list[str] | None, out: Path) -> str:
    """The command line that continues this run: its own options, ``--out`` replaced by
    ``--resume OUT``."""
    kept, skip = [], False
    for item in argv or []:
        if skip:
            skip = False
            continue
        if item in ("--out", "--resume"):
            skip = True
            continue
        if item.startswith(("--out=", "--resume=")) or item == "--retry-failed":
            continue
        kept.append(item)
    return "leanstep " + shlex.join([*kept, "--resume", str(out)])


def _write_reports(rows: list[dict], out: Path) -> None:
    from leanstep.bench.plot import plot_rows
    from leanstep.bench.report import format_seed, render_table
    from leanstep.bench.results import derived_path

    render_table(rows)
    seed_path = derived_path(out, ".seed.md")
    seed_path.write_text(format_seed(rows))
    print(f"results: {out}\nseed format: {seed_path}")
    try:
        print(f"plot: {plot_rows(rows, derived_path(out, '.png'))}")
    except ValueError as error:
        print(f"plot: not written ({error})")


def _warn_flagged(rows: list[dict]) -> None:
    from leanstep.bench.row import IQR_LIMIT, SHARE_LIMIT, flags

    flagged = [f"{row['name']} ({', '.join(flags(row))})" for row in rows if flags(row)]
    if flagged:
        print(
            f"warning: timing not to be trusted (cpu share < {SHARE_LIMIT}, IQR > "
            f"{IQR_LIMIT:.0%} of median, or graph breaks): {'; '.join(flagged)}",
            file=sys.stderr,
        )


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM (``kill``, ``timeout``) ends the run as Ctrl-C does: workers are killed, the
    rows written so far stay."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    if args.ddp:
        return _run_ddp(args)
    suite = _run_settings(args, suite_from_args(args))
    from_suite = is_suite(args.target)
    skipped = {}
    for case in suite.cases:
        try:
            validate_case(case)
        except MissingPackageError as error:
            if not from_suite:
                raise
            skipped[case.key] = str(error)
    output = _output(args, suite)

    from leanstep.bench.results import ResultsFile, done_keys, environment, latest_rows, row_key
    from leanstep.bench.runner import failed, run_suite

    with ResultsFile(output.path, new=not output.resume) as out:
        done = set()
        if output.resume:
            existing = out.rows()
            check_resume(suite, existing)
            done = done_keys(existing, retry_failed=output.retry_failed)
        try:
            with _sigterm_raises():
                run_suite(
                    suite, out, env=environment(), skipped=skipped, done=done,
                    progress=not args.no_progress,
                )
        except KeyboardInterrupt:
            argv = getattr(args, "_argv", None) or sys.argv[1:]
            print(f"interrupted; continue with: {_resume_command(argv, out.path)}",
                  file=sys.stderr)
            return 130
        keys = {case.key for case in suite.cases}
        rows = [row for row in latest_rows(out.rows()) if row_key(row) in keys]
    _write_reports(rows, output.path)
    _warn_flagged(rows)
    return 1 if failed(rows) else 0


def _run_ddp(args: argparse.Namespace) -> int:
    """``leanstep bench ... --ddp``: the cases of the command line, run under torchrun.

    Threads default to this node's cores shared evenly among its ranks (``--threads`` overrides).
    Bad input is reported by the first rank of each node only (every rank finds the same fault);
    the others exit with the same code 2 silently, so a bad launch prints one line per node, not
    one per rank.
    """
    from leanstep.bench.cases import available_cores
    from leanstep.bench.ddp import check_launch, run_ddp, torchrun_launch

    launch = torchrun_launch()
    try:
        if args.resume:
            raise ValueError("--resume does not combine with --ddp; give a new --out file")
        if args.rounds not in (None, 1):
            raise ValueError(f"--rounds {args.rounds} does not combine with --ddp (one round only)")
        if args.timeout is not None:
            raise ValueError(
                "--timeout does not combine with --ddp; a rank that fails or hangs ends the "
                "launch (torchrun stops the others, collectives time out after 10 minutes)"
            )
        suite = suite_from_args(args)
        if args.threads is None:
            per_rank = max(1, available_cores() // launch.local_world_size)
            suite = suite.replace(cases=tuple(
                dataclasses.replace(case, threads=per_rank) for case in suite.cases
            ))
        check_launch(list(suite.cases), launch)
        output = _output(args, suite.replace(name=f"{suite.name}-ddp"))
        if output.path.exists():
            raise ValueError(f"{str(output.path)!r} exists; give --ddp a new --out file")
    except ValueError:
        if launch.local_rank != 0:
            raise SystemExit(2) from None
        raise
    return run_ddp(list(suite.cases), output.path, launch)


__all__ = ["Output", "add_arguments", "check_resume", "run"]
