"""The case options shared by bench, predict, max-batch and verify: argparse to a ``Suite``.

Every case option is one ``Axis`` below: its flag, the Case field (or model keyword,
``option:KEY``) it sets and how its text parses. Axes take comma lists; an ad hoc run expands
them into one comparison group (every combination), a suite takes one value to override every
case (where ``suite`` is true). Nothing outside ``leanstep.commands`` sees argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from leanstep.bench.cases import Case
from leanstep.bench.step import LOSSES, MODES, OPTIMIZERS, PRECISIONS
from leanstep.bench.suite import Suite, is_suite, load_suite

__all__ = ["AXES", "SCALARS", "Axis", "add_case_arguments", "split_list", "suite_from_args"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def split_list(text: str) -> list[str]:
    """The items of a comma list; ValueError for an empty item."""
    items = [item.strip() for item in str(text).split(",")]
    if not all(items):
        raise ValueError(f"empty item in comma list {text!r}")
    return items


def parse_bool(text: str, label: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{label} must be true or false, got {text!r}")


def parse_int(text: str, label: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{label} must be an integer, got {text!r}") from None


def _parse_checkpoint(text: str, label: str) -> None | str | int:
    if text.lower() == "none":
        return None
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _parse_none_or_text(text: str, label: str) -> str | None:
    return None if text.lower() in ("none", "off") else text


def _parse_literal(text: str) -> object:
    lowered = text.lower()
    if lowered == "none":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _text(text: str, label: str) -> str:
    return text


def parse_size(text: str, label: str) -> tuple[int, int | None]:
    """``S`` (square) or ``HxW``: (height, width), width None for a square image."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if match is None:
        raise ValueError(f"{label} takes S or HxW (pixels, e.g. 224 or 512x1024), got {text!r}")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) is not None else None
    return (height, None if width == height else width)


def _shown(value: object) -> str:
    """How a case name shows an option's value."""
    if value is None:
        return "none"
    if isinstance(value, tuple):  # an image size
        height, width = value
        return str(height) if width is None else f"{height}x{width}"
    return str(value)


@dataclass(frozen=True)
class Axis:
    """A case option that takes a comma list: ``--flag A,B`` compares A and B.

    ``target``: a Case field, a tuple of Case fields (``parse`` then returns one value each), or
    ``option:KEY`` for a model keyword; ``label``: how case names show the value; ``suite``:
    whether it may override a suite's cases (one value).
    """

    flag: str
    target: str | tuple[str, ...]
    parse: Callable[[str, str], object]
    help: str
    label: str
    suite: bool = False
    nargs: str | None = None
    const: str | None = None
    show: Callable[[object], str] | None = None


def _parse_plan(text: str, label: str) -> dict | None:
    """A plan file (``leanstep plan --out``) as a Case's plan, or None for "none"."""
    if text.lower() == "none":
        return None
    from leanstep.planner import Plan

    plan = Plan.load(text)
    return {**plan.to_dict(), "report": {}, "source": text}


def _show_plan(value: object) -> str:
    return "none" if value is None else str(value.get("source") or "plan")


AXES = (
    Axis("--norm", "option:norm", _text, "norm+activation layer: bn, abn, inplace_abn, ...",
         "norm"),
    Axis("--activation", "option:activation", _text,
         "activation name (see `leanstep list activations`): a zoo model's activation; with "
         "--convert, the converted layers' activation (any model)", "activation"),
    Axis("--checkpoint", "checkpoint", _parse_checkpoint,
         "none, blocks, or N (segments of N blocks) recomputed in backward (any model)",
         "checkpoint"),
    Axis("--lean", "lean", parse_bool,
         "on/off: keep conv/linear outputs, recompute cheap ops in backward (any model, exact)",
         "lean", nargs="?", const="on", show=lambda value: "on" if value else "off"),
    Axis("--convert", "convert", _parse_none_or_text,
         "none, abn or inplace_abn: BatchNorm+activation -> leanstep's fused layer (any model)",
         "convert"),
    Axis("--pre-act", "option:pre_act", parse_bool, "VGG: norm+act before conv (true/false)",
         "pre_act", nargs="?", const="true"),
    Axis("--bs", "batch_size", parse_int, "batch size", "bs", suite=True),
    Axis("--size", ("image_size", "image_width"), parse_size,
         "image size in pixels: S (square) or HxW, e.g. 512x1024", "size", suite=True),
    Axis("--precision", "precision", _text, f"one of {', '.join(PRECISIONS)}", "precision",
         suite=True),
    Axis("--mode", "mode", _text, f"{' or '.join(MODES)}: full step, or eval no_grad forward",
         "mode", suite=True),
    Axis("--optimizer", "optimizer", _text,
         f"one of {', '.join(OPTIMIZERS)} (default sgd: momentum 0.9)", "optimizer",
         suite=True),
    Axis("--loss", "loss", _text,
         f"one of {', '.join(LOSSES)}: output.mean() (default), or cross entropy against "
         "random class targets", "loss", suite=True),
    Axis("--plan", "plan", _parse_plan, "a plan file from `leanstep plan --out` (none: plain)",
         "plan", show=_show_plan),
)

# Options with one value that apply to every case (ad hoc or suite): (flag, Case field, type).
SCALARS = (
    ("--device", "device", str, "cpu or cuda"),
    ("--runs", "runs", int, "timed runs (default 10)"),
    ("--iters", "iters", int, "iterations per run (default 10)"),
    ("--warmup", "warmup", int, "warm-up steps (default 5 on CPU, 2 on CUDA)"),
    ("--threads", "threads", int, "torch threads (default: all cores)"),
)
FLAGS = (
    ("--channels-last", "channels_last", "channels_last memory format"),
    ("--compile", "compile", "torch.compile the model"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The MODEL_OR_SUITE argument and every case option."""
    parser.add_argument(
        "target", metavar="MODEL_OR_SUITE",
        help="a model spec (resnet50, timm:NAME, torchvision:NAME, efficientnet_pytorch:NAME, "
        "package.module:callable; comma list for several), a shipped suite's name "
        "(`leanstep list suites`) or a suite file (*.toml)",
    )
    group = parser.add_argument_group("case options (comma lists compare variants)")
    for axis in AXES:
        extra = {"nargs": axis.nargs, "const": axis.const} if axis.nargs else {}
        group.add_argument(axis.flag, dest=_dest(axis.flag), help=axis.help, **extra)
    group.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="any other model keyword (repeatable; VALUE may be a comma list)",
    )
    for flag, _, kind, text in SCALARS:
        group.add_argument(flag, dest=_dest(flag), type=kind, help=text)
    for flag, _, text in FLAGS:
        group.add_argument(flag, dest=_dest(flag), action="store_const", const=True,
                           default=None, help=text)
    group.add_argument(
        "--group", action="append", metavar="NAME",
        help="ad hoc: the comparison group's name; suite: run only this group (repeatable)",
    )


def _axes(args: argparse.Namespace) -> list[tuple[Axis | None, str, str, list]]:
    """(axis, label, target, values) for every comma-list option given."""
    given = []
    for axis in AXES:
        text = getattr(args, _dest(axis.flag), None)
        if text is not None:
            values = [axis.parse(value, axis.flag) for value in split_list(text)]
            given.append((axis, axis.label, axis.target, values))
    for item in getattr(args, "option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        key = key.strip()
        given.append((None, key, f"option:{key}", [_parse_literal(v) for v in split_list(value)]))
    return given


def _scalar_overrides(args: argparse.Namespace) -> dict:
    overrides = {}
    for flag, field_name, *_ in (*SCALARS, *FLAGS):
        value = getattr(args, _dest(flag), None)
        if value is not None:
            overrides[field_name] = value
    return overrides


def _suite(args: argparse.Namespace) -> Suite:
    suite = load_suite(args.target)
    overrides = _scalar_overrides(args)
    for axis, _, target, values in _axes(args):
        flag = axis.flag if axis else "--option"
        if axis is None or not axis.suite:
            raise ValueError(f"{flag} applies to a model, not to a suite; edit the suite file")
        if len(values) != 1:
            raise ValueError(f"a suite takes one value for {flag}, got {len(values)}")
        _assign(target, values[0], overrides, overrides)
    if "batch_size" in overrides or "image_size" in overrides:
        overrides.update(memory_batch_size=None, memory_image_size=None)
    suite = suite.replace(
        cases=tuple(dataclasses.replace(case, **overrides) for case in suite.cases)
    )
    if getattr(args, "group", None):
        suite = suite.only_groups(args.group)
    return suite


def _assign(target, value, options: dict, fields: dict) -> None:
    """Set what ``target`` names (model keyword, field or fields) to ``value``."""
    if isinstance(target, tuple):
        fields.update(zip(target, value, strict=True))
    elif target.startswith("option:"):
        options[target.split(":", 1)[1]] = value
    else:
        fields[target] = value


def _adhoc_name(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", target).lstrip("-.").rstrip("-") or "adhoc"


def _adhoc(args: argparse.Namespace) -> Suite:
    models = split_list(args.target)
    axes = _axes(args)
    overrides = _scalar_overrides(args)
    suite = _adhoc_name(args.target)
    groups = getattr(args, "group", None) or [args.target]
    if len(groups) > 1:
        raise ValueError(f"an ad hoc run is one group; got --group {' and '.join(groups)}")
    activation_given = getattr(args, "activation", None) is not None
    cases = []
    for model in models:
        for combination in itertools.product(*(values for *_, values in axes)):
            options: dict = {}
            fields: dict = {}
            label_parts = [model]
            for (axis, label, target, values), value in zip(axes, combination, strict=True):
                _assign(target, value, options, fields)
                if len(values) > 1:
                    shown = axis.show(value) if axis and axis.show else _shown(value)
                    label_parts.append(f"{label}={'none' if shown is None else shown}")
            if fields.get("convert") is not None and activation_given:
                # With --convert, --activation is the converted layers' activation.
                fields["convert_activation"] = options.pop("activation")
            cases.append(Case(
                suite=suite, group=groups[0], name=" ".join(str(p) for p in label_parts),
                model=model, options=options, index=len(cases), **{**fields, **overrides},
            ))
    return Suite(name=suite, cases=tuple(cases), source=args.target)


def suite_from_args(args: argparse.Namespace) -> Suite:
    """The suite that the parsed command line asks for: a suite (file or shipped name) with
    the command line's overrides, or an ad hoc group of one model's variants. Cases are not
    validated: call ``validate_case`` on each."""
    suite = _suite(args) if is_suite(args.target) else _adhoc(args)
    return suite.replace(cases=tuple(case.with_defaults() for case in suite.cases))
