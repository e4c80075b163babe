"""Largest batch under a budget: the search over predictions, budget strings, the command."""

from __future__ import annotations

import json
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanstep.bench.max_batch import largest_batch, parse_budget
from leanstep.bench.predict import predict_peak
from leanstep.cli import main
from leanstep.models import create_model


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("16 GB", 16 * 10**9), ("16GB", 16 * 10**9), ("16GiB", 16 * 2**30),
        ("16 GiB", 16 * 2**30), ("800MiB", 800 * 2**20), ("800 MB", 800 * 10**6),
        ("1.5 TiB", int(1.5 * 2**40)), ("512KiB", 512 * 2**10), ("16gib", 16 * 2**30),
    ],
)
def test_budget_strings(text, nbytes):
    assert parse_budget(text) == nbytes


@pytest.mark.parametrize("text", ["16", "16 XB", "GiB", "-1GiB", "0 GB", "16 G", "1e3 MB", ""])
def test_bad_budget_strings_name_the_accepted_forms(text):
    with pytest.raises(ValueError, match="accepted: .*16 GB.*16GiB.*800MiB"):
        parse_budget(text)


def _brute_force(peak, budget, limit=4096):
    fitting = [batch for batch in range(1, limit + 1) if peak(batch) <= budget]
    return max(fitting, default=0)


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0, 1000), slope=st.floats(0.01, 100), bend=st.floats(0, 0.5),
    knee=st.integers(1, 2000), budget=st.floats(1, 50000),
)
def test_search_matches_brute_force_on_convex_piecewise_peaks(base, slope, bend, knee, budget):
    # Phases of a step are affine in the batch; the peak is the largest (convex, piecewise).
    def peak(batch):
        return max(base + slope * batch, base + slope * batch + bend * slope * (batch - knee))

    found = largest_batch(peak, budget, limit=4096)
    assert found["batch_size"] == _brute_force(peak, budget)
    assert all(found["probes"][b] == peak(b) for b in found["probes"])


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0, 100), min_size=1, max_size=300), budget=st.floats(0, 30000))
def test_search_matches_brute_force_on_any_nondecreasing_peak(values, budget):
    totals = [sum(values[: i + 1]) for i in range(len(values))]

    def peak(batch):
        return totals[batch - 1] if batch <= len(totals) else totals[-1] + batch

    assert largest_batch(peak, budget, limit=4096)["batch_size"] == _brute_force(peak, budget)


def test_straight_line_is_found_in_few_predictions():
    found = largest_batch(lambda batch: 300 + 85.5 * batch, 16384)
    assert found["batch_size"] == int((16384 - 300) / 85.5)
    assert len(found["probes"]) <= 5


def test_nothing_fits():
    found = largest_batch(lambda batch: 100.0 * batch, 50.0)
    assert found["batch_size"] == 0 and found["predicted_mib"] == 100.0


def test_search_starts_where_asked():
    def peak(batch):
        if batch < 2:
            raise AssertionError("batch 1 must not be predicted")
        return 10.0 * batch

    assert largest_batch(peak, 95.0, start=2)["batch_size"] == 9


@pytest.fixture
def straight_line_predictions(monkeypatch):
    """Predictions replaced by straight lines: 100 MiB + 10 MiB per image for ABN, 6 for
    InplaceABN; batch 1 cannot train for image sizes under 64 px."""

    def predict_case(case, device_like=None):
        if case.batch_size == 1 and case.image_size < 64:
            raise ValueError("Expected more than 1 value per channel when training")
        per_image = 6.0 if case.options.get("norm") == "inplace_abn" else 10.0
        return {"predicted_mib": 100.0 + per_image * case.batch_size}

    monkeypatch.setattr("leanstep.bench.predict.predict_case", predict_case)


def test_cli_json_rows_and_gain(straight_line_predictions, capsys):
    code = main(["max-batch", "resnet18", "--norm", "abn,inplace_abn", "--activation",
                 "leaky_relu", "--memory", "1000MiB", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [(row["options"]["norm"], row["batch_size"]) for row in rows] == [
        ("abn", 90), ("inplace_abn", 150)
    ]
    assert rows[0]["gain_pct"] is None
    assert rows[1]["gain_pct"] == pytest.approx(100 * (150 / 90 - 1))
    assert all(row["memory_budget_mib"] == 1000 and row["image_size"] == 224 for row in rows)


def test_cli_table_line(straight_line_predictions, capsys):
    assert main(["max-batch", "resnet18", "--norm", "abn,inplace_abn", "--activation",
                 "leaky_relu", "--memory", "1 GB"]) == 0
    out = capsys.readouterr().out
    assert "resnet18: abn 85 | inplace_abn 142 (+67%)" in out and "(954 MiB)" in out


def test_search_starts_at_batch_2_where_batch_1_cannot_train(straight_line_predictions, capsys):
    assert main(["max-batch", "resnet18", "--memory", "125MiB", "--size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 2


def test_cli_on_real_predictions(capsys):
    code = main(["max-batch", "resnet18", "--norm", "inplace_abn", "--activation", "leaky_relu",
                 "--memory", "400MiB", "--size", "64", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0 and row["predicted_mib"] <= 400
    beyond = predict_peak(
        partial(create_model, "resnet18", norm="inplace_abn", activation="leaky_relu"),
        batch_size=row["batch_size"] + 1, image_size=64,
    )
    assert beyond["predicted_mib"] > 400


def test_cli_bad_budget_exits_2(capsys):
    assert main(["max-batch", "resnet18", "--memory", "16 gigs"]) == 2
    err = capsys.readouterr().err
    assert "16 gigs" in err and "accepted" in err and len(err.strip().splitlines()) == 1
