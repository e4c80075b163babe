"""The layer benchmark: norm and activation variants compared on one fixed stack of conv blocks.

Every variant is the same stack, 6 x [conv3x3 (3->64 first, then 64->64), norm + activation],
trained by ``TrainStep`` (input of ones, loss = output.mean(), SGD) on the CPU, with the same
initial weights. Each variant gets three figures, from separate passes so that none disturbs
another:

- saved: the bytes autograd saves for backward during one forward pass (``saved_tensor_bytes``);
- peak: the tensor-level peak of one training step and its breakdown (``measured_peak``); the
  tracker is only active in this pass, never while timing;
- time: one training step (forward, backward and the SGD step that ``TrainStep`` includes),
  median and interquartile range over ``iters`` steps after a warm-up round. The variants take
  turns step by step (A B C ... A B C ...), so a change of machine load hits all alike.

Ratios are to the first variant (BatchNormAct + leaky_relu).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from leanstep.layers import get_norm_act

from .cases import available_cores
from .measurement import Measurement, measure
from .memory import MIB, measured_peak, saved_tensor_bytes
from .step import TrainStep
from .validate import check_int

__all__ = ["VARIANTS", "Variant", "build_stack", "default_threads", "run_layer_bench"]

BLOCKS = 6
WIDTH = 64
IN_CHANNELS = 3


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: a norm and an activation, by their registry names."""

    norm: str
    activation: str

    @property
    def label(self) -> str:
        return f"{get_norm_act(self.norm).__name__}+{self.activation}"


VARIANTS = (
    Variant("bn", "leaky_relu"),
    Variant("abn", "leaky_relu"),
    Variant("inplace_abn", "leaky_relu"),
    *(
        Variant("abn", activation)
        for activation in (
            "relu",
            "swish", "swish_me", "swish_naive",
            "mish", "mish_me", "mish_naive",
            "hard_swish", "hard_swish_me", "hard_swish_naive",
        )
    ),
)


def build_stack(norm: str, activation: str) -> nn.Sequential:
    """The benchmark's stack: 6 x [conv3x3 without bias, norm + activation], 64 channels."""
    layers: list[nn.Module] = []
    channels = IN_CHANNELS
    for _ in range(BLOCKS):
        layers.append(nn.Conv2d(channels, WIDTH, 3, padding=1, bias=False))
        layers.append(get_norm_act(norm)(WIDTH, activation))
        channels = WIDTH
    return nn.Sequential(*layers)


def default_threads() -> int:
    """Every core this process may run on."""
    return available_cores()


def _ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline > 0 else None


def run_layer_bench(
    *,
    batch_size: int = 16,
    image_size: int = 64,
    iters: int = 20,
    threads: int | None = None,
    variants: Sequence[Variant] = VARIANTS,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure ``variants``; returns ``{"config": {...}, "rows": [{...}, ...]}``, JSON-ready.

    ``threads`` (default: every core) is set for the run and restored afterwards.
    """
    threads = default_threads() if threads is None else threads
    for name, value in (("batch size", batch_size), ("image size", image_size),
                        ("iters", iters), ("threads", threads)):
        check_int(name, value, 1)
    if batch_size * image_size * image_size < 2:
        raise ValueError(
            f"batch size {batch_size} x image size {image_size}^2 leaves 1 value per channel; "
            f"BatchNorm needs more than 1 (use batch size >= 2 or image size >= 2)"
        )
    if not variants:
        raise ValueError("no variants to measure")
    report = progress or (lambda message: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps = []
        for variant in variants:
            torch.manual_seed(0)
            model = build_stack(variant.norm, variant.activation)
            steps.append(TrainStep(model, batch_size=batch_size, image_size=image_size))

        memory = []
        for index, (variant, step) in enumerate(zip(variants, steps, strict=True), 1):
            report(f"memory {index}/{len(variants)}: {variant.label}")
            step()  # warm-up: the optimizer state exists from here on, as in training
            saved = saved_tensor_bytes(step.model, step.input)
            peak = measured_peak(step, *step.tracked_objects())
            memory.append((saved / MIB, peak))

        parts: list[list[Measurement]] = [[] for _ in variants]
        for round_index in range(iters + 1):  # round 0 warms up after the memory pass
            report(f"timing round {round_index}/{iters}")
            for measured, step in zip(parts, steps, strict=True):
                one = measure(step, runs=1, iters=1)
                if round_index:
                    measured.append(one)
    finally:
        torch.set_num_threads(previous_threads)

    rows = []
    for variant, (saved_mib, peak), measured in zip(variants, memory, parts, strict=True):
        merged = Measurement.merge(measured)
        median_ms, iqr_ms = merged.median_ms, merged.iqr_ms
        rows.append({
            "variant": variant.label,
            "norm": variant.norm,
            "activation": variant.activation,
            "saved_mib": saved_mib,
            "peak_mib": peak["peak_mib"],
            "memory_mib": peak["memory"],
            "time_ms_median": median_ms,
            "time_ms_iqr": iqr_ms,
        })
    baseline = rows[0]
    for row in rows:
        row["saved_ratio"] = _ratio(row["saved_mib"], baseline["saved_mib"])
        row["peak_ratio"] = _ratio(row["peak_mib"], baseline["peak_mib"])
        row["time_ratio"] = _ratio(row["time_ms_median"], baseline["time_ms_median"])
    config = {
        "stack": f"{BLOCKS} x [conv3x3 {WIDTH}, norm+act]",
        "batch_size": batch_size,
        "image_size": image_size,
        "iters": iters,
        "threads": threads,
        "device": "cpu",
        "torch": torch.__version__,
    }
    return {"config": config, "rows": rows}
