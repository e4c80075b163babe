"""The block finder: the repeated units of a model that lean and checkpointing work on.

A block is what timm's ``checkpoint_seq`` recomputes: a child of a stage container
(``nn.Sequential`` / ``nn.ModuleList``). Found automatically:

- a container whose children are composite modules (they have sub-modules), such as
  ResNet's ``layer1`` (``layer1.0``, ``layer1.1``, ...) or EfficientNet's ``blocks.3``
  (containers of containers are searched inside: ``blocks.3.0``, ...);
- an ``nn.Sequential`` of plain layers with at least two convolutions or linear layers, such
  as VGG's ``features``: a block is a *unit*, a conv/linear layer and the layers after it up to
  the next one, named as the slice that gives it, ``"features[0:3]"`` (``model.features[0:3]``
  is that unit as an ``nn.Sequential``).

Names are qualified as in ``named_modules()``. ``blocks=`` takes module names (a name picks
that module), unit slices, or class names (every module of that class, outermost only).
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["Unit", "find_blocks", "is_unit", "resolve_blocks"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_SLICE = re.compile(r"^(?P<parent>.*)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def _composite(module: nn.Module) -> bool:
    """Has a sub-module with parameters (a norm+activation layer's parameter-free ``act``
    does not make it composite)."""
    return any(True for child in module.children() for _ in child.parameters())


def _stage_like(module: nn.Module) -> bool:
    """A container of blocks (rather than a block that happens to be a Sequential)."""
    return isinstance(module, _CONTAINERS) and any(_composite(c) for c in module.children())


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Unit(nn.Sequential):
    """A run of consecutive children of an ``nn.Sequential`` (a VGG conv unit), as a view.

    It shares the children (nothing is copied or re-registered in the model); ``parent``,
    ``start`` and ``stop`` say where it lies.
    """

    def __init__(self, parent: nn.Sequential, start: int, stop: int):
        super().__init__(*list(parent)[start:stop])
        object.__setattr__(self, "parent", parent)
        self.start, self.stop = start, stop


def is_unit(name: str) -> bool:
    """True for a unit name such as ``"features[0:3]"``."""
    return _SLICE.match(name) is not None


def _units(sequential: nn.Sequential) -> list[tuple[int, int]]:
    """Index ranges of the conv units of a Sequential of plain layers."""
    children = list(sequential)
    starts = [i for i, child in enumerate(children) if isinstance(child, _WEIGHTED)]
    if len(starts) < 2 or not any(isinstance(c, nn.modules.conv._ConvNd) for c in children):
        return []
    ranges = []
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else len(children)
        # The last unit ends where the Sequential ends; the first starts at index 0.
        ranges.append((0 if k == 0 else start, stop))
    return ranges


def _auto(module: nn.Module, prefix: str, found: list) -> None:
    children = list(module.named_children())
    if isinstance(module, _CONTAINERS):
        composite = [(n, c) for n, c in children if _composite(c) and _has_params(c)]
        if composite and all(_stage_like(c) for _, c in composite):
            for name, child in composite:
                _auto(child, _join(prefix, name), found)
            return
        if composite:  # blocks, and maybe a stem such as torchvision's Conv2dNormActivation
            found.extend((_join(prefix, n), c) for n, c in composite)
            return
        if not composite and isinstance(module, nn.Sequential):
            units = _units(module)
            found.extend((f"{prefix}[{a}:{b}]", Unit(module, a, b)) for a, b in units)
            if units:
                return
    for name, child in children:
        if _composite(child):
            _auto(child, _join(prefix, name), found)


def _lookup(model: nn.Module, name: str) -> nn.Module:
    match = _SLICE.match(name)
    target = match.group("parent") if match else name
    modules = dict(model.named_modules())
    if target not in modules:
        raise ValueError(f"block {name!r}: no module named {target!r} in {type(model).__name__}")
    module = modules[target]
    if not match:
        return module
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"block {name!r}: {target!r} is a {type(module).__name__}, not an "
                         f"nn.Sequential, so it cannot be sliced")
    start, stop = int(match.group("start")), int(match.group("stop"))
    if not 0 <= start < stop <= len(module):
        raise ValueError(f"block {name!r}: slice out of range for {target!r} "
                         f"({len(module)} children)")
    return Unit(module, start, stop)


def resolve_blocks(model: nn.Module, blocks: list[str] | tuple[str, ...] | str
                   ) -> list[tuple[str, nn.Module]]:
    """The blocks that ``blocks`` (module names, unit slices or class names) name."""
    if isinstance(blocks, str):
        blocks = [b for b in blocks.split(",") if b]
    found: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    modules = list(model.named_modules())
    for entry in blocks:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"blocks: expected module names or class names, got {entry!r}")
        names = {n for n, _ in modules}
        if entry in names or is_unit(entry):
            pairs = [(entry, _lookup(model, entry))]
        else:
            pairs = [(n, m) for n, m in modules if type(m).__name__ == entry]
            # Outermost only: a block inside another block of the same class is covered.
            pairs = [(n, m) for n, m in pairs
                     if not any(n.startswith(o + ".") for o, _ in pairs if o != n)]
            if not pairs:
                classes = sorted({type(m).__name__ for _, m in modules if _composite(m)})
                raise ValueError(
                    f"blocks: {entry!r} is neither a module name nor a class name in "
                    f"{type(model).__name__} (composite classes: {', '.join(classes[:12])})"
                )
        for name, module in pairs:
            if name not in seen:
                seen.add(name)
                found.append((name, module))
    return found


def find_blocks(model: nn.Module, blocks=None) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model`` as ``(qualified name, module)`` pairs, in forward order.

    ``blocks=None`` finds them automatically (see the module docstring); otherwise ``blocks``
    is a list (or comma-separated string) of module names, unit slices (``"features[0:3]"``)
    or class names. Raises ValueError when none are found, naming what to pass instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_blocks needs an nn.Module, got {type(model).__name__}")
    if blocks is not None:
        found = resolve_blocks(model, blocks)
    else:
        found = []
        _auto(model, "", found)
    if not found:
        classes = sorted({type(m).__name__ for _, m in model.named_modules() if _composite(m)})
        raise ValueError(
            f"no blocks found in {type(model).__name__}: it has no stage container "
            f"(nn.Sequential/nn.ModuleList of blocks); pass blocks=[module or class names], "
            f"e.g. one of: {', '.join(classes[:8]) or 'none'}"
        )
    return found
