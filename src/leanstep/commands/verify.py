"""Check that model variants compute the same training step (loss, gradients, statistics).

``leanstep verify resnet50 --norm bn,inplace_abn --activation leaky_relu`` builds one model per
combination of the comma lists, gives each the first one's weights and compares one float64
step with the first's (``leanstep.bench.verify``). ``--precision`` runs each variant in the named
precision, and ``--mode``, ``--channels-last``, ``--compile``, ``--optimizer`` and ``--loss`` as
they say, each compared with the float64 eager step of the first variant at a tolerance that
scales with the precision. When the first variant is transformed (``--lean``,
``--checkpoint``, ``--convert``), the untouched model is the reference (where ``--convert``
replaces the activation, the same conversion with ABN for InplaceABN: the activation asked for,
BatchNorm's own maths). Exit code 1 if a difference exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from leanstep.bench.cases import build_model
from leanstep.bench.suite import is_suite
from leanstep.bench.table import print_table
from leanstep.bench.validate import validate_case
from leanstep.bench.verify import TOLERANCES, StepSettings, verify_models
from leanstep.commands.case_args import add_case_arguments, suite_from_args
from leanstep.transforms.convert import inplace_abn_as_abn

DEFAULT_BATCH_SIZE = 4
DEFAULT_IMAGE_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_arguments(parser)
    check = parser.add_argument_group("verification")
    defaults = ", ".join(f"{name} {value:g}" for name, value in TOLERANCES.items())
    check.add_argument(
        "--tolerance", type=float, default=None,
        help=f"largest relative difference accepted (default by precision: {defaults}; "
        "float64 without --precision)",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the input and dropout masks")
    check.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.set_defaults(bs=str(DEFAULT_BATCH_SIZE), size=str(DEFAULT_IMAGE_SIZE))


def _same_shapes(cases) -> None:
    first = cases[0]
    for case in cases[1:]:
        for field in ("batch_size", "image_hw", "in_channels", "num_classes"):
            if getattr(case, field) != getattr(first, field):
                raise ValueError(
                    f"verify compares variants on one input; {field} differs: "
                    f"{getattr(first, field)} ({first.name}) vs "
                    f"{getattr(case, field)} ({case.name})"
                )


def _refuse_timing_options(args: argparse.Namespace) -> None:
    """verify runs one step on the CPU: the timing and device options have nothing to do."""
    for flag in ("runs", "iters", "warmup"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag} times a benchmark; verify runs one step: drop it")
    device = getattr(args, "device", None)
    if device is not None and str(device) != "cpu":
        raise ValueError(
            f"verify compares steps on the CPU against a float64 reference; drop --device "
            f"{device}"
        )


def _settings(case, explicit_precision: bool) -> StepSettings:
    """The case's step as verify runs it: float64 unless ``--precision`` was given."""
    return StepSettings(
        precision=case.precision if explicit_precision else "fp64", mode=case.mode,
        channels_last=case.channels_last, compile=case.compile, optimizer=case.optimizer,
        loss=case.loss,
    )


def _reference(first):
    """(case, build) of the reference for a transformed first variant (--lean, --checkpoint,
    --convert): the untouched model; where --convert replaces the activation (asked for by
    name), the first variant's conversion without lean or checkpointing, its InplaceABN layers
    as ABN (the same layers, the same activation, BatchNorm's own maths), so that what is
    checked is the memory saving, not the change asked for."""
    if first.convert_activation is None:
        return dataclasses.replace(first, lean=False, checkpoint=None, convert=None,
                                   convert_activation=None,
                                   name=f"{first.model} untouched"), build_model
    case = dataclasses.replace(
        first, lean=False, checkpoint=None,
        name=f"{first.model} untouched but for activation {first.convert_activation}")
    return case, lambda case: inplace_abn_as_abn(build_model(case))


def run(args: argparse.Namespace) -> int:
    if is_suite(args.target):
        raise ValueError("verify takes a model and variant options, not a suite file")
    if args.tolerance is not None and not args.tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {args.tolerance!r}")
    _refuse_timing_options(args)
    cases = list(suite_from_args(args).cases)
    builds = [build_model] * len(cases)
    if cases and cases[0].transformed:
        reference, build = _reference(cases[0])
        cases.insert(0, reference)
        builds.insert(0, build)
    settings = [_settings(case, args.precision is not None) for case in cases]
    for case in cases:
        validate_case(case, require_device=False)
    if len(cases) < 2 and settings[0].is_reference:
        raise ValueError(
            "verify needs at least two variants: give comma lists, e.g. --norm bn,inplace_abn "
            "(or one variant in another --precision, --mode, --channels-last or --compile)"
        )
    _same_shapes(cases)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    first = cases[0]
    result = verify_models(
        [(case.name, build(case)) for case, build in zip(cases, builds, strict=True)],
        batch_size=first.batch_size, image_size=first.image_hw,
        in_channels=first.in_channels, num_classes=first.num_classes, seed=args.seed,
        tolerance=args.tolerance, settings=settings,
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
        f"one training step, batch {first.batch_size}, {first.size_label} px; against the "
        f"float64 step of {result['reference']}"
    )
    headers = ("variant", "precision", "tolerance", "loss rel", "output rel", "worst gradient",
               "grad rel", "worst buffer", "buffer rel", "params after step", "")
    lines = []
    for label, variant in result["variants"].items():
        lines.append((
            label, variant["precision"], f"{variant['tolerance']:g}",
            f"{variant['loss']['rel']:.2e}", f"{variant['output']['rel']:.2e}",
            *_worst_cells(variant["gradients"]),
            *_worst_cells(variant["buffers"]),
            f"{variant['parameters']['rel']:.2e}",
            "ok" if variant["passed"] else "FAILED",
        ))
    print_table(headers, lines)
    metrics = {variant["metric"] for variant in result["variants"].values()}
    if "max" in metrics:
        print("fp64: rel = max |difference| / max |reference value|, per tensor; worst = largest")
    if "l2" in metrics:
        print("fp32: rel = L2 norm of the differences / that of the reference, per group; "
              "worst = largest contribution")
    print("passed" if result["passed"] else "FAILED: a difference exceeds the tolerance")
