"""VGG with batch norm (Simonyan & Zisserman, 2015), keyed as torchvision's ``vgg*_bn``.

``features`` holds the convolutions, norms and pools under torchvision's indices
(``features.0`` conv, ``features.1`` norm, ``features.6`` pool, ...); torchvision's separate
ReLU modules are fused into the norm (a ``leanstep.layers`` norm+activation module), so their
indices are simply unused. ``classifier.{0,3,6}`` are the three linear layers.

Two groupings of the same layers, the seed table's two VGG orderings (``pre_act``):

- PostAct (``pre_act=False``): units conv -> norm+act (-> pool).
- PreAct (``pre_act=True``): units norm+act (-> pool) -> conv. A norm normalises the input
  channels of the conv after it, which are the output channels of the conv before it, so
  every norm keeps torchvision's shape (``features.1`` has 64 channels, not the image's 3).
  Hence the first conv has no norm in front (the image is not normalised by a BN, whose
  3-channel parameters the reference has no keys for) and the last norm+act stands after the
  last conv, closing the stack before the final pool, as in PostAct.

Both orderings therefore compute the same function from the same state dict; they differ in
where a unit starts, which is what ``checkpoint`` cuts at: PostAct checkpoints keep each conv's
input, PreAct checkpoints keep each norm's input (the raw conv output).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from leanstep.layers import get_activation, get_norm_act
from leanstep.transforms import checkpoint_blocks

from .checkpointing import segment_size

__all__ = ["DEFAULT_ACTIVATION", "OPTIONS", "VGG", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

DEFAULT_ACTIVATION = "relu"
# Family options and their defaults.
OPTIONS = {"pre_act": False, "dropout": 0.5}

POOL = "M"
CONFIGS = {
    "vgg11_bn": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg13_bn": (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg16_bn": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL,
                 512, 512, 512, POOL),
    "vgg19_bn": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512,
                 POOL, 512, 512, 512, 512, POOL),
}


class VGGFeatures(nn.Sequential):
    """torchvision's ``features`` Sequential, whose units can be recomputed in backward.

    A unit spans two or three of torchvision's indices (conv and norm, plus a pool), so it
    cannot be one wrapped child without renaming keys. Instead the children stay where
    torchvision has them and each segment of ``segment`` consecutive units is recomputed in
    backward by ``leanstep.transforms.checkpoint_blocks`` on the unit slices (``"[0:2]"``):
    non-reentrant checkpoint, BN statistics updated once, inputs protected from a first layer
    that writes in place, as a PreAct InplaceABN does. ``segment == 0``: plain.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module], units: list[list[str]], segment: int):
        super().__init__(layers)
        self.units = units
        self.segment = 0
        self.set_segment(segment)

    def unit_slices(self) -> list[str]:
        """The units as slices of this Sequential (positions, not torchvision's index names),
        as ``find_blocks`` names them."""
        position = {name: i for i, name in enumerate(self._modules)}
        return [f"[{position[unit[0]]}:{position[unit[-1]] + 1}]" for unit in self.units]

    def set_segment(self, segment: int) -> None:
        """Recompute segments of ``segment`` units in backward (0: none)."""
        if self.segment:
            checkpoint_blocks(self, blocks=self.unit_slices(), enable=False)
        if segment:
            checkpoint_blocks(self, every=segment, blocks=self.unit_slices())
        self.segment = segment

    def extra_repr(self) -> str:
        return f"units={len(self.units)}, checkpoint_segment={self.segment}"


class VGG(nn.Module):
    """VGG-bn: ``features`` -> 7x7 adaptive average pool -> three-layer MLP ``classifier``."""

    def __init__(
        self,
        config: tuple,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        norm: str = "bn",
        activation: str = DEFAULT_ACTIVATION,
        checkpoint: None | str | int = None,
        pre_act: bool = False,
        dropout: float = 0.5,
    ):
        super().__init__()
        norm_act = get_norm_act(norm)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        units: list[list[str]] = []
        index, channels = 0, in_channels
        for width in config:
            if width == POOL:
                layers[str(index)] = nn.MaxPool2d(kernel_size=2, stride=2)
                units[-1].append(str(index))
                index += 1
                continue
            conv, norm_name = str(index), str(index + 1)
            layers[conv] = nn.Conv2d(channels, width, kernel_size=3, padding=1)
            layers[norm_name] = norm_act(width, activation=activation)
            if pre_act:
                if not units:
                    units.append([])
                units[-1].append(conv)
                units.append([norm_name])
            else:
                units.append([conv, norm_name])
            index += 3  # torchvision's ReLU index: fused into the norm here
            channels = width
        self.pre_act = pre_act
        self.features = VGGFeatures(layers, units, segment_size(checkpoint))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, 4096),
            get_activation(activation, inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            get_activation(activation, inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's VGG initialisation: He-normal convs, N(0, 0.01) linears, BN 1 / 0."""
        for module in self.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue  # nothing to initialise on the meta device
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """timm's switch: recompute ``features`` in segments of ``every`` units (or stop)."""
        self.features.set_segment(every if enable else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def _check_options(pre_act: object, dropout: object) -> None:
    if not isinstance(pre_act, bool):
        raise ValueError(f"pre_act must be True or False, got {pre_act!r}")
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
            and math.isfinite(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


def _vgg(name: str, *, drop_path_rate: float = 0.0, pre_act: bool = False,
         dropout: float = 0.5, **kwargs) -> VGG:
    if drop_path_rate != 0.0:
        raise ValueError(
            f"{name} has no residual branches to drop: drop_path_rate must be 0.0, "
            f"got {drop_path_rate!r}"
        )
    _check_options(pre_act, dropout)
    return VGG(CONFIGS[name], pre_act=pre_act, dropout=float(dropout), **kwargs)


def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 (configuration A) with batch norm."""
    return _vgg("vgg11_bn", **kwargs)


def vgg13_bn(**kwargs) -> VGG:
    """VGG-13 (configuration B) with batch norm."""
    return _vgg("vgg13_bn", **kwargs)


def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 (configuration D) with batch norm."""
    return _vgg("vgg16_bn", **kwargs)


def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 (configuration E) with batch norm."""
    return _vgg("vgg19_bn", **kwargs)
