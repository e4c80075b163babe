"""Pretrained weights for the zoo: a state-dict file, or the reference weights via torchvision/timm.

``pretrained="path"`` reads a .pth / .pt / .bin (``torch.load`` with ``weights_only=True``) or a
.safetensors file (with the ``safetensors`` package). Accepted layouts: leanstep's own, which is
torchvision's for VGG / ResNet / ResNeXt and timm's for SE-ResNeXt / EfficientNet, and timm's
VGG (``pre_logits.fc1`` conv form, ``head.fc``); a checkpoint wrapped in ``{"state_dict": ...}``
/ ``{"model": ...}`` or saved from DDP (``module.`` prefix) is unwrapped. torchvision's
EfficientNet (``features.N.M.block``) and the Cadene/pretrainedmodels SE-ResNeXt layouts are
not translated. As timm does, the
classifier is skipped when ``num_classes`` differs (the new head keeps its initialisation),
the first conv is adapted to ``in_chans`` (summed for 1 channel, repeated and rescaled
otherwise), and the parts a features-only model removed are skipped. Anything else missing,
unexpected or of the wrong shape is an error listing the keys.

``pretrained=True`` fetches the reference weights with the owning package's own download
mechanism, only when asked (never at import): torchvision's ``DEFAULT`` weights for VGG-bn,
ResNet and ResNeXt (timm's ``.tv_in1k`` copy of them if only timm is installed), timm's default
weights for SE-ResNeXt-50 and EfficientNet. Those weights were trained with the family's
activation; a model built with another one (``norm="inplace_abn"`` needs ``leaky_relu``) gets a
warning, since its outputs differ from the reference until fine-tuned.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["check_pretrained", "load_pretrained", "load_state_dict_file", "reference_source"]

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_TORCHVISION = {
    *(f"vgg{d}_bn" for d in (11, 13, 16, 19)),
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    "resnext50_32x4d",
}
_TIMM = {"se_resnext50_32x4d": "seresnext50_32x4d",
         **{f"efficientnet_b{i}": f"efficientnet_b{i}" for i in range(8)}}


def _installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def reference_source(name: str) -> tuple[str, str]:
    """(package, its model name) whose download ``pretrained=True`` uses for ``name``.

    Raises ValueError naming the package(s) to install when none is importable.
    """
    if name in _TORCHVISION:
        if _installed("torchvision"):
            return "torchvision", name
        if _installed("timm"):
            return "timm", f"{name}.tv_in1k"
        raise ValueError(f"pretrained=True for {name} downloads torchvision's weights: "
                         f"pip install torchvision (or timm), or pass pretrained='file.pth'")
    if _installed("timm"):
        return "timm", _TIMM[name]
    raise ValueError(f"pretrained=True for {name} downloads timm's weights: pip install timm, "
                     f"or pass pretrained='file.pth'")


def check_pretrained(pretrained: object, checkpoint_path: object) -> None:
    """Validate ``pretrained`` / ``checkpoint_path`` before anything is built or downloaded."""
    if checkpoint_path is not None and pretrained not in (False, None):
        raise ValueError(f"pretrained={pretrained!r} and checkpoint_path={checkpoint_path!r} "
                         f"both name weights; give one of them")
    for label, value in (("pretrained", pretrained), ("checkpoint_path", checkpoint_path)):
        if value is None or isinstance(value, bool) and label == "pretrained":
            continue
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{label}={value!r} is not allowed; use True, False or the path of "
                             f"a {'/'.join(SUFFIXES)} state dict")
        _check_file(label, Path(value))


def _check_file(label: str, path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{label}={str(path)!r}: unknown file type {path.suffix!r}; "
                         f"allowed: {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{label}={str(path)!r}: no such file")
    if path.suffix == ".safetensors" and not _installed("safetensors"):
        raise ValueError(f"{label}={str(path)!r}: reading .safetensors needs the safetensors "
                         f"package: pip install safetensors")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, unwrapped from a training checkpoint if needed."""
    path = Path(path)
    _check_file("pretrained", path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True), str(path))


def _unwrap(obj: object, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{where}: expected a state dict (names -> tensors), or a checkpoint "
                         f"holding one under 'state_dict' or 'model'")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _download(name: str) -> dict[str, torch.Tensor]:
    package, source = reference_source(name)
    if package == "torchvision":
        from torchvision.models import get_model_weights

        return dict(get_model_weights(source).DEFAULT.get_state_dict(progress=True))
    import timm

    return dict(timm.create_model(source, pretrained=True).state_dict())


def _from_timm_vgg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's VGG head (1x1/7x7 convs ``pre_logits``, ``head.fc``) in torchvision's layout."""
    renames = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.",
               "head.fc.": "classifier.6."}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                if key.endswith("weight") and value.dim() == 4:
                    value = value.flatten(1)
        out[key] = value
    return out


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """timm's rule: sum over RGB for 1 channel; else repeat RGB and rescale by 3 / in_chans."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _first_conv(model: nn.Module) -> str:
    for key, value in model.state_dict().items():
        if key.endswith("weight") and value.dim() == 4:
            return key
    raise ValueError("model has no convolution")


def _classifier_prefix(model: nn.Module) -> str | None:
    if getattr(model, "features_only", False):
        return None
    for name, module in model.named_modules():
        if module is model.get_classifier():
            return name + "."
    return None


def _shorten(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_pretrained(model: nn.Module, name: str, source: object, *,
                    default_activation: str) -> None:
    """Load ``source`` (True or a path) into ``model`` built as ``name``; see the module doc."""
    if source is True:
        state = _download(name)
        activation = getattr(model, "activation", default_activation)
        if activation != default_activation:
            warnings.warn(
                f"{name}: the pretrained weights were trained with activation "
                f"{default_activation!r}, this model uses {activation!r} (norm="
                f"{getattr(model, 'norm', '?')!r}): its outputs differ from the reference model "
                f"until fine-tuned", UserWarning, stacklevel=3,
            )
        where = f"pretrained weights for {name}"
    else:
        state = load_state_dict_file(source)
        where = f"pretrained={str(source)!r}"
    if any(k.startswith(("pre_logits.", "head.fc.")) for k in state):
        state = _from_timm_vgg(state)
    expected = model.state_dict()
    conv = _first_conv(model)
    if conv in state and state[conv].dim() == 4:
        state[conv] = _adapt_first_conv(state[conv], expected[conv].shape[1])

    skipped = tuple(getattr(model, "_pruned_prefixes", ()))
    head = _classifier_prefix(model)
    if head is not None:
        head_keys = [k for k in state if k.startswith(head)]
        fits = all(k in expected and expected[k].shape == state[k].shape for k in head_keys)
        if head_keys and not fits:
            skipped += (head,)  # another num_classes: keep the new head, as timm
    if skipped:
        state = {k: v for k, v in state.items() if not k.startswith(skipped)}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")
               and not (head is not None and k.startswith(head) and head in skipped)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {_shorten(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("wrong shapes", wrong)) if keys]
        layouts = "torchvision or timm" if name in _TORCHVISION else "timm"
        raise ValueError(f"{where} does not fit {name}: {'; '.join(parts)}; expected a {name} "
                         f"state dict in {layouts} layout")
    model.load_state_dict(state, strict=False)
