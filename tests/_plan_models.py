"""Small models in the styles the world writes, for the planner's tests (fast at 16 px)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """torchvision style: one ReLU(inplace=True) module used twice, ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """timm/EfficientNet style: expand, depthwise, SE with functional F.silu, project."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.conv_pw = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se_reduce = nn.Conv2d(hidden, max(channels // 2, 1), 1)
        self.se_expand = nn.Conv2d(max(channels // 2, 1), hidden, 1)
        self.conv_pwl = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.silu(self.bn1(self.conv_pw(x)))
        out = F.silu(self.bn2(self.conv_dw(out)))
        gate = self.se_expand(F.silu(self.se_reduce(out.mean((2, 3), keepdim=True))))
        out = out * gate.sigmoid()
        return self.bn3(self.conv_pwl(out)) + x


class TinyEfficientNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.SiLU())
        self.blocks = nn.Sequential(
            nn.Sequential(InvertedResidual(width), InvertedResidual(width)),
            nn.Sequential(InvertedResidual(width), InvertedResidual(width)),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class NoBlocks(nn.Module):
    """No stage container: the block finder has nothing to find."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class Branchy(TinyResNet):
    """Branches on a tensor value: cannot be predicted on fake tensors."""

    def forward(self, x):
        x = super().forward(x)
        if x.sum() > 0:
            return x * 2
        return x


def tiny_resnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyResNet(num_classes, in_channels)


def tiny_efficientnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyEfficientNet(num_classes, in_channels)


def no_blocks(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return NoBlocks(num_classes, in_channels)


def branchy(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return Branchy(num_classes, in_channels)
