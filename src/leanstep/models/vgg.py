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
from .features import TimmApiMixin
from .heads import check_drop_rate, check_global_pool, check_num_classes, classifier

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


class VGG(TimmApiMixin, nn.Module):
    """VGG-bn: ``features`` -> 7x7 adaptive pool -> three-layer MLP ``classifier``.

    timm's interface, on torchvision's layout: ``forward_features`` is ``features`` (512
    channels, ``num_features``); ``forward_head`` pools to 7x7 (``global_pool`` "avg", as
    torchvision, or "max"), runs the MLP (``head_hidden_size`` 4096, what ``num_classes=0``
    returns, as timm's ``pre_logits``) and the last linear ``classifier.6``. Feature points are
    timm's: the map before each max pool (stride 1..16) and after the last (stride 32).
    ``features_until`` builds ``features`` only up to that feature point (features_only).
    """

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
        global_pool: str = "avg",
        features_until: int | None = None,
    ):
        super().__init__()
        norm_act = get_norm_act(norm)
        self.activation = activation
        self.norm = norm
        self.feature_info = _feature_info(config)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        units: list[list[str]] = []
        index, channels, pools = 0, in_channels, 0
        for width in config:
            if width == POOL and pools == features_until:
                break
            if width == POOL:
                pools += 1
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
        self.num_classes = num_classes
        self.num_features = channels
        self.head_hidden_size = 4096
        if features_until is None:  # a features-only VGG builds no head at all
            self.avgpool = _pool(global_pool)
            self.classifier = nn.Sequential(
                nn.Linear(channels * 7 * 7, 4096),
                get_activation(activation, inplace=True),
                nn.Dropout(p=dropout),
                nn.Linear(4096, 4096),
                get_activation(activation, inplace=True),
                nn.Dropout(p=dropout),
                classifier(4096, num_classes),
            )
        self._init_weights()

    @property
    def drop_rate(self) -> float:
        """The MLP's dropout (timm's name; ``dropout`` in leanstep's options)."""
        return self.classifier[2].p

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        check_drop_rate("drop_rate", value)
        self.classifier[2].p = self.classifier[5].p = float(value)

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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``features``: (N, 512, H/32, W/32)."""
        self._check_not_features_only("forward_features")
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """7x7 pool, the MLP, then ``classifier.6`` unless ``pre_logits`` ((N, 4096))."""
        self._check_not_features_only("forward_head")
        x = torch.flatten(self.avgpool(x), 1)
        if pre_logits:
            for layer in list(self.classifier)[:-1]:
                x = layer(x)
            return x
        return self.classifier(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised ``classifier.6`` for ``num_classes`` (0: none)."""
        self._check_not_features_only("reset_classifier")
        pool = self.avgpool.pool_type if global_pool is None else global_pool
        _check_vgg_head(num_classes, pool)
        self.num_classes = num_classes
        self.avgpool = _pool(pool)
        self.classifier[-1] = classifier(4096, num_classes, like=self.classifier[0].weight)

    def _forward_intermediates(self, x: torch.Tensor, indices) -> list[torch.Tensor]:
        """Run ``features`` as it is (checkpointed units included) and keep the input of each
        max pool that precedes a requested feature point: a pre-hook, only for this call."""
        pools = [name for name, m in self.features.named_children() if isinstance(m, nn.MaxPool2d)]
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for point, name in enumerate(pools):
            if point in indices:
                handles.append(self.features._modules[name].register_forward_pre_hook(
                    lambda module, args, point=point: captured.setdefault(point, args[0])
                ))
        try:
            x = self.features(x)
        finally:
            for handle in handles:
                handle.remove()
        captured[max(indices)] = x  # the last requested point is what ``features`` returns
        return [captured[i] for i in sorted(indices)]

    def _prune_for_features(self, last: int) -> None:
        built = max(int(name) for name in self.features._modules)
        total = int(self.feature_info[-1]["module"].split(".")[1])
        self._pruned_prefixes = tuple(f"features.{i}." for i in range(built + 1, total + 1)) + (
            "classifier.",)
        for name in ("avgpool", "classifier"):
            if hasattr(self, name):
                delattr(self, name)


    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """timm's switch: recompute ``features`` in segments of ``every`` units (or stop)."""
        self.features.set_segment(every if enable else 0)


class _Pool7x7(nn.Module):
    """torchvision's adaptive pool to 7x7 in front of the MLP: average, or max."""

    def __init__(self, pool_type: str):
        super().__init__()
        self.pool_type = pool_type
        self.pool = (nn.AdaptiveAvgPool2d((7, 7)) if pool_type == "avg"
                     else nn.AdaptiveMaxPool2d((7, 7)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def _pool(global_pool: str) -> nn.Module:
    _check_vgg_head(0, global_pool)
    return _Pool7x7(global_pool)


def _check_vgg_head(num_classes: object, global_pool: object) -> None:
    check_num_classes(num_classes)
    if global_pool == "":
        raise ValueError(
            "global_pool='' is not allowed for VGG: its MLP head needs the 7x7 pooled map; use "
            "'avg' or 'max', or forward_features(x) / features_only=True for unpooled maps"
        )
    check_global_pool(global_pool, num_classes)


def _feature_info(config: tuple) -> list[dict]:
    """timm's VGG feature points: before each max pool, and after the last one."""
    info, index, channels, reduction = [], 0, 0, 1
    for width in config:
        if width == POOL:
            info.append(dict(num_chs=channels, reduction=reduction, module=f"features.{index - 2}"))
            reduction *= 2
            index += 1
        else:
            channels = width
            index += 3
    info.append(dict(num_chs=channels, reduction=reduction, module=f"features.{index - 1}"))
    return info


def _check_options(pre_act: object, dropout: object) -> None:
    if not isinstance(pre_act, bool):
        raise ValueError(f"pre_act must be True or False, got {pre_act!r}")
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
            and math.isfinite(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


NUM_FEATURES = 6  # every configuration has five max pools: strides 1, 2, 4, 8, 16, 32


def check_head_options(global_pool: object) -> None:
    """VGG's own rule for ``global_pool``, for ``create_model`` to check before building."""
    if global_pool is not None:
        _check_vgg_head(0, global_pool)


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
