"""Check that model variants compute the same training step (float64 loss, gradients, stats).

``leanstep verify resnet50 --norm bn,inplace_abn --activation leaky_relu`` builds one model per
combination of the comma lists, gives each the first one's weights and compares one float64
step with the first's (``leanstep.bench.verify``). When the first variant is transformed
(``--lean``, ``--checkpoint``, ``--convert``), the untouched model is the reference. Exit
code 1 if a difference exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from leanstep.bench.cases import build_model
from leanstep.bench.suite import is_suite
from leanstep.bench.table import print_table
from leanstep.bench.validate import validate_case
from leanstep.bench.verify import TOLERANCE, verify_models
from leanstep.commands.case_args import add_case_arguments, suite_from_args

DEFAULT_BATCH_SIZE = 4
DEFAULT_IMAGE_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_arguments(parser)
    check = parser.add_argument_group("verification")
    check.add_argument(
        "--tolerance", type=float, default=TOLERANCE,
        help=f"largest relative difference accepted (default {TOLERANCE:g})",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the input and dropout masks")
    check.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.set_defaults(bs=str(DEFAULT_BATCH_SIZE), size=str(DEFAULT_IMAGE_SIZE))


def _same_shapes(cases) -> None:
    first = cases[0]
    for case in cases[1:]:
        for field in ("batch_size", "image_size", "in_channels", "num_classes"):
            if getattr(case, field) != getattr(first, field):
                raise ValueError(
                    f"verify compares variants on one input; {field} differs: "
                    f"{getattr(first, field)} ({first.name}) vs "
                    f"{getattr(case, field)} ({case.name})"
                )


def run(args: argparse.Namespace) -> int:
    if is_suite(args.target):
        raise ValueError("verify takes a model and variant options, not a suite file")
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {args.tolerance!r}")
    cases = list(suite_from_args(args).cases)
    if cases and cases[0].transformed:
        # --lean / --checkpoint / --convert: compared against the untouched model.
        first = cases[0]
        cases.insert(0, dataclasses.replace(
            first, lean=False, checkpoint=None, convert=None, convert_activation=None,
            name=f"{first.model} untouched"))
    if len(cases) < 2:
        raise ValueError(
            "verify needs at least two variants: give comma lists, e.g. --norm bn,inplace_abn"
        )
    _same_shapes(cases)
    for case in cases:
        validate_case(case, require_device=False)
    first = cases[0]
    result = verify_models(
        [(case.name, build_model(case)) for case in cases],
        batch_size=first.batch_size, image_size=first.image_size,
        in_channels=first.in_channels, seed=args.seed, tolerance=args.tolerance,
    )
    if args.json:
        print(json.dumps(result))
    else:
        _print_result(result, first)
    return 0 if result["passed"] else 1


def _worst_cells(worst: dict) -> tuple[str, str]:
    """The worst tensor's name ("-" when nothing differs) and its relative difference."""
    name = worst["name"] if worst["abs"] > 0 else "-"
    return name, f"{worst['rel']:.2e}"


def _print_result(result: dict, first) -> None:
    print(
        f"float64 training step, batch {first.batch_size}, {first.image_size} px; "
        f"against {result['reference']}; tolerance {result['tolerance']:g} (relative)"
    )
    headers = ("variant", "loss rel", "worst gradient", "grad rel", "worst buffer", "buffer rel",
               "")
    lines = []
    for label, variant in result["variants"].items():
        lines.append((
            label,
            f"{variant['loss']['rel']:.2e}",
            *_worst_cells(variant["gradients"]),
            *_worst_cells(variant["buffers"]),
            "ok" if variant["passed"] else "FAILED",
        ))
    print_table(headers, lines)
    print("rel = max |difference| / max |reference value|, per tensor; worst = largest rel")
    print("passed" if result["passed"] else "FAILED: a difference exceeds the tolerance")
