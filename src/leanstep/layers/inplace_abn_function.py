"""InplaceABN's training step as one autograd Function: native kernels, no host-device sync.

Forward writes act(gamma * xhat + beta) over the input with PyTorch's native batch-norm kernel
(``native_batch_norm.out`` with ``out=x``: the kernel ABN runs, statistics and running-stat
update included), then applies the activation in place. Backward inverts the activation and the
affine transform to rebuild the input from the output, and runs the native batch-norm backward.

Everything here is static in shape and free of host reads of device values (no ``nonzero``,
``item``, ``float(tensor)``, Python branches on tensor values), so ``torch.compile`` traces it
into the surrounding graph and a CUDA stream never waits for the host.

Ill-conditioned channels. Rebuilding xhat = (y - beta) / gamma from a rounded y loses about
``eps * |beta / gamma|`` of absolute accuracy (all of it when gamma == 0 or is so tiny that y
underflows, 1 / gamma overflows or gamma^2 underflows: ``tiny_gamma``), and ELU's inverse
loses it where the output saturates at -alpha. No formula recovers what rounding removed: such
channels need their input saved. With static shapes that copy cannot be sized by the number of
such channels (knowing it is a sync), so each layer keeps a fixed budget of ``protect`` channels:
the worst-conditioned ones (by ``torch.topk``) keep a copy of their input. Gradients are
float32-accurate while at most ``protect`` channels are ill-conditioned; channels beyond the
budget are counted in the layer's ``unprotected_channels`` buffer (a device tensor, read it when
convenient) and get best-effort gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CONDITION_LIMIT", "ELU_SATURATION", "InplaceABNFunction", "tiny_gamma"]

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


def _affine(weight, bias, like):
    """gamma and beta with ``like``'s dtype and device (1 and 0 without affine parameters)."""
    dtype, channels, device = like.dtype, like.shape[-1], like.device
    gamma = (weight if weight is not None else torch.ones(channels, device=device)).to(dtype)
    beta = (bias if bias is not None else torch.zeros(channels, device=device)).to(dtype)
    return gamma, beta


# sqrt(smallest normal) per dtype: finfo is not free, and this runs twice per layer and step.
_TINY = {dtype: torch.finfo(dtype).tiny ** 0.5
         for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def tiny_gamma(gamma):
    """Where |gamma| is below sqrt of the dtype's smallest normal (0 and subnormals included):
    there y = gamma * xhat + beta underflows, 1 / gamma may overflow and the rebuilt channel's
    weight gamma^2 * invstd underflows, so nothing of xhat can be rebuilt from y."""
    return gamma.abs() < _TINY[gamma.dtype]


def _condition(gamma, beta):
    """|beta / gamma| per channel; +inf (ranked worst) where gamma is tiny or the ratio is nan."""
    ratio = torch.where(tiny_gamma(gamma), math.inf, (beta / gamma).abs())
    return ratio.nan_to_num_(nan=math.inf, posinf=math.inf)


class InplaceABNFunction(torch.autograd.Function):
    """Training-mode InplaceABN. Arguments after ``bias``:

    running_mean, running_var: updated in place (None: not tracked); factor: a device scalar
    (1 / num_batches_tracked, for momentum=None) or None to use ``momentum``; eps; activation
    ("leaky_relu", "elu", "identity") and its slope/alpha; protect: how many channels may keep a
    copy of their input; unprotected: a device scalar set to the number of ill-conditioned
    channels left without one (or None); group: a process group (InplaceABNSync) or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, momentum, eps,
                activation, slope, protect, unprotected, group):
        channels = x.shape[1]
        acc = stats_dtype(x.dtype)
        gamma, beta = _affine(weight, bias, x.new_empty((0, channels), dtype=acc))
        ratio = _condition(gamma, beta)
        protect = min(protect, channels)
        if activation != "elu":  # judged on the weights alone: copy before x is overwritten
            index, copy = _protect(x, ratio, protect, unprotected)
        if group is not None:
            from .sync_stats import group_stats

            mean, invstd, count = group_stats(x, eps, group, running_mean, running_var,
                                              factor, momentum)
            y = None
        else:
            count = None
            if factor is not None:
                # momentum=None: a cumulative average whose weight is a device scalar; the
                # native kernel takes the weight as a host float, which would be a sync.
                dims = [0, *range(2, x.dim())]
                var, batch_mean = torch.var_mean(x.to(acc), dim=dims, correction=1)
                running_mean.mul_(1 - factor).add_(batch_mean.to(running_mean.dtype) * factor)
                running_var.mul_(1 - factor).add_(var.to(running_var.dtype) * factor)
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
            index, copy = _protect(x, ratio, protect, unprotected)

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
        if activation == "leaky_relu":
            F.leaky_relu_(x, slope)
        elif activation == "elu":
            F.elu_(x, slope)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, mean, invstd, index, copy, count)
        ctx.activation, ctx.slope, ctx.eps, ctx.group = activation, slope, eps, group
        return x

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        z, weight, bias, mean, invstd, index, copy, count = ctx.saved_tensors
        activation, slope = ctx.activation, ctx.slope
        gamma, beta = _affine(weight, bias, mean)
        protected = index.numel() > 0
        if protected:
            # The protected channels' (mean, invstd, gamma, beta), gathered in one op.
            kept = torch.stack([mean, invstd, gamma, beta]).index_select(1, index)
        # Undo the activation: y = act^-1(z), dy = dL/dy. A protected channel's y is its saved
        # input and its dy takes the activation's branch from that input.
        if activation == "leaky_relu":
            y = F.leaky_relu(z, 1.0 / slope)
            dy = torch.ops.aten.leaky_relu_backward(grad_output, z, slope, True)
        elif activation == "elu":
            y = torch.where(z >= 0, z, torch.log1p(z / slope))
            dy = torch.ops.aten.elu_backward(grad_output, slope, 1, 1, True, z)
        else:
            y = z.index_copy(1, index, copy) if protected else z
            dy = grad_output
        if protected and activation != "identity":
            y.index_copy_(1, index, copy)
            dy.index_copy_(1, index, _protected_slope(grad_output, z, copy, index, kept,
                                                      activation, slope))
        needs = list(ctx.needs_input_grad[:3])
        if ctx.group is not None:
            from .sync_stats import group_backward

            channels = z.shape[1]
            shape = [1, channels] + [1] * (z.dim() - 2)
            acc = mean.dtype
            y, dy = y.to(acc, copy=y is z), dy.to(acc)  # y is rebuilt in place below
            inverse = torch.where(tiny_gamma(gamma), torch.zeros_like(gamma), 1.0 / gamma)
            x = y.sub_(beta.view(shape)).mul_(inverse.view(shape))
            x = x.mul_(invstd.view(shape).reciprocal()).add_(mean.view(shape))
            if protected:
                x.index_copy_(1, index, copy.to(acc))
            grad_input, grad_weight, grad_bias = group_backward(
                dy, x, gamma, mean, invstd, count, ctx.group, needs[0]
            )
        else:
            # One native backward over y itself: its xhat is (y - centre) * spread, so for a
            # channel rebuilt from the output centre = beta, spread = 1 / gamma, and the
            # weight is gamma^2 * invstd (the input gradient's factor is weight * spread =
            # gamma * invstd); a protected channel holds its saved input instead, with the
            # batch's mean, invstd and gamma. A channel with a tiny gamma left out of the budget
            # gets xhat = 0.
            spread = torch.where(tiny_gamma(gamma), 0.0, gamma.reciprocal())
            params = torch.stack([beta, spread, gamma * gamma * invstd])
            if protected:
                params.index_copy_(1, index, kept[:3])
            centre, spread, factor = params.unbind()
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                dy, y, factor, None, None, centre, spread, True, ctx.eps, needs
            )
        if grad_input is not None and grad_input.dtype != grad_output.dtype:
            grad_input = grad_input.to(grad_output.dtype)
        grad_weight = grad_weight.to(weight.dtype) if needs[1] and weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if needs[2] and bias is not None else None
        return (grad_input, grad_weight, grad_bias) + (None,) * 10


def _aminmax(x):
    """Per-channel (min, max) of an (N, C, *) tensor."""
    return torch.aminmax(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1)


def _protected_slope(grad_output, z, copy, index, kept, activation, slope):
    """dL/dy of the protected channels, the activation's branch taken from the saved input.

    z's sign picks the branch, but where gamma * xhat + beta underflows (a subnormal gamma)
    z == 0 has lost it; y > 0 is decided as xhat * sign(gamma) + beta / |gamma| > 0 instead,
    which neither underflows nor loses the sign (beta / 0 is +-inf; the sum of two floats
    rounds to a value of the exact sum's sign)."""
    shape = [len(kept), 1, index.numel()] + [1] * (z.dim() - 2)
    mean, invstd, gamma, beta = kept.view(shape).unbind()
    side = (copy.to(mean.dtype) - mean).mul_(invstd * gamma.sign()).add_(beta / gamma.abs())
    grad = grad_output.index_select(1, index)
    if activation == "leaky_relu" and side.dtype == grad.dtype:
        return torch.ops.aten.leaky_relu_backward(grad, side, slope, False)
    if activation == "leaky_relu":
        return torch.where(side > 0, grad, grad * slope)
    return torch.where(side > 0, grad, grad * (z.index_select(1, index) + slope))


def _protect(x, ratio, protect, unprotected):
    """The indices of the ``protect`` worst-conditioned channels and a copy of their input;
    sets ``unprotected`` to the number of ill-conditioned channels outside them (the top
    ``protect`` of the ranking hold every ill-conditioned channel they can)."""
    if protect:
        index = ratio.topk(protect).indices
    else:
        index = torch.empty(0, dtype=torch.long, device=x.device)
    if unprotected is not None:
        unprotected.copy_((ratio > CONDITION_LIMIT).sum().sub_(protect).clamp_(min=0))
    return index, x.index_select(1, index)
