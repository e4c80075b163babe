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

Not predicted: a model whose forward reads tensor values (``.item()``, ``if x.mean() > 0``,
``nonzero``): fake tensors have none (``UnpredictableModelError``, which suggests ``bench``).
``torch.compile`` (its generated kernels allocate differently; ValueError).
``amp_fp16`` is predicted CUDA-like only, as bfloat16 autocast (same element size) with the
CPU's autocast op lists.

``device_like="cuda"`` adjusts the prediction for a CUDA run in two documented ways:

- every storage is counted as the CUDA caching allocator hands it out, rounded up to a
  multiple of 512 bytes (``CUDA_BLOCK_BYTES``), as ``max_memory_allocated`` counts it;
- the optimizer takes its multi-tensor (``foreach``) path, which PyTorch picks by default for
  CUDA tensors; it holds a second copy of every gradient while it applies weight decay (SGD),
  or of its state while it combines them (Adam, RMSprop);
- Adam's and AdamW's step counters, which PyTorch keeps on the CPU for CUDA parameters, are
  not counted.

Every private PyTorch API this needs is reached through ``leanstep.bench._torch_internals``.

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
from torch.utils.weak import WeakIdKeyDictionary

from . import _torch_internals as internals
from .memory import CATEGORIES, MIB
from .step import TrainStep, image_hw

__all__ = [
    "CUDA_BLOCK_BYTES",
    "DEVICE_LIKES",
    "PEAK_LABEL",
    "TOP_MODULES",
    "UnpredictableModelError",
    "predict_case",
    "predict_peak",
]

DEVICE_LIKES = ("cpu", "cuda")
CUDA_BLOCK_BYTES = 512
TOP_MODULES = 10
_TOTAL = "Total"  # MemTracker's key for the sum of all categories
PEAK_LABEL = "tensor-level peak: a lower bound of torch.cuda.max_memory_allocated"


class UnpredictableModelError(ValueError):
    """The model's forward pass depends on tensor values, which a prediction does not have."""


def _round_up(nbytes: int, block: int) -> int:
    return math.ceil(nbytes / block) * block


class _ActivationOwners(internals.dispatch_mode_class()):
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
    # TrainStep leaves a model that is already on its device, in its memory format, as it is
    # (Module.to would swap every fake parameter for a copy, which torch refuses for a tensor
    # that the fake mode's memo references).


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


# Meta kernels that predictions need where PyTorch has none, {aten op name: meta function},
# registered only while predicting (``_torch_internals.temporary_meta_kernels``). None today:
# InplaceABN's statistics run native_batch_norm, which has one.
_META_KERNELS: dict = {}


def _cpu_side_state_bytes(optimizer: torch.optim.Optimizer, block: int) -> int:
    """Bytes of the optimizer state that PyTorch keeps on the CPU for CUDA parameters: Adam's
    and AdamW's scalar step counters (unless ``capturable`` or ``fused``)."""
    total = 0
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for parameter in group["params"]:
            step = optimizer.state.get(parameter, {}).get("step")
            if isinstance(step, torch.Tensor) and step.dim() == 0:
                total += _round_up(step.untyped_storage().nbytes(), block)
    return total


def _unpredictable(error: BaseException, model_fn: Callable) -> UnpredictableModelError | None:
    op = internals.data_dependent_op(error)
    if op is None:
        return None
    name = getattr(model_fn, "spec", None) or "the model"
    return UnpredictableModelError(
        f"{name} cannot be predicted: its forward reads tensor values ({op}: .item(), "
        f"`if tensor ...`, nonzero or similar), which fake tensors do not have; measure it "
        f"with `leanstep bench` instead"
    )


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
    image_size: int | tuple[int, int],
    in_channels: int = 3,
    precision: str = "fp32",
    channels_last: bool = False,
    mode: str = "train",
    device_like: str = "cpu",
    compile: bool = False,
    optimizer: str = "sgd",
    loss: str = "mean",
    num_classes: int | None = None,
    top: int = TOP_MODULES,
) -> dict:
    """Predict the peak memory of one training step of ``model_fn()`` after a warm-up step.

    ``model_fn`` builds the model; it is called on the meta device, so it allocates nothing.
    ``image_size`` is one side or (height, width); ``optimizer``, ``loss`` and ``num_classes``
    are ``TrainStep``'s. Returns ``predicted_mib`` (the tensor-level peak, see ``PEAK_LABEL``),
    ``memory`` (MiB per category at the peak: parameters, buffers, gradients, optimizer_state,
    activations, temporaries, input), ``top_modules`` (the ``top`` modules holding the most
    activation memory at the end of the forward pass) and ``seconds`` (time it took).
    ``UnpredictableModelError`` (a ValueError) for a model whose forward reads tensor values.
    """
    _check_options(device_like, compile)
    started = time.perf_counter()
    with torch.device("meta"):
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise ValueError(f"the model builder returned a {type(model).__name__}, not an nn.Module")
    try:
        with internals.temporary_meta_kernels(_META_KERNELS):
            snapshot, top_modules = _predict(
                model, batch_size=batch_size, image_hw=image_hw(image_size),
                in_channels=in_channels, precision=precision, channels_last=channels_last,
                mode=mode, device_like=device_like, optimizer=optimizer, loss=loss,
                num_classes=num_classes, top=top,
            )
    except RuntimeError as error:
        unpredictable = _unpredictable(error, model_fn)
        if unpredictable is None:
            raise
        raise unpredictable from None
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


def _predict(
    model: nn.Module, *, batch_size: int, image_hw: tuple[int, int], in_channels: int,
    precision: str, channels_last: bool, mode: str, device_like: str, optimizer: str, loss: str,
    num_classes: int | None, top: int,
) -> tuple[dict, list[dict]]:
    """The peak snapshot ({category: bytes, "Total": bytes}) and the top modules."""
    block = CUDA_BLOCK_BYTES if device_like == "cuda" else 1
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with internals.fake_tensor_mode():
        _materialise_fake(model, memory_format)
        step = TrainStep(
            model, batch_size=batch_size, image_size=image_hw, in_channels=in_channels,
            device="cpu", precision=_autocast_precision(precision, device_like),
            channels_last=channels_last, mode=mode, optimizer=optimizer, loss=loss,
            num_classes=num_classes,
        )
        if step.optimizer is not None and device_like == "cuda":
            _use_foreach(step.optimizer)
        if step.optimizer is not None:
            _warm_up_optimizer(step.optimizer)
        tracker = internals.peak_tracker(block)
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
        snapshot = dict(tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {}))
        if step.optimizer is not None and device_like == "cuda":
            host_bytes = _cpu_side_state_bytes(step.optimizer, block)
            for key in list(snapshot):
                if getattr(key, "value", key) in ("Optstate", _TOTAL):
                    snapshot[key] -= host_bytes
    return snapshot, top_modules


def predict_case(case, *, device_like: str | None = None) -> dict:
    """``predict_peak`` for a benchmark case (``leanstep.bench.cases.Case``), at the input its
    memory pass measures (``memory_batch_size`` and ``memory_image_size`` where it has them).

    ``device_like`` defaults to the case's device type, so a CUDA case is predicted as CUDA.
    """
    from .cases import build_model

    if device_like is None:
        device_like = case.device_type
    memory_case = case.memory_case()

    def model_fn() -> nn.Module:
        return build_model(case)

    model_fn.spec = case.model
    return predict_peak(
        model_fn,
        batch_size=memory_case.batch_size,
        image_size=memory_case.image_hw,
        in_channels=case.in_channels,
        precision=case.precision, channels_last=case.channels_last, mode=case.mode,
        device_like=device_like, compile=case.compile, optimizer=case.optimizer,
        loss=case.loss, num_classes=case.num_classes,
    )
