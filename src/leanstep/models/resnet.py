"""ResNet (He et al., 2016), ResNeXt (Xie et al., 2017) and SE-ResNeXt (Hu et al., 2018).

State-dict keys are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer1.0.downsample.{0,1}``, ``fc``); the squeeze-excitation of SE-ResNeXt is keyed as timm's
``seresnext50_32x4d`` (``layerX.Y.se.fc1`` / ``fc2``). Every ``bn*`` is a leanstep norm+activation
module with BatchNorm2d's keys. Bottlenecks stride in the 3x3 conv (ResNet v1.5).

In-place safety, which matters with ``norm="inplace_abn"`` (the norm overwrites its input):

- every norm follows a convolution, whose output nobody else needs (a conv saves its input);
- the last norm of a block has ``activation="identity"``; its output is saved by InplaceABN
  (and by the SE product), so the residual sum is out of place, ``out + shortcut``; only that
  fresh sum is then activated in place;
- the block's input is only read: by ``conv1`` and as the shortcut (or by the downsample conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanstep.layers import get_activation, get_norm_act

from .checkpointing import GradCheckpointing, stage
from .features import TimmApiMixin
from .heads import GlobalPool, classifier
from .stochastic_depth import DropPath

__all__ = [
    "DEFAULT_ACTIVATION",
    "OPTIONS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "SqueezeExcite",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "se_resnext50_32x4d",
]

DEFAULT_ACTIVATION = "relu"
OPTIONS: dict[str, object] = {}
# Feature points (timm's): the stem's norm+act output (stride 2), then each stage (4..32).
NUM_FEATURES = 5
STAGES = ("layer1", "layer2", "layer3", "layer4")


class SqueezeExcite(nn.Module):
    """Channel gate x * sigmoid(fc2(relu(fc1(mean(x))))), as timm's SEModule.

    The squeeze width is channels / 16 rounded to a multiple of 8. Its activation stays ReLU,
    as in the reference SE-ResNeXt, whatever the model's ``activation``: it acts on a tiny
    (N, C/16, 1, 1) tensor, and this keeps pretrained SE weights meaningful.
    """

    def __init__(self, channels: int):
        super().__init__()
        squeezed = max(8, int(channels / 16 + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(channels, squeezed, kernel_size=1)
        self.act = get_activation("relu", inplace=True)
        self.fc2 = nn.Conv2d(squeezed, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int, downsample: nn.Module | None,
                 norm_act: type, activation: str, drop_path: float, groups: int = 1,
                 base_width: int = 64, squeeze_excite: bool = False):
        super().__init__()
        if groups != 1 or base_width != 64 or squeeze_excite:
            raise ValueError("BasicBlock supports only groups=1, base_width=64, no SE")
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_act(planes, activation=activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_act(planes, activation="identity")
        self.act = get_activation(activation, inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped for ResNeXt, strided) -> 1x1 expand, optional SE, residual."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int, downsample: nn.Module | None,
                 norm_act: type, activation: str, drop_path: float, groups: int = 1,
                 base_width: int = 64, squeeze_excite: bool = False):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_act(width, activation=activation)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_act(width, activation=activation)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_act(out_channels, activation="identity")
        self.se = SqueezeExcite(out_channels) if squeeze_excite else None
        self.act = get_activation(activation, inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.drop_path(out) + shortcut)


class ResNet(TimmApiMixin, GradCheckpointing, nn.Module):
    """Stem (7x7 conv, norm+act, 3x3 max pool), four stages of blocks, global pool, ``fc``.

    timm's interface: ``forward_features`` (the last stage's map), ``forward_head`` (pool,
    dropout ``drop_rate``, ``fc``), ``reset_classifier``, ``feature_info``,
    ``set_grad_checkpointing``.

    Drop path grows linearly with the block index, from 0 at the first block to
    ``drop_path_rate`` at the last (as timm). Last-norm weights start at 1, not 0: an InplaceABN
    backward divides by gamma, and a zero gamma would make it keep a copy of its input.
    """

    _pool_attr, _classifier_attr, _stem_attr = "avgpool", "fc", "conv1"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        norm: str = "bn",
        activation: str = DEFAULT_ACTIVATION,
        checkpoint: None | str | int = None,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        groups: int = 1,
        base_width: int = 64,
        squeeze_excite: bool = False,
    ):
        super().__init__()
        norm_act = get_norm_act(norm)
        self.activation = activation
        self.norm = norm
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_act(64, activation=activation)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        total_blocks, block_index = sum(depths), 0
        channels = 64
        stage_widths = (64, 128, 256, 512)
        for stage_index, (planes, depth) in enumerate(zip(stage_widths, depths, strict=True)):
            out_channels = planes * block.expansion
            blocks = []
            for i in range(depth):
                stride = 2 if stage_index > 0 and i == 0 else 1
                downsample = None
                if stride != 1 or channels != out_channels:
                    downsample = nn.Sequential(
                        nn.Conv2d(channels, out_channels, 1, stride=stride, bias=False),
                        norm_act(out_channels, activation="identity"),
                    )
                rate = drop_path_rate * block_index / max(total_blocks - 1, 1)
                blocks.append(block(
                    channels, planes, stride=stride, downsample=downsample, norm_act=norm_act,
                    activation=activation, drop_path=rate, groups=groups, base_width=base_width,
                    squeeze_excite=squeeze_excite,
                ))
                channels = out_channels
                block_index += 1
            self.add_module(f"layer{stage_index + 1}", stage(blocks, checkpoint))

        self.feature_info = [dict(num_chs=64, reduction=2, module="bn1")] + [
            dict(num_chs=width * block.expansion, reduction=4 * 2**i, module=name)
            for i, (width, name) in enumerate(zip(stage_widths, STAGES, strict=True))
        ]
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = channels
        self.drop_rate = drop_rate
        self.avgpool = GlobalPool(global_pool)
        self.fc = classifier(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's ResNet initialisation: He-normal (fan-out) convs, BN weight 1, bias 0."""
        for module in self.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue  # nothing to initialise on the meta device
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, (N, num_features, H/32, W/32)."""
        self._check_not_features_only("forward_features")
        x = self.maxpool(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout (``drop_rate``), then ``fc`` unless ``pre_logits``."""
        self._check_not_features_only("forward_head")
        x = self.avgpool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def _forward_intermediates(self, x: torch.Tensor, indices) -> list[torch.Tensor]:
        x = self.bn1(self.conv1(x))
        features = [x] if 0 in indices else []
        x = self.maxpool(x)
        for index, name in enumerate(STAGES[: max(indices)], start=1):
            x = getattr(self, name)(x)
            if index in indices:
                features.append(x)
        return features

    def _prune_for_features(self, last: int) -> None:
        self._pruned_prefixes = tuple(f"{name}." for name in STAGES[last:]) + ("fc.",)
        for name in STAGES[last:]:
            delattr(self, name)
        del self.avgpool, self.fc


def resnet18(**kwargs) -> ResNet:
    """ResNet-18: basic blocks, depths 2-2-2-2."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34: basic blocks, depths 3-4-6-3."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: bottlenecks, depths 3-4-6-3."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: bottlenecks, depths 3-4-23-3."""
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152: bottlenecks, depths 3-8-36-3."""
    return ResNet(Bottleneck, (3, 8, 36, 3), **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d: bottlenecks with 32 groups of width 4 at the first stage."""
    return ResNet(Bottleneck, (3, 4, 6, 3), groups=32, base_width=4, **kwargs)


def se_resnext50_32x4d(**kwargs) -> ResNet:
    """SE-ResNeXt-50 32x4d: ResNeXt-50 with squeeze-excitation in every bottleneck."""
    return ResNet(Bottleneck, (3, 4, 6, 3), groups=32, base_width=4, squeeze_excite=True,
                  **kwargs)
