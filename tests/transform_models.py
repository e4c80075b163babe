"""Small models in the styles the world writes them, for the transform tests.

- ``TorchvisionResNet``: torchvision's Bottleneck, one ``nn.ReLU(inplace=True)`` used three
  times, ``out += identity``, a downsample Sequential;
- ``TimmNet``: timm-style blocks calling ``F.silu`` / ``torch.relu`` functionally, stages in a
  Sequential of Sequentials;
- ``MobileNet``: inverted residuals (expand, depthwise, squeeze-excitation, project) with
  ``nn.ReLU6`` / ``nn.Hardswish`` modules in ``nn.Sequential``s;
- ``vgg``: an ``nn.Sequential`` of conv, BatchNorm, ReLU(inplace), max pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 2
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Bottleneck(width, width), Bottleneck(2 * width, width))
        self.layer2 = nn.Sequential(Bottleneck(2 * width, width, 2), Bottleneck(2 * width, width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TimmBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_pw = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * channels)
        self.conv_dw = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1,
                                 groups=2 * channels, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.conv_pwl = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.silu(self.bn1(self.conv_pw(x)))
        out = torch.relu(self.bn2(self.conv_dw(out)))
        return self.bn3(self.conv_pwl(out)) + x


class TimmNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(nn.Sequential(TimmBlock(width), TimmBlock(width)),
                                    nn.Sequential(TimmBlock(width)))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.silu(self.bn1(self.conv_stem(x)))
        return self.head(self.blocks(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.Hardswish(inplace=True),
            SqueezeExcite(mid, max(1, mid // 4)),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                          nn.ReLU6(inplace=True)),
            InvertedResidual(width, width), InvertedResidual(width, 2 * width, 2),
            InvertedResidual(2 * width, 2 * width),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * width, classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def vgg(width: int = 8, classes: int = 5) -> nn.Sequential:
    def unit(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *unit(3, width), *unit(width, width), nn.MaxPool2d(2),
        *unit(width, 2 * width), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


MODELS = {
    "torchvision_resnet": TorchvisionResNet,
    "timm": TimmNet,
    "mobilenet": MobileNet,
    "vgg": vgg,
}
