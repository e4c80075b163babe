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
import math

import torch
import torch.nn.functional as F
from torch import nn

from .activations import (
    INVERTIBLE_ACTIVATIONS,
    activation_parameter,
    canonical_activation,
    get_activation,
)
from .inplace_abn_function import (
    InplaceABNFunction,
    activate_,
    cumulative_update,
    unprotected_count,
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

# The default fraction of each InplaceABN layer's channels that may keep a copy of their input
# when ill-conditioned (see inplace_abn_function): 1/16 costs at most 6.25% of one tensor.
DEFAULT_PROTECT = 1 / 16


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


class InplaceABN(BatchNormAct):
    """In-Place Activated BatchNorm: saves one full-size tensor per layer instead of two.

    Training with batch statistics runs ``InplaceABNFunction``: PyTorch's native batch-norm
    kernel (the one ABN runs, running statistics included) writes act(gamma * xhat + beta) into
    the input's storage, and only it is saved. Backward
    inverts the activation (hence ``leaky_relu`` with slope > 0, ``elu`` or ``identity`` only)
    and then the affine transform, xhat = (y - beta) / gamma.

    Gamma is *not* reparametrised (unlike mapillary's |gamma| + eps): the weight means what it
    means in ``nn.BatchNorm2d``, negative values and zero included. Where the division loses
    xhat to rounding (|beta / gamma| > 16, gamma == 0, ELU saturated below -6), a channel needs a
    copy of its input: the ``ceil(protect * C)`` worst-conditioned channels of each layer keep
    one (default ``protect`` 1/16; 1.0: every channel, as much memory as ABN). Gradients are
    float32-accurate while the ill-conditioned channels fit that budget;
    ``unprotected_channels`` (a device scalar) counts those left out at the last training step.
    Nothing reads device values on the host: the layer runs
    without host-device synchronisation and compiles (torch.compile) without graph breaks.
    Under torch.compile training runs ABN's maths (exact for every gamma; the compiler's
    partitioner then keeps no more than it would for this Function) and does not write the
    input: use the returned tensor.

    In place is only safe on a tensor nobody else needs. The input is overwritten when it is an
    intermediate of the autograd graph (``requires_grad``, neither a leaf nor a view of one); any
    other input (a leaf such as the user's image batch or a view of it, or a tensor outside
    autograd) is copied first, so user data is never modified. If an earlier op saved the input
    for its own backward (e.g. a sigmoid's output), autograd's version check raises "modified by
    an inplace operation" at backward: put InplaceABN after a convolution or linear layer, as
    models do.

    Statistics are accumulated in float32 for float16/bfloat16 inputs (and kept in float32 when
    the module is float32, as under autocast); the output keeps the input's dtype and memory
    format. ``momentum=None`` (cumulative average) is computed with device tensors, so unlike
    ``nn.BatchNorm2d`` it does not read ``num_batches_tracked`` on the host. Eval mode (running
    statistics) is plain BN + activation.
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
        protect: float = DEFAULT_PROTECT,
    ):
        _check_invertible(activation, activation_param)
        if isinstance(protect, bool) or not isinstance(protect, (int, float)) or not (
            0 <= protect <= 1
        ):
            raise ValueError(
                f"InplaceABN: protect={protect!r}, expected a fraction of the channels in [0, 1]"
            )
        super().__init__(
            num_features, activation, activation_param, eps, momentum, affine, track_running_stats
        )
        params = activation_parameter(activation, activation_param)
        default = {"leaky_relu": 0.01, "elu": 1.0}.get(self.activation_name, 0.0)
        self.slope = next(iter(params.values()), default)
        self.protect = float(protect)
        self.protected_channels = math.ceil(self.protect * num_features)
        # Each channel's conditioning |beta / gamma| at the last training step (not in the
        # state dict); ``unprotected_channels`` is read from it only when asked for.
        self.register_buffer("channel_condition", torch.zeros(num_features), persistent=False)

    @property
    def unprotected_channels(self) -> torch.Tensor:
        """How many ill-conditioned channels were left without a copy of their input at the
        last training step (a device scalar: reading it with ``.item()`` syncs)."""
        return unprotected_count(self.channel_condition, self.protected_channels)

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
        if torch.jit.is_tracing():
            raise RuntimeError(_JIT_ERROR.format(self=type(self).__name__, how="torch.jit.trace"))
        group = self._group()
        if group is None and x.numel() <= x.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when training, "
                f"got input of shape {tuple(x.shape)}"
            )
        # Else the input is left as it was: a leaf, a view of a leaf (autograd forbids writing
        # either in place), a tensor outside autograd.
        written = x.requires_grad and not x.is_leaf and not (
            x._base is not None and x._base.is_leaf)
        track = self.training and self.track_running_stats and self.running_mean is not None
        factor = None
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
        if group is None and torch.compiler.is_compiling():
            return self._compiled_forward(x, track, factor)
        # torch.compile (2.13) drops mark_dirty when the written tensor is an input of the
        # compiled graph: its gradient would bypass this layer. There InplaceABNSync writes a
        # copy and copies the result back, an input mutation the compiler handles; for a
        # tensor made inside the graph the copies are functionalised away.
        target = x if written and torch.compiler.is_compiling() else None
        if not written or target is not None:
            x = x.clone()
        out = InplaceABNFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            factor,
            self.momentum,
            self.eps,
            self.activation_name,
            self.slope,
            self.protected_channels,
            self.channel_condition,
            group,
        )
        return out if target is None else target.copy_(out)

    def _compiled_forward(self, x, track, factor):
        """Training under torch.compile: ABN's maths (native batch norm, then the activation).

        The compiler functionalises in-place writes and its partitioner picks what backward
        keeps, recomputing cheap pointwise ops: on the partitioned graphs ABN keeps no more than
        InplaceABN's autograd Function does (205.0 vs 208.2 MiB, resnet50 batch 4, 128 px),
        so inverting the output buys nothing there, and ABN's gradients are exact for every
        gamma and beta. The input is not written here (batch norm's backward needs it): use
        the returned tensor, as models do."""
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        if factor is not None:
            cumulative_update(x, running_mean, running_var, factor)
            running_mean = running_var = None
        self.channel_condition.zero_()  # nothing is rebuilt, nothing ill-conditioned
        y = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, True,
                         self.momentum or 0.0, self.eps)
        # In place, as ABN: the activation's backward then reads its output (which the next
        # layer keeps anyway), not the batch norm's output.
        return activate_(y, self.activation_name, self.slope)

    def __prepare_scriptable__(self):
        """torch.jit.script cannot compile InplaceABN's autograd Function: one clear error.
        (torch.jit.trace works in eval mode, where the layer is plain BatchNorm + activation.)"""
        raise RuntimeError(_JIT_ERROR.format(self=type(self).__name__, how="torch.jit.script"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, protect={self.protect:g}"

    def _group(self):
        """The process group whose batches are normalised together; None: this process alone."""
        return None


_JIT_ERROR = (
    "{self} cannot be compiled by {how} (its training step is a custom autograd Function): "
    "use torch.compile, or norm='abn' for TorchScript"
)


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
