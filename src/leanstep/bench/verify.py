"""Whether variants of a model (norm, activation implementation, checkpointing, precision,
memory format, compilation) compute the same training step.

Every variant gets the first variant's weights and buffers (its state dict), the same random
input (and cross-entropy targets) and the same random-number state (dropout and drop-path draw
the same masks), and runs one training step: forward, loss (``output.mean()`` or cross entropy,
as ``TrainStep``), backward and the optimizer's step. Its loss, output, gradients (the input's
too), buffers after the step (BatchNorm running statistics, batch counters) and parameters after
the optimizer step are compared with those of the **reference**: the first variant's model run
in float64, eager, contiguous, in the variant's mode with its loss and optimizer. A variant whose
settings are the reference's (the default: ``precision="fp64"``) is checked exactly; a variant
in another precision is checked at that precision's tolerance.

How differences are measured depends on the precision (``METRICS``, ``TOLERANCES``):

- fp64 (the default; variants that differ in implementation, memory format, compilation or
  mode): per tensor, the largest absolute difference divided by the largest magnitude of the
  reference tensor (so a tensor of small values is not judged by its near-zero entries), or by
  ``GROUP_FLOOR`` (1e-6) times the largest magnitude in its group where that is larger (a
  tensor that is zero up to cancellation, like a conv bias's gradient before a BatchNorm, holds
  rounding only);
  implementations of the same function in float64 differ by rounding, around 1e-12 here
  (InplaceABN's inversion of the activation amplifies it most), bound 1e-6. A wrong gradient or
  statistic differs by 1e-3 or more.
- fp32: per group (all gradients, all buffers, all parameters after the step), the L2 norm of
  the differences divided by that of the reference. A per-tensor bound does not work here: with
  BatchNorm, many gradients are analytically almost zero (BatchNorm removes their direction),
  so float32 rounding is all they hold (relative differences of 0.5 to 1e8 measured). Measured
  float32-vs-float64 group differences on resnet18, efficientnet_b0 and vgg11_bn at batch 4,
  64 px (``leanstep verify``'s default input): 1e-7 (buffers) to 1.2e-5 (gradients), 3.7e-3
  for vgg11_bn's gradients with cross entropy; bound 1e-2. A gradient 10% off in every norm
  layer differs by about 1e-1. A BatchNorm that sees a handful of values per channel amplifies
  rounding (resnet18 at batch 2, 32 px: 1.4e-2, over the bound): verify at batch >= 4, 64 px.
- amp_bf16 / amp_fp16 are not verified (``verify_models`` refuses them): autocast's bfloat16
  steps differ from the float64 step by 0.2 to 0.4 in gradients (group L2, same models), too
  much to tell a bug from rounding in one step.

``compile`` runs the variant's forward and backward under ``torch.compile`` (``COMPILE_BACKEND``,
or the backend a string names). Compiled code draws its random numbers differently, so a model
with dropout or drop-path does not match the eager reference when compiled; verify it with those
rates at 0.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .optimizers import OPTIMIZERS, make_optimizer
from .step import LOSSES, MODES, image_hw

__all__ = [
    "COMPILE_BACKEND",
    "METRICS",
    "PRECISIONS",
    "TOLERANCE",
    "TOLERANCES",
    "UNVERIFIABLE",
    "StepSettings",
    "compare_tensors",
    "verify_models",
]

TOLERANCES = {"fp64": 1e-6, "fp32": 1e-2}
METRICS = {"fp64": "max", "fp32": "l2"}
PRECISIONS = tuple(TOLERANCES)
UNVERIFIABLE = {
    "amp_bf16": "bfloat16 autocast steps differ from the float64 step by 0.2 to 0.4 in "
    "gradients (group L2, measured on resnet18, efficientnet_b0, vgg11_bn)",
    "amp_fp16": "float16 autocast needs CUDA and its steps differ from the float64 step as "
    "bfloat16's do",
}
TOLERANCE = TOLERANCES["fp64"]
COMPILE_BACKEND = "inductor"
GROUP_FLOOR = 1e-6
_INPUT = "(input)"
TARGET_SEED = 0


@dataclass(frozen=True)
class StepSettings:
    """How one variant's step runs. ``precision``: "fp64" (the reference's) or "fp32" (float32
    weights and input); autocast precisions are refused (``UNVERIFIABLE``);
    ``compile``: False, True (``COMPILE_BACKEND``) or a backend name."""

    precision: str = "fp64"
    mode: str = "train"
    channels_last: bool = False
    compile: bool | str = False
    optimizer: str = "sgd"
    loss: str = "mean"

    def __post_init__(self):
        if self.precision in UNVERIFIABLE:
            raise ValueError(
                f"verify cannot check precision {self.precision!r}: "
                f"{UNVERIFIABLE[self.precision]}, too much to tell a bug from rounding; verify "
                f"fp32 or the default float64"
            )
        for label, value, allowed in (
            ("precision", self.precision, PRECISIONS), ("mode", self.mode, MODES),
            ("optimizer", self.optimizer, tuple(OPTIMIZERS)), ("loss", self.loss, LOSSES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {label} {value!r}; valid: {', '.join(allowed)}")

    def reference(self) -> StepSettings:
        """The settings of the float64 step this variant is compared with."""
        return StepSettings(mode=self.mode, optimizer=self.optimizer, loss=self.loss)

    @property
    def is_reference(self) -> bool:
        return self == self.reference()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.precision == "fp64" else torch.float32


def compare_tensors(
    reference: torch.Tensor, other: torch.Tensor, floor: float = 0.0
) -> tuple[float, float]:
    """(max absolute difference, that relative to the reference's largest magnitude, or to
    ``floor`` where that is larger)."""
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    reference, other = reference.detach().double(), other.detach().double()
    if reference.numel() == 0:
        return 0.0, 0.0
    absolute = (reference - other).abs().max().item()
    scale = max(reference.abs().max().item(), floor)
    if absolute == 0:
        return 0.0, 0.0
    return absolute, (absolute / scale if scale > 0 else float("inf"))


def _run_step(
    model: nn.Module, batch: torch.Tensor, targets: torch.Tensor | None, seed: int,
    settings: StepSettings,
) -> dict:
    """One step of ``model`` as ``settings`` say; its loss, output, gradients, buffers and
    parameters afterwards.

    Tensors are named by their state-dict keys, which wrappers such as ``Checkpointed`` leave
    unchanged, so that the variants' tensors pair up.
    """
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(dtype=settings.dtype, memory_format=memory_format)
    module = model
    if settings.compile:
        backend = settings.compile if isinstance(settings.compile, str) else COMPILE_BACKEND
        module = torch.compile(model, backend=backend)
    x = batch.detach().to(settings.dtype, copy=True).contiguous(memory_format=memory_format)
    train = settings.mode == "train"
    model.train(train)
    model.zero_grad(set_to_none=True)
    x.requires_grad_(train)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(train):
        output = module(x)
    output = output.to(settings.dtype)
    if settings.loss == "cross_entropy" and train:
        if output.dim() != 2:
            raise ValueError(
                f"loss 'cross_entropy' needs (batch, classes) logits; the model returns shape "
                f"{tuple(output.shape)}; use loss 'mean'"
            )
        loss = nn.functional.cross_entropy(output, targets)
    else:
        loss = output.mean()
    gradients, parameters = {}, {}
    if train:
        loss.backward()
        gradients[_INPUT] = x.grad
        named = model.state_dict(keep_vars=True)
        for name, tensor in named.items():
            if isinstance(tensor, nn.Parameter) and tensor.grad is not None:
                gradients[name] = tensor.grad.detach().clone()
        make_optimizer(settings.optimizer, model.parameters()).step()
        parameters = {
            name: tensor.detach() for name, tensor in named.items()
            if isinstance(tensor, nn.Parameter)
        }
    buffers = {
        name: tensor.detach() for name, tensor in model.state_dict(keep_vars=True).items()
        if not isinstance(tensor, nn.Parameter)
    }
    return {"loss": loss.detach(), "output": output.detach(), "gradients": gradients,
            "buffers": buffers, "parameters": parameters}


def _worst(pairs: dict[str, tuple[float, float]]) -> dict:
    """The entry with the largest relative difference (its name, abs and rel), and the count."""
    if not pairs:
        return {"name": None, "abs": 0.0, "rel": 0.0, "count": 0}
    name = max(pairs, key=lambda key: (pairs[key][1], pairs[key][0]))
    absolute, relative = pairs[name]
    return {"name": name, "abs": absolute, "rel": relative, "count": len(pairs)}


def _differences(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Per name, (abs, rel) difference; a tensor that only one side has differs infinitely.

    A tensor whose values are all below ``GROUP_FLOOR`` times the group's largest is judged
    against that floor: such a tensor is zero up to cancellation (a conv bias before a
    BatchNorm has an analytically zero gradient), and rounding alone decides its values.
    """
    largest = max(
        (t.detach().abs().max().item() for t in reference.values()
         if t.is_floating_point() and t.numel()),
        default=0.0,
    )
    differences = {}
    for name in reference.keys() | other.keys():
        if name in reference and name in other:
            differences[name] = compare_tensors(
                reference[name], other[name], floor=GROUP_FLOOR * largest
            )
        else:
            differences[name] = (float("inf"), float("inf"))
    return differences


_GROUPS = ("gradients", "buffers", "parameters")


def _l2(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """The group's L2 relative difference; ``name``: the tensor contributing most to it."""
    if reference.keys() != other.keys():
        missing = sorted(reference.keys() ^ other.keys())[0]
        return {"name": missing, "abs": float("inf"), "rel": float("inf"),
                "count": len(reference)}
    squares, norms = {}, 0.0
    for name, tensor in reference.items():
        if tensor.is_floating_point():
            if tensor.shape != other[name].shape:
                raise ValueError(f"shapes of {name} differ: {tuple(tensor.shape)} vs "
                                 f"{tuple(other[name].shape)}")
            difference = tensor.detach().double() - other[name].detach().double()
            squares[name] = difference.square().sum().item()
            norms += tensor.detach().double().square().sum().item()
    if not squares:
        return {"name": None, "abs": 0.0, "rel": 0.0, "count": 0}
    absolute = sum(squares.values()) ** 0.5
    relative = absolute / norms**0.5 if norms > 0 else (0.0 if absolute == 0 else float("inf"))
    return {"name": max(squares, key=squares.get), "abs": absolute, "rel": relative,
            "count": len(reference)}


def _compare(reference: dict, other: dict, metric: str = "max") -> dict:
    loss = compare_tensors(reference["loss"], other["loss"])
    output = compare_tensors(reference["output"], other["output"])
    if metric == "l2":
        output_l2 = _l2({"output": reference["output"]}, {"output": other["output"]})
        output = (output_l2["abs"], output_l2["rel"])
        groups = {group: _l2(reference[group], other[group]) for group in _GROUPS}
    else:
        groups = {
            group: _worst(_differences(reference[group], other[group])) for group in _GROUPS
        }
    return {
        "loss": {"abs": loss[0], "rel": loss[1]},
        "output": {"abs": output[0], "rel": output[1]},
        **groups,
    }


def verify_models(
    models: Sequence[tuple[str, nn.Module]],
    *,
    batch_size: int,
    image_size: int | tuple[int, int],
    in_channels: int = 3,
    num_classes: int | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    settings: Sequence[StepSettings] | None = None,
) -> dict:
    """Run one step of each (label, model) as its ``settings`` say (default: float64 training
    steps) and compare it with the float64 step of the first model.

    Every model is converted to float64 and given the first model's state dict (ValueError if a
    variant's keys or shapes differ); the steps run on copies, so that the optimizer step and
    the running statistics leave the models given as they were. ``tolerance`` (None:
    ``TOLERANCES`` of each variant's precision) bounds every relative difference. Returns
    ``variants``: per label (all but the first when its settings are the reference's: it is the
    reference), its ``precision``, ``tolerance``, the loss and output differences, the worst
    gradient, buffer and parameter after the step (name, abs, rel) and ``passed``; ``passed``
    overall; ``reference`` (the first label).
    """
    settings = list(settings) if settings is not None else [StepSettings()] * len(models)
    if len(settings) != len(models):
        raise ValueError(f"{len(models)} models but {len(settings)} step settings")
    if not models or (len(models) < 2 and settings[0].is_reference):
        raise ValueError(
            f"verify needs at least two variants to compare, or one in another precision, mode, "
            f"memory format or compiled; got {len(models)}"
        )
    generator = torch.Generator().manual_seed(seed)
    height, width = image_hw(image_size)
    batch = torch.randn(
        batch_size, in_channels, height, width, generator=generator, dtype=torch.float64
    )
    first_label, first_model = models[0]
    first_model.double()
    state = {name: tensor.clone() for name, tensor in first_model.state_dict().items()}
    pristine = copy.deepcopy(first_model)
    for label, model in models:
        model.double()
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            detail = str(error).strip().splitlines()[0]
            raise ValueError(
                f"variant {label!r} does not take the weights of {first_label!r}: {detail}"
            ) from None
    targets = None
    if any(s.loss == "cross_entropy" for s in settings):
        classes = num_classes or _output_width(pristine, batch)
        targets = torch.randint(
            classes, (batch_size,), generator=torch.Generator().manual_seed(TARGET_SEED)
        )
    references: dict[StepSettings, dict] = {}

    def reference_of(variant: StepSettings) -> dict:
        key = variant.reference()
        if key not in references:
            references[key] = _run_step(copy.deepcopy(pristine), batch, targets, seed, key)
        return references[key]

    variants = {}
    for index, ((label, model), variant) in enumerate(zip(models, settings, strict=True)):
        if index == 0 and variant.is_reference:
            continue
        expected = reference_of(variant)
        metric = METRICS[variant.precision]
        outcome = _run_step(copy.deepcopy(model), batch, targets, seed, variant)
        comparison = _compare(expected, outcome, metric)
        bound = tolerance if tolerance is not None else TOLERANCES[variant.precision]
        comparison.update(precision=variant.precision, tolerance=bound, metric=metric)
        comparison["passed"] = all(
            comparison[key]["rel"] <= bound for key in ("loss", "output", *_GROUPS)
        )
        variants[label] = comparison
    return {
        "reference": first_label,
        "variants": variants,
        "passed": all(variant["passed"] for variant in variants.values()),
        "tolerance": tolerance,
    }


def _output_width(model: nn.Module, batch: torch.Tensor) -> int:
    with torch.no_grad():
        was_training = model.training
        model.eval()
        width = model(batch[:1]).shape[-1]
        model.train(was_training)
    return int(width)
