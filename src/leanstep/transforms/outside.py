"""Lean regions for the chains of layers outside the blocks (stem and head).

A model's own forward calls its stem and head layers directly (``self.maxpool(self.relu(
self.bn1(self.conv1(x))))``), so they cannot be grouped by wrapping a container. Instead the
model's forward is traced one level deep with ``torch.fx`` (its children are leaves) and every
chain of at least two layers that starts at a convolution or linear layer, where each step
feeds only the next, is run as one lean region; the model's forward becomes the traced code
with those chains replaced by region calls. Modules, names, state dict and class stay as
they were; ``remove_outside`` restores the original forward. A forward that cannot be traced
is left plain (the summary says why).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .regions import region_state, run_region
from .tracing import trace_one_level

__all__ = ["lean_outside", "remove_outside"]

_ATTR = "_leanstep_outside"
_KEEP = (nn.modules.conv._ConvNd, nn.Linear)


def _is_block_like(module: nn.Module) -> bool:
    return any(True for child in module.children() for _ in child.parameters())


def _chain_link(node, parent: nn.Module) -> bool:
    """A node that takes one tensor (its first argument) and nothing else from the graph."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    others = list(node.args[1:]) + list(node.kwargs.values())
    flat: list = []
    torch.fx.node.map_arg(others, flat.append)
    if flat:
        return False
    if node.op == "call_module":
        module = parent.get_submodule(node.target)
        return not _is_block_like(module) and region_state(module) is None
    return True


def _chains(graph, parent: nn.Module) -> list[list]:
    chains, current = [], []
    for node in graph.nodes:
        starts = (node.op == "call_module" and _chain_link(node, parent)
                  and isinstance(parent.get_submodule(node.target), _KEEP))
        if current and _chain_link(node, parent) and node.args[0] is current[-1] and len(
                current[-1].users) == 1:
            current.append(node)
            continue
        if len(current) >= 2:
            chains.append(current)
        current = [node] if starts else []
    if len(current) >= 2:
        chains.append(current)
    return chains


def _lean_chain(holder: dict, key: str, x):
    module, members = holder[key]
    return run_region(module, members, (x,), {}, name=key, lean=True)


def lean_outside(model: nn.Module, notes: list[str]) -> list[str]:
    """Make the stem/head chains of ``model``'s own forward lean regions; returns their names."""
    if _ATTR in model.__dict__ or region_state(model) is not None:
        return model.__dict__.get(_ATTR, {}).get("names", [])
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        return []
    try:
        graph = trace_one_level(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure leaves the forward plain
        reason = str(error).splitlines()[0][:100] if str(error) else type(error).__name__
        notes.append(f"layers outside the blocks left plain: forward of "
                     f"{type(model).__name__} cannot be traced ({reason})")
        return []
    chains = _chains(graph, model)
    if not chains:
        return []
    holder: dict = {}
    names = []
    for chain in chains:
        sub = torch.fx.Graph()
        env = {chain[0].args[0]: sub.placeholder("x")}
        for node in chain:
            env[node] = sub.node_copy(node, lambda n, env=env: env[n])
        sub.output(env[chain[-1]])
        members = [model.get_submodule(n.target) for n in chain if n.op == "call_module"]
        key = "+".join(n.target if n.op == "call_module" else n.name for n in chain)
        holder[key] = (torch.fx.GraphModule(model, sub), members)
        names.append(key)
        with graph.inserting_before(chain[0]):
            holder_node = graph.get_attr(_ATTR + "_holder")
            call = graph.call_function(_lean_chain, (holder_node, key, chain[0].args[0]))
        chain[-1].replace_all_uses_with(call)
        for node in reversed(chain):
            graph.erase_node(node)
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<leanstep lean {type(model).__name__}>", "exec"), namespace)
    model.__dict__[_ATTR] = {"names": names, "previous": model.__dict__.get("forward")}
    model.__dict__[_ATTR + "_holder"] = holder
    model.forward = types.MethodType(namespace["forward"], model)
    return names


def remove_outside(model: nn.Module) -> bool:
    """Undo ``lean_outside``: the model's forward is its own again. True if there was one."""
    state = model.__dict__.pop(_ATTR, None)
    if state is None:
        return False
    model.__dict__.pop(_ATTR + "_holder", None)
    if state["previous"] is not None:
        model.forward = state["previous"]
    else:
        model.__dict__.pop("forward", None)
    return True
