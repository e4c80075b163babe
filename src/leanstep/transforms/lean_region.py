"""An eager lean region: one autograd node that keeps the expensive outputs of a block and
recomputes the cheap ops in backward.

The block's forward runs once without autograd (inside ``_LeanRegion.forward``) while its
convolution and linear layers keep their outputs and its batch norms keep their batch
statistics. In backward the block runs again with autograd from its saved inputs: each kept
layer hands back its output from the forward pass through a small autograd node whose backward
is the layer's own (``convolution_backward``; the linear layer's matrix products), each batch
norm re-applies its kept statistics through a node whose backward is the training-mode one,
and everything else (normalisation apply, activations, element-wise ops, pooling, gating) is
recomputed. The gradients of the block's inputs and parameters are then taken from that graph
and returned, so the outer backward accumulates them once (parameter hooks fire once).

What makes this cheaper than a checkpoint with a dispatch mode: the forward pass records no
autograd graph and no op passes through Python; only the kept layers' calls are intercepted,
by giving those modules an instance-level forward for the duration of the pass (a batch norm
is intercepted where it calls ``F.batch_norm``, through its ``running_mean`` buffer: any module
that calls it, leanstep's, timm's or torch's, is covered). Outside a pass the modules are
untouched.

Exactness: the recompute runs the same ops on the same values (random state and autocast state
of the forward pass restored), batch-norm statistics are re-applied bit for bit (CPU; elsewhere
the norm is recomputed whole), running statistics and every buffer the forward updates are
updated once (the recompute writes scratch copies), and a kept output that is overwritten later
(a conv followed by an in-place op or InplaceABN) is recomputed instead. A block whose recompute
calls other layers, or reaches a kept layer or norm with other values (a fingerprint of a few
elements of each one's input is compared; a norm whose input is, unchanged, the output of the
kept layer just before it relies on that layer's), than its forward pass raises an error
naming it.

The block's outputs are fingerprinted too, so Python state read after the last kept layer
shows. Every buffer of the block is a scratch copy during the recompute (state updated by
assignment or through ``.data`` is updated once); a conv subclass with its own
``_conv_forward`` is run again rather than kept; a region inside a region's pass runs plain.

Limits, each an error or a fallback rather than a wrong gradient: double backward is refused,
and so is a parameter changed in place between forward and backward (as autograd refuses it);
a block with hooks on a module inside it, or an argument other than tensors and plain values
(a module, a dataclass: tensors in it would get no gradient), runs plain with a warning; the
kept outputs are held by the node, not saved with ``save_for_backward`` (so backward can free
each one as soon as its layer is done), so saved-tensor hooks such as ``save_on_cpu`` apply
to a region's inputs only, and a second backward (``retain_graph=True``) runs the layers
again. Two differences from the plain model remain, both where a block writes in place what
its caller reads afterwards: a block that writes its input runs on a copy (the caller keeps
the unwritten values), and InplaceABN, which writes in place only when autograd records,
writes a copy in the forward pass (a block that reads the norm's input after it sees the
unwritten values there).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import get_device_states, set_device_states

from leanstep.bench import _torch_internals as internals

__all__ = ["lean_pass_active", "run_lean"]

_tree = internals.tree()
tree_flatten, tree_map, tree_unflatten = _tree.tree_flatten, _tree.tree_map, _tree.tree_unflatten

_aten = torch.ops.aten
_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_CONV_IMPLS = {nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}
# Arguments a region may take besides tensors: values its recompute can reuse as they are.
_CONSTANTS = (int, float, complex, bool, str, bytes, type(None), type(Ellipsis), slice,
              enum.Enum, torch.Size, torch.dtype, torch.device, torch.layout,
              torch.memory_format)


class _Active(threading.local):
    depth = 0


_ACTIVE = _Active()


def lean_pass_active() -> bool:
    """Whether a lean region's forward pass or recompute is running in this thread: a region
    inside it runs plain (its gradients are the enclosing region's)."""
    return _ACTIVE.depth > 0


@contextlib.contextmanager
def _pass_active():
    _ACTIVE.depth += 1
    try:
        yield
    finally:
        _ACTIVE.depth -= 1


class _Pass:
    """What one forward pass of a region kept, and where its recompute has got to."""

    __slots__ = ("name", "layers", "norms", "layer_at", "norm_at", "replay", "prints", "handed")

    def __init__(self, name: str):
        self.name = name
        self.layers: list = []  # (module, output or None, version at keeping)
        self.norms: list = []  # (module, (mean, invstd) or None)
        self.layer_at = 0
        self.norm_at = 0
        self.replay = False
        self.prints: list = []  # fingerprints of the kept layers' and norms' inputs, in order
        self.handed = None  # (tensor, version) the last kept layer handed on

    def fingerprint(self, tensor: torch.Tensor) -> None:
        self.prints.append(_fingerprint(tensor))

    def hand_on(self, tensor: torch.Tensor) -> torch.Tensor:
        self.handed = (tensor, tensor._version)
        return tensor

    def fingerprint_unless_handed(self, tensor: torch.Tensor) -> None:
        """A norm's input needs no fingerprint of its own where it is, unchanged, what the
        kept layer just before handed on: that layer's input was compared (a pass that
        skips where the other does not has fewer fingerprints: a mismatch all the same)."""
        handed = self.handed
        if handed is None or handed[0] is not tensor or tensor._version != handed[1]:
            self.prints.append(_fingerprint(tensor))

    def mismatch(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"leanstep.lean: block {self.name!r} ran differently in its recompute than in its "
            f"forward pass ({what}): its forward depends on data or global state, which lean "
            f"cannot replay; use checkpoint_blocks or leave it plain")


_SAMPLES = 32
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """A few of the tensor's elements, spread over it: a recompute that reaches a kept layer or
    norm with other values than the forward pass did (control flow that depends on data or
    on Python state) shows in them. One small copy, no synchronisation."""
    tensor = tensor.detach()
    dense = tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(
        memory_format=torch.channels_last))
    if not dense:
        tensor = tensor.reshape(-1)
    numel = tensor.numel()
    step = max(numel // _SAMPLES, 1)
    return tensor.as_strided((min(numel, _SAMPLES),), (step,), tensor.storage_offset()).clone()


def _same(first: list, second: list) -> bool:
    """Whether two lists of fingerprints hold the same bits (NaN included): one comparison."""
    if len(first) != len(second):
        return False
    if not first:
        return True
    if any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(first, second, strict=True)):
        return False
    if first[0].is_meta or internals.is_fake(first[0]):  # predicting memory, counting FLOPs
        return True
    bits = _BITS.get(first[0].element_size())
    a, b = torch.cat([t.flatten() for t in first]), torch.cat([t.flatten() for t in second])
    if bits is not None and a.dtype.is_floating_point:
        a, b = a.view(bits), b.view(bits)
    return torch.equal(a, b)


def _expected(what: str, at: int, recorded: list, module: nn.Module) -> str:
    found = type(module).__name__
    if at >= len(recorded):
        return f"{what} {at} was {found}, after the forward pass's last"
    return f"{what} {at} was {found} where the forward pass ran {type(recorded[at][0]).__name__}"


# ---------------------------------------------------------------------------------------------
# Kept layers: convolution and linear


def _conv_spec(module: nn.Module):
    """(padding to pad with first or None, stride, padding, dilation, groups) for a kept conv,
    or None where its padding cannot be written as one symmetric amount per side."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(module.kernel_size)
        else:  # "same": symmetric only where every dilation * (kernel - 1) is even
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size,
                                                 strict=True)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    pre = None
    if module.padding_mode != "zeros":
        pre, padding = module._reversed_padding_repeated_twice, (0,) * len(padding)
    return pre, tuple(module.stride), tuple(padding), tuple(module.dilation), module.groups


class _KeptConv(torch.autograd.Function):
    """A convolution whose output was kept: hands it back; backward is the convolution's."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec, kept):
        ctx.save_for_backward(x, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return kept.detach()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.spec
        needs = ctx.needs_input_grad
        grad_x, grad_w, grad_b = _aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding,
            dilation, False, [0] * len(stride), groups,
            [needs[0], needs[1], ctx.has_bias and needs[2]])
        return grad_x, grad_w, grad_b, None, None


class _KeptLinear(torch.autograd.Function):
    """A linear layer whose output was kept; backward as ``addmm``'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, kept):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return kept.detach()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad2.mm(weight).view(x.shape) if needs[0] else None
        grad_w = x.reshape(-1, x.shape[-1]).t().mm(grad2).t() if needs[1] else None
        grad_b = grad2.sum(0) if ctx.has_bias and needs[2] else None
        return grad_x, grad_w, grad_b, None


def _cast(tensor, dtype):
    """What autocast did to a layer's argument (the kept output's dtype is the one it ran in)."""
    if tensor is None or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _keep_forward(module: nn.Module, run: _Pass, x, *rest):
    run.fingerprint(x)
    out = type(module).forward(module, x, *rest)
    run.layers.append((module, out, out._version))
    return run.hand_on(out)


def _next_kept(module: nn.Module, run: _Pass, x):
    """The output ``module`` kept in the forward pass at this point of the recompute (None:
    run it again); an error if the forward pass called another layer here."""
    at = run.layer_at
    run.layer_at += 1
    if at >= len(run.layers) or run.layers[at][0] is not module:
        raise run.mismatch(_expected("layer", at, run.layers, module))
    run.fingerprint(x)
    return run.layers[at][1]


def _replay_conv(module: nn.Module, run: _Pass, spec, x, *rest):
    kept = _next_kept(module, run, x)
    if kept is None or rest:
        return run.hand_on(type(module).forward(module, x, *rest))
    pre, stride, padding, dilation, groups = spec
    dtype = kept.dtype
    if pre is not None:
        x = F.pad(x, pre, mode=module.padding_mode)
    return run.hand_on(_KeptConv.apply(_cast(x, dtype), _cast(module.weight, dtype),
                                       _cast(module.bias, dtype),
                                       (stride, padding, dilation, groups), kept))


def _replay_linear(module: nn.Module, run: _Pass, x):
    kept = _next_kept(module, run, x)
    if kept is None:
        return run.hand_on(type(module).forward(module, x))
    dtype = kept.dtype
    return run.hand_on(_KeptLinear.apply(_cast(x, dtype), _cast(module.weight, dtype),
                                         _cast(module.bias, dtype), kept))


# ---------------------------------------------------------------------------------------------
# Batch norms: statistics kept, re-applied


class _KeptNorm(torch.autograd.Function):
    """A training-mode batch norm whose batch statistics were kept: re-applies them (an
    evaluation-mode kernel with weight ``invstd * weight``, variance 1 and eps 0 computes the
    training kernel's output bit for bit on the CPU); backward is the training-mode one."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, eps):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        scale = invstd if weight is None else invstd * weight
        return torch.native_batch_norm(x, scale, bias, mean, torch.ones_like(invstd), False,
                                       0.0, 0.0)[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_w, grad_b = _aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps,
            [needs[0], needs[1], needs[2]])
        return grad_x, grad_w, grad_b, None, None, None


class _NormProbe(torch.Tensor):
    """Stands in for a batch norm's ``running_mean`` during a lean pass, so that the pass sees
    the module's ``F.batch_norm`` call. Any other use of it is the buffer's own: torch
    functions get the buffer in its place, and so do ops that reach the dispatcher (a custom
    autograd Function that takes the buffer, such as InplaceABN's or SyncBatchNorm's)."""

    @staticmethod
    def __new__(cls, run, module: nn.Module, buffer: torch.Tensor):
        probe = internals.wrapper_tensor(cls, buffer)
        probe._lean = (run, module, buffer)
        return probe

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        args, kwargs = tree_map(_unwrap, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(_unwrap, (args, kwargs or {}))
        return func(*args, **kwargs)


def _unwrap(value):
    return value._lean[2] if isinstance(value, _NormProbe) else value


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    run, module, buffer = running_mean._lean
    run.fingerprint_unless_handed(input)
    if run.replay:
        at = run.norm_at
        run.norm_at += 1
        if at >= len(run.norms) or run.norms[at][0] is not module:
            raise run.mismatch(_expected("batch norm", at, run.norms, module))
        stats = run.norms[at][1]
        if stats is not None:
            return _KeptNorm.apply(input, weight, bias, stats[0], stats[1], eps)
        return F.batch_norm(input, buffer, running_var, weight, bias, training, momentum, eps)
    if (training and input.device.type == "cpu" and running_var is not None
            and (weight is None or weight.dtype == input.dtype)):
        # What F.batch_norm runs, with the statistics it computes returned.
        out, mean, invstd, _, implementation = internals.batch_norm_with_statistics()(
            input, weight, bias, buffer, running_var, training, momentum, eps,
            torch.backends.cudnn.enabled)
        run.norms.append((module, (mean, invstd) if implementation == 0 else None))
        return out
    run.norms.append((module, None))
    return F.batch_norm(input, buffer, running_var, weight, bias, training, momentum, eps)


# ---------------------------------------------------------------------------------------------
# The region


@functools.cache
def _warn_plain(name: str, why: str) -> None:
    warnings.warn(f"lean: block {name!r} runs plain: {why}", stacklevel=4)


class _Plan:
    """One call of a region: its function, layers, parameters and the parts of its
    arguments and results that are not tensors."""

    __slots__ = ("fn", "name", "spec", "flat", "positions", "layers", "norms", "params",
                 "unique", "buffered", "writes_inputs", "learn", "out_spec", "out_flat",
                 "out_positions")

    def __init__(self, fn, name, spec, flat, positions, layers, norms, params, buffered,
                 writes_inputs, learn):
        self.fn, self.name, self.spec, self.flat, self.positions = fn, name, spec, flat, positions
        self.layers, self.norms, self.params, self.buffered = layers, norms, params, buffered
        self.unique = list({id(p): p for _, _, p in params}.values())
        self.writes_inputs, self.learn = writes_inputs, learn
        self.out_spec = self.out_flat = self.out_positions = None

    def call(self, tensors):
        flat = list(self.flat)
        for position, tensor in zip(self.positions, tensors, strict=True):
            flat[position] = tensor
        args, kwargs = tree_unflatten(flat, self.spec)
        return self.fn(*args, **kwargs)


@contextlib.contextmanager
def _intercepted(plan: _Plan, run: _Pass):
    """Give the kept layers instance forwards and the training-mode norms probes for the
    duration of one pass; in a recompute, every buffer of the region is a scratch copy, so
    what the forward pass updated (running statistics, counters, any state a module keeps in
    a buffer, in place or by assignment) is updated once."""
    patched, swapped = [], []
    try:
        for module, spec in plan.layers:
            if run.replay:
                forward = (functools.partial(_replay_conv, module, run, spec)
                           if spec is not False else functools.partial(_replay_linear, module,
                                                                       run))
            else:
                forward = functools.partial(_keep_forward, module, run)
            module.__dict__["forward"] = forward
            patched.append(module)
        if run.replay:
            for module in plan.buffered:
                original = dict(module._buffers)
                swapped.append((module, original))
                module._buffers.update({name: buffer.clone() for name, buffer in
                                        original.items() if buffer is not None})
        for module in plan.norms:
            if not run.replay:
                swapped.append((module, dict(module._buffers)))
            mean = module._buffers.get("running_mean")
            if mean is not None:
                module._buffers["running_mean"] = _NormProbe(run, module, mean)
        yield
    finally:
        for module in patched:
            del module.__dict__["forward"]
        for module, original in swapped:
            module._buffers.clear()
            module._buffers.update(original)


class _RandomState:
    """The random state a forward pass started from (CPU, and CUDA devices of its inputs)."""

    __slots__ = ("cpu", "devices", "states")

    def __init__(self, tensors):
        self.cpu = torch.get_rng_state()
        self.devices, self.states = (get_device_states(*tensors)
                                     if any(t.is_cuda for t in tensors) else ([], []))

    @contextlib.contextmanager
    def restored(self):
        cpu = torch.get_rng_state()
        current = [torch.cuda.get_rng_state(device) for device in self.devices]
        torch.set_rng_state(self.cpu)
        if self.devices:
            set_device_states(self.devices, self.states)
        try:
            yield
        finally:
            torch.set_rng_state(cpu)
            if self.devices:
                set_device_states(self.devices, current)


def _autocast_state(device_type: str) -> list:
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind),
             torch.is_autocast_cache_enabled()) for kind in dict.fromkeys((device_type, "cpu"))
            if torch.amp.is_autocast_available(kind)]


@contextlib.contextmanager
def _autocast(states: list):
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype, cache in states:
            if torch.is_autocast_enabled(kind) != enabled or (
                    enabled and torch.get_autocast_dtype(kind) != dtype):
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled,
                                                   cache_enabled=cache))
        yield


def _versions(tensors) -> list[int]:
    return [t._version for t in tensors]


class _LeanRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *tensors):
        count = len(plan.positions)
        inputs = tensors[:count]
        ctx.plan = plan
        ctx.random = _RandomState(inputs)
        ctx.autocast = _autocast_state(inputs[0].device.type if inputs else "cpu")
        run = _Pass(plan.name)
        ran_on = tuple(t.clone() for t in inputs) if plan.writes_inputs else inputs
        before = _versions(ran_on)
        ctx.param_versions = _versions(plan.unique)
        with _pass_active(), _intercepted(plan, run):
            output = plan.call(ran_on)
        wrote = before != _versions(ran_on)
        if wrote and not plan.writes_inputs:
            raise RuntimeError(
                f"leanstep: region {plan.name!r} wrote over its input in this step but not in "
                f"its first one, so its recompute would start from the wrong values; its "
                f"forward depends on data or global state: use checkpoint_blocks or leave it "
                f"plain")
        plan.learn(wrote)
        plan.writes_inputs = wrote  # the recompute copies its inputs only if this pass wrote
        out_flat, plan.out_spec = tree_flatten(output)
        plan.out_positions = [i for i, v in enumerate(out_flat) if isinstance(v, torch.Tensor)]
        outputs = [out_flat[i] for i in plan.out_positions]
        for tensor in outputs:
            run.fingerprint(tensor)
        plan.out_flat = [None if isinstance(v, torch.Tensor) else v for v in out_flat]
        # Kept outputs overwritten later in the block are recomputed instead: holding them
        # would keep memory for values that no longer exist (so is one the caller overwrites
        # later, found by its version in backward). They are held by the node, not saved with
        # save_for_backward, so that backward can let go of each as soon as its layer's
        # gradient is done (a second backward, retain_graph=True, recomputes the layers).
        ctx.kept = [(tensor.detach(), version) if tensor._version == version else None
                    for _, tensor, version in run.layers]
        ctx.layers = [module for module, _, _ in run.layers]
        ctx.norms = run.norms
        ctx.prints = run.prints
        ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(*[t for t in outputs if not t.is_floating_point()
                                      and not t.is_complex()])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("leanstep.lean does not support double backward "
                               "(create_graph=True); use checkpoint_blocks or leave it plain")
        plan = ctx.plan
        if _versions(plan.unique) != ctx.param_versions:
            changed = next(i for i, (p, v) in enumerate(zip(plan.unique, ctx.param_versions,
                                                            strict=True)) if p._version != v)
            raise RuntimeError(
                f"leanstep.lean: parameter {changed} of block {plan.name!r} "
                f"({tuple(plan.unique[changed].shape)}) was modified in place between the "
                f"forward pass and backward (version {plan.unique[changed]._version}, expected "
                f"{ctx.param_versions[changed]}); the plain model's backward fails on this too")
        saved = ctx.saved_tensors
        count = len(plan.positions)
        needs = ctx.needs_input_grad[1:]
        run = _Pass(plan.name)
        run.replay = True
        kept, ctx.kept = ctx.kept, [None] * len(ctx.kept)
        run.layers = [(module, entry[0] if entry is not None and entry[0]._version == entry[1]
                       else None, None) for module, entry in zip(ctx.layers, kept, strict=True)]
        del kept
        run.norms = ctx.norms
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in
                      zip(saved[:count], needs, strict=False)]
            # The block runs on copies (if it writes its inputs) or views of the leaves whose
            # gradients it returns, so that the hooks module trackers put on a module's inputs
            # (ModTracker, FlopCounterMode) never meet a leaf: inside an autograd.grad they
            # cannot take one.
            ran_on = [t.clone() if plan.writes_inputs else t.view_as(t) for t in inputs]
            aliases = {id(param): param.detach().requires_grad_(need)
                       for param, need in zip(plan.unique, needs[count:], strict=True)}
            swapped = []
            for module, name, param in plan.params:
                module._parameters[name] = aliases[id(param)]
                swapped.append((module, name, param))
            try:
                with (ctx.random.restored(), _autocast(ctx.autocast), _pass_active(),
                      _intercepted(plan, run)):
                    output = plan.call(ran_on)
            finally:
                for module, name, param in swapped:
                    module._parameters[name] = param
            if run.layer_at != len(run.layers) or run.norm_at != len(run.norms):
                raise run.mismatch(f"{run.layer_at} of {len(run.layers)} kept layers and "
                                   f"{run.norm_at} of {len(run.norms)} batch norms called")
            out_flat = tree_flatten(output)[0]
            del output
            for position in plan.out_positions:
                run.fingerprint(out_flat[position])
            if not _same(ctx.prints, run.prints):
                raise run.mismatch("a kept layer, batch norm or the block's output got other "
                                   "values")
        # From here on only the recomputed graph holds the kept outputs and the recomputed
        # results: each is freed as soon as backward is past it.
        run.layers.clear()
        run.handed = None
        pairs = [(out_flat[position], grad) for position, grad in
                 zip(plan.out_positions, grads, strict=True)]
        outputs = [get_gradient_edge(t) for t, g in pairs if g is not None and t.requires_grad]
        upstream = [g for t, g in pairs if g is not None and t.requires_grad]
        del out_flat, pairs, ran_on
        # Accumulated into the leaves of the recompute (the inputs' and parameters' stand-ins,
        # whose gradients are returned), and into any other leaf the block reached (a tensor
        # of a closure): no gradient is dropped.
        if outputs:
            torch.autograd.backward(outputs, upstream)
        input_grads = [t.grad for t in inputs]
        param_grads = [aliases[id(param)].grad for param in plan.unique]
        return (None, *input_grads, *param_grads)


def _region_members(modules: list[nn.Module], own: nn.Module | None):
    """The kept layers, training-mode norms, (module, name, parameter) triples and modules
    with buffers of a region; and a module with hooks inside it, if any."""
    layers, norms, params, buffered, seen = [], [], [], [], set()
    hooked = None
    for top in modules:
        for name, module in top.named_modules():
            if module in seen:
                continue
            seen.add(module)
            if module is not own and hooked is None and (
                    module._forward_hooks or module._forward_pre_hooks
                    or module._backward_hooks or module._backward_pre_hooks):
                hooked = name or type(module).__name__
            forward = type(module).forward
            if "forward" not in module.__dict__:
                spec = (_conv_spec(module) if forward in _CONV_FORWARDS
                        and type(module)._conv_forward in _CONV_IMPLS else None)
                if spec is not None:
                    layers.append((module, spec))
                elif forward is nn.Linear.forward:
                    layers.append((module, False))
            if isinstance(module, _BatchNorm) and module.training:
                norms.append(module)
            for pname, param in module._parameters.items():
                if param is not None and param.requires_grad:
                    params.append((module, pname, param))
            if any(b is not None for b in module._buffers.values()):
                buffered.append(module)
    return layers, norms, params, buffered, hooked


def run_lean(fn, modules: list[nn.Module], args: tuple, kwargs: dict, *, name: str,
             writes_inputs: bool, learn, own: nn.Module | None = None):
    """``fn(*args, **kwargs)`` as an eager lean region over ``modules`` (see module docstring).

    ``writes_inputs``: run on copies of the inputs (learned: ``learn(wrote)`` is told whether
    this call wrote them); ``own``: the module whose forward this is (its hooks run outside).
    """
    layers, norms, params, buffered, hooked = _region_members(modules, own)
    if hooked is not None:
        _warn_plain(name, f"{hooked} has hooks, which would see tensors without autograd "
                          f"history inside a lean region")
        return fn(*args, **kwargs)
    flat, spec = tree_flatten((args, kwargs))
    positions = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    other = next((v for v in flat if not isinstance(v, (torch.Tensor, *_CONSTANTS))), None)
    if other is not None:
        # An argument that may hold tensors or parameters unseen (a module, a dataclass):
        # their gradients would not reach them through the region's node.
        _warn_plain(name, f"it takes a {type(other).__name__} argument")
        return fn(*args, **kwargs)
    plan = _Plan(fn, name, spec, [None if i in positions else v for i, v in enumerate(flat)],
                 positions, layers, norms, params, buffered, writes_inputs, learn)
    outputs = _LeanRegion.apply(plan, *[flat[i] for i in positions], *plan.unique)
    out_flat = list(plan.out_flat)
    for position, tensor in zip(plan.out_positions, outputs, strict=True):
        out_flat[position] = tensor
    return tree_unflatten(out_flat, plan.out_spec)
