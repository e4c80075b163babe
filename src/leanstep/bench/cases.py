"""Benchmark cases: what one measurement builds and runs, where cases come from, and their checks.

A case is one model with its options at one batch size, image size, device and precision. Cases
come from a suite file (TOML, see ``load_suite``) or from the command line, where comma lists
expand into one comparison group (``cases_from_args``). ``validate_case`` rejects every bad input
before anything runs, so a suite never fails half-way on a typo.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .specs import (
    MissingPackageError,
    build_from_spec,
    parse_spec,
    require_package,
    resolve_callable,
)
from .step import MODES, PRECISIONS, TrainStep

__all__ = [
    "Case",
    "MissingPackageError",
    "add_case_arguments",
    "build_model",
    "cases_from_args",
    "is_suite_path",
    "load_suite",
    "make_step",
    "validate_case",
]

DEVICES = ("cpu", "cuda")
DEFAULT_WARMUP = {"cpu": 5, "cuda": 2}

# Model keywords a suite may give as plain keys; any other goes in an `options` table.
MODEL_OPTION_KEYS = ("norm", "activation", "checkpoint", "pre_act", "drop_path_rate")
REFERENCE_KEYS = (
    "reference_ms",
    "reference_fwd_ms",
    "reference_bwd_ms",
    "reference_mib",
    "reference_imgs_per_sec",
)


@dataclass
class Case:
    """One benchmark case. ``warmup`` None: 5 on CPU, 2 on CUDA; ``threads`` None: all cores.

    ``memory_batch_size`` / ``memory_image_size`` (None: the timing ones) let the memory pass run
    at a larger input than the timing pass, so that activations dominate the peak where timing
    at that size would be too slow (VGG16 on a CPU).
    """

    suite: str
    group: str
    name: str
    model: str
    options: dict = field(default_factory=dict)
    batch_size: int = 32
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    mode: str = "train"
    runs: int = 10
    iters: int = 10
    warmup: int | None = None
    threads: int | None = None
    reference: dict = field(default_factory=dict)
    memory_batch_size: int | None = None
    memory_image_size: int | None = None
    index: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies a case in a results file: (suite, group, name)."""
        return (self.suite, self.group, self.name)

    @property
    def device_type(self) -> str:
        return str(self.device).split(":", 1)[0]

    def with_defaults(self) -> Case:
        """A copy with ``warmup`` and ``threads`` resolved for this machine."""
        warmup = self.warmup
        if warmup is None:
            warmup = DEFAULT_WARMUP.get(self.device_type, 2)
        threads = self.threads if self.threads is not None else available_cores()
        return dataclasses.replace(self, warmup=warmup, threads=threads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_model(case: Case) -> nn.Module:
    """The model ``case.model`` names, built with ``case.options``."""
    return build_from_spec(
        case.model, num_classes=case.num_classes, in_channels=case.in_channels,
        options=case.options,
    )


def make_step(case: Case, model: nn.Module | None = None) -> TrainStep:
    """The training step of ``case``; builds the model unless one is given."""
    if model is None:
        model = build_model(case)
    return TrainStep(
        model,
        batch_size=case.batch_size,
        image_size=case.image_size,
        in_channels=case.in_channels,
        device=case.device,
        precision=case.precision,
        channels_last=case.channels_last,
        mode=case.mode,
        compile=case.compile,
    )


# ---------------------------------------------------------------------------------------------
# Validation


def _check_int(label: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be an int >= {minimum}, got {value!r}")


def _check_choice(label: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {label} {value!r}; valid: {', '.join(allowed)}")


def _check_device(device: object, require_device: bool) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if kind == "cuda" and require_device and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but CUDA is not available (torch "
            f"{torch.__version__}); use --device cpu"
        )


class _SingleValuePerChannel(Exception):
    pass


def _check_runs_at(model: nn.Module, case: Case, batch_size: int, image_size: int) -> None:
    """Shape-check a forward pass on the meta device: no memory, no compute.

    Eval mode keeps data-dependent code paths (which meta tensors cannot run) out of the way; a
    hook on every BatchNorm stands in for training mode's "more than 1 value per channel" check.
    """

    def check_values(module, inputs):
        x = inputs[0]
        if x.dim() >= 2 and x.numel() // max(x.shape[1], 1) <= 1:
            raise _SingleValuePerChannel(type(module).__name__)

    hooks = []
    if case.mode == "train":
        hooks = [
            m.register_forward_pre_hook(check_values)
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
    model.eval()
    x = torch.ones(batch_size, case.in_channels, image_size, image_size, device="meta")
    try:
        with torch.no_grad():
            model(x)
    except _SingleValuePerChannel as error:
        raise ValueError(
            f"image size {image_size} is too small for {case.model} at batch size {batch_size}: "
            f"{error} would see one value per channel in training"
        ) from None
    except NotImplementedError:
        return
    except RuntimeError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if "meta" in message.lower():
            return
        raise ValueError(
            f"image size {image_size} is too small for {case.model}: {message}"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()


def validate_case(case: Case, *, require_device: bool = True) -> None:
    """Raise ValueError for anything that would make ``case`` fail before it measures.

    Checks numbers, device (CUDA present unless ``require_device=False``), precision, mode, the
    norm/activation pair, the model spec and its options (by building the model on the meta
    device) and that the image is large enough. MissingPackageError (a ValueError) when a peer
    package is not installed. A ``package.module:callable`` is imported but not called: what it
    does when called is the case's own business, recorded as that case's error.
    """
    _check_int("batch size", case.batch_size, 1)
    _check_int("image size", case.image_size, 1)
    _check_int("in_channels", case.in_channels, 1)
    _check_int("num_classes", case.num_classes, 1)
    _check_int("runs", case.runs, 1)
    _check_int("iters", case.iters, 1)
    if case.warmup is not None:
        _check_int("warmup", case.warmup, 0)
    if case.threads is not None:
        _check_int("threads", case.threads, 1)
    for label in ("memory_batch_size", "memory_image_size"):
        if getattr(case, label) is not None:
            _check_int(label.replace("_", " "), getattr(case, label), 1)
    _check_device(case.device, require_device)
    _check_choice("precision", case.precision, PRECISIONS)
    _check_choice("mode", case.mode, MODES)
    if case.precision == "amp_fp16" and case.device_type != "cuda":
        raise ValueError("precision 'amp_fp16' needs CUDA; use 'amp_bf16' or 'fp32' on CPU")
    if not isinstance(case.options, dict):
        raise ValueError(f"options must be a table of model keywords, got {case.options!r}")
    spec = parse_spec(case.model)
    if spec.is_callable:
        resolve_callable(spec)
        return
    if spec.kind == "leanstep" and "norm" in case.options and "activation" in case.options:
        from leanstep.layers import check_norm_activation

        check_norm_activation(case.options["norm"], case.options["activation"])
    if spec.kind != "leanstep":
        require_package(spec.kind)
    try:
        with torch.device("meta"):
            model = build_model(case)
    except TypeError as error:
        raise ValueError(f"bad option for model {case.model!r}: {error}") from None
    except ImportError as error:
        raise ValueError(f"cannot build model {case.model!r}: {error}") from None
    batch_sizes = [case.batch_size, case.memory_batch_size or case.batch_size]
    image_sizes = [case.image_size, case.memory_image_size or case.image_size]
    _check_runs_at(model, case, min(batch_sizes), min(image_sizes))


# ---------------------------------------------------------------------------------------------
# Suites (TOML)

_CASE_KEYS = (
    "model",
    "batch_size",
    "image_size",
    "in_channels",
    "num_classes",
    "device",
    "precision",
    "channels_last",
    "compile",
    "mode",
    "runs",
    "iters",
    "warmup",
    "threads",
    "memory_batch_size",
    "memory_image_size",
    "options",
    *MODEL_OPTION_KEYS,
    *REFERENCE_KEYS,
)
_SUITE_KEYS = ("name", "description", "rounds", "timeout", "defaults", "group")
_GROUP_KEYS = ("name", "description", "case", *_CASE_KEYS)
_CASE_ENTRY_KEYS = ("name", *_CASE_KEYS)


def _check_keys(table: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown suite key {key!r}{hint} in {where}; allowed: {', '.join(allowed)}"
            )


def _case_from_entry(suite: str, group: str, entry: dict, index: int) -> Case:
    values = dict(entry)
    name = values.pop("name")
    options = dict(values.pop("options", {}))
    for key in MODEL_OPTION_KEYS:
        if key in values:
            options[key] = values.pop(key)
    if options.get("checkpoint") == "none":
        options["checkpoint"] = None
    reference = {key: values.pop(key) for key in REFERENCE_KEYS if key in values}
    if "model" not in values:
        raise ValueError(f"case {name!r} of group {group!r} names no model")
    return Case(
        suite=suite, group=group, name=name, options=options, reference=reference,
        index=index, **values,
    )


def _toml_reader():
    """tomllib (Python 3.11+), or its backport tomli on Python 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError(
                "reading suite files needs Python 3.11+ or `pip install tomli`"
            ) from None
    return tomllib


def _table(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"'options' of {where} must be a table of model keywords, got {value!r}")
    return value


def load_suite(path: str | Path) -> list[Case]:
    """The cases of a suite file, in file order.

    Layout: top-level ``name``, ``description``, ``rounds``, ``timeout``, a ``[defaults]`` table of
    case keys, and ``[[group]]`` tables (``name``, case keys as the group's defaults) each with
    ``[[group.case]]`` tables (``name`` and case keys). Case keys: the Case fields, the model
    options norm, activation, checkpoint, pre_act, drop_path_rate, an ``options`` table for any
    other model keyword, and reference_* figures.
    """
    return load_suite_file(path)[0]


def load_suite_file(path: str | Path) -> tuple[list[Case], dict]:
    """The cases of a suite file and its settings (``name``, ``rounds``, ``timeout``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"suite file {str(path)!r} not found")
    tomllib = _toml_reader()
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"suite file {str(path)!r} is not valid TOML: {error}") from None
    _check_keys(data, _SUITE_KEYS, f"suite {path.name}")
    suite = data.get("name", path.stem)
    defaults = data.get("defaults", {})
    _check_keys(defaults, _CASE_KEYS, f"[defaults] of suite {path.name}")
    groups = data.get("group", [])
    if not groups:
        raise ValueError(f"suite {path.name} has no [[group]]")
    cases: list[Case] = []
    for group_index, group in enumerate(groups):
        group_name = group.get("name", f"group {group_index + 1}")
        _check_keys(group, _GROUP_KEYS, f"group {group_name!r}")
        group_defaults = {k: v for k, v in group.items() if k in _CASE_KEYS}
        seen = set()
        for case_index, entry in enumerate(group.get("case", [])):
            name = entry.get("name", f"case {case_index + 1}")
            _check_keys(entry, _CASE_ENTRY_KEYS, f"case {name!r} of group {group_name!r}")
            if name in seen:
                raise ValueError(f"case name {name!r} appears twice in group {group_name!r}")
            seen.add(name)
            merged = {**defaults, **group_defaults, **entry, "name": name}
            merged["options"] = {
                **_table(defaults.get("options", {}), "[defaults]"),
                **_table(group_defaults.get("options", {}), f"group {group_name!r}"),
                **_table(entry.get("options", {}), f"case {name!r}"),
            }
            cases.append(_case_from_entry(suite, group_name, merged, len(cases)))
    settings = {key: data[key] for key in ("rounds", "timeout") if key in data}
    settings["name"] = suite
    return cases, settings


def is_suite_path(target: str) -> bool:
    """Whether the MODEL_OR_SUITE argument names a suite file rather than a model."""
    return target.endswith(".toml") or Path(target).is_file()


# ---------------------------------------------------------------------------------------------
# Command-line cases

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The case options shared by bench, predict, max-batch and verify.

    Model options, --bs, --size, --precision and --mode take comma lists; an ad hoc run expands
    them into one comparison group (every combination). With a suite file, the scalar options
    override every case of the suite.
    """
    parser.add_argument(
        "target", metavar="MODEL_OR_SUITE",
        help="a model spec (resnet50, timm:NAME, torchvision:NAME, efficientnet_pytorch:NAME, "
        "package.module:callable; comma list for several) or a suite file (suites/*.toml)",
    )
    group = parser.add_argument_group("case options (comma lists compare variants)")
    group.add_argument("--norm", help="norm+activation layer: bn, abn, inplace_abn, ...")
    group.add_argument("--activation", help="activation name (see `leanstep list activations`)")
    group.add_argument("--checkpoint", help="none, blocks, or N (segments of N blocks)")
    group.add_argument(
        "--pre-act", nargs="?", const="true", metavar="BOOL",
        help="VGG: norm+act before conv (true/false)",
    )
    group.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="any other model keyword (repeatable; VALUE may be a comma list)",
    )
    group.add_argument("--bs", help="batch size")
    group.add_argument("--size", help="image size in pixels (square)")
    group.add_argument("--precision", help=f"one of {', '.join(PRECISIONS)}")
    group.add_argument("--mode", help="train (full step) or infer (eval, no_grad forward)")
    group.add_argument("--device", help="cpu or cuda")
    group.add_argument(
        "--channels-last", action="store_const", const=True, default=None,
        help="channels_last memory format",
    )
    group.add_argument(
        "--compile", action="store_const", const=True, default=None, help="torch.compile the model"
    )
    group.add_argument("--runs", type=int, help="timed runs (default 10)")
    group.add_argument("--iters", type=int, help="iterations per run (default 10)")
    group.add_argument("--warmup", type=int, help="warm-up steps (default 5 on CPU, 2 on CUDA)")
    group.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    group.add_argument(
        "--group", action="append", metavar="NAME",
        help="ad hoc: the comparison group's name; suite: run only this group (repeatable)",
    )


def _split(text: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",")]
    if not all(items):
        raise ValueError(f"empty item in comma list {text!r}")
    return items


def _parse_bool(text: str, label: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{label} must be true or false, got {text!r}")


def _parse_int(text: str, label: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{label} must be an integer, got {text!r}") from None


def _parse_checkpoint(text: str) -> None | str | int:
    if text.lower() == "none":
        return None
    return int(text) if re.fullmatch(r"-?\d+", text) else text


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


def _variant_axes(args: argparse.Namespace) -> list[tuple[str, str, list]]:
    """(label, destination, values) for every option given on the command line."""
    axes = []
    if args.norm is not None:
        axes.append(("norm", "option:norm", _split(args.norm)))
    if args.activation is not None:
        axes.append(("activation", "option:activation", _split(args.activation)))
    if args.checkpoint is not None:
        values = [_parse_checkpoint(v) for v in _split(args.checkpoint)]
        axes.append(("checkpoint", "option:checkpoint", values))
    if args.pre_act is not None:
        values = [_parse_bool(v, "--pre-act") for v in _split(args.pre_act)]
        axes.append(("pre_act", "option:pre_act", values))
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        key = key.strip()
        axes.append((key, f"option:{key}", [_parse_literal(v) for v in _split(value)]))
    if args.bs is not None:
        axes.append(("bs", "batch_size", [_parse_int(v, "--bs") for v in _split(args.bs)]))
    if args.size is not None:
        axes.append(("size", "image_size", [_parse_int(v, "--size") for v in _split(args.size)]))
    if args.precision is not None:
        axes.append(("precision", "precision", _split(args.precision)))
    if getattr(args, "mode", None) is not None:
        axes.append(("mode", "mode", _split(args.mode)))
    return axes


def _scalar_overrides(args: argparse.Namespace) -> dict:
    overrides = {}
    for attribute, field_name in (
        ("device", "device"), ("runs", "runs"), ("iters", "iters"), ("warmup", "warmup"),
        ("threads", "threads"), ("channels_last", "channels_last"), ("compile", "compile"),
    ):
        value = getattr(args, attribute, None)
        if value is not None:
            overrides[field_name] = value
    return overrides


def _suite_cases(args: argparse.Namespace) -> list[Case]:
    cases = load_suite(args.target)
    for label, flag in (
        ("norm", "--norm"), ("activation", "--activation"), ("checkpoint", "--checkpoint"),
        ("pre_act", "--pre-act"),
    ):
        if getattr(args, label, None) is not None:
            raise ValueError(f"{flag} applies to a model, not to a suite; edit the suite file")
    if getattr(args, "option", None):
        raise ValueError("--option applies to a model, not to a suite; edit the suite file")
    overrides = _scalar_overrides(args)
    for attribute, field_name, parse in (
        ("bs", "batch_size", lambda v: _parse_int(v, "--bs")),
        ("size", "image_size", lambda v: _parse_int(v, "--size")),
        ("precision", "precision", str), ("mode", "mode", str),
    ):
        value = getattr(args, attribute, None)
        if value is None:
            continue
        values = _split(value)
        if len(values) != 1:
            raise ValueError(f"a suite takes one value for --{attribute}, got {value!r}")
        overrides[field_name] = parse(values[0])
    if "batch_size" in overrides or "image_size" in overrides:
        overrides.update(memory_batch_size=None, memory_image_size=None)
    cases = [dataclasses.replace(case, **overrides) for case in cases]
    if getattr(args, "group", None):
        wanted = {name.strip().lower() for name in args.group}
        names = list(dict.fromkeys(case.group for case in cases))
        unknown = wanted - {name.lower() for name in names}
        if unknown:
            raise ValueError(
                f"unknown group(s) {', '.join(repr(n) for n in sorted(unknown))}; groups: "
                f"{', '.join(repr(n) for n in names)}"
            )
        cases = [case for case in cases if case.group.lower() in wanted]
    return cases


def _adhoc_cases(args: argparse.Namespace) -> list[Case]:
    models = _split(args.target)
    axes = _variant_axes(args)
    overrides = _scalar_overrides(args)
    suite = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.target).strip("-") or "adhoc"
    groups = getattr(args, "group", None) or [args.target]
    if len(groups) > 1:
        raise ValueError(f"an ad hoc run is one group; got --group {' and '.join(groups)}")
    group = groups[0]
    cases = []
    for model in models:
        for combination in itertools.product(*(values for _, _, values in axes)):
            options: dict = {}
            fields: dict = {}
            label_parts = [model]
            for (label, destination, values), value in zip(axes, combination, strict=True):
                if destination.startswith("option:"):
                    options[destination.split(":", 1)[1]] = value
                else:
                    fields[destination] = value
                if len(values) > 1:
                    shown = "none" if value is None else value
                    label_parts.append(f"{label}={shown}")
            cases.append(
                Case(
                    suite=suite, group=group, name=" ".join(str(p) for p in label_parts),
                    model=model, options=options, index=len(cases), **{**fields, **overrides},
                )
            )
    return cases


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    """The cases that the parsed command line asks for (suite file or ad hoc model), with
    warm-up and threads resolved. Not validated: call ``validate_case`` on each."""
    target = args.target
    cases = _suite_cases(args) if is_suite_path(target) else _adhoc_cases(args)
    if not cases:
        raise ValueError(f"{target!r} gives no cases")
    names = [case.key for case in cases]
    duplicates = sorted({key[2] for key in names if names.count(key) > 1})
    if duplicates:
        raise ValueError(f"the same case twice: {', '.join(duplicates)}")
    return [case.with_defaults() for case in cases]
