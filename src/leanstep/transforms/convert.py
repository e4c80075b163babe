"""``convert_norm_act``: BatchNorm followed by an activation -> a leanstep norm+activation layer.

The pairs are found per module: in a plain ``nn.Sequential`` as consecutive children; in any
other module by tracing its forward with ``torch.fx`` one level deep (its children are leaves),
which sees activation modules (also one module used several times), functional calls
(``F.silu(self.bn1(x))``, ``torch.relu``) and tensor methods (``x.relu_()``). The BatchNorm is
replaced by the leanstep layer, which takes over the very same parameter and buffer objects (an
optimizer built earlier still holds them; state-dict keys are unchanged), and the activation
is taken out of the forward: a Sequential child becomes ``nn.Identity``, a traced forward is
rewritten without the call (the module keeps its class; its new forward is the traced code).

It never silently changes what the model computes: ``abn`` keeps each activation;
``inplace_abn`` needs an invertible activation (leaky_relu with slope > 0, elu, identity), so
a ReLU/SiLU model needs an explicit ``activation=`` (and the summary says outputs change).
InplaceABN overwrites its input, so it is only used where nothing else reads that input.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanstep.layers import INVERTIBLE_ACTIVATIONS, get_norm_act
from leanstep.layers.activations import activation_parameter, canonical_activation
from leanstep.layers.norm_act import ABN, BatchNormAct
from leanstep.layers.sync import SyncBatchNormAct

from .outside import lean_outside, remove_outside
from .regions import region_state
from .summary import ConversionSummary, _remember
from .tracing import trace_one_level

__all__ = ["CONVERT_NORMS", "convert_norm_act", "inplace_abn_as_abn"]

CONVERT_NORMS = ("abn", "inplace_abn")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_MODULE_ACTS = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.CELU: "celu", nn.SELU: "selu", nn.GELU: "gelu", nn.SiLU: "swish", nn.Mish: "mish",
    nn.Hardswish: "hard_swish", nn.Hardsigmoid: "hard_sigmoid", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}
_FUNCTION_ACTS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.elu: "elu", F.celu: "celu",
    F.selu: "selu", F.gelu: "gelu", F.silu: "swish", F.mish: "mish",
    F.hardswish: "hard_swish", F.hardsigmoid: "hard_sigmoid", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
}
_METHOD_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
_PARAM_NAMES = {"leaky_relu": ("negative_slope", 1, 0.01), "elu": ("alpha", 1, 1.0),
                "celu": ("alpha", 1, 1.0)}


def _module_activation(module: nn.Module) -> tuple[str, float | None] | None:
    name = _MODULE_ACTS.get(type(module))
    if name is None:
        return None
    if name == "gelu" and module.approximate != "none":
        return None
    if name == "leaky_relu":
        return name, float(module.negative_slope)
    if name in ("elu", "celu"):
        return name, float(module.alpha)
    return name, None


def _call_activation(node) -> tuple[str, float | None] | None:
    """The activation of a call_function / call_method node, or None."""
    if node.op == "call_function":
        name = _FUNCTION_ACTS.get(node.target)
    elif node.op == "call_method":
        name = _METHOD_ACTS.get(node.target)
    else:
        return None
    if name is None:
        return None
    if name == "gelu" and node.kwargs.get("approximate", "none") != "none":
        return None
    if name in _PARAM_NAMES:
        key, position, default = _PARAM_NAMES[name]
        value = node.kwargs.get(key, node.args[position] if len(node.args) > position else default)
        if not isinstance(value, (int, float)):
            return None
        return name, float(value)
    return name, None


@dataclass
class _Pair:
    parent: nn.Module
    child: str  # the BatchNorm's attribute name in ``parent``
    qualname: str
    activation: str | None  # None: no activation follows
    param: float | None
    act_child: str | None = None  # Sequential: the activation child to replace by Identity
    node: object = None  # traced: the activation node to remove
    bn_node: object = None
    input_private: bool = True  # nothing but the BatchNorm reads its input


def _describe(activation: str | None, param: float | None) -> str:
    if activation is None:
        return "identity"
    return activation if param is None else f"{activation}({param:g})"


def _sequential_pairs(parent: nn.Sequential, prefix: str) -> list[_Pair]:
    names = list(parent._modules)
    pairs = []
    for i, name in enumerate(names):
        child = parent._modules[name]
        if not (isinstance(child, _BN) and not isinstance(child, BatchNormAct)):
            continue
        nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
        act = _module_activation(nxt) if nxt is not None else None
        qual = f"{prefix}.{name}" if prefix else name
        pairs.append(_Pair(parent, name, qual, *(act or (None, None)),
                           act_child=names[i + 1] if act else None))
    return pairs


def _traced_pairs(parent: nn.Module, prefix: str, left: list) -> tuple[list[_Pair], object]:
    children = {name for name, child in parent.named_children()
                if isinstance(child, _BN) and not isinstance(child, BatchNormAct)}
    try:
        graph = trace_one_level(parent)
    except Exception as error:  # noqa: BLE001 - any tracing failure: leave this module's BNs
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        for name in sorted(children):
            left.append((f"{prefix}.{name}" if prefix else name,
                         f"forward of {type(parent).__name__} cannot be traced ({reason})"))
        return [], None
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in children:
            continue
        qual = f"{prefix}.{node.target}" if prefix else node.target
        users = list(node.users)
        act = None
        if len(users) == 1 and users[0].args and users[0].args[0] is node:
            user = users[0]
            if user.op == "call_module":
                act = _module_activation(parent.get_submodule(user.target))
            else:
                act = _call_activation(user)
        source = node.args[0] if node.args else None
        private = isinstance(source, torch.fx.Node) and len(source.users) == 1
        pair = _Pair(parent, node.target, qual, *(act or (None, None)),
                     node=users[0] if act else None, bn_node=node, input_private=private)
        if any(p.child == node.target for p in pairs):
            left.append((qual, "called more than once in the forward"))
            pairs = [p for p in pairs if p.child != node.target]
            continue
        pairs.append(pair)
    return pairs, graph


def _new_layer(bn: nn.BatchNorm2d, norm: str, activation: str, param: float | None):
    cls = get_norm_act(norm)
    with torch.device("meta"):
        layer = cls(bn.num_features, activation=activation, activation_param=param, eps=bn.eps,
                    momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats)
    # The very same parameter and buffer objects: optimizers and references stay valid.
    for name in list(layer._parameters):
        layer._parameters[name] = bn._parameters.get(name)
    for name in list(layer._buffers):
        layer._buffers[name] = bn._buffers.get(name)
    layer.train(bn.training)
    return layer


def _rebind(parent: nn.Module, graph) -> None:
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<leanstep convert {type(parent).__name__}>", "exec"), namespace)
    forward = types.MethodType(namespace["forward"], parent)
    state = region_state(parent)
    if state is not None:
        state.own_forward = forward
    else:
        parent.forward = forward


def _fused_private(parent: nn.Module, names: set[str], prefix: str, left: list) -> set[str]:
    """Of the fused children ``names`` of ``parent``, those whose input nothing else reads
    (a plain Sequential's children; else seen by tracing the forward one level)."""
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        return set(names)
    try:
        graph = trace_one_level(parent)
    except Exception as error:  # noqa: BLE001 - any tracing failure: leave these layers
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        for name in sorted(names):
            left.append((f"{prefix}.{name}" if prefix else name,
                         f"forward of {type(parent).__name__} cannot be traced ({reason})"))
        return set()
    private, calls = set(), {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in names:
            calls[node.target] = calls.get(node.target, 0) + 1
            source = node.args[0] if node.args else None
            if isinstance(source, torch.fx.Node) and len(source.users) == 1:
                private.add(node.target)
    for name in sorted(names):
        qual = f"{prefix}.{name}" if prefix else name
        if calls.get(name, 0) > 1:
            private.discard(name)
            left.append((qual, "called more than once in the forward"))
        elif name not in private:
            left.append((qual, "its input is read elsewhere: InplaceABN would overwrite it"))
    return private


def _convert_fused(model: nn.Module, norm: str, activation: str | None,
                   activation_param: float | None, summary: ConversionSummary) -> int:
    """leanstep's own fused layers -> ``norm`` (same parameter and buffer objects): for
    "inplace_abn" BatchNormAct / ABN where the activation is invertible or ``activation`` is
    given; for "abn" BatchNormAct. An identity one is left: it gains nothing, and an in-place
    residual sum after an InplaceABN would corrupt the output it saves. Returns the count."""
    from leanstep.layers.norm_act import InplaceABN

    skip = (InplaceABN, SyncBatchNormAct) if norm == "inplace_abn" else (
        ABN, InplaceABN, SyncBatchNormAct)

    count = 0
    for prefix, parent in list(model.named_modules()):
        if isinstance(parent, (SyncBatchNormAct, BatchNormAct)):
            continue
        fused = {name for name, child in parent.named_children()
                 if isinstance(child, BatchNormAct) and not isinstance(child, skip)}
        if not fused:
            continue
        todo = set()
        for name in sorted(fused):
            layer = parent._modules[name]
            qual = f"{prefix}.{name}" if prefix else name
            if layer.activation_name == "identity":
                summary.left.append((qual, "fused layer without activation (identity)"))
                continue
            target, param = layer.activation_name, layer.activation_param
            if activation is not None:
                target, param = activation, activation_param
            invertible = target in INVERTIBLE_ACTIVATIONS and not (
                target == "leaky_relu" and (param if param is not None else 0.01) <= 0)
            if norm == "inplace_abn" and not invertible:
                raise ValueError(
                    f"convert_norm_act: {qual} ({type(layer).__name__}) has "
                    f"{_describe(layer.activation_name, layer.activation_param)}, which "
                    f"InplaceABN cannot invert; pass activation='leaky_relu' (or 'elu'; outputs "
                    f"change) or use norm='abn' (same outputs)"
                )
            todo.add(name)
        if norm == "inplace_abn" and todo:
            todo = _fused_private(parent, todo, prefix, summary.left)
        for name in sorted(todo):
            layer = parent._modules[name]
            target, param = layer.activation_name, layer.activation_param
            if activation is not None:
                target, param = activation, activation_param
            parent._modules[name] = _new_layer(layer, norm, target, param)
            summary.changes_outputs |= (target, param) != (layer.activation_name,
                                                           layer.activation_param)
            summary.converted.append((f"{prefix}.{name}" if prefix else name,
                                      _describe(target, param)))
            count += 1
    return count


def convert_norm_act(model: nn.Module, norm: str = "abn", activation: str | None = None,
                     activation_param: float | None = None) -> ConversionSummary:
    """Replace every BatchNorm(1d/2d/3d) followed by an activation with leanstep's ``norm``
    layer (``"abn"``: exact; ``"inplace_abn"``: needs an invertible activation), in place.

    ``activation=None`` keeps each model's activation; a name replaces it everywhere a pair is
    converted (outputs change, said in the summary). Works on a whole model or a sub-module,
    and under fake/meta tensors. Returns a ``ConversionSummary``: converted, left and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_norm_act needs an nn.Module, got {type(model).__name__}")
    if norm not in CONVERT_NORMS:
        raise ValueError(f"convert_norm_act: unknown norm {norm!r}; valid: "
                         f"{', '.join(CONVERT_NORMS)}")
    if activation is not None:
        activation = canonical_activation(activation)
        activation_parameter(activation, activation_param)
    summary = ConversionSummary(norm=norm)
    fused = _convert_fused(model, norm, activation, activation_param, summary)
    plans: list[tuple[_Pair, str, float | None]] = []
    relean: list[nn.Module] = []
    graphs: dict[int, tuple[nn.Module, object]] = {}
    for prefix, parent in list(model.named_modules()):
        if isinstance(parent, SyncBatchNormAct):
            continue
        if not any(isinstance(c, _BN) and not isinstance(c, BatchNormAct)
                   for c in parent.children()):
            continue
        if isinstance(parent, nn.SyncBatchNorm):
            continue
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            pairs = _sequential_pairs(parent, prefix)
        else:
            if remove_outside(parent):  # lean's stem chains hide the layers: trace them again
                relean.append(parent)
            pairs, graph = _traced_pairs(parent, prefix, summary.left)
            if graph is not None:
                graphs[id(parent)] = (parent, graph)
        for pair in pairs:
            bn = getattr(parent, pair.child)
            if isinstance(bn, nn.SyncBatchNorm):
                summary.left.append((pair.qualname, "SyncBatchNorm: use convert_sync after"))
                continue
            if pair.activation is None:
                # A lone BatchNorm gains nothing from ABN, and as InplaceABN(identity) its saved
                # output would be corrupted by an in-place residual sum (``out += identity``).
                summary.left.append((pair.qualname, "no activation follows it"))
                continue
            target, param = pair.activation, pair.param
            if activation is not None:
                target, param = activation, activation_param
            if norm == "inplace_abn":
                invertible = target in INVERTIBLE_ACTIVATIONS and not (
                    target == "leaky_relu" and (param if param is not None else 0.01) <= 0)
                if not invertible:
                    raise ValueError(
                        f"convert_norm_act: {pair.qualname} is followed by "
                        f"{_describe(pair.activation, pair.param)}, which InplaceABN cannot "
                        f"invert; pass activation='leaky_relu' (or 'elu'; outputs change) or "
                        f"use norm='abn' (same outputs)"
                    )
                if not pair.input_private:
                    summary.left.append((pair.qualname, "its input is read elsewhere: "
                                         "InplaceABN would overwrite it"))
                    continue
            plans.append((pair, target, param))
    if not plans:
        for parent in relean:
            lean_outside(parent, summary.notes)
        if fused:
            if summary.changes_outputs:
                warnings.warn(f"convert_norm_act: activation replaced by {activation!r}: the "
                              f"model's outputs change (pretrained weights expect the old "
                              f"activation)", stacklevel=2)
            _remember("convert", summary)
            return summary
        bns = sum(isinstance(m, _BN) and not isinstance(m, BatchNormAct) for m in model.modules())
        warnings.warn(f"convert_norm_act: nothing to convert in {type(model).__name__} "
                      f"({bns} BatchNorm(s), {len(summary.left)} left); model returned unchanged",
                      stacklevel=2)
        _remember("convert", summary)
        return summary
    rewritten: set[int] = set()
    for pair, target, param in plans:
        bn = getattr(pair.parent, pair.child)
        setattr(pair.parent, pair.child, _new_layer(bn, norm, target, param))
        if pair.act_child is not None:
            setattr(pair.parent, pair.act_child, nn.Identity())
        elif pair.node is not None:
            pair.node.replace_all_uses_with(pair.bn_node)
            pair.node.graph.erase_node(pair.node)
            rewritten.add(id(pair.parent))
        changed = activation is not None and (target, param) != (pair.activation, pair.param)
        summary.changes_outputs |= changed and pair.activation is not None
        summary.converted.append((pair.qualname, _describe(target, param)))
    for key in rewritten:
        parent, graph = graphs[key]
        _rebind(parent, graph)
    for parent in relean:
        lean_outside(parent, summary.notes)
    if summary.changes_outputs:
        warnings.warn(f"convert_norm_act: activation replaced by {activation!r}: the model's "
                      f"outputs change (pretrained weights expect the old activation)",
                      stacklevel=2)
    _remember("convert", summary)
    return summary


def inplace_abn_as_abn(model: nn.Module) -> nn.Module:
    """Every InplaceABN of ``model`` replaced, in place, by an ABN of the same configuration on the
    same parameter and buffer objects (``_new_layer``; a module shared by several parents stays
    shared): the same layers and activation with
    BatchNorm's own maths, the reference against which ``verify`` checks an InplaceABN
    conversion that changed the activation."""
    from leanstep.layers.norm_act import InplaceABN

    replaced: dict[int, ABN] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, InplaceABN):
                if id(child) not in replaced:
                    replaced[id(child)] = _new_layer(child, "abn", child.activation_name,
                                                     child.activation_param)
                setattr(parent, name, replaced[id(child)])
    return model
