"""One call for every transform, in the order that works: convert, then checkpoint, then lean."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .checkpoint import checkpoint_blocks
from .convert import convert_norm_act
from .lean import lean as lean_model
from .summary import last_summary

__all__ = ["AppliedSummary", "apply"]


@dataclass
class AppliedSummary:
    """The summaries of the transforms ``apply`` ran, in order."""

    parts: list = field(default_factory=list)

    def lines(self) -> list[str]:
        return [line for part in self.parts for line in part.lines()]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def apply(model: nn.Module, *, lean: bool = False, checkpoint: None | str | int = None,
          convert: str | None = None, activation: str | None = None, blocks=None
          ) -> AppliedSummary:
    """Transform ``model`` in place as the CLI flags ask; returns what was done.

    ``convert``: None, "abn" or "inplace_abn" (``activation`` as ``convert_norm_act``);
    ``checkpoint``: None, "blocks" or an int N (segments of N blocks); ``lean``: recompute cheap
    ops in what checkpointing leaves (blocks it does not take, the stem and head chains).
    """
    summary = AppliedSummary()
    if convert is not None:
        summary.parts.append(convert_norm_act(model, norm=convert, activation=activation))
    elif activation is not None:
        raise ValueError(f"activation={activation!r} needs convert='abn' or 'inplace_abn'")
    if lean:
        lean_model(model, blocks)
        summary.parts.append(last_summary("lean"))
    if checkpoint is not None:
        if checkpoint == "blocks":
            every = 1
        elif isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 1:
            every = checkpoint
        else:
            raise ValueError(f"checkpoint={checkpoint!r} is not allowed; use None, 'blocks' or "
                             f"an int >= 1 (blocks per recomputed segment)")
        checkpoint_blocks(model, every=every, blocks=blocks)
        summary.parts.append(last_summary("checkpoint"))
    return summary
