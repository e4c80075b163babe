"""Feature extraction in timm's convention: ``features_only=True`` and ``feature_info``.

A zoo model lists its feature points in ``feature_info`` (channels, reduction, module name, one
dict per point, as timm). ``as_features(model, out_indices)`` turns the model itself into an
encoder: its ``forward`` returns the list of feature maps at ``out_indices``, the classifier and
every stage after the last requested point are removed (so no parameter is left without a
gradient), and ``feature_info`` becomes a ``FeatureInfo`` whose ``channels()`` /
``reduction()`` describe the returned maps.

The model stays the same object with the same state-dict keys (a pretrained checkpoint loads
into the encoder, minus the head), and the features are taken by running the model's own
stages, so whatever wraps the blocks (checkpointing, a memory transform) keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .heads import GlobalPool, check_head, classifier

__all__ = ["FeatureInfo", "as_features", "check_out_indices"]


class FeatureInfo:
    """timm's ``FeatureInfo``: every feature point of a model and the selected ``out_indices``.

    ``channels()``, ``reduction()`` and ``module_name()`` answer for the selected points (or
    for one point with ``idx``); indexing and ``len`` address every point, as in timm.
    """

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]):
        self.info = [dict(entry, index=i) for i, entry in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx=None) -> list[dict] | dict:
        indices = self.out_indices if idx is None else idx
        pick = (lambda d: dict(d)) if keys is None else (lambda d: {k: d[k] for k in keys})
        if isinstance(indices, int):
            return pick(self.info[indices])
        return [pick(self.info[i]) for i in indices]

    def channels(self, idx=None):
        """Channels of the selected feature maps."""
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        """Stride of the selected feature maps relative to the input."""
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        """The module whose output each selected feature map is."""
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return (f"FeatureInfo(channels={self.channels()}, reduction={self.reduction()}, "
                f"out_indices={self.out_indices})")


def check_out_indices(out_indices: object, count: int, model: str) -> tuple[int, ...]:
    """``out_indices`` as sorted non-negative indices into ``count`` feature points.

    Negative indices count from the end, as in Python and timm; duplicates, non-ints and
    out-of-range values raise ValueError naming the value and the allowed range.
    """
    allowed = f"ints in 0..{count - 1} (or -{count}..-1), at least one, no repeats"
    if not isinstance(out_indices, (tuple, list)) or not out_indices:
        raise ValueError(f"out_indices={out_indices!r} for {model}: expected a tuple of {allowed}")
    normalised = []
    for index in out_indices:
        if not isinstance(index, int) or isinstance(index, bool) or not -count <= index < count:
            raise ValueError(
                f"out_indices={tuple(out_indices)!r}: {index!r} is out of range for {model}, "
                f"which has {count} feature points; allowed: {allowed}"
            )
        normalised.append(index % count)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"out_indices={tuple(out_indices)!r} repeats a feature point; "
                         f"allowed: {allowed}")
    return tuple(sorted(normalised))


def as_features(model: nn.Module, out_indices: Sequence[int]) -> nn.Module:
    """Make ``model`` return its feature maps at ``out_indices`` (validated already)."""
    info = FeatureInfo(model.feature_info.info if isinstance(model.feature_info, FeatureInfo)
                       else model.feature_info, out_indices)
    model._prune_for_features(max(out_indices))
    model.feature_info = info
    model.features_only = True
    model.num_classes = 0
    return model


class TimmApiMixin:
    """What every zoo model shares: timm's ``forward`` split and the features-only mode.

    A family defines ``forward_features``, ``forward_head``, ``_forward_intermediates``
    (feature maps at a set of indices, running its own stages) and ``_prune_for_features``.
    """

    features_only = False
    # A pooled linear head (ResNet, EfficientNet) names its parts here; VGG's MLP head defines
    # its own ``get_classifier`` / ``reset_classifier``.
    _pool_attr = _classifier_attr = _stem_attr = ""

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self._forward_intermediates(x, self.feature_info.out_indices)
        return self.forward_head(self.forward_features(x))

    def _check_not_features_only(self, what: str) -> None:
        if self.features_only:
            raise RuntimeError(
                f"{what} is not available on a features_only model (its head was removed); "
                f"call model(x) for the list of feature maps"
            )

    def get_classifier(self) -> nn.Module:
        return getattr(self, self._classifier_attr)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: none), as timm."""
        self._check_not_features_only("reset_classifier")
        pool = getattr(self, self._pool_attr).pool_type if global_pool is None else global_pool
        check_head(num_classes, pool)
        self.num_classes = num_classes
        setattr(self, self._pool_attr, GlobalPool(pool))
        stem = getattr(self, self._stem_attr)
        setattr(self, self._classifier_attr,
                classifier(self.num_features, num_classes, like=stem.weight))
