"""InplaceABN's training step as one autograd Function: native kernels, no host-device sync.

Forward writes act(gamma * xhat + beta) over the input with PyTorch's native batch-norm kernel
(``native_batch_norm.out`` with ``out=x``: the kernel ABN runs, statistics and running-stat
update included), then applies the activation in place. Backward inverts the activation and the
affine transform to rebuild the input from the output, and runs the native batch-norm backward.

Everything here is static in shape and free of host reads of device values (no ``nonzero``,
``item``, ``float(tensor)``, Python branches on tensor values), so ``torch.compile`` traces it
into the surrounding graph and a CUDA stream never waits for the host. (Compiled, the InplaceABN
module runs ABN's maths instead, see ``InplaceABN._compiled_forward``; the Function is traced
there only for InplaceABNSync with a process group.)

Ill-conditioned channels. Rebuilding xhat = (y - beta) / gamma from a rounded y loses about
``eps * |beta / gamma|`` of absolute accuracy (all of it when gamma == 0 or is so tiny that y
underflows, 1 / gamma overflows or gamma^2 underflows: ``tiny_gamma``), and ELU's inverse
loses it where the output saturates at -alpha. No formula recovers what rounding removed: such
channels need their input saved. With static shapes that copy cannot be sized by the number of
such channels (knowing it is a sync), so each layer keeps a fixed budget of ``protect`` channels:
the worst-conditioned ones (by ``torch.topk``) keep a copy of their input. Gradients are
float32-accurate while at most ``protect`` channels are ill-conditioned; channels beyond the
budget are counted by the layer's ``unprotected_channels`` (a device tensor, read it when
convenient) and get best-effort gradients.

Per layer and step this is a few dozen small per-channel ops on top of the two native kernels;
on a CPU each costs microseconds of dispatch, so the per-channel parameters of backward are
formed once, in forward, from the intermediates the conditioning already computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "CONDITION_LIMIT",
    "ELU_SATURATION",
    "InplaceABNFunction",
    "activate_",
    "cumulative_update",
    "tiny_gamma",
    "unprotected_count",
]

# A channel whose |beta / gamma| exceeds this rebuilds xhat with an absolute error above
# about CONDITION_LIMIT float32 ulps; it is ill-conditioned and gets the copy if the budget allows.
CONDITION_LIMIT = 16.0
# ELU's output saturates at -alpha: below y = -ELU_SATURATION, log1p(z / alpha) amplifies the
# output's rounding by more than exp(ELU_SATURATION) (about 400 for 6).
ELU_SATURATION = 6.0

DOUBLE_BACKWARD_ERROR = (
    "InplaceABN does not support double backward (create_graph=True); use norm='abn'"
)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-channel statistics: float32 for float16/bfloat16 inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _affine(weight, bias, channels, dtype, device):
    """gamma and beta in ``dtype`` (1 and 0 without affine parameters)."""
    gamma = weight if weight is not None else torch.ones(channels, device=device)
    beta = bias if bias is not None else torch.zeros(channels, device=device)
    if gamma.dtype != dtype:
        gamma, beta = gamma.to(dtype), beta.to(dtype)
    return gamma, beta


# sqrt(smallest normal) per dtype: finfo is not free, and this runs in every layer and step.
_TINY = {dtype: torch.finfo(dtype).tiny ** 0.5
         for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def tiny_gamma(gamma):
    """Where |gamma| is below sqrt of the dtype's smallest normal (0 and subnormals included):
    there y = gamma * xhat + beta underflows, 1 / gamma may overflow and the rebuilt channel's
    weight gamma^2 * invstd underflows, so nothing of xhat can be rebuilt from y."""
    return _is_tiny(gamma.abs())


def _is_tiny(magnitude):
    return magnitude < _TINY[magnitude.dtype]


def _condition(gamma, beta, tiny=None):
    """|beta / gamma| per channel; +inf (ranked worst) where gamma is tiny or the ratio is nan."""
    tiny = tiny_gamma(gamma) if tiny is None else tiny
    ratio = torch.where(tiny, math.inf, (beta / gamma).abs())
    return ratio.nan_to_num_(nan=math.inf, posinf=math.inf)


def cumulative_update(x, running_mean, running_var, factor):
    """momentum=None: fold the batch statistics of ``x`` into the running ones with weight
    ``factor`` (a device scalar, 1 / num_batches_tracked). The native kernel takes the weight
    as a host float, which would be a host-device sync."""
    dims = [0, *range(2, x.dim())]
    with torch.no_grad():
        var, batch_mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=dims, correction=1)
        running_mean.mul_(1 - factor).add_(batch_mean.to(running_mean.dtype) * factor)
        running_var.mul_(1 - factor).add_(var.to(running_var.dtype) * factor)


def activate_(x, activation, slope):
    """Apply InplaceABN's activation ("leaky_relu", "elu", "identity") to ``x`` in place."""
    if activation == "leaky_relu":
        return F.leaky_relu_(x, slope)
    if activation == "elu":
        return F.elu_(x, slope)
    return x


def unprotected_count(condition, protect):
    """How many channels with ``condition`` (from ``_condition``) > CONDITION_LIMIT fall outside
    a budget of ``protect``: the top ``protect`` of the ranking hold every ill-conditioned
    channel they can."""
    return ((condition > CONDITION_LIMIT).sum() - protect).clamp(min=0)


class InplaceABNFunction(torch.autograd.Function):
    """Training-mode InplaceABN. Arguments after ``bias``:

    running_mean, running_var: updated in place (None: not tracked); factor: a device scalar
    (1 / num_batches_tracked, for momentum=None) or None to use ``momentum``; eps; activation
    ("leaky_relu", "elu", "identity") and its slope/alpha; protect: how many channels may keep a
    copy of their input; condition: a (C,) buffer that receives each channel's conditioning
    (``unprotected_count`` reads it), or None; group: a process group (InplaceABNSync) or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, momentum, eps,
                activation, slope, protect, condition, group):
        channels = x.shape[1]
        acc = stats_dtype(x.dtype)
        gamma, beta = _affine(weight, bias, channels, acc, x.device)
        magnitude = gamma.abs()
        tiny = _is_tiny(magnitude)
        ratio = _condition(gamma, beta, tiny)
        protect = min(protect, channels)
        if activation != "elu":  # judged on the weights alone: copy before x is overwritten
            index, copy = _protect(x, ratio, protect)
        count = None
        if group is not None:
            from .sync_stats import group_stats

            mean, invstd, count = group_stats(x, eps, group, running_mean, running_var,
                                              factor, momentum)
            y = None
        else:
            if factor is not None:
                cumulative_update(x, running_mean, running_var, factor)
                running_mean_arg = running_var_arg = None
            else:
                running_mean_arg, running_var_arg = running_mean, running_var
            # The kernel keeps its statistics in the parameters' dtype (float32 for a float32
            # module on float16/bfloat16 inputs); backward works in ``acc``.
            params = next((t for t in (weight, running_mean) if t is not None), x)
            mean = torch.empty(channels, dtype=params.dtype, device=x.device)
            invstd = torch.empty(channels, dtype=params.dtype, device=x.device)
            # ELU needs y's per-channel minimum to judge saturation before x is overwritten.
            y = torch.empty_like(x) if activation == "elu" else x
            torch.ops.aten.native_batch_norm.out(
                x, weight, bias, running_mean_arg, running_var_arg, True,
                momentum if momentum is not None else 0.0, eps,
                out=y, save_mean=mean, save_invstd=invstd,
            )
            if mean.dtype != acc:
                mean, invstd = mean.to(acc), invstd.to(acc)
        if activation == "elu":
            if y is None:  # synchronised statistics: y's minimum from the input's extremes
                low, high = _aminmax(x)
                scale = gamma * invstd
                y_min = beta + torch.minimum(scale * (low.to(acc) - mean),
                                             scale * (high.to(acc) - mean))
            else:
                y_min = _aminmax(y)[0].to(acc)
            ratio = torch.where(y_min < -ELU_SATURATION, math.inf, ratio)
            index, copy = _protect(x, ratio, protect)
        if condition is not None:
            condition.copy_(ratio)

        if group is not None:
            shape = [1, channels] + [1] * (x.dim() - 2)
            scale = gamma * invstd
            shift = beta - mean * scale
            if x.dtype == acc:
                x.mul_(scale.view(shape)).add_(shift.view(shape))
            else:
                x.copy_(torch.addcmul(shift.view(shape), x.to(acc), scale.view(shape)))
        elif y is not x:
            x.copy_(y)
            del y
        activate_(x, activation, slope)
        ctx.mark_dirty(x)

        # Backward's per-channel parameters. rebuild: (centre, spread, factor) of one native
        # backward over y, whose xhat is (y - centre) * spread: for a channel rebuilt from the
        # output centre = beta, spread = 1 / gamma (0 where gamma is tiny: xhat = 0 for a
        # channel left out of the budget), and the weight is gamma^2 * invstd (the input
        # gradient's factor is weight * spread = gamma * invstd). kept: the protected
        # channels' (mean, invstd, gamma) for a backward over their saved input, and their
        # activation branch's (invstd * sign(gamma), beta / |gamma|): xhat * sign(gamma) +
        # beta / |gamma| has the sign of gamma * xhat + beta, which may have underflowed.
        rebuild = torch.stack([beta, torch.where(tiny, 0.0, gamma.reciprocal()),
                               gamma * gamma * invstd])
        kept = None
        if index.numel():
            rows = [mean, invstd, gamma]
            if activation != "identity":  # identity has no branch to take
                rows += [invstd * gamma.sign(), beta / magnitude]
            kept = torch.stack(rows).index_select(1, index)
            if activation != "identity" and group is None:
                # Backward rebuilds these channels from their input, in the same native
                # backward as the others: their (centre, spread, factor) are (mean, invstd, gamma).
                rebuild.index_copy_(1, index, kept[:3])
        stats = torch.stack([mean, invstd, gamma]) if group is not None else None
        ctx.save_for_backward(x, rebuild, index, copy, kept, stats, count)
        ctx.activation, ctx.slope, ctx.eps, ctx.group = activation, slope, eps, group
        ctx.dtypes = [None if t is None else t.dtype for t in (weight, bias)]
        return x

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        z, rebuild, index, copy, kept, stats, count = ctx.saved_tensors
        activation, slope = ctx.activation, ctx.slope
        # Undo the activation: y = act^-1(z), dy = dL/dy. Pointwise only, so that a compiler
        # fuses them into the batch-norm backward's reductions.
        if activation == "leaky_relu":
            y = F.leaky_relu(z, 1.0 / slope)
            dy = torch.ops.aten.leaky_relu_backward(grad_output, z, slope, True)
        elif activation == "elu":
            y = torch.where(z >= 0, z, torch.log1p(z / slope))
            dy = torch.ops.aten.elu_backward(grad_output, slope, 1, 1, True, z)
        else:
            y, dy = z, grad_output
        protected = kept is not None
        needs = list(ctx.needs_input_grad[:3])
        centre, spread, factor = rebuild.unbind()
        if ctx.group is not None:
            from .sync_stats import group_backward

            mean, invstd, gamma = stats.unbind()
            shape = [1, z.shape[1]] + [1] * (z.dim() - 2)
            acc = mean.dtype
            # x = (y - beta) / gamma / invstd + mean; the protected channels: their copy.
            x = y.to(acc, copy=y is z).sub_(centre.view(shape)).mul_(spread.view(shape))
            x = x.mul_(invstd.view(shape).reciprocal()).add_(mean.view(shape))
            if protected:
                x.index_copy_(1, index, copy.to(acc))
                dy = dy.index_copy(1, index, _protected_dy(grad_output, z, copy, index, kept,
                                                           activation, slope))
            grad_input, grad_weight, grad_bias = group_backward(
                dy.to(acc), x, gamma, mean, invstd, count, ctx.group, needs[0]
            )
        elif protected and y is not z:
            # y and dy are this backward's own tensors: the protected channels' input and dL/dy
            # go into them, and one native backward serves every channel (``rebuild`` holds the
            # protected channels' mean, invstd and gamma).
            y.index_copy_(1, index, copy)
            dy.index_copy_(1, index, _protected_dy(grad_output, z, copy, index, kept,
                                                   activation, slope))
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                dy, y, factor, None, None, centre, spread, True, ctx.eps, needs
            )
        else:
            # identity (y is z, dy is grad_output: neither is this backward's to write): the
            # saved channels get a backward of their own over their input, written over what
            # the full one makes of them (each channel's gradients depend on that channel
            # alone). It runs before the full one, so that only its input gradient is alive
            # beside the full one.
            def protected_part():
                return _protected_backward(grad_output, z, copy, index, kept, activation,
                                           slope, ctx.eps, needs)

            parts = protected_part() if protected else None
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                dy, y, factor, None, None, centre, spread, True, ctx.eps, needs
            )
            if protected:
                for dim, full, part in zip((1, 0, 0), (grad_input, grad_weight, grad_bias),
                                           parts, strict=True):
                    if full is not None:
                        full.index_copy_(dim, index, part)
        if grad_input is not None and grad_input.dtype != grad_output.dtype:
            grad_input = grad_input.to(grad_output.dtype)
        weight_dtype, bias_dtype = ctx.dtypes
        grad_weight = grad_weight.to(weight_dtype) if needs[1] and weight_dtype else None
        grad_bias = grad_bias.to(bias_dtype) if needs[2] and bias_dtype else None
        return (grad_input, grad_weight, grad_bias) + (None,) * 10


def _aminmax(x):
    """Per-channel (min, max) of an (N, C, *) tensor."""
    return torch.aminmax(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1)


def _protected_backward(grad_output, z, copy, index, kept, activation, slope, eps, needs):
    """The native batch-norm backward of the protected channels over their saved input."""
    part_dy = _protected_dy(grad_output, z, copy, index, kept, activation, slope)
    mean, invstd, gamma = kept[:3].unbind()
    return torch.ops.aten.native_batch_norm_backward(
        part_dy, copy, gamma, None, None, mean, invstd, True, eps, needs
    )


def _protected_dy(grad_output, z, copy, index, kept, activation, slope):
    """dL/dy of the protected channels, the activation's branch taken from the saved input.

    ``kept`` holds each protected channel's (mean, invstd, gamma, invstd * sign(gamma),
    beta / |gamma|; the last two not for identity): y > 0 exactly where
    (x - mean) * invstd * sign(gamma) + beta / |gamma| > 0,
    which neither underflows nor loses the sign (beta / 0 is +-inf; the sum of two floats
    rounds to a value of the exact sum's sign), where z's sign is lost when gamma * xhat + beta
    underflows."""
    if activation == "identity":
        return grad_output.index_select(1, index)
    shape = [len(kept), 1, index.numel()] + [1] * (z.dim() - 2)
    mean, _, _, scale, offset = kept.view(shape).unbind()
    branch = (copy.to(mean.dtype) - mean).mul_(scale).add_(offset)
    grad = grad_output.index_select(1, index)
    if activation == "leaky_relu" and branch.dtype == grad.dtype:
        return torch.ops.aten.leaky_relu_backward(grad, branch, slope, False)
    if activation == "leaky_relu":
        return torch.where(branch > 0, grad, grad * slope)
    return torch.where(branch > 0, grad, grad * (z.index_select(1, index) + slope))


def _protect(x, ratio, protect):
    """The indices of the ``protect`` worst-conditioned channels and a copy of their input."""
    if protect:
        index = ratio.topk(protect).indices
    else:
        index = torch.empty(0, dtype=torch.long, device=x.device)
    return index, x.index_select(1, index)
