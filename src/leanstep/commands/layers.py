"""Compare the norm and activation variants on a fixed conv stack: saved memory, peak, step time.

The measurement is ``leanstep.bench.layer_bench``; this module parses the options and prints a
table (or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument(
        "--iters", type=int, default=20, help="timed steps per variant after warm-up (default 20)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: every core)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def render_table(result: dict):
    """The results as a rich table, ratios to the first row."""
    from rich.markup import escape
    from rich.table import Table

    config = result["config"]
    table = Table(
        title=escape(
            f"{config['stack']}, batch {config['batch_size']}, {config['image_size']}x"
            f"{config['image_size']}, {config['device']}, {config['threads']} threads, "
            f"torch {config['torch']}"
        ),
        caption=(
            f"step = forward + backward + SGD step, median and IQR of {config['iters']} steps; "
            f"x = ratio to the first row"
        ),
    )
    table.add_column("variant", no_wrap=True)
    for header in ("saved MiB", "peak MiB", "step ms", "IQR ms", "saved x", "peak x", "time x"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in result["rows"]:
        table.add_row(
            row["variant"],
            f"{row['saved_mib']:.1f}",
            f"{row['peak_mib']:.1f}",
            f"{row['time_ms_median']:.1f}",
            f"{row['time_ms_iqr']:.1f}",
            _ratio_text(row["saved_ratio"]),
            _ratio_text(row["peak_ratio"]),
            _ratio_text(row["time_ratio"]),
        )
    return table


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from leanstep.bench.layer_bench import run_layer_bench

    status = Console(stderr=True)
    result = run_layer_bench(
        batch_size=args.batch,
        image_size=args.size,
        iters=args.iters,
        threads=args.threads,
        progress=lambda message: status.print(f"[dim]{message}[/dim]", highlight=False),
    )
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 120)
        console.print(render_table(result))
    return 0
