"""EfficientNet-B0..B7 (Tan & Le, 2019), keyed as timm's ``efficientnet_b*``.

Keys: ``conv_stem``, ``bn1``, ``blocks.{stage}.{block}.*`` (``conv_dw``, ``conv_pw``,
``conv_pwl``, ``bn1..bn3``, ``se.conv_reduce`` / ``se.conv_expand``), ``conv_head``, ``bn2``,
``classifier``. Every ``bn*`` is a leanstep norm+activation module with BatchNorm2d's keys.

Scaling, as the paper and timm: channels are multiplied by the width multiplier and rounded
to a multiple of 8 (never more than 10 % down); each stage's repeats are multiplied by the depth
multiplier and rounded up. Stochastic depth ("drop connect") of block i of n is
``drop_path_rate * i / n``. Symmetric "same" padding (k // 2), as timm's non-TF variants.

The squeeze-excitation uses the model's activation (swish by default), as the reference; its
squeeze width is a quarter of the block's input channels.

In-place safety with ``norm="inplace_abn"``: every norm follows a convolution; the projection
norm has ``activation="identity"`` and the residual sum is out of place (no activation follows
it), so no tensor saved for backward is ever overwritten.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leanstep.layers import get_activation, get_norm_act

from .checkpointing import GradCheckpointing, stage
from .features import TimmApiMixin
from .heads import GlobalPool, check_drop_rate, classifier
from .stochastic_depth import DropPath

__all__ = [
    "DEFAULT_ACTIVATION",
    "OPTIONS",
    "DepthwiseSeparable",
    "EfficientNet",
    "InvertedResidual",
    "SqueezeExcite",
    *(f"efficientnet_b{i}" for i in range(8)),
]

DEFAULT_ACTIVATION = "swish"
# Family options and their defaults; None: the variant's own value (``VARIANTS``).
OPTIONS: dict[str, object] = {"dropout": None}

# Per stage: block kind ("ds" depthwise separable, "ir" inverted residual), repeats, kernel,
# stride, expansion ratio, output channels, squeeze-excitation ratio (of the input channels).
STAGES = (
    ("ds", 1, 3, 1, 1, 16, 0.25),
    ("ir", 2, 3, 2, 6, 24, 0.25),
    ("ir", 2, 5, 2, 6, 40, 0.25),
    ("ir", 3, 3, 2, 6, 80, 0.25),
    ("ir", 3, 5, 1, 6, 112, 0.25),
    ("ir", 4, 5, 2, 6, 192, 0.25),
    ("ir", 1, 3, 1, 6, 320, 0.25),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# Feature points (timm's "bottleneck" location): the end of each stage followed by a stride-2
# stage, and the last stage: strides 2, 4, 8, 16, 32.
FEATURE_STAGES = tuple(
    i for i in range(len(STAGES)) if i + 1 == len(STAGES) or STAGES[i + 1][3] > 1
)
NUM_FEATURES = len(FEATURE_STAGES)

# Variant: (width multiplier, depth multiplier, classifier dropout); the paper's resolutions are
# 224, 240, 260, 300, 380, 456, 528 and 600.
VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 0.2),
    "efficientnet_b1": (1.0, 1.1, 0.2),
    "efficientnet_b2": (1.1, 1.2, 0.3),
    "efficientnet_b3": (1.2, 1.4, 0.3),
    "efficientnet_b4": (1.4, 1.8, 0.4),
    "efficientnet_b5": (1.6, 2.2, 0.4),
    "efficientnet_b6": (1.8, 2.6, 0.5),
    "efficientnet_b7": (2.0, 3.1, 0.5),
}


def round_channels(channels: float, multiplier: float, divisor: int = 8) -> int:
    """``channels * multiplier`` to the nearest multiple of ``divisor``, at most 10 % lower."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, multiplier: float) -> int:
    """A stage's number of blocks scaled by the depth multiplier, rounded up."""
    return int(math.ceil(repeats * multiplier))


class SqueezeExcite(nn.Module):
    """Channel gate x * sigmoid(conv_expand(act(conv_reduce(mean(x))))), as timm's."""

    def __init__(self, channels: int, squeezed: int, activation: str):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, squeezed, kernel_size=1)
        self.act = get_activation(activation, inplace=True)
        self.conv_expand = nn.Conv2d(squeezed, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class DepthwiseSeparable(nn.Module):
    """Depthwise conv -> norm+act -> SE -> pointwise conv -> norm (the expansion-1 MBConv)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int,
                 se_ratio: float, norm_act: type, activation: str, drop_path: float):
        super().__init__()
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_dw = nn.Conv2d(in_channels, in_channels, kernel, stride=stride,
                                 padding=kernel // 2, groups=in_channels, bias=False)
        self.bn1 = norm_act(in_channels, activation=activation)
        self.se = SqueezeExcite(in_channels, round(in_channels * se_ratio), activation)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = norm_act(out_channels, activation="identity")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.bn1(self.conv_dw(x)))
        out = self.bn2(self.conv_pw(out))
        return self.drop_path(out) + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expand -> depthwise kxk -> SE -> 1x1 project, residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int,
                 expand_ratio: int, se_ratio: float, norm_act: type, activation: str,
                 drop_path: float):
        super().__init__()
        mid_channels = in_channels * expand_ratio
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_pw = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = norm_act(mid_channels, activation=activation)
        self.conv_dw = nn.Conv2d(mid_channels, mid_channels, kernel, stride=stride,
                                 padding=kernel // 2, groups=mid_channels, bias=False)
        self.bn2 = norm_act(mid_channels, activation=activation)
        squeezed = round(mid_channels * (se_ratio / expand_ratio))
        self.se = SqueezeExcite(mid_channels, squeezed, activation)
        self.conv_pwl = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = norm_act(out_channels, activation="identity")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv_pw(x))
        out = self.se(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return self.drop_path(out) + x if self.has_skip else out


class EfficientNet(TimmApiMixin, GradCheckpointing, nn.Module):
    """Stem (3x3 stride-2 conv, norm+act), seven stages of MBConv blocks, 1x1 head, classifier.

    timm's interface: ``forward_features`` (through ``conv_head`` / ``bn2``), ``forward_head``
    (pool, dropout, ``classifier``), ``reset_classifier``, ``feature_info``,
    ``set_grad_checkpointing``.
    """

    _pool_attr, _classifier_attr, _stem_attr = "global_pool", "classifier", "conv_stem"

    def __init__(
        self,
        width_multiplier: float,
        depth_multiplier: float,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        norm: str = "bn",
        activation: str = DEFAULT_ACTIVATION,
        checkpoint: None | str | int = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.2,
        global_pool: str = "avg",
    ):
        super().__init__()
        norm_act = get_norm_act(norm)
        self.activation = activation
        self.norm = norm
        stem_channels = round_channels(STEM_CHANNELS, width_multiplier)
        self.conv_stem = nn.Conv2d(in_channels, stem_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_act(stem_channels, activation=activation)

        depths = [round_repeats(spec[1], depth_multiplier) for spec in STAGES]
        total_blocks, block_index = sum(depths), 0
        channels = stem_channels
        stages = []
        self.feature_info = []
        reduction = 2
        for stage_index, (spec, depth) in enumerate(zip(STAGES, depths, strict=True)):
            kind, _, kernel, stride, expand_ratio, width, se_ratio = spec
            out_channels = round_channels(width, width_multiplier)
            blocks = []
            for i in range(depth):
                common = dict(kernel=kernel, stride=stride if i == 0 else 1, se_ratio=se_ratio,
                              norm_act=norm_act, activation=activation,
                              drop_path=drop_path_rate * block_index / total_blocks)
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(channels, out_channels, **common))
                else:
                    blocks.append(InvertedResidual(channels, out_channels,
                                                   expand_ratio=expand_ratio, **common))
                channels = out_channels
                block_index += 1
            reduction *= spec[3]
            if stage_index in FEATURE_STAGES:
                self.feature_info.append(
                    dict(num_chs=channels, reduction=reduction, module=f"blocks.{stage_index}")
                )
            stages.append(stage(blocks, checkpoint))
        self.blocks = nn.Sequential(*stages)

        head_channels = round_channels(HEAD_CHANNELS, width_multiplier)
        self.conv_head = nn.Conv2d(channels, head_channels, 1, bias=False)
        self.bn2 = norm_act(head_channels, activation=activation)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = head_channels
        self.global_pool = GlobalPool(global_pool)
        self.dropout = nn.Dropout(p=dropout)
        self.classifier = classifier(head_channels, num_classes)
        self._init_weights()

    @property
    def drop_rate(self) -> float:
        """Dropout before the classifier (timm's name; ``dropout`` in leanstep's options)."""
        return self.dropout.p

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        check_drop_rate("drop_rate", value)
        self.dropout.p = float(value)

    def _init_weights(self) -> None:
        """The reference initialisation: convs N(0, 2 / fan_out) with fan_out = k*k*out/groups,
        linear U(+-1/sqrt(out)), BN weight 1, bias 0, biases 0."""
        for module in self.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue  # nothing to initialise on the meta device
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                fan_out = kh * kw * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.weight.shape[0])
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Through ``conv_head`` / ``bn2``: (N, num_features, H/32, W/32)."""
        self._check_not_features_only("forward_features")
        x = self.bn1(self.conv_stem(x))
        return self.bn2(self.conv_head(self.blocks(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout, then ``classifier`` unless ``pre_logits`` (timm's order)."""
        self._check_not_features_only("forward_head")
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def _forward_intermediates(self, x: torch.Tensor, indices) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        wanted = {FEATURE_STAGES[i] for i in indices}
        features = []
        for stage_index, stage_module in enumerate(self.blocks):
            x = stage_module(x)
            if stage_index in wanted:
                features.append(x)
        return features

    def _prune_for_features(self, last: int) -> None:
        kept = FEATURE_STAGES[last] + 1
        self._pruned_prefixes = tuple(f"blocks.{i}." for i in range(kept, len(self.blocks))) + (
            "conv_head.", "bn2.", "classifier.")
        self.blocks = nn.Sequential(*list(self.blocks)[:kept])
        del self.conv_head, self.bn2, self.global_pool, self.dropout, self.classifier


def _efficientnet(name: str, *, dropout: float | None = None, **kwargs) -> EfficientNet:
    width, depth, default_dropout = VARIANTS[name]
    if dropout is None:
        dropout = default_dropout
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
            and math.isfinite(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be None (the variant's {default_dropout}) or a float in "
                         f"[0, 1), got {dropout!r}")
    return EfficientNet(width, depth, dropout=float(dropout), **kwargs)


def efficientnet_b0(**kwargs) -> EfficientNet:
    """EfficientNet-B0: width 1.0, depth 1.0, dropout 0.2 (224 px)."""
    return _efficientnet("efficientnet_b0", **kwargs)


def efficientnet_b1(**kwargs) -> EfficientNet:
    """EfficientNet-B1: width 1.0, depth 1.1, dropout 0.2 (240 px)."""
    return _efficientnet("efficientnet_b1", **kwargs)


def efficientnet_b2(**kwargs) -> EfficientNet:
    """EfficientNet-B2: width 1.1, depth 1.2, dropout 0.3 (260 px)."""
    return _efficientnet("efficientnet_b2", **kwargs)


def efficientnet_b3(**kwargs) -> EfficientNet:
    """EfficientNet-B3: width 1.2, depth 1.4, dropout 0.3 (300 px)."""
    return _efficientnet("efficientnet_b3", **kwargs)


def efficientnet_b4(**kwargs) -> EfficientNet:
    """EfficientNet-B4: width 1.4, depth 1.8, dropout 0.4 (380 px)."""
    return _efficientnet("efficientnet_b4", **kwargs)


def efficientnet_b5(**kwargs) -> EfficientNet:
    """EfficientNet-B5: width 1.6, depth 2.2, dropout 0.4 (456 px)."""
    return _efficientnet("efficientnet_b5", **kwargs)


def efficientnet_b6(**kwargs) -> EfficientNet:
    """EfficientNet-B6: width 1.8, depth 2.6, dropout 0.5 (528 px)."""
    return _efficientnet("efficientnet_b6", **kwargs)


def efficientnet_b7(**kwargs) -> EfficientNet:
    """EfficientNet-B7: width 2.0, depth 3.1, dropout 0.5 (600 px)."""
    return _efficientnet("efficientnet_b7", **kwargs)
