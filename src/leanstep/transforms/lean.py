"""``lean``: recompute the cheap ops of every block in backward, keep the expensive ones.

Per block, a lean region (``regions.py``): conv and matmul outputs are kept from the forward
pass, normalisation, activations, element-wise ops, pooling and gating are recomputed from
them in backward. Loss, gradients and running statistics are those of the plain model (the
recompute runs the same ops on the same values); in eval mode or under ``no_grad`` the forward
is the plain one.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from .blocks import Unit, find_blocks
from .outside import lean_outside, remove_outside
from .regions import clear_region, install_region, region_state
from .summary import TransformSummary, _remember

__all__ = ["apply_regions", "lean"]

_log = logging.getLogger("leanstep")
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def _weighted_count(module: nn.Module) -> int:
    return sum(isinstance(m, _WEIGHTED) for m in module.modules())


def _left_plain(model: nn.Module, blocks: list[tuple[str, nn.Module]]
                ) -> list[tuple[str, str]]:
    """Modules with parameters of their own outside every block."""
    covered = {id(m) for _, block in blocks for m in block.modules()}
    return [(name or "(model)", "outside the blocks")
            for name, module in model.named_modules()
            if id(module) not in covered and any(True for _ in module.parameters(recurse=False))]


def _clear_segment(parent: nn.Module, start: int, stop: int, mode: str) -> None:
    state = region_state(parent)
    if state is None:
        return
    for first, (last, segment_mode, name) in list(state.segments.items()):
        if segment_mode == mode and first < stop and start < last:
            install_region(parent, None, name=name, segment=(first, last))


def apply_regions(model: nn.Module, mode: str, blocks, *, every: int = 1,
                  enable: bool = True) -> TransformSummary:
    """Install (or with ``enable=False`` remove) ``mode`` regions on ``blocks`` of ``model``.

    ``every`` > 1 groups consecutive blocks that are children of one plain nn.Sequential.
    """
    summary = TransformSummary(kind=mode, enabled=enable)
    modules = dict(model.named_modules())
    if not enable:
        for name, block in blocks:
            if isinstance(block, Unit):
                _clear_segment(block.parent, block.start, block.stop, mode)
                continue
            clear_region(block, (mode,))
            parent_name, _, tail = name.rpartition(".")
            parent = modules.get(parent_name) if name else None
            if parent is not None and tail.isdigit():
                _clear_segment(parent, int(tail), int(tail) + 1, mode)
        summary.blocks = [name for name, _ in blocks]
        return summary
    # Group consecutive blocks sharing a plain Sequential parent into runs of ``every``.
    runs: list[tuple[nn.Module, str, list[tuple[str, nn.Module]], int, int]] = []
    for name, block in blocks:
        if isinstance(block, Unit):
            parent, start, stop = block.parent, block.start, block.stop
            parent_name = name.split("[")[0]
            if mode == "lean" and every == 1 and isinstance(parent[start], _WEIGHTED):
                # A lean run starts after its unit's conv and takes in the next unit's conv:
                # its input is then a kept conv output, not a second saved tensor.
                start, stop = start + 1, min(stop + 1, len(parent))
                following = region_state(parent)
                if following is not None and stop - 1 in following.segments:
                    stop -= 1
        else:
            parent_name, _, tail = name.rpartition(".")
            parent = modules.get(parent_name) if name else None
            plain_seq = (isinstance(parent, nn.Sequential)
                         and type(parent).forward is nn.Sequential.forward and tail.isdigit())
            if every == 1 or not plain_seq:
                if every > 1:
                    summary.notes.append(f"{name}: parent is not a plain nn.Sequential, "
                                         f"recomputed alone")
                runs.append((block, name, [(name, block)], -1, -1))
                continue
            start, stop = int(tail), int(tail) + 1
        last = runs[-1] if runs else None
        if (last is not None and last[0] is parent and last[4] == start
                and len(last[2]) < every):
            runs[-1] = (parent, last[1], last[2] + [(name, block)], last[3], stop)
        else:
            runs.append((parent, parent_name, [(name, block)], start, stop))
    for target, _target_name, members, start, stop in runs:
        names = [n for n, _ in members]
        label = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        if start < 0:
            # A block recomputed alone; any regions inside it are superseded.
            for sub in target.modules():
                if sub is not target:
                    clear_region(sub, ("lean", "checkpoint"))
            install_region(target, mode, name=label)
        else:
            for _, block in members:
                if not isinstance(block, Unit):
                    clear_region(block, ("lean", "checkpoint"))
            install_region(target, mode, name=label, segment=(start, stop))
        summary.segments.append(names)
        summary.blocks.extend(names)
        summary.weighted += sum(_weighted_count(b) for _, b in members)
    summary.left = _left_plain(model, blocks)
    return summary


def lean(model: nn.Module, blocks=None, *, enable: bool = True, report: bool = False
         ) -> nn.Module:
    """Make ``model``'s training step keep fewer activations, in place; returns ``model``.

    Each block (``find_blocks``; ``blocks=`` names them; a model or sub-module without stage
    containers is one block itself) becomes a lean region, and with ``blocks=None`` so does
    each chain of layers that the model's own forward runs outside the blocks, from a conv or
    linear layer on (the stem: ``conv1+bn1+relu+maxpool``; traced with torch.fx): in
    backward, the cheap ops are recomputed from the kept conv/matmul outputs. Exact: loss,
    gradients and running statistics equal the plain model's. Idempotent; ``enable=False``
    removes it. ``report=True`` logs the summary (logger "leanstep"); it is always available
    as ``leanstep.transforms.last_summary("lean")``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lean needs an nn.Module, got {type(model).__name__}")
    if blocks is None:
        try:
            found = find_blocks(model)
        except ValueError:
            found = [("", model)]
    else:
        found = find_blocks(model, blocks)
    if enable and not any(_weighted_count(b) for _, b in found) and not any(
            True for _ in model.parameters()):
        summary = TransformSummary(kind="lean", enabled=False)
        warnings.warn(f"lean: nothing to transform in {type(model).__name__} (0 blocks with "
                      f"parameters, 0 conv/linear layers); model returned unchanged",
                      stacklevel=2)
        _remember("lean", summary)
        return model
    summary = apply_regions(model, "lean", found, enable=enable)
    if found == [("", model)]:
        summary.notes.append("no stage containers: the whole module is one region")
    elif not enable:
        remove_outside(model)
    elif blocks is None:
        chains = lean_outside(model, summary.notes)
        layers = {layer for chain in chains for layer in chain.split("+")}
        summary.blocks.extend(chains)
        summary.segments.extend([chain] for chain in chains)
        summary.left = [(name, why) for name, why in summary.left if name not in layers]
    _remember("lean", summary)
    if report:
        for line in summary.lines():
            _log.info(line)
    return model
