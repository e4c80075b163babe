"""leanstep: memory-lean CNN training steps, and a benchmark that measures them.

Transforms for any model (``leanstep.transforms``): ``lean``, ``checkpoint_blocks``,
``convert_norm_act``, ``find_blocks``.
"""

__version__ = "0.1.0"

from .transforms import checkpoint_blocks, convert_norm_act, find_blocks, lean  # noqa: E402

__all__ = ["checkpoint_blocks", "convert_norm_act", "find_blocks", "lean"]


def __getattr__(name: str):
    # ``leanstep.plan`` / ``leanstep.Plan`` (``leanstep.planner``), imported when first used.
    if name in ("plan", "Plan"):
        from . import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'leanstep' has no attribute {name!r}")
