"""``leanstep.plan``: the fastest per-block mix of plain, lean, checkpointed (and InplaceABN)
blocks whose predicted training-step peak fits a memory budget.

``plan(model, memory=..., batch_size=..., input_size=...)`` returns a ``Plan``;
``plan.apply(model)`` transforms a model; plans round-trip through JSON.
"""

from .choices import CHOICES, apply_assignment
from .cost import DEFAULT_RATES, Rates, calibrate
from .plan import FORMAT, NothingFitsError, Plan, plan
from .trace import UnpredictableError

__all__ = [
    "CHOICES",
    "DEFAULT_RATES",
    "FORMAT",
    "NothingFitsError",
    "Plan",
    "Rates",
    "UnpredictableError",
    "apply_assignment",
    "calibrate",
    "plan",
]
