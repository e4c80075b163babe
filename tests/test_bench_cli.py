"""End to end: `leanstep bench` in a subprocess on tiny suites, then its files and reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TINY_MODELS = '''
from torch import nn


def tiny(num_classes=10, in_channels=3, width=8):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


def broken(**kwargs):
    raise RuntimeError("this model cannot be built")
'''

SEED_TITLE = re.compile(r"^\*\*(?P<name>.+) (?P<params>\d+\.\d\d)M params\*\*\s*$")
SEED_MEAN = re.compile(
    r"^Mean of (?P<runs>\d+) runs (?P<iters>\d+) iters each BS=(?P<bs>\d+)(, \d+px)?: "
    r"(?P<fwd>\d+\.\d\d)\+-\d+\.\d\d msecs Forward\. (?P<bwd>\d+\.\d\d)\+-\d+\.\d\d msecs "
    r"Backward\. Max memory: (?P<mib>\d+\.\d\d)Mb\. (?P<ips>\d+\.\d\d) imgs/sec\s*$"
)


def _suite(path: Path, cases: str) -> Path:
    path.write_text(
        textwrap.dedent(
            """
            name = "tiny"
            [defaults]
            device = "cpu"
            runs = 1
            iters = 2
            warmup = 1
            threads = 1
            [[group]]
            name = "tiny group"
            """
        )
        + textwrap.dedent(cases)
    )
    return path


def _bench(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-m", "leanstep", "bench", *args, "--no-progress"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=240,
    )


def _bench_in_process(workdir: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The bench command in this process (its workers are still fresh processes)."""
    from leanstep.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.syspath_prepend(str(workdir))  # the command resolves model specs here too
    code = main(["bench", *args, "--no-progress"])
    return code, capsys.readouterr().out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bench")
    (directory / "tiny_models.py").write_text(TINY_MODELS)
    return directory


@pytest.fixture(scope="module")
def two_cases(workdir):
    suite = _suite(
        workdir / "tiny.toml",
        """
        [[group.case]]
        name = "ResNet18 32px"
        model = "resnet18"
        batch_size = 2
        image_size = 32

        [[group.case]]
        name = "Tiny CNN"
        model = "tiny_models:tiny"
        batch_size = 4
        image_size = 16
        options = { width = 6 }
        """,
    )
    out = workdir / "tiny.jsonl"
    completed = _bench(workdir, str(suite), "--out", str(out))
    return suite, out, completed


def test_bench_writes_sane_rows(two_cases, workdir, monkeypatch):
    from leanstep.bench.specs import build_from_spec

    monkeypatch.syspath_prepend(str(workdir))
    _, out, completed = two_cases
    assert completed.returncode == 0, completed.stderr
    rows = _rows(out)
    assert [row["name"] for row in rows] == ["ResNet18 32px", "Tiny CNN"]
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None
        model = build_from_spec(
            row["model"], num_classes=row["num_classes"], in_channels=row["in_channels"],
            options=row["options"],
        )
        params = sum(p.numel() for p in model.parameters())
        assert row["params"] == params
        assert row["peak_mib"] * 2**20 >= 4 * params
        assert row["fwd_ms_mean"] > 0 and row["bwd_ms_mean"] > 0
        assert len(row["fwd_ms_iters"]) == row["runs"] == 1
        assert len(row["fwd_ms_iters"][0]) == row["iters"] == 2
        assert all(t > 0 for run in row["bwd_ms_iters"] for t in run)
        median = row["step_ms_median"]
        assert row["imgs_per_sec"] == pytest.approx(row["batch_size"] * 1000 / median)
        assert row["flops"] > 0 and row["gflops_per_sec"] > 0
        assert row["threads"] == 1 and row["timing_cpu_share"] > 0
        assert set(row["memory"]) >= {"parameters", "gradients", "optimizer_state", "activations"}
        assert row["memory"]["parameters"] * 2**20 == pytest.approx(4 * params, rel=0.01)
        assert row["env"]["torch"] and row["env"]["device_name"] and row["timestamp"]


def test_bench_writes_seed_text_table_and_plot(two_cases):
    _, out, completed = two_cases
    rows = {row["name"]: row for row in _rows(out)}
    lines = out.with_suffix(".seed.md").read_text().splitlines()
    titles = [SEED_TITLE.match(line) for line in lines]
    means = [SEED_MEAN.match(line) for line in lines]
    assert sum(1 for m in titles if m) == 2 and sum(1 for m in means if m) == 2
    for index, title in enumerate(titles):
        if title:
            row = rows[title["name"]]
            mean = means[index + 1]
            assert mean is not None
            assert float(title["params"]) == pytest.approx(row["params"] / 1e6, abs=0.006)
            assert int(mean["bs"]) == row["batch_size"]
            assert float(mean["mib"]) == pytest.approx(row["peak_mib"], abs=0.006)
    assert "tiny group" in completed.stdout
    assert "ResNet18 32px" in completed.stdout and "Tiny CNN" in completed.stdout
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_runs_only_the_missing_case(workdir, two_cases, monkeypatch, capsys):
    suite, out, _ = two_cases
    first = out.read_text().splitlines()[0]
    interrupted = workdir / "interrupted.jsonl"
    interrupted.write_text(first + "\n")
    code, _ = _bench_in_process(
        workdir, monkeypatch, capsys, str(suite), "--resume", str(interrupted)
    )
    assert code == 0
    lines = interrupted.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0] == first
    assert json.loads(lines[1])["name"] == "Tiny CNN"


def test_failing_case_is_recorded_and_the_suite_goes_on(workdir, monkeypatch, capsys):
    suite = _suite(
        workdir / "failing.toml",
        """
        [[group.case]]
        name = "Broken"
        model = "tiny_models:broken"
        batch_size = 2
        image_size = 16

        [[group.case]]
        name = "Tiny CNN"
        model = "tiny_models:tiny"
        batch_size = 2
        image_size = 16
        """,
    )
    out = workdir / "failing.jsonl"
    code, stdout = _bench_in_process(workdir, monkeypatch, capsys, str(suite), "--out", str(out))
    assert code == 1
    assert "this model cannot be built" in stdout
    rows = {row["name"]: row for row in _rows(out)}
    assert rows["Broken"]["status"] == "error"
    assert "this model cannot be built" in rows["Broken"]["error"]
    assert rows["Broken"]["fwd_ms_mean"] is None
    assert rows["Tiny CNN"]["status"] == "ok" and rows["Tiny CNN"]["fwd_ms_mean"] > 0
