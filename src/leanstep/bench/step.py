"""One full training step, the unit that leanstep times and measures.

The step is the seed table's: input of ones with ``requires_grad=True``, forward,
``loss = output.mean()``, ``zero_grad``, backward, SGD (lr 0.01, momentum 0.9, weight decay 1e-4)
step. ``forward`` and ``backward`` are separate calls so they can be timed separately; the
backward phase includes the optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["PRECISIONS", "MODES", "TrainStep"]

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")
MODES = ("train", "infer")
_AUTOCAST_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


class TrainStep:
    """A model, its SGD optimizer and a fixed input, ready to run training steps.

    ``mode="infer"`` runs eval + no_grad forward passes only. ``precision`` "amp_bf16" and
    "amp_fp16" run the forward under ``torch.autocast``; fp16 scales the loss with a GradScaler.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        image_size: int,
        in_channels: int = 3,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        mode: str = "train",
        compile: bool | str = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        if precision == "amp_fp16" and self.device.type != "cuda":
            raise ValueError("precision 'amp_fp16' needs CUDA; use 'amp_bf16' or 'fp32' on CPU")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
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
        self.set_input(batch_size, image_size)
        self.optimizer = None
        self.scaler = None
        if mode == "train":
            self.optimizer = torch.optim.SGD(
                self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
            )
            if precision == "amp_fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)

    def set_input(self, batch_size: int, image_size: int) -> None:
        """Replace the fixed input with one of ones at this batch and image size."""
        self.input = torch.ones(
            batch_size, self.in_channels, image_size, image_size, device=self.device
        ).contiguous(memory_format=self.memory_format)
        self.input.requires_grad_(self.mode == "train")

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
            return self.module(self.input).float().mean()

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
        """What lives across steps (model, optimizer, input), for memory trackers."""
        return tuple(obj for obj in (self.model, self.optimizer, self.input) if obj is not None)
