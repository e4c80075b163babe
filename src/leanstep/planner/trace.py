"""One training step traced on fake tensors, cut into the segments that a plan composes.

The step is ``leanstep.bench.predict``'s (fake tensors under ``MemTracker``, optimizer warmed
up), with three records added while it runs:

- **segments**: the step is cut at block boundaries: the forward of block i, its backward, and
  the gaps between (stem, head, loss, optimizer). For each segment the tracer keeps its peak of
  live bytes and the part of that peak that does not grow with the batch (parameters, buffers,
  gradients, optimizer state);
- **kept bytes**: every storage created in the forward of block i is attributed to block i; the
  ones still alive when the forward pass ends are what block i keeps for backward;
- **work**: every operation's FLOPs (convolutions, matmuls: torch's FLOP formulas) or bytes
  moved (everything else), summed per segment, for the time estimate (``cost.py``).

A trace in which every block took choice c gives, for each block i, ``keep[i]`` and the
segment's peak over what the blocks before it keep. ``compose.py`` combines these into the peak
of any assignment of choices to blocks, without tracing it.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from leanstep.bench import _torch_internals as internals
from leanstep.bench._torch_internals import temporary_meta_kernels
from leanstep.bench.memory import CATEGORIES, MIB
from leanstep.bench.predict import (
    _META_KERNELS,
    CUDA_BLOCK_BYTES,
    _autocast_precision,
    _check_options,
    _materialise_fake,
    _round_up,
    _tensors_of,
    _use_foreach,
    _warm_up_optimizer,
)

from .step import build_step

__all__ = ["FakeStep", "Trace", "UnpredictableError", "trace_step"]

_TOTAL = "Total"
# Categories that do not grow with the batch.
_FIXED = ("Parameter", "Buffer", "Gradient", "Optstate")
# Operations that allocate or alias without moving data.
_FREE = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "_has_compatible_shallow_copy_type", "set_", "resize_",
}


class UnpredictableError(ValueError):
    """The model's step depends on tensor values, which fake tensors do not have."""


@dataclass
class Work:
    """Work of a part of the step: ``compute``, (FLOPs, bytes moved) of each compute op
    (convolution, matmul); ``bytes`` moved by all other ops; ``ops``, how many ops ran."""

    compute: list[tuple[float, float]] = field(default_factory=list)
    bytes: float = 0.0
    ops: int = 0

    @property
    def flops(self) -> float:
        return sum(flops for flops, _ in self.compute)

    def __add__(self, other: Work) -> Work:
        return Work(self.compute + other.compute, self.bytes + other.bytes,
                    self.ops + other.ops)


@dataclass
class Trace:
    """A traced step. Bytes throughout; block lists are in block order.

    ``block_peak[i]`` / ``block_fixed[i]``: the highest live bytes while block i runs forward or
    backward (None if it never ran), and their batch-independent part. ``gap_peak[k]``: the same
    between blocks, when blocks 0..k-1 keep what they keep (gap 0: stem and optimizer step; gap
    n: head, loss). ``keep[i]``: bytes block i holds when the forward pass ends. ``work`` /
    ``gap_work``: per block (forward + backward, recompute included) and outside the blocks.
    """

    peak: int
    memory: dict[str, float]
    keep: list[int]
    block_peak: list[int | None]
    block_fixed: list[int]
    gap_peak: list[int | None]
    gap_fixed: list[int]
    work: list[Work]
    gap_work: Work
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _flop_formulas() -> dict:
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    from leanstep.bench.flops import _conv_backward_flop

    return {
        **flop_registry,
        torch.ops.aten.convolution_backward: shape_wrapper(_conv_backward_flop),
    }


def _nbytes(value) -> int:
    total = 0
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, (tuple, list)):
            total += _nbytes(item)
    return total


def _returns_tensor(result) -> bool:
    if isinstance(result, (tuple, list)):
        return any(isinstance(item, torch.Tensor) for item in result)
    return isinstance(result, torch.Tensor)


def _tracer(blocks: list[nn.Module], block: int):
    """A MemTracker that also records segments, kept bytes per block and work per segment."""
    MemTracker = internals.mem_tracker_class()
    sized = internals.sized_update_types()
    formulas = _flop_formulas()

    class StepTracer(MemTracker):
        def __init__(self):
            super().__init__()
            self.index = {id(module): i for i, module in enumerate(blocks)}
            self.segment: tuple[str, int] = ("gap", 0)
            self.owner: int | None = None
            self.owners = WeakIdKeyDictionary()
            self.peaks: dict[tuple, tuple[int, int]] = {}
            self.work: dict[tuple, Work] = {}
            self.recording = False

        def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None):
            if u_type in sized:
                winfo.mem_consumed = _round_up(winfo.mem_consumed, block)
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)

        def _update_peak_stats(self, peak_state) -> None:
            for device, current in self._curr_mem_snap.items():
                total = current[_TOTAL]
                if self._peak_mem.get(device, 0) < total:
                    self._peak_mem[device] = total
                    self._peak_mem_snap[device] = dict(current)
                best = self.peaks.get(self.segment)
                if best is None or best[0] < total:
                    fixed = sum(
                        value for key, value in current.items()
                        if getattr(key, "value", key) in _FIXED
                    )
                    self.peaks[self.segment] = (total, fixed)

        def _pre_fw_hook(self, module, inputs):
            super()._pre_fw_hook(module, inputs)
            index = self.index.get(id(module))
            if index is not None and not self._mod_tracker.is_bw:
                self.segment, self.owner = ("block", index), index

        def _post_fw_hook(self, module, inputs, outputs):
            super()._post_fw_hook(module, inputs, outputs)
            index = self.index.get(id(module))
            if index is not None and not self._mod_tracker.is_bw:
                self.segment, self.owner = ("gap", index + 1), None

        def _pre_bw_hook(self, module, args):
            super()._pre_bw_hook(module, args)
            index = self.index.get(id(module)) if module is not None else None
            if index is not None:
                self.segment = ("block", index)

        def _post_bw_hook(self, module, args):
            super()._post_bw_hook(module, args)
            index = self.index.get(id(module)) if module is not None else None
            # The gradient of block i's input is that of block i-1's output: block i-1's
            # backward may have been entered (its hook fired first) before block i's exit.
            if index is not None and self.segment == ("block", index):
                self.segment = ("gap", index)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = super().__torch_dispatch__(func, types, args, kwargs)
            if result is NotImplemented:
                return result
            kwargs = kwargs or {}
            work = self.work.setdefault(self.segment, Work())
            packet = func._overloadpacket
            formula = formulas.get(packet)
            if formula is not None:
                moved = _nbytes(args) + _nbytes(result)
                work.compute.append((float(formula(*args, **kwargs, out_val=result)), moved))
                work.ops += 1
            elif not func.is_view and packet.__name__ not in _FREE and _returns_tensor(result):
                work.bytes += _nbytes(args) + _nbytes(list(kwargs.values())) + _nbytes(result)
                work.ops += 1
            if self.recording and self.owner is not None and not self._mod_tracker.is_bw:
                outputs = result if isinstance(result, (tuple, list)) else (result,)
                for output in outputs:
                    if isinstance(output, torch.Tensor):
                        storage = output.untyped_storage()
                        if storage not in self.owners:
                            self.owners[storage] = self.owner
            return result

        def kept(self, count: int) -> list[int]:
            kept = [0] * count
            for storage, owner in list(self.owners.items()):
                if owner is not None:
                    kept[owner] += _round_up(storage.nbytes(), block)
            return kept

    return StepTracer()


def _unpredictable(error: Exception) -> UnpredictableError:
    func = getattr(error, "func", None)
    op = str(func) if func is not None else type(error).__name__
    return UnpredictableError(
        f"the step cannot be predicted: it depends on tensor values (operation {op}, e.g. "
        "`if x.sum() > 0`, .item(), nonzero); measure it with `leanstep bench` instead"
    )


class FakeStep:
    """A model built once on fake tensors with its optimizer warmed up, whose training step can
    be traced at any batch size (building and warming up cost as much as a third of a trace).

    Raises UnpredictableError when the step depends on tensor values.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        block_names: list[str],
        *,
        input_size: tuple[int, int],
        in_channels: int = 3,
        precision: str = "fp32",
        optimizer: str = "sgd",
        device_like: str = "cpu",
    ):
        _check_options(device_like, False)
        self.block = CUDA_BLOCK_BYTES if device_like == "cuda" else 1
        self.input_size, self.in_channels = input_size, in_channels
        with torch.device("meta"):
            model = model_fn()
        self.modules = [model.get_submodule(name) for name in block_names]
        self.mode = internals.fake_tensor_mode()
        with temporary_meta_kernels(_META_KERNELS), self.mode, _predictable():
            _materialise_fake(model, torch.contiguous_format)
            self.step = build_step(
                model, batch_size=1, input_size=input_size, in_channels=in_channels,
                precision=_autocast_precision(precision, device_like), optimizer=optimizer,
            )
            if device_like == "cuda":
                _use_foreach(self.step.optimizer)
            _warm_up_optimizer(self.step.optimizer)

    def trace(self, batch_size: int) -> Trace:
        """Trace one step at ``batch_size``."""
        started = time.perf_counter()
        step = self.step
        with temporary_meta_kernels(_META_KERNELS), self.mode, _predictable():
            step.input = torch.ones(batch_size, self.in_channels, *self.input_size,
                                    requires_grad=True)
            tracer = _tracer(self.modules, self.block)
            tracer.track_external(*step.tracked_objects())
            for tensor in _tensors_of(step.tracked_objects()):
                tracer.owners[tensor.untyped_storage()] = None
            with tracer, warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Module is None", UserWarning)
                warnings.filterwarnings("ignore", "The module hierarchy", UserWarning)
                tracer.recording = True
                output = step.forward()
                tracer.recording = False
                keep = tracer.kept(len(self.modules))
                step.backward(output)
                del output
            snapshot = tracer.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
        memory = {name: 0.0 for name in CATEGORIES.values()}
        for key, nbytes in snapshot.items():
            name = CATEGORIES.get(getattr(key, "value", key))
            if name is not None:
                memory[name] = nbytes / MIB
        count = len(self.modules)
        peaks = tracer.peaks
        return Trace(
            peak=int(snapshot.get(_TOTAL, 0)),
            memory=memory,
            keep=keep,
            block_peak=[peaks[("block", i)][0] if ("block", i) in peaks else None
                        for i in range(count)],
            block_fixed=[peaks.get(("block", i), (0, 0))[1] for i in range(count)],
            gap_peak=[peaks[("gap", k)][0] if ("gap", k) in peaks else None
                      for k in range(count + 1)],
            gap_fixed=[peaks.get(("gap", k), (0, 0))[1] for k in range(count + 1)],
            work=[tracer.work.get(("block", i), Work()) for i in range(count)],
            gap_work=sum((w for (kind, _), w in tracer.work.items() if kind == "gap"), Work()),
            seconds=time.perf_counter() - started,
        )


@contextlib.contextmanager
def _predictable():
    """Turn fake tensors' data-dependent errors into UnpredictableError."""
    try:
        yield
    except internals.data_dependent_errors() as error:
        raise _unpredictable(error) from None


def trace_step(
    model_fn: Callable[[], nn.Module],
    block_names: list[str],
    *,
    batch_size: int,
    input_size: tuple[int, int],
    in_channels: int = 3,
    precision: str = "fp32",
    optimizer: str = "sgd",
    device_like: str = "cpu",
) -> Trace:
    """Trace one training step of ``model_fn()`` (called on the meta device) after a warm-up.

    ``block_names`` are the qualified names of the blocks to segment the step at. Raises
    UnpredictableError when the step depends on tensor values.
    """
    started = time.perf_counter()
    trace = FakeStep(
        model_fn, block_names, input_size=input_size, in_channels=in_channels,
        precision=precision, optimizer=optimizer, device_like=device_like,
    ).trace(batch_size)
    trace.seconds = time.perf_counter() - started
    return trace
