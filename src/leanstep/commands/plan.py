"""Choose per block among plain, lean, checkpointed (and InplaceABN): the fastest step that fits a
memory budget.

Every candidate's peak is predicted on fake tensors (``leanstep.planner``); the time estimate is
explained in the output. Exit codes: 0 a plan fits, 1 nothing fits (with the smallest
achievable peak and what dominates it), 2 bad input or a model that cannot be predicted.
"""

from __future__ import annotations

import argparse
import json
import sys

from leanstep.bench.predict import DEVICE_LIKES, PEAK_LABEL
from leanstep.bench.step import PRECISIONS
from leanstep.planner.step import OPTIMIZERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", metavar="MODEL",
        help="a model spec: resnet50, timm:NAME, torchvision:NAME, efficientnet_pytorch:NAME, "
        "package.module:callable",
    )
    step = parser.add_argument_group("the training step to plan for")
    step.add_argument("--memory", required=True, metavar="BUDGET",
                      help='memory budget, e.g. "16GiB", "16 GB", "800MiB"')
    step.add_argument("--bs", required=True, metavar="N", help="batch size")
    step.add_argument("--size", default="224", metavar="S|HxW",
                      help="input size in pixels: S (square) or HxW (default 224)")
    step.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)}")
    step.add_argument("--optimizer", default="sgd", choices=tuple(OPTIMIZERS),
                      help="optimizer whose state the step keeps (default sgd with momentum)")
    step.add_argument("--device-like", choices=DEVICE_LIKES,
                      help="model this device's allocator and optimizer path (default: --device)")
    step.add_argument("--norm", help="leanstep models: norm+activation layer (bn, abn, ...)")
    step.add_argument("--activation", help="leanstep models: activation name")
    step.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="any other model keyword (repeatable)")
    choose = parser.add_argument_group("choices")
    choose.add_argument("--blocks", metavar="NAME,...",
                        help="the blocks to choose for: module names or a class name "
                        "(default: found automatically)")
    choose.add_argument("--allow-activation-change", action="store_true",
                        help="offer InplaceABN where the activation is not invertible, "
                        "converting it to leaky_relu (outputs change)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="PLAN.json", help="write the plan (JSON) to this file")
    output.add_argument("--json", action="store_true", help="the result as one JSON object")
    output.add_argument("--no-max-batch", action="store_true",
                        help="skip the largest-batch searches (faster)")
    measure = parser.add_argument_group("measuring on this machine")
    measure.add_argument("--device", default="cpu", help="device for --calibrate and --measure")
    measure.add_argument("--calibrate", action="store_true",
                         help="time one plain step here and fit the time estimate to it")
    measure.add_argument("--measure", action="store_true",
                         help="run the plan and both baselines through leanstep bench "
                         "(fresh processes, interleaved) and print what they measure")
    measure.add_argument("--runs", type=int, default=4, help="--measure: timed runs (default 4)")
    measure.add_argument("--iters", type=int, default=2,
                         help="--measure: iterations per run (default 2)")
    measure.add_argument("--warmup", type=int, default=2, help="--measure: warm-up steps")
    measure.add_argument("--rounds", type=int, default=2,
                         help="--measure: interleaved rounds (default 2)")
    measure.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    measure.add_argument("--measure-out", metavar="FILE", help="--measure: results file")


def _case(args: argparse.Namespace, options: dict, batch_size: int, size: tuple[int, int]):
    """The case that validates the command line (model, options, sizes) as bench would."""
    from leanstep.bench.cases import Case

    precision = args.precision
    if precision == "amp_fp16" and not (args.calibrate or args.measure):
        precision = "amp_bf16"  # planned CUDA-like: only its element size matters here
    return Case(
        suite="plan", group="plan", name=args.target, model=args.target, options=options,
        batch_size=batch_size, image_size=min(size), device=args.device,
        precision=precision, threads=args.threads,
    )


def _options(args: argparse.Namespace) -> dict:
    from leanstep.commands.case_args import _parse_literal

    options: dict = {}
    if args.norm is not None:
        options["norm"] = args.norm
    if args.activation is not None:
        options["activation"] = args.activation
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        options[key.strip()] = _parse_literal(value.strip())
    for key, value in options.items():
        if isinstance(value, str) and "," in value:
            raise ValueError(f"plan takes one value per option, got {key}={value!r}")
    return options


def _check(args: argparse.Namespace) -> tuple[int, tuple[int, int], dict]:
    from leanstep.bench.max_batch import parse_budget
    from leanstep.bench.suite import is_suite
    from leanstep.bench.validate import validate_case
    from leanstep.planner.step import parse_input_size

    if is_suite(args.target):
        raise ValueError("plan takes one model, not a suite file")
    parse_budget(args.memory)
    try:
        batch_size = int(args.bs)
    except ValueError:
        raise ValueError(f"--bs must be one integer >= 1, got {args.bs!r}") from None
    if batch_size < 1:
        raise ValueError(f"--bs must be one integer >= 1, got {args.bs!r}")
    size = parse_input_size(args.size)
    if args.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {args.precision!r}; valid: {', '.join(PRECISIONS)}")
    for label, value in (("--runs", args.runs), ("--iters", args.iters),
                         ("--rounds", args.rounds)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.measure:
        from leanstep.planner import Plan
        from leanstep.planner.measure import check_measurable

        check_measurable(Plan(blocks=[], choices=[], model=args.target, input_size=size,
                              optimizer=args.optimizer))
    options = _options(args)
    case = _case(args, options, batch_size, size)
    validate_case(case, require_device=args.calibrate or args.measure)
    if (args.calibrate or args.measure) and args.precision == "amp_fp16" and \
            not str(args.device).startswith("cuda"):
        raise ValueError("precision 'amp_fp16' needs CUDA to measure; use --device cuda")
    return batch_size, size, options


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        print(f"plan: {message} ...", file=sys.stderr, flush=True)


def _rates(args, options: dict, batch_size: int, size: tuple[int, int], device_like: str):
    from leanstep.planner.cost import calibrate, default_rates

    if not args.calibrate:
        return default_rates(device_like)
    import torch

    from leanstep.bench.specs import build_from_spec
    from leanstep.planner.step import build_step

    if args.threads:
        torch.set_num_threads(args.threads)
    _progress(f"calibrating: timing plain steps on {args.device}")
    torch.manual_seed(0)
    model = build_from_spec(args.target, num_classes=1000, in_channels=3, options=options)
    step = build_step(model, batch_size=batch_size, input_size=size, device=args.device,
                      precision=args.precision, optimizer=args.optimizer)
    return calibrate(step)


def run(args: argparse.Namespace) -> int:
    from leanstep.planner import NothingFitsError, plan

    batch_size, size, options = _check(args)
    device_like = args.device_like or ("cuda" if str(args.device).startswith("cuda") else "cpu")
    rates = _rates(args, options, batch_size, size, device_like)
    try:
        result = plan(
            args.target, memory=args.memory, batch_size=batch_size, input_size=size,
            options=options, precision=args.precision, optimizer=args.optimizer,
            device_like=device_like, blocks=args.blocks,
            allow_activation_change=args.allow_activation_change, rates=rates,
            max_batch=not args.no_max_batch, progress=_progress,
        )
    except NothingFitsError as error:
        if args.json:
            print(json.dumps({"status": "nothing_fits", "message": str(error), **error.details}))
        else:
            print(f"leanstep plan: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        if "no blocks found" in str(error):
            raise ValueError(f"{error}; on the command line: --blocks NAME,...") from None
        raise
    if args.out:
        result.save(args.out)
    measured = None
    if args.measure:
        from leanstep.planner.measure import measure_plans

        measured, path = measure_plans(
            result, device=args.device, runs=args.runs, iters=args.iters, warmup=args.warmup,
            rounds=args.rounds, threads=args.threads, out_path=args.measure_out,
            progress=not args.json and sys.stderr.isatty(),
        )
        result.report["measured"] = {key: _measured(row) for key, row in measured.items()}
        result.report["measured_results"] = str(path)
    if args.json:
        print(json.dumps({"status": "ok", **result.to_dict()}))
    else:
        _print(args, result)
    return 0


def _measured(row: dict) -> dict:
    """A bench row's measured peak and step time: the median step, as every ratio of bench's
    reports (a mean is dragged by one stalled iteration)."""
    ok = row.get("status") == "ok"
    step_ms = row.get("step_ms_median") if ok else None
    return {"status": row.get("status"), "error": row.get("error"),
            "peak_mib": row.get("peak_mib") if ok else None, "step_ms": step_ms}


def _mib(value: float) -> str:
    if value < 1:
        return f"{value * 1024:.0f} KiB"
    if value < 100:
        return f"{value:.2f} MiB"
    return f"{value:.1f} MiB" if value < 10240 else f"{value / 1024:.2f} GiB"


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.1f} ms"


def _print(args: argparse.Namespace, result) -> None:
    from leanstep.bench.table import print_table
    from leanstep.planner.cost import ESTIMATE

    report = result.report
    budget = report["budget_mib"]
    height, width = result.input_size
    print(f"plan for {result.model}: batch {result.batch_size}, {height}x{width} px, "
          f"{result.precision}, {result.optimizer}, {result.device_like}-like; budget "
          f"{args.memory} ({_mib(budget)})")
    abn = f"; inplace_abn {report['inplace_abn']}" if report["inplace_abn"] else ""
    print(f"{len(result.blocks)} blocks ({result.blocks[0]} .. {result.blocks[-1]}); choices: "
          f"{', '.join(report['choices'])}{abn}")
    print(f"\nchosen: {result.describe()}")
    if result.activation:
        print(f"note: the InplaceABN blocks use {result.activation} in place of the model's "
              f"activation (--allow-activation-change): the model's outputs change")
    print()
    rows = [("plan", report["plan"]),
            ("every block lean", report["baselines"]["lean"]),
            ("every block checkpointed", report["baselines"]["checkpoint"]),
            ("plain (unchanged)", report["plain"])]
    measured = report.get("measured")
    headers = ["", "predicted peak", "of budget", "est. step", "slowdown", "max batch"]
    if measured:
        headers += ["measured peak", "measured step (median)"]
    lines = []
    for key, (label, figures) in zip(("plan", "lean", "checkpoint", "plain"), rows, strict=True):
        line = [label, _mib(figures["predicted_mib"]),
                f"{100 * figures['predicted_mib'] / budget:.0f}%",
                _seconds(figures["estimated_step_s"]), f"{figures['slowdown']:.2f}x",
                str(figures.get("max_batch", "-"))]
        if measured:
            row = measured.get(key)
            if row is None:
                line += ["-", "-"]
            elif row["status"] != "ok":
                line += [row["status"], "-"]
            else:
                line += [_mib(row["peak_mib"]), _seconds(row["step_ms"] / 1e3)]
        lines.append(tuple(line))
    print_table(headers, lines)
    plan_s = report["plan"]["estimated_step_s"]
    ckpt_s = report["baselines"]["checkpoint"]["estimated_step_s"]
    print(f"\nestimated: plan / every block checkpointed = {plan_s / ckpt_s:.2f}x")
    if measured and measured["plan"]["step_ms"] and measured["checkpoint"]["step_ms"]:
        ratio = measured["plan"]["step_ms"] / measured["checkpoint"]["step_ms"]
        print(f"measured:  plan / every block checkpointed = {ratio:.2f}x "
              f"(results: {report['measured_results']})")
    rates = report["estimate"]["rates"]
    print(f"\npredicted: {PEAK_LABEL}")
    print(f"{ESTIMATE}; F = {rates['flops'] / 1e9:.0f} GFLOP/s, B = {rates['bytes'] / 1e9:.1f} "
          f"GB/s, o = {rates['op'] * 1e6:.0f} us ({rates['source']})"
          + ("; scaled to the measured plain step" if rates["plain_step_s"] else ""))
    print("max batch: the largest batch whose predicted peak fits the budget with these choices")
    where = f"; plan written to {args.out}" if args.out else "; --out PLAN.json saves it"
    print(f"planned in {report['seconds']:.1f} s (CPU {report['cpu_seconds']:.1f} s){where}")
