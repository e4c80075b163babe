"""Whether variants of a model (norm, activation implementation, checkpointing) compute the same
training step.

Every variant gets the first variant's weights and buffers (its state dict), the same random
input and the same random-number state (dropout and drop-path draw the same masks), and runs the
training step's forward and backward in float64: loss = output.mean(), as in ``TrainStep``. The
SGD update that would follow is a function of the gradients, so comparing these is comparing
the steps. Compared with the first variant: the loss, every parameter's gradient, the input's
gradient, and every buffer after the step (BatchNorm running statistics, batch counters).

Differences are measured per tensor as the largest absolute difference and, relative, that
divided by the largest magnitude of the first variant's tensor (so a tensor of small values is
not judged by its near-zero entries). ``TOLERANCE`` is the relative bound: implementations of
the same function in float64 differ by rounding, around 1e-12 here (InplaceABN's inversion of
the activation amplifies it most); a wrong gradient or statistic differs by 1e-3 or more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TOLERANCE", "compare_tensors", "verify_models"]

TOLERANCE = 1e-6
_INPUT = "(input)"


def compare_tensors(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max absolute difference, that relative to the reference's largest magnitude)."""
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    reference, other = reference.detach().double(), other.detach().double()
    if reference.numel() == 0:
        return 0.0, 0.0
    absolute = (reference - other).abs().max().item()
    scale = reference.abs().max().item()
    if absolute == 0:
        return 0.0, 0.0
    return absolute, (absolute / scale if scale > 0 else float("inf"))


def _run_step(model: nn.Module, batch: torch.Tensor, seed: int) -> dict:
    """Forward and backward in training mode; the loss, gradients and buffers afterwards.

    Tensors are named by their state-dict keys, which wrappers such as ``Checkpointed`` leave
    unchanged, so that the variants' tensors pair up.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    batch = batch.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss = model(batch).mean()
    loss.backward()
    gradients = {_INPUT: batch.grad}
    buffers = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, nn.Parameter):
            if tensor.grad is not None:
                gradients[name] = tensor.grad
        else:
            buffers[name] = tensor.detach()
    return {"loss": loss.detach(), "gradients": gradients, "buffers": buffers}


def _worst(pairs: dict[str, tuple[float, float]]) -> dict:
    """The entry with the largest relative difference (its name, abs and rel), and the count."""
    if not pairs:
        return {"name": None, "abs": 0.0, "rel": 0.0, "count": 0}
    name = max(pairs, key=lambda key: (pairs[key][1], pairs[key][0]))
    absolute, relative = pairs[name]
    return {"name": name, "abs": absolute, "rel": relative, "count": len(pairs)}


def _differences(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Per name, (abs, rel) difference; a tensor that only one side has differs infinitely."""
    differences = {}
    for name in reference.keys() | other.keys():
        if name in reference and name in other:
            differences[name] = compare_tensors(reference[name], other[name])
        else:
            differences[name] = (float("inf"), float("inf"))
    return differences


def _compare(reference: dict, other: dict) -> dict:
    loss = compare_tensors(reference["loss"], other["loss"])
    return {
        "loss": {"abs": loss[0], "rel": loss[1]},
        "gradients": _worst(_differences(reference["gradients"], other["gradients"])),
        "buffers": _worst(_differences(reference["buffers"], other["buffers"])),
    }


def verify_models(
    models: Sequence[tuple[str, nn.Module]],
    *,
    batch_size: int,
    image_size: int,
    in_channels: int = 3,
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> dict:
    """Run the float64 training step of each (label, model) and compare it with the first's.

    The models are converted to float64 and given the first model's state dict (ValueError if
    a variant's keys or shapes differ). Returns ``variants``: per label, the loss difference and
    the worst gradient and buffer (name, abs, rel), and ``passed`` (every relative difference
    <= ``tolerance``); ``passed`` overall; ``tolerance``.
    """
    if len(models) < 2:
        raise ValueError(f"verify needs at least two variants to compare, got {len(models)}")
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(
        batch_size, in_channels, image_size, image_size, generator=generator, dtype=torch.float64
    )
    first_label, first_model = models[0]
    first_model.double()
    state = {name: tensor.clone() for name, tensor in first_model.state_dict().items()}
    for label, model in models:
        model.double()
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            detail = str(error).strip().splitlines()[0]
            raise ValueError(
                f"variant {label!r} does not take the weights of {first_label!r}: {detail}"
            ) from None
    results = [(label, _run_step(model, batch, seed)) for label, model in models]
    reference = results[0][1]
    variants = {}
    for label, outcome in results[1:]:
        comparison = _compare(reference, outcome)
        comparison["passed"] = all(
            entry["rel"] <= tolerance
            for entry in (comparison["loss"], comparison["gradients"], comparison["buffers"])
        )
        variants[label] = comparison
    return {
        "reference": first_label,
        "variants": variants,
        "passed": all(variant["passed"] for variant in variants.values()),
        "tolerance": tolerance,
    }
