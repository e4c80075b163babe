"""Predicted peak memory of a training step, computed without allocating it.

The model is built on the meta device (no weights, no initialisation), then materialised as
fake CPU tensors under ``FakeTensorMode``: tensors with shapes, dtypes and strides but no data,
whose operations run PyTorch's shape functions instead of kernels. On that fake model the very
``TrainStep`` that ``leanstep bench`` runs gets its optimizer warmed up (momentum buffers and
gradients allocated, as the benchmark's warm-up step leaves them) and then runs one step under
``MemTracker``, the tracker whose categories ``measured_peak`` reports. The result is the
tensor-level peak of the real step (its live tensor storages at their highest), in seconds, at
any batch size; over the model zoo it equals the measured CPU peak
(``benchmarks/predict_accuracy.py``).

What the figure is: a lower bound of ``torch.cuda.max_memory_allocated``, which also counts
cuDNN and cuBLAS workspaces and whatever kernels allocate inside themselves.

Not predicted: ``torch.compile`` (its generated kernels allocate differently; ValueError).
``amp_fp16`` is predicted CUDA-like only, as bfloat16 autocast (same element size) with the
CPU's autocast op lists.

``device_like="cuda"`` adjusts the prediction for a CUDA run in two documented ways:

- every storage is counted as the CUDA caching allocator hands it out, rounded up to a
  multiple of 512 bytes (``CUDA_BLOCK_BYTES``), as ``max_memory_allocated`` counts it;
- the optimizer takes its multi-tensor (``foreach``) path, which PyTorch picks by default for
  CUDA tensors; it holds a second copy of every gradient while it applies weight decay.

Fake CUDA tensors are never created: on a CPU-only build they abort the process.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from .memory import CATEGORIES, MIB
from .step import TrainStep

__all__ = [
    "CUDA_BLOCK_BYTES",
    "DEVICE_LIKES",
    "PEAK_LABEL",
    "TOP_MODULES",
    "predict_case",
    "predict_peak",
]

DEVICE_LIKES = ("cpu", "cuda")
CUDA_BLOCK_BYTES = 512
TOP_MODULES = 10
_TOTAL = "Total"  # MemTracker's key for the sum of all categories
PEAK_LABEL = "tensor-level peak: a lower bound of torch.cuda.max_memory_allocated"


def _round_up(nbytes: int, block: int) -> int:
    return math.ceil(nbytes / block) * block


def _peak_tracker(block: int):
    """A ``MemTracker`` that keeps the step's peak only, counting each storage as an allocator
    that hands out ``block``-byte units would.

    ``MemTracker`` also keeps a peak per module, updated at every operation for every module
    seen so far; that costs more than the rest of the prediction and is not needed here (the
    modules' activation memory comes from ``_ActivationOwners``).
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _UpdateType

    class PeakTracker(MemTracker):
        def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None):
            # A storage's size enters the tracker's totals only here (when it is added or
            # resized); rounding it at that moment makes every later figure the rounded one.
            if u_type in (_UpdateType.ADD, _UpdateType.SIZE):
                winfo.mem_consumed = _round_up(winfo.mem_consumed, block)
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)

        def _update_peak_stats(self, peak_state) -> None:
            for device, current in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < current[_TOTAL]:
                    self._peak_mem[device] = current[_TOTAL]
                    self._peak_mem_snap[device] = dict(current)

    return PeakTracker()


class _ActivationOwners(TorchDispatchMode):
    """Attributes every storage created during a forward pass to the innermost named module
    whose forward was running, so that the activation memory still alive at the end of the
    forward pass can be summed per module."""

    def __init__(self, model: nn.Module, block: int):
        super().__init__()
        self._names = {id(module): name or "(model)" for name, module in model.named_modules()}
        self._types = {id(module): type(module).__name__ for module in model.modules()}
        self._block = block
        self._stack: list[int] = []
        self._owners = WeakIdKeyDictionary()
        self._recording = False
        self._hooks: list = []

    @contextlib.contextmanager
    def recording(self, existing: tuple):
        """Record what the forward passes run inside this context allocate.

        ``existing`` (modules, optimizers, tensors) own storages that outlive the step, which
        operations may return (a transposed weight is a view of it): they are nobody's
        activations.
        """
        for tensor in _tensors_of(existing):
            self._owners[tensor.untyped_storage()] = None
        push = nn.modules.module.register_module_forward_pre_hook(self._push)
        pop = nn.modules.module.register_module_forward_hook(self._pop, always_call=True)
        self._recording = True
        try:
            with self:
                yield self
        finally:
            self._recording = False
            push.remove()
            pop.remove()

    def _push(self, module, args):
        if id(module) in self._names:
            self._stack.append(id(module))

    def _pop(self, module, args, output):
        if self._stack and self._stack[-1] == id(module):
            self._stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self._recording and self._stack:
            owner = self._stack[-1]
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            for output in outputs:
                if isinstance(output, torch.Tensor):
                    storage = output.untyped_storage()
                    if storage not in self._owners:
                        self._owners[storage] = owner
        return result

    def top(self, count: int) -> list[dict]:
        """The ``count`` modules holding the most activation memory, largest first."""
        self._recording = False
        held: dict[int, int] = {}
        for storage, owner in list(self._owners.items()):
            nbytes = storage.nbytes()
            if nbytes and owner is not None:
                held[owner] = held.get(owner, 0) + _round_up(nbytes, self._block)
        ranked = sorted(held.items(), key=lambda item: item[1], reverse=True)[:count]
        return [
            {
                "module": self._names[owner],
                "type": self._types[owner],
                "activation_mib": nbytes / MIB,
            }
            for owner, nbytes in ranked
        ]


def _tensors_of(objects: tuple) -> list[torch.Tensor]:
    """The tensors that modules (parameters, their gradients, buffers), optimizers (state) and
    tensors among ``objects`` hold."""
    tensors = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            for parameter in obj.parameters():
                tensors.append(parameter)
                if parameter.grad is not None:
                    tensors.append(parameter.grad)
            tensors.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, torch.Tensor):
            tensors.append(obj)
    return tensors


def _materialise_fake(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Replace the meta tensors of ``model`` by fake CPU tensors of the same shape and dtype.

    Called inside ``FakeTensorMode``. Four-dimensional tensors take ``memory_format``, as
    ``Module.to(memory_format=...)`` would give them.
    """

    def fake_cpu(tensor: torch.Tensor) -> torch.Tensor:
        layout = memory_format if tensor.dim() == 4 else torch.contiguous_format
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", memory_format=layout)

    model._apply(fake_cpu)
    # TrainStep moves its model with Module.to, which would swap every fake parameter for a
    # copy, and torch refuses to swap a tensor that the fake mode's memo references. The model
    # is already on the fake CPU in its memory format, so for it the move is the identity.
    model.to = lambda *args, **kwargs: model


def _use_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Switch ``optimizer`` to its multi-tensor path, the default for CUDA tensors."""
    optimizer.defaults["foreach"] = True
    for group in optimizer.param_groups:
        group["foreach"] = True


def _warm_up_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state as a warm-up step would, without the forward and backward.

    A step with a gradient for every trainable parameter allocates what the measured step
    finds in place after its warm-up step (SGD's momentum buffers), and leaves the gradients
    allocated as a warm-up step does, at a fraction of a whole step's cost. It assumes that
    every trainable parameter takes part in the forward pass, as in every leanstep model. The
    step runs the multi-tensor path, whose state is the same and costs a few operations in
    all instead of a few per parameter; the measured step runs the path it was given.
    """
    paths = [group.get("foreach") for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["foreach"] = True
        for parameter in group["params"]:
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for group, path in zip(optimizer.param_groups, paths, strict=True):
        group["foreach"] = path


def _check_options(device_like: str, compile: bool) -> None:
    if device_like not in DEVICE_LIKES:
        raise ValueError(f"unknown device_like {device_like!r}; valid: {', '.join(DEVICE_LIKES)}")
    if compile:
        raise ValueError(
            "compile=True cannot be predicted: torch.compile's generated kernels allocate "
            "differently from eager mode; predict the eager step (compile=False)"
        )


def _autocast_precision(precision: str, device_like: str) -> str:
    """The precision to run on the fake CPU device.

    float16 autocast needs CUDA; its tensors are as large as bfloat16's, so a CUDA-like
    prediction runs bfloat16 autocast in its place (with the CPU's autocast op lists).
    """
    if precision == "amp_fp16" and device_like == "cuda":
        return "amp_bf16"
    return precision


def predict_peak(
    model_fn: Callable[[], nn.Module],
    *,
    batch_size: int,
    image_size: int,
    in_channels: int = 3,
    precision: str = "fp32",
    channels_last: bool = False,
    mode: str = "train",
    device_like: str = "cpu",
    compile: bool = False,
    top: int = TOP_MODULES,
) -> dict:
    """Predict the peak memory of one training step of ``model_fn()`` after a warm-up step.

    ``model_fn`` builds the model; it is called on the meta device, so it allocates nothing.
    Returns ``predicted_mib`` (the tensor-level peak, see ``PEAK_LABEL``), ``memory`` (MiB per
    category at the peak: parameters, buffers, gradients, optimizer_state, activations,
    temporaries, input), ``top_modules`` (the ``top`` modules holding the most activation memory
    at the end of the forward pass) and ``seconds`` (time the prediction took).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_options(device_like, compile)
    started = time.perf_counter()
    block = CUDA_BLOCK_BYTES if device_like == "cuda" else 1
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.device("meta"):
        model = model_fn()
    with FakeTensorMode():
        _materialise_fake(model, memory_format)
        step = TrainStep(
            model, batch_size=batch_size, image_size=image_size, in_channels=in_channels,
            device="cpu", precision=_autocast_precision(precision, device_like),
            channels_last=channels_last, mode=mode,
        )
        if step.optimizer is not None and device_like == "cuda":
            _use_foreach(step.optimizer)
        if step.optimizer is not None:
            _warm_up_optimizer(step.optimizer)
        tracker = _peak_tracker(block)
        tracker.track_external(*step.tracked_objects())
        owners = _ActivationOwners(model, block)
        with tracker, warnings.catch_warnings():
            # MemTracker's per-module snapshots (unused here) skip the modules that a
            # checkpointed segment creates for one call and then drops, with a warning each.
            warnings.filterwarnings("ignore", "Module is None", UserWarning)
            with owners.recording(step.tracked_objects()):
                output = step.forward()
            top_modules = owners.top(top)
            step.backward(output)
            del output
        snapshot = tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
    memory = {name: 0.0 for name in CATEGORIES.values()}
    for key, nbytes in snapshot.items():
        name = CATEGORIES.get(getattr(key, "value", key))
        if name is not None:
            memory[name] = nbytes / MIB
    return {
        "predicted_mib": snapshot.get(_TOTAL, 0) / MIB,
        "memory": memory,
        "top_modules": top_modules,
        "device_like": device_like,
        "seconds": time.perf_counter() - started,
    }


def predict_case(case, *, device_like: str | None = None) -> dict:
    """``predict_peak`` for a benchmark case (``leanstep.bench.cases.Case``), at the input its
    memory pass measures (``memory_batch_size`` and ``memory_image_size`` where it has them).

    ``device_like`` defaults to the case's device type, so a CUDA case is predicted as CUDA.
    """
    from .cases import build_model

    if device_like is None:
        device_like = "cuda" if str(case.device).startswith("cuda") else "cpu"
    return predict_peak(
        lambda: build_model(case),
        batch_size=case.memory_batch_size or case.batch_size,
        image_size=case.memory_image_size or case.image_size,
        in_channels=case.in_channels,
        precision=case.precision, channels_last=case.channels_last, mode=case.mode,
        device_like=device_like, compile=case.compile,
    )
