"""Compare the norm and activation variants on a fixed conv stack: saved memory, peak, step time.

The measurement is ``leanstep.bench.layer_bench``; this module parses the options and prints a
table (or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bs", "--batch", dest="bs", type=int, default=16,
        help="batch size (default 16; --batch is the old spelling)",
    )
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument(
        "--iters", type=int, default=20, help="timed steps per variant after warm-up (default 20)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: every core)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def table_lines(result: dict) -> tuple[str, list[str], list[list[str]], str]:
    """Title, headers, lines and caption of the results table (ratios to the first row)."""
    config = result["config"]
    title = (
        f"{config['stack']}, batch {config['batch_size']}, {config['image_size']}x"
        f"{config['image_size']}, {config['device']}, {config['threads']} threads, "
        f"torch {config['torch']}"
    )
    caption = (
        f"step = forward + backward + SGD step, median and IQR of {config['iters']} steps; "
        f"x = ratio to the first row"
    )
    headers = ["variant", "saved MiB", "peak MiB", "step ms", "IQR ms", "saved x", "peak x",
               "time x"]
    lines = [
        [
            row["variant"],
            f"{row['saved_mib']:.1f}",
            f"{row['peak_mib']:.1f}",
            f"{row['time_ms_median']:.1f}",
            f"{row['time_ms_iqr']:.1f}",
            _ratio_text(row["saved_ratio"]),
            _ratio_text(row["peak_ratio"]),
            _ratio_text(row["time_ratio"]),
        ]
        for row in result["rows"]
    ]
    return title, headers, lines, caption


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from leanstep.bench.layer_bench import run_layer_bench

    status = Console(stderr=True)
    result = run_layer_bench(
        batch_size=args.bs,
        image_size=args.size,
        iters=args.iters,
        threads=args.threads,
        progress=lambda message: status.print(f"[dim]{message}[/dim]", highlight=False),
    )
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from leanstep.bench.table import print_table

        title, headers, lines, caption = table_lines(result)
        print_table(headers, lines, title=title, caption=caption)
    return 0
