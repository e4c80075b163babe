"""The choices a plan makes per block, and how an assignment of them transforms a model.

One registry: a choice is a name, a one-line description and a function that applies it to
some blocks of a model (``leanstep.transforms``). A block left "plain" is untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["CHOICES", "Choice", "apply_assignment"]


@dataclass(frozen=True)
class Choice:
    name: str
    description: str
    apply: Callable[[nn.Module, list[str], str | None], None]


def _lean(model: nn.Module, names: list[str], activation: str | None) -> None:
    from leanstep.transforms import lean

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean(model, names)


def _checkpoint(model: nn.Module, names: list[str], activation: str | None) -> None:
    from leanstep.transforms import checkpoint_blocks

    checkpoint_blocks(model, every=1, blocks=names)


def _inplace_abn(model: nn.Module, names: list[str], activation: str | None) -> None:
    from leanstep.transforms import convert_norm_act, find_blocks

    with warnings.catch_warnings():  # the plan says so when outputs change
        warnings.simplefilter("ignore")
        for _, block in find_blocks(model, names):
            convert_norm_act(block, norm="inplace_abn", activation=activation)


CHOICES = {
    "plain": Choice("plain", "as built", lambda model, names, activation: None),
    "lean": Choice("lean", "keep conv outputs, recompute cheap ops in backward (exact)", _lean),
    "checkpoint": Choice("checkpoint", "keep the block's input, recompute it in backward",
                         _checkpoint),
    "inplace_abn": Choice("inplace_abn", "BatchNorm+activation -> InplaceABN (invertible "
                          "activation)", _inplace_abn),
}
# Applied in this order: a conversion changes the modules the others wrap.
_ORDER = ("inplace_abn", "lean", "checkpoint")


def apply_assignment(model: nn.Module, blocks: list[str], assignment: list[str],
                     activation: str | None = None) -> nn.Module:
    """Transform ``model`` in place: block ``blocks[i]`` takes choice ``assignment[i]``."""
    if len(blocks) != len(assignment):
        raise ValueError(f"{len(blocks)} blocks but {len(assignment)} choices")
    unknown = sorted(set(assignment) - set(CHOICES))
    if unknown:
        raise ValueError(f"unknown choice(s) {', '.join(unknown)}; valid: {', '.join(CHOICES)}")
    for choice in _ORDER:
        names = [name for name, c in zip(blocks, assignment, strict=True) if c == choice]
        if names:
            CHOICES[choice].apply(model, names, activation)
    return model
