"""What a transform did, as plain data: covered, left alone and why; printable as lines."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConversionSummary", "TransformSummary", "last_summary"]

_LAST: dict[str, object] = {}


def last_summary(kind: str = "lean"):
    """The summary of the last ``lean`` / ``checkpoint_blocks`` / ``convert_norm_act`` call."""
    return _LAST.get(kind)


def _remember(kind: str, summary) -> None:
    _LAST[kind] = summary


@dataclass
class TransformSummary:
    """``lean`` or ``checkpoint_blocks``: the regions it installed (or removed) and what it left.

    ``blocks``: region names; ``segments``: the same grouped as recomputed together;
    ``left``: (module name, reason) for the parameterised modules outside every region;
    ``weighted``: conv/linear layers inside the regions (their outputs are what lean keeps).
    """

    kind: str
    blocks: list[str] = field(default_factory=list)
    segments: list[list[str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    weighted: int = 0
    enabled: bool = True
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        verb = "recomputes" if self.enabled else "removed from"
        what = ("cheap ops (keeps conv/linear outputs)" if self.kind == "lean"
                else "whole blocks")
        head = (f"{self.kind}: {len(self.blocks)} block(s) in {len(self.segments)} region(s), "
                f"{verb} {what}; {self.weighted} conv/linear layer(s) inside")
        out = [head]
        if self.blocks:
            shown = ", ".join(self.blocks[:6]) + (", ..." if len(self.blocks) > 6 else "")
            out.append(f"  blocks: {shown}")
        if self.left:
            shown = ", ".join(name for name, _ in self.left[:8])
            reasons = sorted({reason for _, reason in self.left})
            out.append(f"  left plain ({len(self.left)}): {shown}"
                       f"{', ...' if len(self.left) > 8 else ''} ({'; '.join(reasons)})")
        out.extend(f"  note: {note}" for note in self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class ConversionSummary:
    """``convert_norm_act``: every BatchNorm converted (with the activation it absorbed) and
    every one left, with the reason."""

    norm: str
    converted: list[tuple[str, str]] = field(default_factory=list)  # (bn name, activation)
    left: list[tuple[str, str]] = field(default_factory=list)  # (bn name, reason)
    changes_outputs: bool = False
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"convert_norm_act({self.norm}): {len(self.converted)} BatchNorm(s) converted, "
               f"{len(self.left)} left"]
        for name, activation in self.converted:
            out.append(f"  {name}: {self.norm} + {activation}")
        for name, reason in self.left:
            out.append(f"  left {name}: {reason}")
        if self.changes_outputs:
            out.append("  outputs change: the activation was replaced as asked")
        out.extend(f"  note: {note}" for note in self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())
