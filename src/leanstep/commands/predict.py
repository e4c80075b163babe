"""Predict a training step's peak memory without running it (fake tensors: seconds, any batch).

The prediction is ``leanstep.bench.predict``: a tensor-level peak, i.e. a lower bound of
``torch.cuda.max_memory_allocated``. For one model the output is the peak, its breakdown by
category and the modules holding the most activation memory; for a suite, one row per case with
the suite's ``reference_mib`` beside the prediction where it has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from leanstep.bench.cases import TRANSFORM_FIELDS
from leanstep.bench.predict import DEVICE_LIKES, PEAK_LABEL, predict_case
from leanstep.bench.suite import is_suite
from leanstep.bench.table import print_table
from leanstep.bench.validate import validate_case
from leanstep.commands.case_args import add_case_arguments, suite_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_arguments(parser)
    output = parser.add_argument_group("prediction")
    output.add_argument(
        "--device-like", choices=DEVICE_LIKES,
        help="model this device's allocator and optimizer path (default: each case's device)",
    )
    output.add_argument("--json", action="store_true", help="one JSON object per line and case")


def _row(case, device_like: str | None, *, strict: bool) -> dict:
    """The prediction of ``case`` as a row; skipped or error rows carry the reason.

    A case that cannot be predicted (ValueError: a peer package missing, compile, ...) is a
    skipped row; with ``strict`` (an ad hoc case, validated before any prediction) the
    ValueError itself.
    """
    at = case.memory_case()
    row = {
        "suite": case.suite, "group": case.group, "name": case.name, "model": case.model,
        "options": case.options,
        **{key: getattr(case, key) for key in TRANSFORM_FIELDS},
        "batch_size": at.batch_size,
        "image_size": at.image_size, "image_width": at.image_hw[1], "size": at.size_label,
        "precision": case.precision, "optimizer": case.optimizer, "loss": case.loss,
        "device_like": device_like or case.device_type,
        "predicted_mib": None, "memory": None, "top_modules": None, "seconds": None,
        "status": "ok", "reason": None,
    }
    reference = case.reference.get("reference_mib")
    if reference is not None:
        row["reference_mib"] = reference
    try:
        if not strict:
            validate_case(_as_validated(case, device_like), require_device=False)
        predicted = predict_case(case, device_like=device_like)
    except ValueError as error:
        if strict:
            raise
        return {**row, "status": "skipped", "reason": str(error)}
    except Exception as error:  # one case's failure is its row's, not the whole command's
        return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"}
    row.update(
        predicted_mib=predicted["predicted_mib"], memory=predicted["memory"],
        top_modules=predicted["top_modules"], seconds=predicted["seconds"],
    )
    if reference:
        row["ratio"] = predicted["predicted_mib"] / reference
    return row


def _as_validated(case, device_like: str | None):
    """The case as its prediction runs it: a CUDA-like prediction takes CUDA-only options
    (amp_fp16) whatever the case's device."""
    if device_like == "cuda" and case.device_type != "cuda":
        return dataclasses.replace(case, device="cuda")
    return case


def _print_details(row: dict) -> None:
    print(
        f"{row['name']}: batch {row['batch_size']}, {row['size']} px, {row['precision']}, "
        f"{row['optimizer']}, loss {row['loss']}, {row['device_like']}-like"
    )
    if row["status"] != "ok":
        print(f"  {row['status']}: {row['reason']}\n")
        return
    print(f"  predicted peak {row['predicted_mib']:.1f} MiB ({PEAK_LABEL})")
    for category, mib in row["memory"].items():
        print(f"    {category:<16} {mib:>10.1f} MiB")
    print("  modules holding the most activation memory at the end of the forward pass:")
    width = max((len(m["module"]) for m in row["top_modules"]), default=0)
    for module in row["top_modules"]:
        print(
            f"    {module['module']:<{width}}  {module['type']:<20} "
            f"{module['activation_mib']:>10.1f} MiB"
        )
    print(f"  predicted in {row['seconds']:.1f} s\n")


def _print_table(rows: list[dict]) -> None:
    headers = ("group", "case", "bs", "px", "predicted MiB", "reference MiB", "ratio", "s")
    lines = []
    for row in rows:
        ok = row["status"] == "ok"
        reference = row.get("reference_mib")
        lines.append((
            row["group"], row["name"], str(row["batch_size"]), row["size"],
            f"{row['predicted_mib']:.1f}" if ok else row["status"],
            f"{reference:.1f}" if reference else "-",
            f"{row['ratio']:.3f}" if ok and "ratio" in row else "-",
            f"{row['seconds']:.1f}" if ok else "-",
        ))
    print_table(headers, lines, left=2)
    print(f"\npredicted: {PEAK_LABEL}; ratio = predicted / reference")
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['status']}: {row['group']} / {row['name']}: {row['reason']}")


def run(args: argparse.Namespace) -> int:
    cases = suite_from_args(args).cases
    from_suite = is_suite(args.target)
    if not from_suite:
        for case in cases:
            validate_case(_as_validated(case, args.device_like), require_device=False)
    rows = []
    for case in cases:
        row = _row(case, args.device_like, strict=not from_suite)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        elif not from_suite:
            _print_details(row)
        elif sys.stderr.isatty():
            print(f"predicted {len(rows)}/{len(cases)}: {case.name}", file=sys.stderr)
    if from_suite and not args.json:
        _print_table(rows)
    return 1 if any(row["status"] == "error" for row in rows) else 0
