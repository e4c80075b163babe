"""``plan --measure``: the plan and the two baselines measured by ``leanstep bench``'s workers.

Each is a benchmark case whose model is ``leanstep.planner:planned_model`` with the plan as its
option, so it runs exactly as ``leanstep bench`` runs any case: a fresh worker process per case
and round, the three cases interleaved round by round (A B C A B C), measured peak from the
memory pass.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .plan import BASELINES, Plan

__all__ = ["LABELS", "measure_plans", "variants"]

LABELS = {"plan": "plan", "lean": "every block lean", "checkpoint": "every block checkpointed"}
BUILDER = "leanstep.planner:planned_model"


def variants(plan: Plan) -> dict[str, Plan]:
    """The plan and its baselines (every block lean, every block checkpointed)."""
    out = {"plan": dataclasses.replace(plan, report={})}
    for choice in BASELINES:
        out[choice] = dataclasses.replace(plan, choices=[choice] * len(plan.blocks), report={})
    return out


def measure_plans(
    plan: Plan, *, device: str = "cpu", runs: int = 4, iters: int = 2, warmup: int = 2,
    rounds: int = 2, threads: int | None = None, out_path: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict], Path]:
    """Measure the plan and its baselines; returns ({"plan"|"lean"|"checkpoint": row}, path of
    the results file)."""
    from leanstep.bench.cases import Case
    from leanstep.bench.results import default_out_path, environment, latest_rows, read_rows
    from leanstep.bench.runner import run_cases

    if plan.model is None:
        raise ValueError("--measure needs a plan made for a model spec")
    if plan.optimizer != "sgd":
        raise ValueError(f"--measure runs leanstep bench, whose step uses SGD: it cannot measure "
                         f"optimizer {plan.optimizer!r} yet (issue 13)")
    height, width = plan.input_size
    if height != width:
        raise ValueError(f"--measure runs leanstep bench, whose inputs are square: it cannot "
                         f"measure {height}x{width} yet (issue 13)")
    suite = "plan-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", plan.model).strip("-") or "model")
    cases = [
        Case(
            suite=suite, group=f"{plan.model} plan", name=LABELS[key], model=BUILDER,
            options={"plan": variant.to_dict()}, batch_size=plan.batch_size, image_size=height,
            in_channels=plan.in_channels, num_classes=plan.num_classes, device=device,
            precision=plan.precision, runs=runs, iters=iters, warmup=warmup, threads=threads,
            index=index,
        ).with_defaults()
        for index, (key, variant) in enumerate(variants(plan).items())
    ]
    out = Path(out_path) if out_path else default_out_path(suite)
    if out.exists():
        raise ValueError(f"{str(out)!r} exists; choose another --measure-out")
    run_cases(cases, out_path=out, env=environment(), rounds=rounds, progress=progress)
    rows = {row["name"]: row for row in latest_rows(read_rows(out))}
    return {key: rows.get(LABELS[key], {"status": "error", "error": "no row"})
            for key in LABELS}, out
