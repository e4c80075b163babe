"""Checks of a benchmark case before anything runs, so a suite never fails half-way on a typo.

Each check raises ValueError with one line naming the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from .cases import DEVICES, Case, build_model
from .specs import MissingPackageError, parse_spec, require_package, resolve_callable
from .step import LOSSES, MODES, OPTIMIZERS, PRECISIONS

__all__ = ["MAX_INT", "MissingPackageError", "check_int", "validate_case"]

# Largest count a case accepts (batch, image size, runs, ...): beyond it torch's int64 shape
# arithmetic overflows long before any step could run.
MAX_INT = 2**31 - 1


def check_int(label: str, value: object, minimum: int, maximum: int = MAX_INT) -> None:
    """ValueError unless ``value`` is an int in [minimum, maximum] (bool is not an int here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be an int >= {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{label} must be an int <= {maximum}, got {value!r}")


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


def _check_runs_at(
    model: nn.Module, case: Case, batch_size: int, image_hw: tuple[int, int]
) -> None:
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
    height, width = image_hw
    image_size = str(height) if height == width else f"{height}x{width}"
    x = torch.ones(batch_size, case.in_channels, height, width, device="meta")
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


def _check_transforms(case: Case) -> None:
    """The transform fields: lean true/false, checkpoint None/"blocks"/N, convert a known norm,
    convert_activation only with convert, and no plan with them (a plan chooses per block)."""
    from leanstep.layers.activations import canonical_activation
    from leanstep.transforms.convert import CONVERT_NORMS

    if not isinstance(case.lean, bool):
        raise ValueError(f"lean must be true or false, got {case.lean!r}")
    checkpoint = case.checkpoint
    if checkpoint is not None and checkpoint != "blocks" and not (
            isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 1):
        raise ValueError(f"checkpoint {checkpoint!r} is not allowed; use none, blocks or an int "
                         f">= 1 (blocks per recomputed segment)")
    if case.convert is not None:
        _check_choice("convert", case.convert, CONVERT_NORMS)
    if case.convert_activation is not None:
        if case.convert is None:
            raise ValueError(f"convert_activation {case.convert_activation!r} is the activation "
                             f"of converted layers; give convert (abn or inplace_abn) with it")
        canonical_activation(case.convert_activation)
    if case.plan is not None and case.transformed:
        raise ValueError("a plan already chooses lean/checkpoint/inplace_abn per block; give "
                         "no lean, checkpoint or convert with it")


def _check_conversion(case: Case, builder) -> None:
    """Whether the conversion of a ``module:callable`` model can be done (the library's error,
    e.g. InplaceABN on ReLU without an activation), on the meta device; a callable that fails
    to build is left to the case's run."""
    from leanstep.transforms import convert_norm_act

    try:
        with torch.device("meta"):
            model = build_model(dataclasses.replace(case, lean=False, checkpoint=None,
                                                    convert=None, convert_activation=None))
    except Exception:  # noqa: BLE001 - calling the callable is the case's own business
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_norm_act(model, norm=case.convert, activation=case.convert_activation)


def validate_case(case: Case, *, require_device: bool = True) -> None:
    """Raise ValueError for anything that would make ``case`` fail before it measures.

    Checks numbers, device (CUDA present unless ``require_device=False``), precision, mode, the
    norm/activation pair, the model spec and its options (by building the model on the meta
    device) and that the image is large enough. MissingPackageError (a ValueError) when a peer
    package is not installed. A ``package.module:callable`` is imported but not called: what it
    does when called is the case's own business, recorded as that case's error.
    """
    for label, minimum in (("batch_size", 1), ("image_size", 1), ("in_channels", 1),
                           ("num_classes", 1), ("runs", 1), ("iters", 1)):
        check_int(label.replace("_", " "), getattr(case, label), minimum)
    for label, minimum in (("warmup", 0), ("threads", 1), ("memory_batch_size", 1),
                           ("memory_image_size", 1), ("image_width", 1)):
        if getattr(case, label) is not None:
            check_int(label.replace("_", " "), getattr(case, label), minimum)
    for label in ("channels_last", "compile"):
        if not isinstance(getattr(case, label), bool):
            raise ValueError(f"{label} must be true or false, got {getattr(case, label)!r}")
    _check_device(case.device, require_device)
    _check_choice("precision", case.precision, PRECISIONS)
    _check_choice("mode", case.mode, MODES)
    _check_choice("optimizer", case.optimizer, tuple(OPTIMIZERS))
    _check_choice("loss", case.loss, LOSSES)
    if case.image_hw[0] != case.image_hw[1] and case.memory_image_size not in (
        None, case.image_size
    ):
        raise ValueError(
            f"memory_image_size {case.memory_image_size} is square, the images are "
            f"{case.size_label}; drop one of them"
        )
    if case.precision == "amp_fp16" and case.device_type != "cuda":
        raise ValueError("precision 'amp_fp16' needs CUDA; use 'amp_bf16' or 'fp32' on CPU")
    if not isinstance(case.options, dict):
        raise ValueError(f"options must be a table of model keywords, got {case.options!r}")
    if case.plan is not None:
        from leanstep.planner import Plan

        planned = Plan.from_dict(case.plan)
        if planned.model is not None and planned.model != case.model:
            raise ValueError(f"the plan was made for {planned.model!r}, not {case.model!r}")
    _check_transforms(case)
    spec = parse_spec(case.model)
    if spec.is_callable:
        builder = resolve_callable(spec)
        if case.convert is not None:
            _check_conversion(case, builder)
        return
    if spec.kind == "leanstep" and "norm" in case.options and "activation" in case.options:
        from leanstep.layers import check_norm_activation

        check_norm_activation(case.options["norm"], case.options["activation"])
    if spec.kind != "leanstep":
        require_package(spec.kind)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a transform's warnings: the case's run says them
            model = build_model(case)
    except TypeError as error:
        raise ValueError(f"bad option for model {case.model!r}: {error}") from None
    except ImportError as error:
        raise ValueError(f"cannot build model {case.model!r}: {error}") from None
    batch_sizes = [case.batch_size, case.memory_batch_size or case.batch_size]
    image_sizes = [case.image_hw, case.memory_case().image_hw]
    _check_runs_at(
        model, case, min(batch_sizes), min(image_sizes, key=lambda hw: hw[0] * hw[1])
    )
