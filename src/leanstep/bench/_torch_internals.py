"""Every use of a private PyTorch API in leanstep, in one place.

The memory predictor and the measured peaks rest on parts of PyTorch that are not public and
may change in any release: ``MemTracker`` (``torch.distributed._tools.mem_tracker``) and two of
its methods that a subclass overrides, fake tensors (``torch._subclasses.fake_tensor``), the
dispatcher's kernel table (``torch._C._dispatch_has_kernel_for_dispatch_key``), dispatch modes
(``torch.utils._python_dispatch``) and unregistering a ``torch.library.Library``; lean regions
rest on ``torch._batch_norm_impl_index``, wrapper tensor subclasses and ``torch.utils._pytree``.
leanstep is tested with the torch versions that ``pyproject.toml`` declares; with another, a
missing internal raises ``TorchInternalsError`` naming it and the torch version, instead of an
AttributeError deep inside a prediction.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "TESTED_TORCH",
    "TorchInternalsError",
    "batch_norm_with_statistics",
    "data_dependent_errors",
    "data_dependent_op",
    "dispatch_mode_class",
    "fake_tensor_mode",
    "has_meta_kernel",
    "is_fake",
    "mem_tracker",
    "mem_tracker_class",
    "peak_tracker",
    "sized_update_types",
    "temporary_meta_kernels",
    "tree",
    "wrapper_tensor",
]

TESTED_TORCH = "2.13 and 2.14"
_TOTAL = "Total"  # MemTracker's key for the sum of all categories


class TorchInternalsError(RuntimeError):
    """A private PyTorch API that leanstep relies on is missing from this torch version."""


def _missing(what: str, error: BaseException | None = None) -> TorchInternalsError:
    detail = f" ({type(error).__name__}: {error})" if error is not None else ""
    return TorchInternalsError(
        f"torch {torch.__version__} lacks {what}, a private API that leanstep's memory "
        f"tracking needs{detail}; leanstep is tested with torch {TESTED_TORCH}"
    )


def _attribute(module_name: str, name: str):
    try:
        module = importlib.import_module(module_name)
        return getattr(module, name)
    except (ImportError, AttributeError) as error:
        raise _missing(f"{module_name}.{name}", error) from None


def _require_methods(cls: type, *names: str) -> None:
    for name in names:
        if not callable(getattr(cls, name, None)):
            raise _missing(f"{cls.__module__}.{cls.__name__}.{name}")


def mem_tracker():
    """A new ``MemTracker`` (peak memory per category: parameters, gradients, ...)."""
    return _attribute("torch.distributed._tools.mem_tracker", "MemTracker")()


def mem_tracker_class() -> type:
    """``MemTracker``, checked for the two private methods that subclasses here override:
    ``_update_snap`` (where a storage's size enters the totals) and ``_update_peak_stats``."""
    tracker_class = _attribute("torch.distributed._tools.mem_tracker", "MemTracker")
    _require_methods(tracker_class, "_update_snap", "_update_peak_stats")
    return tracker_class


def sized_update_types() -> tuple:
    """The ``_UpdateType`` members with which ``_update_snap`` adds or resizes a storage."""
    update_type = _attribute("torch.distributed._tools.mem_tracker", "_UpdateType")
    sized = tuple(getattr(update_type, name, None) for name in ("ADD", "SIZE"))
    if None in sized:
        raise _missing("mem_tracker._UpdateType.ADD / SIZE")
    return sized


def peak_tracker(block: int):
    """A ``MemTracker`` that keeps the step's peak only, counting each storage as an allocator
    that hands out ``block``-byte units would.

    ``MemTracker`` also keeps a peak per module, updated at every operation for every module
    seen so far; that costs more than the rest of a prediction and is not needed there.
    Overrides two private methods: ``_update_snap`` (where a storage's size enters the totals)
    and ``_update_peak_stats``.
    """
    tracker_class = mem_tracker_class()
    sized = sized_update_types()

    class PeakTracker(tracker_class):
        def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None):
            # Rounding a storage's size when it enters the totals makes every later figure
            # the rounded one.
            if u_type in sized:
                winfo.mem_consumed = -(-winfo.mem_consumed // block) * block
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)

        def _update_peak_stats(self, peak_state) -> None:
            for device, current in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < current[_TOTAL]:
                    self._peak_mem[device] = current[_TOTAL]
                    self._peak_mem_snap[device] = dict(current)

    return PeakTracker()


def fake_tensor_mode():
    """A new ``FakeTensorMode``: tensors with shapes and dtypes but no data."""
    return _attribute("torch._subclasses.fake_tensor", "FakeTensorMode")()


def dispatch_mode_class() -> type:
    """``TorchDispatchMode``, the base of a mode that sees every aten operation."""
    return _attribute("torch.utils._python_dispatch", "TorchDispatchMode")


def data_dependent_errors() -> tuple[type, ...]:
    """The exceptions fake tensors raise for an operation that needs tensor values."""
    module = "torch._subclasses.fake_tensor"
    return tuple(
        cls for cls in (
            _optional_attribute(module, "DataDependentOutputException"),
            _optional_attribute(module, "DynamicOutputShapeException"),
        ) if cls is not None
    )


def data_dependent_op(error: BaseException) -> str | None:
    """The aten operation that ``error`` says needs tensor values (``.item()``, ``nonzero``,
    Python control flow on a tensor) under fake tensors; None for any other error."""
    kinds = data_dependent_errors()
    if not kinds or not isinstance(error, kinds):
        return None
    func = getattr(error, "func", None)
    return str(func) if func is not None else type(error).__name__


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a fake tensor (a memory prediction is running)."""
    return _attribute("torch._subclasses.fake_tensor", "is_fake")(tensor)


def batch_norm_with_statistics():
    """``torch._batch_norm_impl_index``: what ``F.batch_norm`` runs, returning (output, batch
    mean, batch inverse std, reserve, implementation) instead of the output alone."""
    function = getattr(torch, "_batch_norm_impl_index", None)
    if function is None:
        raise _missing("torch._batch_norm_impl_index")
    return function


def tree():
    """``torch.utils._pytree``: flatten, unflatten and map nested arguments and results."""
    try:
        return importlib.import_module("torch.utils._pytree")
    except ImportError as error:
        raise _missing("torch.utils._pytree", error) from None


def wrapper_tensor(cls: type, like: torch.Tensor) -> torch.Tensor:
    """An instance of the tensor subclass ``cls`` with ``like``'s metadata and no storage of its
    own (``Tensor._make_wrapper_subclass``)."""
    make = getattr(torch.Tensor, "_make_wrapper_subclass", None)
    if make is None:
        raise _missing("torch.Tensor._make_wrapper_subclass")
    return make(cls, like.shape, strides=like.stride(), dtype=like.dtype, device=like.device,
                requires_grad=False)


def _optional_attribute(module_name: str, name: str):
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


def has_meta_kernel(op: str) -> bool:
    """Whether the aten operation ``op`` ("aten::name") has a Meta kernel (fake tensors then
    describe its output without running it)."""
    check = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if check is None:
        raise _missing("torch._C._dispatch_has_kernel_for_dispatch_key")
    return bool(check(op, "Meta"))


@contextlib.contextmanager
def temporary_meta_kernels(kernels: dict[str, Callable]) -> Iterator[list[str]]:
    """Register ``kernels`` ({aten op name: meta function}) for the ops that have no Meta
    kernel, for the duration of the block only; yields the names registered.

    Outside the block PyTorch's dispatcher is as it was: a leanstep prediction never changes
    what other code sees.
    """
    missing = {name: fn for name, fn in kernels.items() if not has_meta_kernel(f"aten::{name}")}
    if not missing:
        yield []
        return
    library = torch.library.Library("aten", "IMPL")
    destroy = getattr(library, "_destroy", None)
    if destroy is None:
        raise _missing("torch.library.Library._destroy")
    try:
        for name, fn in missing.items():
            library.impl(name, fn, "Meta")
        yield list(missing)
    finally:
        destroy()
