"""How a model's ``checkpoint`` argument turns a stage of blocks into modules.

``checkpoint`` is None (store everything), ``"blocks"`` (every block is recomputed in backward)
or an int N (segments of N consecutive blocks are recomputed together). Either way the state
dict, ``named_parameters()`` and attribute paths keep the plain ``nn.Sequential``'s names
(``layer1.0.conv1.weight``, ``model.layer1[0].bn1``): the blocks are recomputed by
``leanstep.transforms.checkpoint_blocks``, which wraps nothing. ``GradCheckpointing`` gives the
zoo timm's ``model.set_grad_checkpointing(enable=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from leanstep.transforms import checkpoint_blocks

__all__ = ["CHECKPOINT_FORMS", "GradCheckpointing", "check_checkpoint", "segment_size", "stage"]

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

    "blocks" recomputes each block alone; an int N recomputes segments of N blocks together
    (never crossing into the next stage). The stage is a plain ``nn.Sequential`` either way.
    """
    size = segment_size(checkpoint)
    sequential = nn.Sequential(*blocks)
    if size:
        checkpoint_blocks(sequential, every=size)
    return sequential


class GradCheckpointing:
    """timm's ``set_grad_checkpointing`` for the zoo: recompute the blocks in backward (or stop).

    ``every`` blocks per recomputed segment (1: each block alone). Names stay as they are.
    """

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        checkpoint_blocks(self, every=every, enable=enable)
