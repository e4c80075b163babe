"""The benchmark case: one model with its options at one batch size, image size, device and
precision, and the model and training step it builds.

A Case is frozen and plain data (JSON-ready through ``to_dict``), so the parent process, the
worker and the results file all see the same thing. ``settings()`` is what a measurement depends
on; ``--resume`` compares it with the rows already written. Adding a case option is adding a
field here (it then reaches the worker, the rows and resume matching by itself), a flag in
``leanstep.commands.case_args`` and a check in ``leanstep.bench.validate``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from torch import nn

from .specs import build_from_spec, parse_spec
from .step import TrainStep

__all__ = [
    "DEFAULT_WARMUP",
    "DEVICES",
    "IDENTITY_FIELDS",
    "MODEL_OPTION_KEYS",
    "REFERENCE_KEYS",
    "TRANSFORM_FIELDS",
    "Case",
    "available_cores",
    "build_model",
    "legacy_row",
    "make_step",
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
# Fields that place a case in its suite rather than say what it measures.
IDENTITY_FIELDS = ("suite", "group", "name", "index", "reference")
# The model transforms of a case (``leanstep.transforms.apply``), as row columns.
TRANSFORM_FIELDS = ("lean", "checkpoint", "convert", "convert_activation")


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``warmup`` None: 5 on CPU, 2 on CUDA; ``threads`` None: all cores.

    ``image_size`` is the image's height, ``image_width`` its width (None: square).
    ``optimizer`` names one of ``leanstep.bench.optimizers.OPTIMIZERS``; ``loss`` is "mean"
    (``output.mean()``, the seed table's) or "cross_entropy" (against random class targets).
    ``memory_batch_size`` / ``memory_image_size`` (None: the timing ones) let the memory pass run
    at a larger input than the timing pass, so that activations dominate the peak where timing
    at that size would be too slow (VGG16 on a CPU); a memory image size is square. ``plan``: a
    ``leanstep plan`` (as ``Plan.to_dict``) applied to the model's blocks after it is built.

    ``lean``, ``checkpoint`` (None, "blocks" or N blocks per segment), ``convert`` (None, "abn",
    "inplace_abn") and ``convert_activation`` (the converted layers' activation): model
    transforms (``leanstep.transforms.apply``) for any model spec, applied after the build. A
    ``checkpoint`` model option (older suites and result rows) becomes the ``checkpoint`` field:
    on a zoo model the transform builds the same model the option did.
    """

    suite: str
    group: str
    name: str
    model: str
    options: dict = field(default_factory=dict)
    batch_size: int = 32
    image_size: int = 224
    image_width: int | None = None
    in_channels: int = 3
    num_classes: int = 1000
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    mode: str = "train"
    optimizer: str = "sgd"
    loss: str = "mean"
    runs: int = 10
    iters: int = 10
    warmup: int | None = None
    threads: int | None = None
    reference: dict = field(default_factory=dict)
    memory_batch_size: int | None = None
    memory_image_size: int | None = None
    plan: dict | None = None
    lean: bool = False
    checkpoint: None | str | int = None
    convert: str | None = None
    convert_activation: str | None = None
    index: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.options, dict) and "checkpoint" in self.options:
            options = dict(self.options)
            value = options.pop("checkpoint")
            value = None if value == "none" else value
            if self.checkpoint is not None and value is not None and value != self.checkpoint:
                raise ValueError(f"checkpoint given twice: {self.checkpoint!r} and model option "
                                 f"checkpoint={value!r}")
            object.__setattr__(self, "options", options)
            if self.checkpoint is None:
                object.__setattr__(self, "checkpoint", value)

    @property
    def transformed(self) -> bool:
        """Whether ``build_model`` transforms the built model (lean, checkpoint, convert)."""
        return self.lean is True or self.checkpoint is not None or self.convert is not None

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies a case in a results file: (suite, group, name)."""
        return (self.suite, self.group, self.name)

    @property
    def device_type(self) -> str:
        return str(self.device).split(":", 1)[0]

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the timing pass's images."""
        return (self.image_size, self.image_width or self.image_size)

    @property
    def size_label(self) -> str:
        """The image size as ``--size`` takes it: "224" or "512x1024"."""
        height, width = self.image_hw
        return str(height) if height == width else f"{height}x{width}"

    def with_defaults(self) -> Case:
        """A copy with ``warmup``, ``threads`` and the memory pass's input resolved."""
        warmup = self.warmup
        if warmup is None:
            warmup = DEFAULT_WARMUP.get(self.device_type, 2)
        threads = self.threads if self.threads is not None else available_cores()
        return dataclasses.replace(
            self, warmup=warmup, threads=threads,
            memory_batch_size=self.memory_batch_size or self.batch_size,
            memory_image_size=self.memory_image_size or self.image_size,
        )

    def memory_case(self) -> Case:
        """The case as the memory pass runs it (its memory batch and image size)."""
        if self.memory_image_size in (None, self.image_size):
            return dataclasses.replace(self, batch_size=self.memory_batch_size or self.batch_size)
        return dataclasses.replace(
            self, batch_size=self.memory_batch_size or self.batch_size,
            image_size=self.memory_image_size, image_width=None,
        )

    def settings(self) -> dict:
        """Every field that the measurement depends on (all but suite, group, name, index and
        reference figures), with defaults resolved."""
        resolved = self.with_defaults().to_dict()
        return {key: value for key, value in resolved.items() if key not in IDENTITY_FIELDS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Case:
        """The case that ``to_dict`` wrote (unknown keys are an error)."""
        return cls(**data)


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _zoo_hint(case: Case) -> str:
    """For ``--norm``/``--activation`` given to a model outside leanstep's zoo: what to use."""
    zoo_options = {"norm", "activation"} & set(case.options)
    if not zoo_options or parse_spec(case.model).kind == "leanstep":
        return ""
    if "norm" in zoo_options:
        return (f"; --norm is for leanstep's zoo models: for {case.model} use --convert "
                f"abn|inplace_abn (with --activation for the converted layers)")
    return (f"; for {case.model}, --activation is the activation of the layers --convert "
            f"converts: give this variant --convert abn|inplace_abn too")


def build_model(case: Case) -> nn.Module:
    """The model ``case.model`` names, built with ``case.options``.

    The one place a case's model is made (worker, DDP ranks, predict, verify, validation on the
    meta device): model transforms that apply to any spec belong right after the build here.
    """
    try:
        model = build_from_spec(
            case.model, num_classes=case.num_classes, in_channels=case.in_channels,
            options=case.options,
        )
    except TypeError as error:  # a keyword the builder does not take
        raise ValueError(f"cannot build model {case.model!r}: {error}{_zoo_hint(case)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model spec {case.model!r} built a {type(model).__name__}, not a torch.nn.Module"
        )
    if case.plan is not None:
        from leanstep.planner import Plan

        Plan.from_dict(case.plan).apply(model)
    if case.transformed:
        from leanstep.transforms import apply

        apply(model, lean=case.lean, checkpoint=case.checkpoint, convert=case.convert,
              activation=case.convert_activation)
    return model


def legacy_row(row: dict) -> dict:
    """A results row as this version writes it: a ``checkpoint`` model option (rows written
    before checkpointing became a transform) moved to the ``checkpoint`` column."""
    options = row.get("options")
    if not isinstance(options, dict) or "checkpoint" not in options:
        return row
    options = dict(options)
    value = options.pop("checkpoint")
    return {**row, "options": options,
            "checkpoint": row.get("checkpoint") if row.get("checkpoint") is not None else value}


def make_step(case: Case, model: nn.Module | None = None) -> TrainStep:
    """The training step of ``case``; builds the model unless one is given."""
    if model is None:
        model = build_model(case)
    return TrainStep(
        model,
        batch_size=case.batch_size,
        image_size=case.image_hw,
        in_channels=case.in_channels,
        device=case.device,
        precision=case.precision,
        channels_last=case.channels_last,
        mode=case.mode,
        compile=case.compile,
        optimizer=case.optimizer,
        loss=case.loss,
        num_classes=case.num_classes,
    )
