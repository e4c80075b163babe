"""``checkpoint_blocks``: recompute whole blocks in backward, for any model, names unchanged."""

from __future__ import annotations

import logging

from torch import nn

from .blocks import find_blocks
from .lean import apply_regions
from .summary import _remember

__all__ = ["checkpoint_blocks"]

_log = logging.getLogger("leanstep")


def checkpoint_blocks(model: nn.Module, every: int = 1, blocks=None, enable: bool = True, *,
                      report: bool = False) -> nn.Module:
    """Recompute ``model``'s blocks in backward (segments of ``every`` consecutive blocks).

    Blocks are ``find_blocks(model, blocks)``. ``named_parameters()``, ``state_dict()`` keys and
    attribute paths stay as they were; BatchNorm running statistics are updated once per step;
    ``enable=False`` switches it off again. A checkpointed block supersedes ``lean`` on it.
    Returns ``model``; the summary is ``leanstep.transforms.last_summary("checkpoint")``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"checkpoint_blocks needs an nn.Module, got {type(model).__name__}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be an int >= 1 (blocks per recomputed segment), "
                         f"got {every!r}")
    found = find_blocks(model, blocks)
    summary = apply_regions(model, "checkpoint", found, every=every, enable=enable)
    _remember("checkpoint", summary)
    if report:
        for line in summary.lines():
            _log.info(line)
    return model
