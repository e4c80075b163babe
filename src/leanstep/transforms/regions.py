"""Recompute regions: run a block (or a run of a Sequential's children) so that backward
rebuilds what it needs, without renaming anything.

A region is installed by giving the module an instance-level ``forward`` (the class's is kept
and called inside), so ``named_parameters()``, ``state_dict()`` keys, attribute paths and hooks
are those of the plain model. Two modes:

- ``"checkpoint"``: non-reentrant ``torch.utils.checkpoint``: only the region's inputs are kept;
  backward runs the whole region again.
- ``"lean"``: one autograd node per region (``lean_region.py``) whose forward runs the block
  without autograd while its convolution and linear layers keep their outputs and its batch
  norms their batch statistics; backward runs the block again, handing those back, so it
  recomputes only the cheap ops (normalisation apply, activations, element-wise, pooling,
  gating). Unlike torch's selective checkpointing it accepts in-place ops: a kept output that
  is overwritten afterwards (a conv followed by an in-place ReLU or an InplaceABN, an output
  the caller overwrites) is not handed back stale but recomputed.

Both keep BatchNorm running statistics (and any buffer the forward updates) updated once per
step (the recompute updates scratch copies, or the buffers are restored after it). The region's
inputs are copied for the first run if it writes over them (InplaceABN, an in-place
activation; learned on the region's first step, checked on every later one), so the recompute
starts from what the forward started from. In eval mode or under
``no_grad`` a region is the plain forward. Inside ``torch.compile`` a region is torch's
checkpoint higher-order op (lean: with a selective policy keeping ``KEEP_OPS`` outputs), which
the compiler functionalises and partitions: one graph, buffers updated once.
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from .lean_region import _versions, lean_pass_active, run_lean

__all__ = ["KEEP_OPS", "RegionState", "clear_region", "install_region", "region_state",
           "run_region"]

_aten = torch.ops.aten
# Ops whose outputs a compiled lean region keeps: everything else is recomputed in backward.
KEEP_OPS = {
    op
    for name in ("convolution", "_convolution", "mm", "addmm", "bmm", "baddbmm",
                 "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention")
    if hasattr(_aten, name)
    for op in (getattr(_aten, name).default,)
}


@contextlib.contextmanager
def _restored(buffers: list[torch.Tensor]):
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def _copies(values: tuple) -> tuple:
    return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in values)


def _aliases(values: tuple) -> tuple:
    return tuple(v.view_as(v) if isinstance(v, torch.Tensor) else v for v in values)


# Whether a region writes over its inputs, learned once: first module -> {region: bool}.
_WRITES_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_region(fn, modules: list[nn.Module], args: tuple, kwargs: dict, *, name: str,
               lean: bool, own: nn.Module | None = None):
    """``fn(*args, **kwargs)`` as a recompute region over ``modules`` (see module docstring);
    ``own``: the module whose forward ``fn`` is (its hooks run outside the region)."""
    if not (torch.is_grad_enabled() and any(m.training for m in modules)):
        return fn(*args, **kwargs)
    if torch.compiler.is_compiling():
        return _compiled_region(fn, args, kwargs, lean)
    if lean_pass_active():  # inside a lean region's pass: that region recomputes this one
        return fn(*args, **kwargs)
    learned = _WRITES_INPUTS.setdefault(modules[0], {})
    key = (len(modules), lean, name)  # regions may nest, sharing their first module
    writes_inputs = learned.get(key, True)
    if lean:
        return run_lean(fn, modules, args, kwargs, name=name, writes_inputs=writes_inputs,
                        learn=functools.partial(learned.__setitem__, key), own=own)
    buffers = [b for m in modules for b in m.buffers()]
    norm_buffers = {id(b) for m in modules for n in m.modules() if isinstance(n, _BatchNorm)
                    for b in n.buffers(recurse=False)}
    calls = 0
    stateful: list[torch.Tensor] = []

    def run(*inputs, **kw):
        nonlocal calls, writes_inputs, stateful
        calls += 1
        if calls == 1:
            # Copies of the inputs only for a region that writes them (learned on its first
            # training step, then checked on every step by the version counters).
            inputs = _copies(inputs) if writes_inputs else _aliases(inputs)
            tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
            before, buffers_before = _versions(tensors), _versions(buffers)
            output = fn(*inputs, **kw)
            wrote = before != _versions(tensors)
            if wrote and not writes_inputs:
                raise RuntimeError(
                    f"leanstep: region {name!r} wrote over its input in this step but not in "
                    f"its first one, so its recompute would start from the wrong values; its "
                    f"forward depends on data or global state: use checkpoint_blocks or leave "
                    f"it plain")
            writes_inputs = learned[key] = wrote
            # BatchNorm's kernels update their statistics without a version bump.
            stateful = [b for b, v in zip(buffers, buffers_before, strict=True)
                        if b._version != v or id(b) in norm_buffers]
            return output
        if writes_inputs:
            inputs = _copies(inputs)
        with _restored(stateful):
            return fn(*inputs, **kw)

    return checkpoint(run, *args, use_reentrant=False, context_fn=noop_context_fn, **kwargs)


def _compiled_policy(ctx, func, *args, **kwargs):
    """Under torch.compile a lean region keeps what ``KEEP_OPS`` make, recomputes the rest."""
    if func in KEEP_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_COMPILED_LEAN = functools.partial(create_selective_checkpoint_contexts, _compiled_policy)


def _compiled_region(fn, args: tuple, kwargs: dict, lean: bool):
    """A region inside ``torch.compile``: dynamo traces ``checkpoint`` as a higher-order op and
    the compiler's partitioner recomputes in backward what the region does not keep (a lean
    region: torch's selective checkpointing with the ``KEEP_OPS`` policy; the compiler
    functionalises in-place ops, so the eager path's kept outputs, input copies and
    buffer restores are not needed: buffer updates stay in the forward graph, run once)."""
    if lean:
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_COMPILED_LEAN, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


@dataclass
class RegionState:
    """What ``install_region`` attached to a module (``module.__dict__['_leanstep']``)."""

    mode: str | None = None  # "lean" / "checkpoint" for the module itself, None: plain
    name: str = ""
    own_forward: object = None  # an instance-level forward that was there before, if any
    # For an nn.Sequential parent: start index -> (stop index, mode, name) of child runs.
    segments: dict = field(default_factory=dict)


_ATTR = "_leanstep"


def region_state(module: nn.Module) -> RegionState | None:
    return module.__dict__.get(_ATTR)


def _plain_forward(module: nn.Module, state: RegionState):
    # functools.partial rather than a bound method: torch.compile traces it without a break
    if state.segments:
        return functools.partial(_segmented, module)
    if state.own_forward is not None:
        return state.own_forward
    return functools.partial(type(module).forward, module)


def _region_forward(self, *args, **kwargs):
    state = self.__dict__[_ATTR]
    plain = _plain_forward(self, state)
    if state.mode is None:
        return plain(*args, **kwargs)
    return run_region(plain, [self], args, kwargs, name=state.name, lean=state.mode == "lean",
                      own=self)


def _segmented(self, x):
    """``nn.Sequential.forward`` with runs of children as recompute regions."""
    state = self.__dict__[_ATTR]
    children = list(self)
    index = 0
    while index < len(children):
        segment = state.segments.get(index)
        if segment is None:
            x = children[index](x)
            index += 1
            continue
        stop, mode, name = segment
        part = children[index:stop]

        def run(value, part=part):
            for child in part:
                value = child(value)
            return value

        x = run_region(run, part, (x,), {}, name=name, lean=mode == "lean")
        index = stop
    return x


def _attach(module: nn.Module) -> RegionState:
    state = region_state(module)
    if state is None:
        state = RegionState(own_forward=module.__dict__.get("forward"))
        module.__dict__[_ATTR] = state
        module.forward = types.MethodType(_region_forward, module)
    return state


def _detach_if_plain(module: nn.Module) -> None:
    state = region_state(module)
    if state is not None and state.mode is None and not state.segments:
        del module.__dict__[_ATTR]
        if state.own_forward is not None:
            module.forward = state.own_forward
        else:
            del module.__dict__["forward"]


def install_region(module: nn.Module, mode: str | None, *, name: str = "",
                   segment: tuple[int, int] | None = None) -> None:
    """Make ``module`` (or children ``segment`` = (start, stop) of an nn.Sequential) a region
    of ``mode`` ("lean", "checkpoint"; None removes it)."""
    if segment is None:
        if mode is None and region_state(module) is None:
            return
        state = _attach(module)
        state.mode, state.name = mode, name
        _detach_if_plain(module)
        return
    if not (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward):
        raise ValueError(f"{name!r}: runs of children need a plain nn.Sequential parent, got "
                         f"{type(module).__name__}")
    start, stop = segment
    if mode is None and region_state(module) is None:
        return
    state = _attach(module)
    for other in list(state.segments):
        other_stop, other_mode, other_name = state.segments[other]
        if not (other < stop and start < other_stop):
            continue
        if other_mode == "lean" and other < start < other_stop <= start + 1:
            # a lean run reaching one layer (the next unit's conv) into the new one: shorten it
            state.segments[other] = (start, other_mode, other_name)
        else:  # overlapping runs: the new one replaces them
            del state.segments[other]
    if mode is not None:
        state.segments[start] = (stop, mode, name)
    _detach_if_plain(module)


def clear_region(module: nn.Module, modes: tuple[str, ...]) -> int:
    """Remove regions of ``modes`` from ``module`` (itself and its segments); returns how many."""
    state = region_state(module)
    if state is None:
        return 0
    removed = 0
    if state.mode in modes:
        state.mode = None
        removed += 1
    for start in [s for s, (_, mode, _) in state.segments.items() if mode in modes]:
        del state.segments[start]
        removed += 1
    _detach_if_plain(module)
    return removed
