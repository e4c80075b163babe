"""max-batch options: --margin, --device-like following --device, amp_fp16 CUDA-like, what it
says when nothing fits or the search hits its cap, the progress line, --confirm's refusal."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from leanstep.bench.cases import Case
from leanstep.bench.max_batch import case_max_batch, parse_margin
from leanstep.bench.predict import predict_peak
from leanstep.cli import main
from leanstep.models import create_model


@pytest.fixture
def lines(monkeypatch):
    """Predictions replaced by straight lines: 100 MiB fixed (40 parameters, 40 gradients,
    20 optimizer state) + 10 MiB per image; records the device_like each was asked for."""
    asked = []

    def predict_case(case, device_like=None):
        asked.append(device_like or case.device_type)
        fixed = {"parameters": 40.0, "buffers": 0.0, "gradients": 40.0, "optimizer_state": 20.0}
        return {"predicted_mib": 100.0 + 10.0 * case.batch_size,
                "memory": {**fixed, "activations": 10.0 * case.batch_size}}

    monkeypatch.setattr("leanstep.bench.predict.predict_case", predict_case)
    return asked


@pytest.mark.parametrize("text, share", [("10%", 0.1), ("10", 0.1), ("0%", 0.0),
                                         ("12.5 %", 0.125)])
def test_margin_strings(text, share):
    assert parse_margin(text) == pytest.approx(share)


@pytest.mark.parametrize("text", ["100%", "-5%", "ten", "", "5%%"])
def test_bad_margin_is_one_line(text, capsys):
    assert main(["max-batch", "resnet18", "--memory", "1GiB", f"--margin={text}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "margin" in err


def test_margin_shrinks_the_budget_and_says_what_it_covers(lines, capsys):
    assert main(["max-batch", "resnet18", "--memory", "1100MiB", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["max-batch", "resnet18", "--memory", "1100MiB", "--margin", "10%",
                 "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert plain["batch_size"] == 100 and kept["batch_size"] == 89  # (990 - 100) / 10
    assert kept["budget_mib"] == pytest.approx(990)
    assert main(["max-batch", "resnet18", "--memory", "1100MiB", "--margin", "10%"]) == 0
    out = capsys.readouterr().out
    assert "lower bound of torch.cuda.max_memory_allocated" in out
    assert "10% margin is for cuDNN/cuBLAS workspaces" in out


def test_device_like_follows_device(lines, capsys):
    assert main(["max-batch", "resnet18", "--device", "cuda", "--memory", "1GiB",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["device_like"] == "cuda" and set(lines) == {"cuda"}


def test_cuda_like_amp_fp16_is_searched(capsys):
    code = main(["max-batch", "resnet18", "--device-like", "cuda", "--precision", "amp_fp16",
                 "--memory", "300MiB", "--size", "32", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0 and row["device_like"] == "cuda" and row["precision"] == "amp_fp16"
    assert 0 < row["predicted_mib"] <= 300
    beyond = predict_peak(partial(create_model, "resnet18"), batch_size=row["batch_size"] + 1,
                          image_size=32, precision="amp_fp16", device_like="cuda")
    assert beyond["predicted_mib"] > 300


def test_fixed_state_over_budget_is_one_line_with_figures(lines, capsys):
    assert main(["max-batch", "resnet18", "--memory", "90MiB"]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "alone take" in line)
    assert ("parameters + gradients + optimizer state alone take 100.0 MiB (parameters 40.0, "
            "buffers 0.0, gradients 40.0, optimizer state 20.0 MiB), over the budget of 90.0 MiB"
            in line)
    assert "max batch 0" not in out and " 0 " not in out.splitlines()[3]


def test_first_batch_over_budget_says_so(lines, capsys):
    assert main(["max-batch", "resnet18", "--memory", "105MiB"]) == 1
    assert "batch 1 already needs 110.0 MiB, over the budget of 105.0 MiB" in (
        capsys.readouterr().out
    )


def test_search_cap_is_reported_as_a_lower_bound(lines):
    case = Case("s", "g", "resnet18", "resnet18", image_size=32)
    found = case_max_batch(case, 2**40, limit=64)
    assert found["capped"] and found["batch_size"] == 64


def test_search_cap_in_the_command(lines, capsys, monkeypatch):
    monkeypatch.setattr("leanstep.bench.max_batch.MAX_BATCH", 64)
    monkeypatch.setattr(
        "leanstep.commands.max_batch.case_max_batch",
        partial(case_max_batch, limit=64),
    )
    assert main(["max-batch", "resnet18", "--memory", "1TiB"]) == 0
    out = capsys.readouterr().out
    assert ">= 64" in out and "the search stopped at its cap, batch 64" in out


def test_progress_line_on_stderr(lines, capsys):
    assert main(["max-batch", "resnet18", "--memory", "1000MiB"]) == 0
    err = capsys.readouterr().err
    assert "max-batch resnet18: batch 1 -> 110.0 MiB (fits)" in err
    assert "batch 90 -> 1000.0 MiB (fits)" in err and "(over)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal without CUDA")
def test_confirm_without_cuda_is_refused_in_one_line(lines, capsys):
    assert main(["max-batch", "resnet18", "--device", "cuda", "--memory", "1GiB",
                 "--confirm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--confirm runs real steps on CUDA" in err
    assert "this machine has none" in err and lines == []  # refused before any search


def test_confirm_needs_device_cuda(lines, capsys):
    assert main(["max-batch", "resnet18", "--memory", "1GiB", "--confirm"]) == 2
    assert "give --device cuda" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_confirm_measures_the_answer_on_cuda(capsys):
    code = main(["max-batch", "resnet18", "--device", "cuda", "--memory", "2GiB", "--size",
                 "64", "--confirm", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0
    at, past = row["confirmed"]
    assert at["batch_size"] == row["batch_size"] and past["batch_size"] == row["batch_size"] + 1
    assert at["status"] == "ok" and at["peak_mib"] >= 0.99 * row["predicted_mib"]
