"""``plan --measure``: the plan and the two baselines measured by ``leanstep bench``.

The three are one comparison group of benchmark cases (the model with the plan's choices as the
case's ``plan``), run as ``leanstep bench`` runs any group: a fresh worker process per case and
round, interleaved round by round (A B C A B C), the measured peak from the memory pass.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .plan import BASELINES, Plan

__all__ = ["LABELS", "measure_plans", "variants"]

LABELS = {"plan": "plan", "lean": "every block lean", "checkpoint": "every block checkpointed"}


def variants(plan: Plan) -> dict[str, Plan]:
    """The plan and its baselines (every block lean, every block checkpointed), reports off."""
    out = {"plan": dataclasses.replace(plan, report={})}
    for choice in BASELINES:
        out[choice] = dataclasses.replace(plan, choices=[choice] * len(plan.blocks), report={})
    return out


def check_measurable(plan: Plan) -> None:
    """ValueError when ``leanstep bench`` cannot run the step the plan was made for."""
    if plan.model is None:
        raise ValueError("--measure needs a plan made for a model spec")
    if plan.optimizer != "sgd":
        raise ValueError(f"--measure runs leanstep bench, whose step uses SGD: it cannot measure "
                         f"optimizer {plan.optimizer!r} yet (issue 13)")
    height, width = plan.input_size
    if height != width:
        raise ValueError(f"--measure runs leanstep bench, whose inputs are square: it cannot "
                         f"measure {height}x{width} yet (issue 13)")


def measure_plans(
    plan: Plan, *, device: str = "cpu", runs: int = 4, iters: int = 2, warmup: int = 2,
    rounds: int = 2, threads: int | None = None, out_path: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict], Path]:
    """Measure the plan and its baselines; returns ({"plan"|"lean"|"checkpoint": row}, the
    results file)."""
    from leanstep.bench.cases import Case
    from leanstep.bench.results import ResultsFile, default_out_path, environment, latest_rows
    from leanstep.bench.runner import run_suite
    from leanstep.bench.suite import Suite
    from leanstep.bench.validate import validate_case

    check_measurable(plan)
    name = "plan-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", plan.model).strip("-.") or "model")
    cases = tuple(
        Case(
            suite=name, group=f"{plan.model} plan", name=LABELS[key], model=plan.model,
            options=dict(plan.options), batch_size=plan.batch_size,
            image_size=plan.input_size[0], in_channels=plan.in_channels,
            num_classes=plan.num_classes, device=device, precision=plan.precision, runs=runs,
            iters=iters, warmup=warmup, threads=threads, plan=variant.to_dict(), index=index,
        ).with_defaults()
        for index, (key, variant) in enumerate(variants(plan).items())
    )
    for case in cases:
        validate_case(case)
    suite = Suite(name=name, cases=cases, rounds=rounds)
    path = Path(out_path) if out_path else default_out_path(name)
    with ResultsFile(path, new=True) as out:
        run_suite(suite, out, env=environment(), progress=progress)
        rows = {row["name"]: row for row in latest_rows(out.rows())}
    return {key: rows.get(LABELS[key], {"status": "error", "error": "no row"})
            for key in LABELS}, path
