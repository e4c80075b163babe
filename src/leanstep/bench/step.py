"""One full training step, the unit that leanstep times and measures.

The step is the seed table's by default: input of ones with ``requires_grad=True``, forward,
``loss = output.mean()``, ``zero_grad``, backward, SGD (lr 0.01, momentum 0.9, weight decay 1e-4)
step. ``optimizer`` names another (``leanstep.bench.optimizers``); ``loss="cross_entropy"`` is
the common classification loss against random class targets (fixed seed). ``forward`` and
``backward`` are separate calls so they can be timed separately; the backward phase includes
the optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .optimizers import OPTIMIZERS, make_optimizer

__all__ = ["LOSSES", "MODES", "OPTIMIZERS", "PRECISIONS", "TrainStep", "image_hw"]

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")
MODES = ("train", "infer")
LOSSES = ("mean", "cross_entropy")
TARGET_SEED = 0


def image_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of an image size given as one side or as (height, width)."""
    if isinstance(image_size, (tuple, list)):
        height, width = image_size
        return int(height), int(width)
    return int(image_size), int(image_size)
_AUTOCAST_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


class TrainStep:
    """A model, its optimizer and a fixed input, ready to run training steps.

    ``image_size`` is one side (square) or (height, width). ``mode="infer"`` runs eval + no_grad
    forward passes only. ``precision`` "amp_bf16" and "amp_fp16" run the forward under
    ``torch.autocast``; fp16 scales the loss with a GradScaler. ``loss="cross_entropy"`` needs
    (batch, classes) logits; its targets are drawn once per input (``TARGET_SEED``) from
    ``num_classes`` classes (default: the model's output width, found at the first step).
    A model already on ``device`` in the memory format is used as it is (no ``Module.to``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        image_size: int | tuple[int, int],
        in_channels: int = 3,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        mode: str = "train",
        compile: bool | str = False,
        optimizer: str = "sgd",
        loss: str = "mean",
        num_classes: int | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        if precision == "amp_fp16" and self.device.type != "cuda":
            raise ValueError("precision 'amp_fp16' needs CUDA; use 'amp_bf16' or 'fp32' on CPU")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model
        if not _placed(model, self.device, memory_format):
            self.model = model.to(self.device, memory_format=memory_format)
        self.model.train(mode == "train")
        self.module = self.model
        if compile:  # a string names a torch.compile backend ("eager" in tests)
            backend = compile if isinstance(compile, str) else "inductor"
            self.module = torch.compile(self.model, backend=backend)
        self.mode = mode
        self.precision = precision
        self.memory_format = memory_format
        self.in_channels = in_channels
        self.loss = loss
        self.num_classes = num_classes
        self.target = None
        self.set_input(batch_size, image_size)
        self.optimizer = None
        self.optimizer_name = optimizer
        self.scaler = None
        if mode == "train":
            self.optimizer = make_optimizer(optimizer, self.model.parameters())
            if precision == "amp_fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)

    def set_input(self, batch_size: int, image_size: int | tuple[int, int]) -> None:
        """Replace the fixed input with one of ones at this batch and image size (and the
        cross-entropy targets with new ones for this batch)."""
        height, width = image_hw(image_size)
        self.input = torch.ones(
            batch_size, self.in_channels, height, width, device=self.device
        ).contiguous(memory_format=self.memory_format)
        self.input.requires_grad_(self.mode == "train")
        self.target = None
        if self.loss == "cross_entropy" and self.mode == "train" and self.num_classes:
            self.target = self._targets(batch_size, self.num_classes)

    def _targets(self, batch_size: int, num_classes: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(TARGET_SEED)
        targets = torch.randint(num_classes, (batch_size,), generator=generator)
        return targets.to(self.device)

    def _loss(self, output: torch.Tensor) -> torch.Tensor:
        if self.loss == "mean":
            return output.float().mean()
        if output.dim() != 2:
            raise ValueError(
                f"loss 'cross_entropy' needs (batch, classes) logits; the model returns shape "
                f"{tuple(output.shape)}; use loss 'mean'"
            )
        if self.target is None or self.target.shape[0] != output.shape[0]:
            self.num_classes = self.num_classes or output.shape[1]
            self.target = self._targets(output.shape[0], self.num_classes)
        if self.num_classes > output.shape[1]:
            raise ValueError(
                f"loss 'cross_entropy' with {self.num_classes} classes, but the model returns "
                f"{output.shape[1]} logits per image"
            )
        return nn.functional.cross_entropy(output.float(), self.target)

    @contextlib.contextmanager
    def eager(self):
        """Within the block, steps run the model uncompiled (counting FLOPs, say)."""
        module, self.module = self.module, self.model
        try:
            yield self
        finally:
            self.module = module

    def _autocast(self):
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def forward(self) -> torch.Tensor:
        """Zero the gradients and run the forward pass; returns the loss (train) or output."""
        if self.mode == "infer":
            with torch.no_grad(), self._autocast():
                return self.module(self.input)
        self.optimizer.zero_grad(set_to_none=True)
        self.input.grad = None
        with self._autocast():
            return self._loss(self.module(self.input))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass and optimizer step (nothing in infer mode)."""
        if self.mode == "infer":
            return
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def __call__(self) -> None:
        """One whole step."""
        self.backward(self.forward())

    def tracked_objects(self) -> tuple:
        """What lives across steps (model, optimizer, input and targets), for memory
        trackers."""
        return tuple(
            obj for obj in (self.model, self.optimizer, self.input, self.target)
            if obj is not None
        )


def _placed(model: nn.Module, device: torch.device, memory_format: torch.memory_format) -> bool:
    """Whether every tensor of ``model`` is on ``device`` (4-d ones in ``memory_format``), so
    that moving it would change nothing."""
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors:
        return False
    for tensor in tensors:
        if tensor.device.type != device.type or (
            device.index is not None and tensor.device.index != device.index
        ):
            return False
        if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=memory_format):
            return False
    return True
