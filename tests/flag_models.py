"""Stand-in ``module:callable`` models for tests/test_transform_flags.py (world-style, tiny)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """torchvision-style basic block: one ReLU(inplace=True) module used twice, ``+=``."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class _Net(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(_Block(width), _Block(width))
        self.layer2 = nn.Sequential(_Block(width), _Block(width))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.silu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


def resnet(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    return _Net(width, num_classes, in_channels)


def no_norm(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Nothing for --convert to convert: no BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


class _PreActivation(nn.Module):
    """A pre-activation unit whose BatchNorm input is also the shortcut: InplaceABN must leave
    it (it would overwrite the shortcut), ABN would not."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        y = self.conv2(F.relu(self.bn(x))) + x
        return self.fc(F.relu(self.bn2(y)).mean((2, 3)))


def pre_activation(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _PreActivation(in_channels, num_classes)
