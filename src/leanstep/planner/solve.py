"""Choosing a choice per block: the fastest assignment whose composed peak fits a budget.

Exact dynamic programming over the blocks in order. The constraint at block i involves only what
blocks 0..i-1 keep (``compose.Table``), so a partial assignment is summed up by two numbers: the
bytes it keeps and its cost. Of the partial assignments that keep the same bytes only the
cheapest matters, and one that keeps more and costs more is never better: the planner keeps the
Pareto front of (kept bytes, cost) after each block, merging assignments whose kept bytes are
within ``budget / 20000`` of each other (the cheaper survives).
"""

from __future__ import annotations

from collections.abc import Callable

from .compose import Table

__all__ = ["fastest", "smallest_peak"]

_RESOLUTION = 20000


def _front(states: list[tuple]) -> list[tuple]:
    """The (kept, cost, ...) states that no other beats on both, merged in buckets of kept."""
    states.sort(key=lambda s: (s[0], s[1]))
    front: list[tuple] = []
    for state in states:
        if not front or state[1] < front[-1][1]:
            front.append(state)
    return front


def _merge(front: list[tuple], quantum: float) -> list[tuple]:
    merged: dict[int, tuple] = {}
    for state in front:
        key = int(state[0] // quantum) if quantum > 0 else state[0]
        if key not in merged or state[1] < merged[key][1]:
            merged[key] = state
    return _front(list(merged.values()))


def fastest(
    table: Table, budget: int, seconds: Callable[[str, int], float],
    allowed: list[list[str]],
) -> list[str] | None:
    """The assignment with the least total ``seconds(choice, block)`` whose composed peak is
    at most ``budget`` bytes; None when none fits. ``allowed[i]``: block i's choices."""
    quantum = budget / _RESOLUTION
    states: list[tuple] = [(0, 0.0, ())]
    for i, choices in enumerate(allowed):
        gap = table.gap[i]
        grown = []
        for kept, cost, path in states:
            if gap is not None and gap + kept > budget:
                continue
            for choice in choices:
                if table.own[choice][i] + kept <= budget:
                    grown.append((kept + table.keep[choice][i], cost + seconds(choice, i),
                                  (*path, choice)))
        states = _merge(_front(grown), quantum)
        if not states:
            return None
    last = table.gap[len(allowed)]
    final = [s for s in states if last is None or last + s[0] <= budget]
    if not final:
        return None
    best = min(s[1] for s in final)
    ties = [s for s in final if s[1] <= best * (1 + 1e-9)]
    return list(min(ties, key=lambda s: table.peak(list(s[2])))[2])


def smallest_peak(table: Table, allowed: list[list[str]]) -> list[str]:
    """The assignment with the smallest composed peak."""
    states: list[tuple] = [(0, 0, ())]
    for i, choices in enumerate(allowed):
        gap = table.gap[i]
        grown = []
        for kept, worst, path in states:
            worst = max(worst, gap + kept) if gap is not None else worst
            for choice in choices:
                peak = max(worst, table.own[choice][i] + kept)
                grown.append((kept + table.keep[choice][i], peak, (*path, choice)))
        states = _front(grown)
    last = table.gap[len(allowed)]
    return list(min(
        states, key=lambda s: max(s[1], last + s[0]) if last is not None else s[1]
    )[2])
