"""The peak and work of any assignment of choices to blocks, composed from uniform traces.

Blocks run in order; while block i runs (forward or backward), blocks 0..i-1 hold what they
keep for backward and the blocks after it hold nothing (not yet run, or already through
backward). So, for an assignment ``a`` (a choice per block), with ``P_i(a)`` the bytes kept by
blocks 0..i-1:

    peak(a) = max( max_i [ E_i(a_i) + P_i(a) ],  max_k [ G_k + P_k(a) ] )

``E_i(c)``, block i's own part (its transient peak over what the blocks before it keep, plus
parameters, gradients, optimizer state, stem and head), comes from the trace where every block
took choice c; ``G_k`` (the parts between blocks: stem, head, loss, optimizer step) from every
trace, the largest. Each uniform trace is reproduced exactly; a mixed assignment is exact as
long as what a block keeps does not depend on its neighbours' choices (its output is kept by
the next block whatever that block does), which the planner checks with one real prediction of
the plan it picks.

Everything scales to another batch size: the batch-independent part of each figure
(parameters, buffers, gradients, optimizer state) stays, the rest grows with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .trace import Trace, Work

__all__ = ["Table"]


@dataclass
class Table:
    """Per-block figures for each choice, from one uniform trace per choice (bytes)."""

    blocks: list[str]
    choices: list[str]
    batch_size: int
    keep: dict[str, list[int]]
    own: dict[str, list[int]]
    own_fixed: dict[str, list[int]]
    gap: list[int | None]
    gap_fixed: list[int]
    work: dict[str, list[Work]]
    gap_work: Work

    @classmethod
    def from_traces(cls, blocks: list[str], traces: dict[str, Trace], batch_size: int) -> Table:
        keep, own, own_fixed, work = {}, {}, {}, {}
        count = len(blocks)
        gap: list[int | None] = [None] * (count + 1)
        gap_fixed = [0] * (count + 1)
        for choice, trace in traces.items():
            prefix = _prefix(trace.keep)
            keep[choice] = list(trace.keep)
            own[choice] = [
                0 if peak is None else peak - prefix[i] for i, peak in enumerate(trace.block_peak)
            ]
            own_fixed[choice] = list(trace.block_fixed)
            work[choice] = list(trace.work)
            for k, peak in enumerate(trace.gap_peak):
                if peak is not None and (gap[k] is None or peak - prefix[k] > gap[k]):
                    gap[k] = peak - prefix[k]
                    gap_fixed[k] = trace.gap_fixed[k]
        gap_work = max((t.gap_work for t in traces.values()), key=lambda w: (w.flops, w.bytes))
        return cls(
            blocks=list(blocks), choices=list(traces), batch_size=batch_size, keep=keep,
            own=own, own_fixed=own_fixed, gap=gap, gap_fixed=gap_fixed, work=work,
            gap_work=gap_work,
        )

    def scaled(self, batch_size: int) -> Table:
        """The table at ``batch_size``: batch-dependent bytes scale, the rest stays."""
        ratio = batch_size / self.batch_size

        def scale(total: int | None, fixed: int) -> int | None:
            return None if total is None else round(fixed + (total - fixed) * ratio)

        return Table(
            blocks=self.blocks, choices=self.choices, batch_size=batch_size,
            keep={c: [round(k * ratio) for k in ks] for c, ks in self.keep.items()},
            own={
                c: [scale(e, f) for e, f in zip(es, self.own_fixed[c], strict=True)]
                for c, es in self.own.items()
            },
            own_fixed=self.own_fixed,
            gap=[scale(g, f) for g, f in zip(self.gap, self.gap_fixed, strict=True)],
            gap_fixed=self.gap_fixed, work=self.work, gap_work=self.gap_work,
        )

    def peak(self, assignment: list[str]) -> int:
        """Composed peak bytes of ``assignment`` (a choice per block)."""
        return self.peak_parts(assignment)[0]

    def peak_parts(self, assignment: list[str]) -> tuple[int, str]:
        """Composed peak and where it happens ("block NAME" or "outside the blocks")."""
        kept = 0
        best, where = -1, ""
        for i, choice in enumerate(assignment):
            if self.gap[i] is not None and self.gap[i] + kept > best:
                best, where = self.gap[i] + kept, "outside the blocks"
            if self.own[choice][i] + kept > best:
                best, where = self.own[choice][i] + kept, f"block {self.blocks[i]}"
            kept += self.keep[choice][i]
        last = self.gap[len(assignment)]
        if last is not None and last + kept > best:
            best, where = last + kept, "outside the blocks"
        return best, where

    def work_of(self, assignment: list[str]) -> Work:
        """Total work of the step under ``assignment``."""
        total = self.gap_work
        for i, choice in enumerate(assignment):
            total = total + self.work[choice][i]
        return total


def _prefix(values: list[int]) -> list[int]:
    prefix = [0]
    for value in values:
        prefix.append(prefix[-1] + value)
    return prefix
