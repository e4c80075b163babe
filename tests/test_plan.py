"""leanstep.plan: composed per-block peaks, the solver, the Plan object, and the planned step's
real memory (small models at 16 px; every figure a deterministic tensor-level peak)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from _plan_models import BasicBlock, branchy, tiny_efficientnet, tiny_resnet

import leanstep
from leanstep.bench.memory import measured_peak
from leanstep.bench.predict import predict_peak
from leanstep.planner import NothingFitsError, Plan, UnpredictableError, apply_assignment
from leanstep.planner.compose import Table
from leanstep.planner.cost import Rates
from leanstep.planner.solve import fastest, smallest_peak
from leanstep.planner.step import build_step, parse_input_size
from leanstep.planner.trace import Work, trace_step
from leanstep.transforms import find_blocks

CHOICES = ("plain", "lean", "checkpoint")
SIZE = (16, 16)
BATCH = 8


def _names(build) -> list[str]:
    return [name for name, _ in find_blocks(build())]


def _trace(build, names, assignment, batch=BATCH, size=SIZE, **kwargs):
    return trace_step(lambda: apply_assignment(build(), names, assignment), names,
                      batch_size=batch, input_size=size, **kwargs)


def _measured(build, names, assignment, batch=BATCH, size=SIZE, optimizer="sgd"):
    """Peak of one real CPU step after a warm-up step (what ``bench`` measures)."""
    model = apply_assignment(build(), names, assignment)
    step = build_step(model, batch_size=batch, input_size=size, optimizer=optimizer)
    step()
    return measured_peak(step, *step.tracked_objects())["peak_mib"] * 2**20


@pytest.fixture(scope="module", params=[tiny_resnet, tiny_efficientnet],
                ids=["resnet-style", "efficientnet-style"])
def traced(request):
    build = request.param
    names = _names(build)
    traces = {c: _trace(build, names, [c] * len(names)) for c in CHOICES}
    return build, names, traces, Table.from_traces(names, traces, BATCH)


def test_plain_trace_is_the_prediction_of_predict(traced):
    build, names, traces, _ = traced
    predicted = predict_peak(build, batch_size=BATCH, image_size=SIZE[0])["predicted_mib"]
    assert traces["plain"].peak == pytest.approx(predicted * 2**20, rel=1e-9)


def test_choices_change_what_blocks_keep(traced):
    _, _, traces, _ = traced
    kept = {c: sum(traces[c].keep) for c in CHOICES}
    assert kept["checkpoint"] < kept["lean"] < kept["plain"]
    assert traces["checkpoint"].peak < traces["plain"].peak


def test_composition_reproduces_uniform_traces(traced):
    _, names, traces, table = traced
    for choice in CHOICES:
        assert table.peak([choice] * len(names)) == traces[choice].peak


def test_composition_predicts_mixed_assignments(traced):
    build, names, _, table = traced
    rng = random.Random(0)
    for _ in range(3):
        assignment = [rng.choice(CHOICES) for _ in names]
        real = _trace(build, names, assignment).peak
        assert table.peak(assignment) == pytest.approx(real, rel=0.005), assignment


def test_scaled_table_follows_the_batch(traced):
    build, names, _, table = traced
    assignment = ["checkpoint", "lean", "plain", "lean"]
    real = _trace(build, names, assignment, batch=2 * BATCH).peak
    assert table.scaled(2 * BATCH).peak(assignment) == pytest.approx(real, rel=0.02)


def test_recompute_shows_in_the_work(traced):
    _, _, traces, _ = traced
    flops = {c: sum(w.flops for w in traces[c].work) for c in CHOICES}
    moved = {c: sum(w.bytes for w in traces[c].work) for c in CHOICES}
    # lean recomputes cheap ops only: no conv FLOPs, more bytes; checkpoint recomputes convs.
    assert flops["lean"] == flops["plain"] < flops["checkpoint"]
    assert moved["plain"] < moved["lean"]


def test_predicted_peak_equals_the_measured_cpu_peak(traced):
    build, names, _, _ = traced
    assignment = ["checkpoint", "plain", "lean", "lean"]
    predicted = _trace(build, names, assignment).peak
    assert predicted == pytest.approx(_measured(build, names, assignment), rel=0.01)


def test_optimizer_and_rectangular_inputs_are_predicted():
    names = _names(tiny_resnet)
    assignment = ["lean", "checkpoint", "plain", "lean"]
    sgd = _trace(tiny_resnet, names, assignment, size=(16, 24)).peak
    adam = _trace(tiny_resnet, names, assignment, size=(16, 24), optimizer="adam").peak
    params = sum(p.numel() * 4 for p in tiny_resnet().parameters())
    assert adam - sgd >= params  # Adam keeps two states per parameter, SGD momentum one
    measured = _measured(tiny_resnet, names, assignment, size=(16, 24), optimizer="adam")
    assert adam == pytest.approx(measured, rel=0.01)


def _synthetic_table(rng: random.Random, count: int) -> Table:
    keep = {c: [rng.randint(1, 100) for _ in range(count)] for c in CHOICES}
    own = {c: [keep[c][i] + rng.randint(0, 80) for i in range(count)] for c in CHOICES}
    return Table(
        blocks=[f"b{i}" for i in range(count)], choices=list(CHOICES), batch_size=1,
        keep=keep, own=own, own_fixed={c: [0] * count for c in CHOICES},
        gap=[rng.randint(0, 50) if rng.random() < 0.7 else None for _ in range(count + 1)],
        gap_fixed=[0] * (count + 1),
        work={c: [Work() for _ in range(count)] for c in CHOICES}, gap_work=Work(),
    )


@pytest.mark.parametrize("seed", range(8))
def test_solver_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    count = 6
    table = _synthetic_table(rng, count)
    seconds = {(c, i): rng.uniform(0, 1) for c in CHOICES for i in range(count)}
    allowed = [list(CHOICES)] * count
    every = [list(a) for a in itertools.product(CHOICES, repeat=count)]
    peaks = [table.peak(a) for a in every]
    assert table.peak(smallest_peak(table, allowed)) == min(peaks)
    for budget in sorted(set(peaks))[:: max(len(set(peaks)) // 5, 1)]:
        chosen = fastest(table, budget, lambda c, i: seconds[(c, i)], allowed)
        cost = [sum(seconds[(c, i)] for i, c in enumerate(a)) for a in every]
        best = min(t for t, p in zip(cost, peaks, strict=True) if p <= budget)
        assert chosen is not None and table.peak(chosen) <= budget
        assert sum(seconds[(c, i)] for i, c in enumerate(chosen)) == pytest.approx(best)
    assert fastest(table, min(peaks) - 1, lambda c, i: seconds[(c, i)], allowed) is None


@pytest.fixture(scope="module")
def made():
    plain = predict_peak(tiny_resnet, batch_size=BATCH, image_size=16)["predicted_mib"]
    budget = int(plain * 2**20 * 0.8)
    return budget, leanstep.plan(tiny_resnet, memory=budget, batch_size=BATCH, input_size=16)


def test_plan_fits_and_beats_everything_checkpointed(made):
    budget, plan = made
    report = plan.report
    assert report["plan"]["predicted_mib"] * 2**20 <= budget
    assert report["plain"]["predicted_mib"] * 2**20 > budget
    assert set(plan.choices) != {"plain"}
    ckpt = report["baselines"]["checkpoint"]
    assert report["plan"]["estimated_step_s"] <= ckpt["estimated_step_s"]
    # the plan's own max batch is the requested one or more, confirmed by prediction
    assert report["plan"]["max_batch"] >= BATCH
    assert ckpt["max_batch"] >= report["plan"]["max_batch"]
    assert ckpt["max_batch_predicted_mib"] * 2**20 <= budget


def test_applied_plan_measures_within_the_budget_and_is_exact(made):
    budget, plan = made
    names = plan.blocks
    assert _measured(tiny_resnet, names, plan.choices) <= budget
    torch.manual_seed(0)
    reference = tiny_resnet().double()
    planned = plan.apply(tiny_resnet().double())
    planned.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    losses = [m(x).square().mean() for m in (reference, planned)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-12)
    for (name, a), b in zip(reference.named_parameters(), planned.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(reference.buffers(), planned.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_plan_round_trips_through_json(made, tmp_path):
    _, plan = made
    again = Plan.from_json(plan.to_json())
    assert again == plan
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path).choices == plan.choices
    with pytest.raises(ValueError, match="not a leanstep plan"):
        Plan.from_json('{"blocks": []}')
    with pytest.raises(ValueError, match="unknown choice"):
        Plan(blocks=["layer1.0"], choices=["fast"])
    with pytest.raises(ValueError, match="does not match this model"):
        Plan(blocks=["stage9.0"], choices=["lean"]).apply(tiny_resnet())


def test_plan_of_a_model_object_and_of_a_spec():
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = leanstep.plan(model, memory="64MiB", batch_size=4, input_size="16x20",
                         max_batch=False)
    assert plan.model is None and plan.input_size == (16, 20)
    for key, value in model.state_dict().items():  # planning leaves the model alone
        assert torch.equal(value, before[key])
    spec = leanstep.plan("resnet18", memory="1GiB", batch_size=2, input_size=32,
                         max_batch=False)
    assert spec.model == "resnet18" and len(spec.blocks) == 8
    assert isinstance(spec.build(), torch.nn.Module)


def test_nothing_fits_names_the_smallest_peak_and_what_dominates():
    with pytest.raises(NothingFitsError) as caught:
        leanstep.plan(tiny_resnet, memory="100KiB", batch_size=BATCH, input_size=16)
    details = caught.value.details
    assert details["smallest_peak_mib"] * 2**20 > 100 * 1024
    assert "parameters + gradients + optimizer state" in str(caught.value)
    assert "nothing fits" in str(caught.value)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="bad memory budget"):
        leanstep.plan(tiny_resnet, memory="lots", batch_size=2)
    with pytest.raises(ValueError, match="batch size"):
        leanstep.plan(tiny_resnet, memory="1GiB", batch_size=0)
    with pytest.raises(ValueError, match="input size"):
        parse_input_size("16y9")
    with pytest.raises(ValueError, match="optimizer"):
        leanstep.plan(tiny_resnet, memory="1GiB", batch_size=2, optimizer="lion")
    with pytest.raises(UnpredictableError, match="depends on tensor values"):
        leanstep.plan(branchy, memory="1GiB", batch_size=2, input_size=16)


def test_blocks_by_class_name():
    plan = leanstep.plan(tiny_resnet, memory="64MiB", batch_size=4, input_size=16,
                         blocks=[BasicBlock.__name__], max_batch=False)
    assert plan.blocks == _names(tiny_resnet)


def test_default_rates_roofline():
    rates = Rates(flops=1e9, bytes=1e8, op=1e-6, source="test")
    work = Work(compute=[(1e9, 1e7), (1e6, 1e8)], bytes=2e8, ops=4)
    # conv 1: bound by FLOPs (1 s); conv 2: by bytes (1 s); the rest 2 s; 4 ops of 1 us
    assert rates.seconds(work) == pytest.approx(4.000004)


def test_cpu_default_flops_follow_the_threads():
    from leanstep.planner.cost import CPU_FLOPS_PER_THREAD, default_rates

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = default_rates("cpu")
        torch.set_num_threads(2)
        two = default_rates("cpu")
    finally:
        torch.set_num_threads(threads)
    assert one.flops == CPU_FLOPS_PER_THREAD and two.flops == 2 * CPU_FLOPS_PER_THREAD
    assert "2 threads" in two.source
    assert default_rates("cuda").flops == 20e12  # a GPU's default does not follow CPU threads
