"""Batch statistics and BatchNorm gradient sums reduced over a torch.distributed group.

Used by InplaceABNSync inside InplaceABNFunction. Counts stay device tensors, so nothing here
reads a device value on the host.
"""

from __future__ import annotations

import torch

from .inplace_abn_function import stats_dtype


def _reduce_stats(count, mean, var, group):
    """Combine per-rank (count, mean, biased var) into the group's, stably (Chan et al.)."""
    import torch.distributed as dist

    local = torch.cat([count.reshape(1), mean, var]).unsqueeze(0)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.cat(gathered)
    counts, means, variances = (
        table[:, :1],
        table[:, 1 : 1 + mean.numel()],
        table[:, 1 + mean.numel() :],
    )
    total = counts.sum()
    group_mean = (counts * means).sum(0) / total
    group_var = (counts * (variances + (means - group_mean) ** 2)).sum(0) / total
    return total, group_mean, group_var


def group_stats(x, eps, group, running_mean, running_var, factor, momentum):
    """Batch mean, 1/std and value count per channel over every rank of ``group``; updates the
    running statistics (weight ``factor``, a device scalar, or else ``momentum``)."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    acc = stats_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(acc), dim=dims, correction=0)
    if x.numel() == 0:
        # A rank holding no samples contributes nothing (its own mean and variance are NaN).
        var, mean = var.nan_to_num(0.0), mean.nan_to_num(0.0)
    local = torch.full((), x.numel() // channels, dtype=acc, device=x.device)
    count, mean, var = _reduce_stats(local, mean, var, group)
    if running_mean is not None:
        weight = factor if factor is not None else momentum
        # n / (n - 1) is inf for a single value per channel: the running variance says so.
        unbiased = var * (count / (count - 1))
        running_mean.mul_(1 - weight).add_(mean.to(running_mean.dtype) * weight)
        running_var.mul_(1 - weight).add_(unbiased.to(running_var.dtype) * weight)
    return mean, torch.rsqrt(var + eps), count


def group_backward(dy, x, gamma, mean, invstd, count, group, needs_input_grad):
    """BatchNorm gradient with the per-channel sums reduced over the process group.

    The input gradient uses the group's sums; weight and bias gradients stay local, as
    DistributedDataParallel sums them across ranks itself. ``x`` is overwritten.
    """
    import torch.distributed as dist

    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    xhat = x.sub_(mean.view(shape)).mul_(invstd.view(shape))
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xhat).sum(dims)
    grad_weight, grad_bias = sum_dy_xhat.clone(), sum_dy.clone()
    # Every rank joins the reduction, whether or not its own input needs a gradient.
    sums = torch.cat([sum_dy, sum_dy_xhat])
    dist.all_reduce(sums, group=group)
    if not needs_input_grad:
        return None, grad_weight, grad_bias
    sum_dy, sum_dy_xhat = sums.split(sum_dy.numel())
    grad_input = dy - (sum_dy / count).view(shape)
    grad_input.sub_(xhat.mul_((sum_dy_xhat / count).view(shape)))
    grad_input.mul_((gamma * invstd).view(shape))
    return grad_input, grad_weight, grad_bias
