"""The largest batch size whose predicted peak fits a memory budget, per model variant.

Variants come from comma lists of case options (``--norm abn,inplace_abn``); each is searched
over predictions (``leanstep.bench.max_batch``) and compared with the first variant of its model.
"""

from __future__ import annotations

import argparse
import json

from leanstep.bench.cases import TRANSFORM_FIELDS
from leanstep.bench.max_batch import case_max_batch, parse_budget
from leanstep.bench.predict import DEVICE_LIKES, PEAK_LABEL
from leanstep.bench.suite import is_suite
from leanstep.bench.table import print_table
from leanstep.bench.validate import validate_case
from leanstep.commands.case_args import add_case_arguments, suite_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_arguments(parser)
    search = parser.add_argument_group("search")
    search.add_argument(
        "--memory", required=True, metavar="BUDGET",
        help='memory budget, e.g. "16GiB", "16 GB", "800MiB" (GB = 10^9 bytes, GiB = 2^30)',
    )
    search.add_argument(
        "--device-like", choices=DEVICE_LIKES,
        help="model this device's allocator and optimizer path (default: the case's device)",
    )
    search.add_argument("--json", action="store_true", help="one JSON object per line and variant")


def _variant_label(case) -> str:
    """The values that set the case apart ("resnet50 norm=abn" -> "abn"), or its model."""
    parts = case.name.removeprefix(case.model).split()
    return " ".join(part.partition("=")[2] or part for part in parts) or case.model


def _gain(batch: int, first: int | None) -> float | None:
    """Percent more (or fewer) images per batch than the first variant; None for the first."""
    return None if not first else 100.0 * (batch / first - 1)


def run(args: argparse.Namespace) -> int:
    budget = parse_budget(args.memory)
    if is_suite(args.target):
        raise ValueError("max-batch takes a model (and variant options), not a suite file")
    if args.bs is not None:
        raise ValueError("max-batch searches the batch size; drop --bs")
    cases = suite_from_args(args).cases
    for case in cases:
        validate_case(case, require_device=False)
    rows, first_batch = [], {}
    for case in cases:
        found = case_max_batch(case, budget, device_like=args.device_like)
        first = first_batch.get(case.model)
        if first is None:
            first_batch[case.model] = found["batch_size"]
        row = {
            "name": case.name, "model": case.model, "options": case.options,
            **{key: getattr(case, key) for key in TRANSFORM_FIELDS},
            "variant": _variant_label(case), "image_size": case.image_size,
            "precision": case.precision, "device_like": args.device_like or case.device_type,
            "memory_budget_mib": budget / 2**20, "batch_size": found["batch_size"],
            "predicted_mib": found["predicted_mib"], "gain_pct": _gain(found["batch_size"], first),
            "predictions": len(found["probes"]), "seconds": found["seconds"],
        }
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        _print_table(rows, args.memory)
    return 0


def _print_table(rows: list[dict], budget_text: str) -> None:
    first = rows[0]
    print(
        f"largest batch whose predicted peak fits {budget_text} "
        f"({first['memory_budget_mib']:.0f} MiB), {first['image_size']} px, "
        f"{first['precision']}, {first['device_like']}-like"
    )
    headers = ("variant", "max batch", "predicted MiB", "gain", "predictions", "s")
    lines = [
        (
            row["name"], str(row["batch_size"]), f"{row['predicted_mib']:.1f}",
            "-" if row["gain_pct"] is None else f"{row['gain_pct']:+.0f}%",
            str(row["predictions"]), f"{row['seconds']:.1f}",
        )
        for row in rows
    ]
    print_table(headers, lines)
    print()
    for model in dict.fromkeys(row["model"] for row in rows):
        parts = []
        for row in (r for r in rows if r["model"] == model):
            gain = "" if row["gain_pct"] is None else f" ({row['gain_pct']:+.0f}%)"
            parts.append(f"{row['variant']} {row['batch_size']}{gain}")
        print(f"{model}: {' | '.join(parts)}")
    print(f"\npredicted: {PEAK_LABEL}")
