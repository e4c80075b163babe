"""benchmarks/cuda_check.py: its --dry-run validates every row on the CPU and touches no CUDA."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from leanstep.bench.suite import load_suite

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_check.py"


@pytest.fixture(scope="module")
def cuda_check():
    spec = importlib.util.spec_from_file_location("cuda_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cuda_check"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["cuda_check"]


@pytest.fixture
def no_cuda(monkeypatch):
    """Any use of CUDA fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("CUDA used during a dry run")

    for name in ("synchronize", "set_sync_debug_mode", "max_memory_allocated",
                 "reset_peak_memory_stats", "empty_cache", "get_device_name", "Event"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_dry_run_validates_every_row_and_runs_nothing_on_cuda(cuda_check, no_cuda, tmp_path,
                                                              capsys):
    output = tmp_path / "check.json"
    assert cuda_check.main(["--dry-run", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["environment"]["dry_run"] is True
    rows = report["rows"]
    sections = {row["section"] for row in rows}
    assert sections == {"sync", "stack", "resnet50", "seed", "compile"}
    for row in rows:
        assert row["status"] == "validated (dry run)" or row["status"].startswith("skipped: pip")
        assert "step_ms" not in row
    seed = [row for row in rows if row["section"] == "seed"]
    suite_groups = {case.group for case in load_suite(cuda_check.SEED_SUITE).cases}
    assert sorted(row["group"] for row in seed) == sorted(suite_groups)  # one row per group
    assert all(row["reference_ms"] for row in seed)
    assert any("InplaceABN" in row["label"] for row in seed)
    precisions = {row["precision"] for row in rows if row["section"] == "resnet50"}
    assert precisions == {None, "amp_fp16", "amp_bf16"}
    assert "validated (dry run)" in capsys.readouterr().out  # the one table


def test_without_cuda_and_without_dry_run_exits_2_with_one_line(cuda_check, no_cuda, capsys):
    assert cuda_check.main([]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--dry-run" in error


@pytest.mark.parametrize("budget", ["0", "-3", "nan"])
def test_bad_budget_exits_2_naming_it(cuda_check, no_cuda, capsys, budget):
    assert cuda_check.main(["--dry-run", "--budget-s", budget]) == 2
    assert budget in capsys.readouterr().err
