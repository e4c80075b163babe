"""Memory of a call: bytes saved for backward, and the peak of a training step by category.

Tensor-level figures: they count the bytes of live tensor storages, not what an allocator
reserves around them (CUDA's caching allocator and cuDNN workspaces add to the latter).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CATEGORIES", "MIB", "measured_peak", "saved_tensor_bytes"]

MIB = 1024 * 1024

# MemTracker's category names -> leanstep's. "Other" holds what is tracked but is neither a
# module's state nor an optimizer's: in a training step, the input batch.
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "input",
}


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (tensor.device, storage.data_ptr(), storage.nbytes())


def saved_tensor_bytes(fn: Callable, *args, **kwargs) -> int:
    """Bytes that autograd saves for backward during ``fn(*args, **kwargs)``.

    Each storage is counted once, however many saved tensors view it. When ``fn`` is a module,
    its own parameters and buffers are not counted: they exist whether or not anything is saved.
    """
    excluded = set()
    if isinstance(fn, nn.Module):
        excluded = {_storage_key(t) for t in (*fn.parameters(), *fn.buffers())}
    seen: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in excluded:
            seen[key] = key[2]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn(*args, **kwargs)
    total = sum(seen.values())
    del output
    return total


def _tracked_peak(step_fn: Callable[[], object], tracked: tuple, device: torch.device) -> dict:
    from ._torch_internals import mem_tracker

    tracker = mem_tracker()
    tracker.track_external(*tracked)
    with tracker, warnings.catch_warnings():
        # MemTracker's module hooks warn for modules it only sees in a checkpoint's recompute.
        warnings.filterwarnings("ignore", message="Module is None")
        step_fn()
    snapshot = tracker.get_tracker_snapshot("peak").get(device, {})
    memory = {
        CATEGORIES.get(getattr(key, "value", key), str(key)): value / MIB
        for key, value in snapshot.items()
        if getattr(key, "value", key) in CATEGORIES
    }
    return {"peak_mib": snapshot.get("Total", 0) / MIB, "memory": memory}


def measured_peak(
    step_fn: Callable[[], object], *tracked: nn.Module | torch.optim.Optimizer | torch.Tensor,
    device: str | torch.device = "cpu", breakdown: bool = True,
) -> dict:
    """Peak memory of one ``step_fn()`` call, in MiB, with its breakdown by category.

    ``tracked`` are the objects that exist before the call (model, optimizer, input): their
    tensors count towards the peak. On CPU the peak is MemTracker's (tensor-level). On CUDA it is
    ``torch.cuda.max_memory_allocated`` after a reset, with ``reserved_mib`` beside it, and the
    breakdown comes from a second, tracked call (``breakdown=False``: none, ``memory`` None).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _tracked_peak(step_fn, tracked, device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.synchronize(index)
    torch.cuda.reset_peak_memory_stats(index)
    step_fn()
    torch.cuda.synchronize(index)
    allocated = torch.cuda.max_memory_allocated(index) / MIB
    reserved = torch.cuda.max_memory_reserved(index) / MIB
    if not breakdown:
        return {"peak_mib": allocated, "reserved_mib": reserved, "memory": None}
    tracked_call = _tracked_peak(step_fn, tracked, torch.device("cuda", index))
    return {
        "peak_mib": allocated,
        "reserved_mib": reserved,
        "tracked_peak_mib": tracked_call["peak_mib"],
        "memory": tracked_call["memory"],
    }
