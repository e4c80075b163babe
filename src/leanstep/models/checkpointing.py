"""How a model's ``checkpoint`` argument turns a stage of blocks into modules.

``checkpoint`` is None (store everything), ``"blocks"`` (every block is recomputed in backward)
or an int N (segments of N consecutive blocks are recomputed together). Either way the state
dict keeps the plain ``nn.Sequential``'s keys (``layer1.0.conv1.weight``), so pretrained
checkpoints load whether or not a model is checkpointed.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from leanstep.layers import Checkpointed, CheckpointedSequential

__all__ = ["CHECKPOINT_FORMS", "check_checkpoint", "segment_size", "stage"]

CHECKPOINT_FORMS = "None, 'blocks' or an int >= 1 (blocks per checkpointed segment)"


def check_checkpoint(checkpoint: object) -> None:
    """Raise ValueError unless ``checkpoint`` is None, "blocks" or an int >= 1."""
    if checkpoint is None or checkpoint == "blocks":
        return
    if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 1:
        return
    raise ValueError(f"checkpoint={checkpoint!r} is not allowed; use {CHECKPOINT_FORMS}")


def segment_size(checkpoint: None | str | int) -> int:
    """Blocks per checkpointed segment: 0 for no checkpointing, 1 for "blocks", else N."""
    check_checkpoint(checkpoint)
    if checkpoint is None:
        return 0
    return 1 if checkpoint == "blocks" else int(checkpoint)


def stage(blocks: Sequence[nn.Module], checkpoint: None | str | int) -> nn.Sequential:
    """A stage of consecutive blocks, checkpointed as ``checkpoint`` asks.

    "blocks" wraps each block in ``Checkpointed``; an int N runs the stage as a
    ``CheckpointedSequential`` with segments of N blocks (never crossing into the next stage).
    """
    size = segment_size(checkpoint)
    if size == 0:
        return nn.Sequential(*blocks)
    if checkpoint == "blocks":
        return nn.Sequential(*(Checkpointed(block) for block in blocks))
    return CheckpointedSequential(*blocks, segment=size)
