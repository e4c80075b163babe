"""The model zoo: VGG-bn, ResNet / ResNeXt / SE-ResNeXt and EfficientNet, built from leanstep's
norm+activation layers, with torchvision / timm state-dict keys."""

from .registry import create_model, list_models

__all__ = ["create_model", "list_models"]
