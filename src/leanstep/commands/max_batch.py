"""The largest batch size whose predicted peak fits a memory budget, per model variant.

Variants come from comma lists of case options (``--norm abn,inplace_abn``); each is searched
over predictions (``leanstep.bench.max_batch``) and compared with the first variant of its model.
The prediction is a lower bound of ``torch.cuda.max_memory_allocated``; ``--margin`` keeps a
share of the budget for what it does not count. ``--confirm`` runs real CUDA steps at the answer
and one past it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from leanstep.bench.cases import TRANSFORM_FIELDS
from leanstep.bench.max_batch import (
    FIXED_CATEGORIES,
    case_max_batch,
    confirm_case,
    parse_budget,
    parse_margin,
)
from leanstep.bench.predict import DEVICE_LIKES, PEAK_LABEL
from leanstep.bench.suite import is_suite
from leanstep.bench.table import print_table
from leanstep.bench.validate import validate_case
from leanstep.commands.case_args import add_case_arguments, suite_from_args

MARGIN_COVERS = (
    "cuDNN/cuBLAS workspaces, memory that kernels allocate inside themselves, allocator "
    "fragmentation"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_arguments(parser)
    search = parser.add_argument_group("search")
    search.add_argument(
        "--memory", required=True, metavar="BUDGET",
        help='memory budget, e.g. "16GiB", "16 GB", "800MiB" (GB = 10^9 bytes, GiB = 2^30)',
    )
    search.add_argument(
        "--margin", default="0%", metavar="PERCENT",
        help=f"share of the budget kept free for what the prediction does not count "
        f"({MARGIN_COVERS}); default 0%%",
    )
    search.add_argument(
        "--device-like", choices=DEVICE_LIKES,
        help="model this device's allocator and optimizer path (default: --device's type)",
    )
    search.add_argument(
        "--confirm", action="store_true",
        help="with --device cuda: run one real step at the answer and at the next batch size, "
        "and show the measured peak beside the prediction",
    )
    search.add_argument("--json", action="store_true", help="one JSON object per line and variant")


def _variant_label(case) -> str:
    """The values that set the case apart ("resnet50 norm=abn" -> "abn"), or its model."""
    parts = case.name.removeprefix(case.model).split()
    return " ".join(part.partition("=")[2] or part for part in parts) or case.model


def _gain(batch: int, first: int | None) -> float | None:
    """Percent more (or fewer) images per batch than the first variant; None for the first."""
    return None if not first else 100.0 * (batch / first - 1)


def _progress(name: str):
    """A progress line on stderr: rewritten in place on a terminal, one line per probe
    otherwise."""
    tty = sys.stderr.isatty()

    def report(batch: int, mib: float, fits: bool) -> None:
        text = f"max-batch {name}: batch {batch} -> {mib:.1f} MiB ({'fits' if fits else 'over'})"
        if tty:
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    return report


def _note(row: dict) -> str | None:
    """One line for a variant whose answer is not a plain batch size."""
    if row["batch_size"] == 0:
        fixed = row["fixed"]
        if row["fixed_mib"] > row["budget_mib"]:
            parts = ", ".join(f"{name.replace('_', ' ')} {fixed[name]:.1f}"
                              for name in FIXED_CATEGORIES)
            return (
                f"{row['name']}: parameters + gradients + optimizer state alone take "
                f"{row['fixed_mib']:.1f} MiB ({parts} MiB), over the budget of "
                f"{row['budget_mib']:.1f} MiB: no batch fits"
            )
        return (
            f"{row['name']}: batch {row['start']} already needs {row['predicted_mib']:.1f} MiB, "
            f"over the budget of {row['budget_mib']:.1f} MiB ({row['fixed_mib']:.1f} MiB of it "
            "parameters, gradients and optimizer state): no batch fits"
        )
    if row["capped"]:
        return (
            f"{row['name']}: the search stopped at its cap, batch {row['batch_size']} "
            f"({row['predicted_mib']:.1f} MiB); the largest batch that fits is at least that"
        )
    return None


def run(args: argparse.Namespace) -> int:
    budget = parse_budget(args.memory)
    margin = parse_margin(args.margin)
    if is_suite(args.target):
        raise ValueError("max-batch takes a model (and variant options), not a suite file")
    if args.bs is not None:
        raise ValueError("max-batch searches the batch size; drop --bs")
    cases = suite_from_args(args).cases
    for case in cases:
        device_like = args.device_like or case.device_type
        checked = case if device_like == case.device_type else dataclasses.replace(
            case, device=device_like
        )
        validate_case(checked, require_device=False)
    if args.confirm:
        confirm_case(cases[0], [])  # refuses here, before any search, without CUDA
    rows, first_batch = [], {}
    for case in cases:
        progress = None if args.json else _progress(case.name)
        found = case_max_batch(case, budget, device_like=args.device_like, margin=margin,
                               progress=progress)
        if progress is not None and sys.stderr.isatty():
            print(file=sys.stderr)
        first = first_batch.get(case.model)
        if first is None:
            first_batch[case.model] = found["batch_size"]
        row = {
            "name": case.name, "model": case.model, "options": case.options,
            **{key: getattr(case, key) for key in TRANSFORM_FIELDS},
            "variant": _variant_label(case), "image_size": case.image_size,
            "image_width": case.image_hw[1], "size": case.size_label,
            "precision": case.precision, "optimizer": case.optimizer, "loss": case.loss,
            "device_like": args.device_like or case.device_type,
            "memory_budget_mib": budget / 2**20, "margin": margin,
            "budget_mib": found["budget_mib"], "batch_size": found["batch_size"],
            "predicted_mib": found["predicted_mib"], "capped": found["capped"],
            "start": found["start"], "fixed": found["fixed"], "fixed_mib": found["fixed_mib"],
            "gain_pct": _gain(found["batch_size"], first),
            "predictions": len(found["probes"]), "seconds": found["seconds"],
        }
        if args.confirm and found["batch_size"]:
            batches = [found["batch_size"], found["batch_size"] + 1]
            row["confirmed"] = [
                {**confirmed, "predicted_mib": found["probes"].get(confirmed["batch_size"])}
                for confirmed in confirm_case(case, batches)
            ]
        row["note"] = _note(row)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        _print_table(rows, args.memory)
    return 0 if all(row["batch_size"] for row in rows) else 1


def _print_table(rows: list[dict], budget_text: str) -> None:
    first = rows[0]
    margin = (
        f", {100 * first['margin']:g}% margin: searched up to {first['budget_mib']:.0f} MiB"
        if first["margin"] else ""
    )
    print(
        f"largest batch whose predicted peak fits {budget_text} "
        f"({first['memory_budget_mib']:.0f} MiB{margin}), {first['size']} px, "
        f"{first['precision']}, {first['optimizer']}, loss {first['loss']}, "
        f"{first['device_like']}-like"
    )
    headers = ("variant", "max batch", "predicted MiB", "gain", "predictions", "s")
    lines = [
        (
            row["name"],
            ("none" if not row["batch_size"] else
             f">= {row['batch_size']}" if row["capped"] else str(row["batch_size"])),
            f"{row['predicted_mib']:.1f}",
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
    for row in rows:
        if row["note"]:
            print(row["note"])
        for confirmed in row.get("confirmed", []):
            measured = (f"{confirmed['peak_mib']:.1f} MiB measured (max_memory_allocated), "
                        f"{confirmed['reserved_mib']:.1f} MiB reserved"
                        if confirmed["status"] == "ok" else "out of memory")
            predicted = confirmed["predicted_mib"]
            beside = "" if predicted is None else f" (predicted {predicted:.1f} MiB)"
            print(f"confirm {row['name']} batch {confirmed['batch_size']}: {measured}{beside}")
    covers = (f"; the {100 * first['margin']:g}% margin is for {MARGIN_COVERS}"
              if first["margin"] else f"; --margin keeps room for {MARGIN_COVERS}")
    print(f"\npredicted: {PEAK_LABEL}{covers}")
