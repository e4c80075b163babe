"""BatchNorm fused with an activation, in three memory profiles, and the norm registry.

Every variant subclasses ``nn.BatchNorm2d``: its state-dict keys (weight, bias, running_mean,
running_var, num_batches_tracked) are BatchNorm2d's, so checkpoints of plain BatchNorm models
load unchanged. All variants accept inputs of shape (N, C, *).

- ``BatchNormAct``: BatchNorm, then the activation out of place. Autograd keeps the BN input
  and the activation input: two full-size tensors per layer.
- ``ABN``: BatchNorm, then the activation in place on the BN output. Where the activation's
  backward can use its output (ReLU, LeakyReLU, ELU) that is one tensor fewer.
- ``InplaceABN``: In-Place Activated BatchNorm (Rota Bulo et al., CVPR 2018) in pure PyTorch.
  The result overwrites the input's storage; backward inverts the activation and the affine
  transform to recover the normalised input, so one full-size tensor is kept per layer.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

from .activations import (
    INVERTIBLE_ACTIVATIONS,
    activation_parameter,
    canonical_activation,
    get_activation,
)

__all__ = [
    "ABN",
    "BatchNormAct",
    "InplaceABN",
    "check_norm_activation",
    "get_norm_act",
    "list_norms",
    "register_norm",
]

# Channels whose |gamma| is below this keep a copy of their normalised input: dividing by a
# gamma that small would lose the normalised input to rounding (and gamma == 0 erases it).
SMALL_GAMMA = 1e-3


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm followed by an out-of-place activation: the plain baseline."""

    activation_inplace = False

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        activation_param: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.activation_name = canonical_activation(activation)
        self.activation_param = activation_param
        self.act = get_activation(
            activation,
            inplace=self.activation_inplace,
            **activation_parameter(activation, activation_param),
        )

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input of shape "
                f"{tuple(input.shape)}; expected (N, {self.num_features}, *)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))

    def extra_repr(self) -> str:
        param = "" if self.activation_param is None else f"({self.activation_param})"
        return f"{super().extra_repr()}, activation={self.activation_name}{param}"


class ABN(BatchNormAct):
    """BatchNorm followed by the activation applied in place on the BatchNorm output."""

    activation_inplace = True


def _exponential_average_factor(module: nn.BatchNorm2d) -> float:
    """The weight of this batch in the running statistics, exactly as nn.BatchNorm2d uses it."""
    module.num_batches_tracked.add_(1)
    if module.momentum is None:
        return 1.0 / float(module.num_batches_tracked)
    return module.momentum


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


class _InplaceABNFunction(torch.autograd.Function):
    """Training-mode InplaceABN: batch statistics, output written over the input.

    Without a process group the statistics and the BatchNorm gradient are PyTorch's native
    kernels; with one, statistics and gradient sums are reduced over the group.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tracker, eps, activation, slope, group):
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        local_count = x.numel() // channels
        running_mean = running_var = None
        factor = 0.0
        if tracker is not None:
            factor = _exponential_average_factor(tracker)
            running_mean, running_var = tracker.running_mean, tracker.running_var
        if group is None:
            if local_count <= 1:
                raise ValueError(
                    f"InplaceABN: expected more than 1 value per channel when training, got "
                    f"input of shape {tuple(x.shape)}"
                )
            mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, factor)
            rstd = torch.rsqrt(var + eps)
            count = float(local_count)
        else:
            mean, rstd, count = _group_stats(x, eps, group, running_mean, running_var, factor)

        # Channels whose gamma is too small to invert keep a copy of their input.
        small = x_small = None
        if weight is not None and not _is_fake(weight):
            small = (weight.detach().abs() < SMALL_GAMMA).nonzero().flatten()
            if small.numel():
                x_small = x.index_select(1, small)
            else:
                small = None

        w = weight.detach().to(mean.dtype) if weight is not None else torch.ones_like(mean)
        b = bias.detach().to(mean.dtype) if bias is not None else torch.zeros_like(mean)
        scale = w * rstd
        torch.addcmul((b - mean * scale).view(shape), x, scale.view(shape), out=x)
        if activation == "leaky_relu":
            F.leaky_relu_(x, slope)
        elif activation == "elu":
            F.elu_(x, slope)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, mean, rstd, small, x_small)
        ctx.activation, ctx.slope, ctx.group, ctx.count, ctx.eps = (
            activation,
            slope,
            group,
            count,
            eps,
        )
        return x

    @staticmethod
    def backward(ctx, grad_output):
        z, weight, bias, mean, rstd, small, x_small = ctx.saved_tensors
        shape = [1, z.shape[1]] + [1] * (z.dim() - 2)
        acc = mean.dtype
        # Undo the activation: y = act^-1(z), dy = dL/dy.
        if ctx.activation == "leaky_relu":
            y = F.leaky_relu(z, 1.0 / ctx.slope)
            dy = torch.ops.aten.leaky_relu_backward(grad_output, z, ctx.slope, True)
        elif ctx.activation == "elu":
            y = torch.where(z >= 0, z, torch.log1p(z / ctx.slope))
            dy = torch.ops.aten.elu_backward(grad_output, ctx.slope, 1, 1, True, z)
        else:
            y = z.clone()
            dy = grad_output
        y, dy = y.to(acc), dy.to(acc)
        # Undo the affine transform and the normalisation in place:
        # x = (y - beta) / (gamma * rstd) + mean.
        w = weight.detach().to(acc) if weight is not None else torch.ones_like(mean)
        b = bias.detach().to(acc) if bias is not None else torch.zeros_like(mean)
        inverse_scale = 1.0 / (w * rstd)
        x = torch.addcmul(
            (mean - b * inverse_scale).view(shape), y, inverse_scale.view(shape), out=y
        )
        if small is not None:
            x.index_copy_(1, small, x_small.to(acc))
        needs = list(ctx.needs_input_grad[:3])
        if ctx.group is None:
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                dy, x, w, None, None, mean, rstd, True, ctx.eps, needs
            )
        else:
            grad_input, grad_weight, grad_bias = _group_backward(dy, x, w, mean, rstd, ctx)
        if grad_input is not None:
            grad_input = grad_input.to(grad_output.dtype)
        grad_weight = grad_weight.to(weight.dtype) if needs[1] and weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if needs[2] and bias is not None else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _group_stats(x, eps, group, running_mean, running_var, factor):
    """Batch mean and 1/std over every rank of ``group``; updates the running statistics."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    acc = _stats_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(acc), dim=dims, correction=0)
    if x.numel() == 0:
        # A rank holding no samples contributes nothing (its own mean and variance are NaN).
        var, mean = var.nan_to_num(0.0), mean.nan_to_num(0.0)
    local = torch.tensor(float(x.numel() // channels), dtype=acc, device=x.device)
    count, mean, var = _reduce_stats(local, mean, var, group)
    n = float(count)
    if n <= 1:
        raise ValueError(
            f"InplaceABN: expected more than 1 value per channel when training, got {n:g} over "
            f"the process group"
        )
    if running_mean is not None:
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        unbiased = var * (n / (n - 1))
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return mean, torch.rsqrt(var + eps), n


def _group_backward(dy, x, w, mean, rstd, ctx):
    """BatchNorm gradient with the per-channel sums reduced over the process group.

    The input gradient uses the group's sums; weight and bias gradients stay local, as
    DistributedDataParallel sums them across ranks itself.
    """
    import torch.distributed as dist

    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    xhat = x.sub_(mean.view(shape)).mul_(rstd.view(shape))
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xhat).sum(dims)
    grad_weight, grad_bias = sum_dy_xhat.clone(), sum_dy.clone()
    # Every rank joins the reduction, whether or not its own input needs a gradient.
    sums = torch.cat([sum_dy, sum_dy_xhat])
    dist.all_reduce(sums, group=ctx.group)
    if not ctx.needs_input_grad[0]:
        return None, grad_weight, grad_bias
    sum_dy, sum_dy_xhat = sums.split(sum_dy.numel())
    n = ctx.count
    grad_input = dy - (sum_dy / n).view(shape)
    grad_input.sub_(xhat.mul_((sum_dy_xhat / n).view(shape)))
    grad_input.mul_((w * rstd).view(shape))
    return grad_input, grad_weight, grad_bias


class InplaceABN(BatchNormAct):
    """In-Place Activated BatchNorm: saves one full-size tensor per layer instead of two.

    Training with batch statistics runs ``_InplaceABNFunction``: the output
    act(gamma * xhat + beta) is written into the input's storage and only it is saved. Backward
    inverts the activation (hence ``leaky_relu`` with slope > 0, ``elu`` or ``identity`` only)
    and then the affine transform, xhat = (y - beta) / gamma.

    Gamma is *not* reparametrised (unlike mapillary's |gamma| + eps): the weight means what it
    means in ``nn.BatchNorm2d``, negative values included. Channels with |gamma| < 1e-3, where
    the division would lose xhat to rounding (or gamma == 0 erases it), keep a copy of their
    own normalised input, so gradients are right for every gamma at the cost of those channels.

    In place is only safe on a tensor nobody else needs. The input is overwritten when it is an
    intermediate of the autograd graph (``requires_grad`` and not a leaf); any other input (a
    leaf such as the user's image batch, or a tensor outside autograd) is copied first, so user
    data is never modified. If an earlier op saved the input for its own backward (e.g. a
    sigmoid's output), autograd's version check raises "modified by an inplace operation" at
    backward: put InplaceABN after a convolution or linear layer, as models do.

    Statistics are accumulated in float32 for float16/bfloat16 inputs; the output keeps the
    input's dtype and memory format. Eval mode (running statistics) is plain BN + activation.
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        activation_param: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        _check_invertible(activation, activation_param)
        super().__init__(
            num_features, activation, activation_param, eps, momentum, affine, track_running_stats
        )
        params = activation_parameter(activation, activation_param)
        default = {"leaky_relu": 0.01, "elu": 1.0}.get(self.activation_name, 0.0)
        self.slope = next(iter(params.values()), default)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            return self.act(
                F.batch_norm(
                    x,
                    self.running_mean,
                    self.running_var,
                    self.weight,
                    self.bias,
                    False,
                    0.0,
                    self.eps,
                )
            )
        if not (x.requires_grad and not x.is_leaf):
            x = x.clone()
        track = self.training and self.track_running_stats and self.running_mean is not None
        return _InplaceABNFunction.apply(
            x,
            self.weight,
            self.bias,
            self if track else None,
            self.eps,
            self.activation_name,
            self.slope,
            self._group(),
        )

    def _group(self):
        """The process group whose batches are normalised together; None: this process alone."""
        return None


def _check_invertible(activation: str, activation_param: float | None) -> None:
    name = canonical_activation(activation)
    params = activation_parameter(name, activation_param)
    if name not in INVERTIBLE_ACTIVATIONS or (
        name == "leaky_relu" and params.get("negative_slope", 0.01) <= 0
    ):
        raise ValueError(
            f"InplaceABN needs an invertible activation, got activation={activation!r}"
            f"{'' if activation_param is None else f' with parameter {activation_param}'}; "
            f"allowed: leaky_relu (negative slope > 0), elu, identity; or use norm='abn'"
        )


_NORMS: dict[str, type[nn.BatchNorm2d]] = {
    "bn": BatchNormAct,
    "abn": ABN,
    "inplace_abn": InplaceABN,
}


def register_norm(name: str, cls: type[nn.BatchNorm2d]) -> None:
    """Add a norm+activation class to the registry under ``name``."""
    _NORMS[name] = cls


def list_norms() -> list[str]:
    """Every registered norm name."""
    return list(_NORMS)


def get_norm_act(name: str) -> type[nn.BatchNorm2d]:
    """The norm+activation class registered as ``name`` ("bn", "abn", "inplace_abn", ...)."""
    if name not in _NORMS:
        close = difflib.get_close_matches(str(name), list(_NORMS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown norm {name!r}{hint}; valid: {', '.join(_NORMS)}")
    return _NORMS[name]


def check_norm_activation(
    norm: str, activation: str, activation_param: float | None = None
) -> None:
    """Raise ValueError, before anything is built, if ``norm`` cannot work with ``activation``."""
    cls = get_norm_act(norm)
    canonical_activation(activation)
    activation_parameter(activation, activation_param)
    if issubclass(cls, InplaceABN):
        try:
            _check_invertible(activation, activation_param)
        except ValueError:
            raise ValueError(
                f"{cls.__name__} needs an invertible activation, got activation={activation!r}: "
                f"use activation='leaky_relu' (or 'elu', 'identity') or norm='abn'"
            ) from None
