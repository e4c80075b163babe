"""Report a results file (JSONL): seed text, table, markdown, CSV or a plot (PNG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanstep.bench.report import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="FILE.jsonl", help="results file of `leanstep bench`")
    parser.add_argument(
        "--format", choices=FORMATS,
        help="default: table in a terminal, markdown otherwise; plot writes a PNG beside FILE",
    )
    parser.add_argument("--output", metavar="PATH", help="write there instead of stdout")


def run(args: argparse.Namespace) -> int:
    from leanstep.bench import report
    from leanstep.bench.results import read_rows

    if args.output and _same_file(args.output, args.results):
        raise ValueError(f"--output {args.output!r} is the results file itself; give another path")
    rows = read_rows(args.results)
    if not rows:
        raise ValueError(f"{args.results!r} holds no result rows")
    fmt = args.format or ("table" if sys.stdout.isatty() else "markdown")
    if fmt == "plot":
        from leanstep.bench.plot import plot_rows
        from leanstep.bench.results import derived_path

        path = args.output or derived_path(args.results, ".png")
        print(plot_rows(rows, path))
        return 0
    if fmt == "table":
        if args.output:
            from leanstep.bench.table import console

            with open(args.output, "w") as stream:
                report.render_table(rows, console(file=stream, width=160))
        else:
            report.render_table(rows)
        return 0
    text = {"seed": report.format_seed, "markdown": report.format_markdown,
            "csv": report.format_csv}[fmt](rows)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _same_file(first: str, second: str) -> bool:
    a, b = Path(first), Path(second)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()
