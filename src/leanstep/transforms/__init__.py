"""Transforms that make the training step of any ``nn.Module`` leaner, in place, exactly.

- ``find_blocks(model, blocks=None)``: the repeated blocks (stage containers' children).
- ``lean(model)``: recompute cheap ops in backward, keep conv/matmul outputs.
- ``checkpoint_blocks(model, every=1, blocks=None, enable=True)``: recompute whole blocks.
- ``convert_norm_act(model, norm="abn", activation=None)``: BatchNorm + activation -> leanstep's
  fused layers, weights and statistics carried over.
- ``apply(model, lean=..., checkpoint=..., convert=..., activation=...)``: all of them at once,
  as the CLI flags ask.
"""

from .apply import apply
from .blocks import find_blocks
from .checkpoint import checkpoint_blocks
from .convert import convert_norm_act
from .lean import lean
from .summary import ConversionSummary, TransformSummary, last_summary

__all__ = [
    "ConversionSummary",
    "TransformSummary",
    "apply",
    "checkpoint_blocks",
    "convert_norm_act",
    "find_blocks",
    "last_summary",
    "lean",
]
