"""One-level ``torch.fx`` tracing of a module's *current* forward (children are leaves)."""

from __future__ import annotations

import torch
from torch import nn

from .regions import region_state

__all__ = ["trace_one_level"]


class _OneLevel(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return True


def trace_one_level(module: nn.Module) -> torch.fx.Graph:
    """The graph of what ``module``'s forward runs now: an instance-level forward (a previous
    rewrite) is traced rather than the class's; a region's wrapper is looked through."""
    state = region_state(module)
    own = state.own_forward if state is not None else module.__dict__.get("forward")
    if own is None:
        return _OneLevel().trace(module)
    cls = module.__class__
    # fx traces type(root).forward: trace the instance's forward through a throwaway subclass.
    module.__class__ = type(cls.__name__, (cls,), {"forward": own.__func__})
    try:
        return _OneLevel().trace(module)
    finally:
        module.__class__ = cls
