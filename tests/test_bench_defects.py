"""`leanstep bench` loses nothing and mixes nothing: one test per defect of issue 12.

Every bad input is one line and exit 2 before anything is measured; a results file has one
writer; resume checks settings; derived files never overwrite the results; workers die with
their parent; timings say when they cannot be trusted.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from leanstep.bench.cases import Case
from leanstep.bench.runner import make_row
from leanstep.cli import main

TINY = '''
import os
import time

from torch import nn


def tiny(num_classes=4, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, num_classes),
    )


class _Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        time.sleep(120)
        return self.conv(x)


def slow(num_classes=4, in_channels=3):
    with open(os.environ["LEANSTEP_TEST_PID_FILE"], "w") as stream:
        stream.write(str(os.getpid()))
    return _Slow()
'''
ENV = {"torch": "x"}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "tiny_i12.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    return tmp_path


def _suite(path: Path, body: str = "", name: str = "tiny") -> Path:
    path.write_text(f'name = "{name}"\n' + textwrap.dedent(body or """
        [defaults]
        runs = 1
        iters = 1
        warmup = 0
        threads = 1
        batch_size = 2
        image_size = 8
        [[group]]
        name = "g"
        [[group.case]]
        name = "tiny"
        model = "tiny_i12:tiny"
    """))
    return path


def _error(capsys, *argv: str) -> str:
    code = main([*argv])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def _no_worker(monkeypatch):
    from leanstep.bench import runner

    def refuse(*args, **kwargs):
        raise AssertionError("a worker started")

    monkeypatch.setattr(runner, "run_worker", refuse)


def _row(name="tiny", status="ok", **case_fields) -> dict:
    case = Case("tiny", "g", name, "tiny_i12:tiny", **{
        "batch_size": 2, "image_size": 8, "runs": 1, "iters": 1, "warmup": 0, "threads": 1,
        **case_fields,
    })
    result = {"status": status, "error": None if status == "ok" else "boom", "params": 10,
              "fwd_ms_iters": [[1.0]], "bwd_ms_iters": [[2.0]], "peak_mib": 1.0,
              "memory": {"activations": 0.5}, "timing_wall_s": 1.0, "timing_cpu_s": 1.0,
              "threads": 1}
    return make_row(case, [result], ENV)


# --------------------------------------------------------------------------------------------
# nothing lost


def test_plot_and_seed_text_never_overwrite_the_results_file(workdir, capsys):
    suite = _suite(workdir / "s.toml")
    out = workdir / "r.png"
    assert main(["bench", str(suite), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["name"] for row in rows] == ["tiny"]
    assert (workdir / "r.png.png").read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "r.png.seed.md").read_text().startswith("# tiny")


def test_a_second_writer_exits_2_before_measuring(workdir, capsys, monkeypatch):
    suite = _suite(workdir / "s.toml")
    out = workdir / "r.jsonl"
    out.write_text("")
    _no_worker(monkeypatch)
    with out.open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        line = _error(capsys, "bench", str(suite), "--resume", str(out), "--no-progress")
    assert "being written by another leanstep bench run" in line


def test_resume_with_other_settings_is_refused_listing_the_differences(workdir, capsys,
                                                                         monkeypatch):
    suite = _suite(workdir / "s.toml")
    out = workdir / "r.jsonl"
    out.write_text(json.dumps(_row()) + "\n")
    _no_worker(monkeypatch)
    line = _error(capsys, "bench", str(suite), "--bs", "4", "--resume", str(out),
                  "--no-progress")
    assert "tiny: batch_size 2 in the file, 4 now" in line
    assert out.read_text().count("\n") == 1


def test_interrupt_hint_repeats_every_option():
    from leanstep.commands.bench import _resume_command

    argv = ["bench", "resnet18", "--norm", "abn,inplace_abn", "--bs", "8", "--out", "r.jsonl"]
    assert _resume_command(argv, Path("r.jsonl")) == (
        "leanstep bench resnet18 --norm abn,inplace_abn --bs 8 --resume r.jsonl"
    )


def test_a_cut_line_inside_the_file_is_set_aside_and_the_good_rows_kept(workdir, capsys):
    from leanstep.bench.results import ResultsFile, read_rows

    out = workdir / "r.jsonl"
    first, last = _row("a"), _row("c", index=2)
    out.write_text(json.dumps(first) + "\n" + '{"suite": "tiny", "gro\n' + json.dumps(last) + "\n")
    assert [row["name"] for row in read_rows(out)] == ["a", "c"]
    assert "line 2" in capsys.readouterr().err
    assert main(["report", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    with ResultsFile(out, new=False) as results:
        results.append(_row("d", index=3))
    assert [row["name"] for row in read_rows(out)] == ["a", "c", "d"]
    assert (workdir / "r.jsonl.bad").read_text() == '{"suite": "tiny", "gro\n'


def test_an_unwritable_output_is_found_before_the_first_case(workdir, capsys, monkeypatch):
    suite = _suite(workdir / "s.toml")
    (workdir / "file").write_text("")
    _no_worker(monkeypatch)
    line = _error(capsys, "bench", str(suite), "--out", str(workdir / "file" / "r.jsonl"),
                  "--no-progress")
    assert "cannot write results file" in line


def test_failed_rows_run_again_with_retry_failed(workdir, capsys):
    suite = _suite(workdir / "s.toml")
    out = workdir / "r.jsonl"
    out.write_text(json.dumps(_row(status="error")) + "\n")
    assert main(["bench", str(suite), "--resume", str(out), "--no-progress"]) == 1
    assert len(out.read_text().splitlines()) == 1
    assert main(["bench", str(suite), "--resume", str(out), "--retry-failed",
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["error", "ok"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_worker_dies_with_its_parent(workdir, sig):
    suite = _suite(workdir / "s.toml", """
        [[group]]
        name = "g"
        [[group.case]]
        name = "slow"
        model = "tiny_i12:slow"
        batch_size = 2
        image_size = 4
        warmup = 0
        runs = 1
        iters = 1
        threads = 1
    """)
    pid_file = workdir / "worker.pid"
    env = dict(os.environ, LEANSTEP_TEST_PID_FILE=str(pid_file))
    parent = subprocess.Popen(
        [sys.executable, "-m", "leanstep", "bench", str(suite), "--no-progress", "--out",
         str(workdir / "r.jsonl")],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None, parent.stderr.read()
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        time.sleep(0.5)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


# --------------------------------------------------------------------------------------------
# one line, exit 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[group]\nname = "g"\n', "written [[group]]"),
        ("defaults = 3\n[[group]]\nname = \"g\"\n", "[defaults] of suite s.toml must be a table"),
        ('[[group]]\nname = "g"\ncase = [1, 2]\n', "written [[group.case]]"),
    ],
)
def test_malformed_suites_are_one_line(workdir, capsys, body, message):
    suite = workdir / "s.toml"
    suite.write_text(body)
    assert message in _error(capsys, "bench", str(suite), "--no-progress")


def test_a_suite_name_cannot_write_outside_results(workdir, capsys, monkeypatch):
    suite = _suite(workdir / "s.toml", name="../../x")
    _no_worker(monkeypatch)
    assert "suite name '../../x'" in _error(capsys, "bench", str(suite), "--no-progress")
    assert not list(workdir.parent.parent.glob("x-*.jsonl"))


def test_a_huge_batch_size_is_one_line(capsys):
    line = _error(capsys, "bench", "resnet18", "--bs", "99999999999999999999", "--no-progress")
    assert "batch size must be an int <=" in line


def test_report_refuses_to_overwrite_its_input(workdir, capsys):
    out = workdir / "r.jsonl"
    text = json.dumps(_row()) + "\n"
    out.write_text(text)
    assert "is the results file itself" in _error(
        capsys, "report", str(out), "--format", "markdown", "--output", str(out)
    )
    assert out.read_text() == text


def test_a_row_with_a_non_numeric_figure_is_skipped_with_a_message(workdir, capsys):
    out = workdir / "r.jsonl"
    bad = {**_row("b", index=1), "peak_mib": "lots"}
    out.write_text(json.dumps(_row("a")) + "\n" + json.dumps(bad) + "\n")
    assert main(["report", str(out), "--format", "markdown"]) == 0
    captured = capsys.readouterr()
    assert "field 'peak_mib' of row 'b' is not a number" in captured.err
    assert "| a |" in captured.out and "| b |" not in captured.out


# --------------------------------------------------------------------------------------------
# timings that say when they cannot be trusted


def test_flops_are_counted_after_timing_not_in_the_warm_up(workdir):
    from leanstep.bench.measure import measure_case

    phases = []
    case = Case("s", "g", "n", "tiny_i12:tiny", batch_size=2, image_size=8, runs=1, iters=1,
                warmup=1, threads=1)
    result = measure_case(case, predict=False, phase=phases.append)
    assert phases == ["build", "warmup", "timing", "memory", "flops"]
    assert result["flops"] > 0


def test_time_ratio_and_throughput_use_medians():
    from leanstep.bench.report import ratios

    base, stalled = _row("a"), _row("b", index=1)
    base.update(step_ms_median=10.0, fwd_ms_mean=3.0, bwd_ms_mean=7.0)
    stalled.update(step_ms_median=10.0, fwd_ms_mean=3.0, bwd_ms_mean=250.0)
    assert ratios([base, stalled])["b"]["time_x"] == pytest.approx(1.0)
    row = make_row(
        Case("s", "g", "n", "m", batch_size=4),
        [{"status": "ok", "fwd_ms_iters": [[1.0, 1.0, 1.0, 1.0]],
          "bwd_ms_iters": [[9.0, 9.0, 9.0, 991.0]], "threads": 1}],
        ENV,
    )
    assert row["imgs_per_sec"] == pytest.approx(4 * 1000 / 10.0)


def test_untrusted_rows_are_flagged_in_every_report_and_by_bench(capsys):
    from leanstep.bench.report import format_csv, format_markdown, format_seed, render_table
    from leanstep.commands.bench import _warn_flagged

    loaded, steady = _row("loaded"), _row("steady", index=1)
    loaded["timing_cpu_share"] = 0.5
    steady.update(timing_cpu_share=1.0, step_ms_median=10.0, step_ms_iqr=0.5)
    rows = [loaded, steady]
    assert "cpu share 0.50" in format_seed(rows)
    markdown = format_markdown(rows)
    assert "cpu share 0.50" in markdown and markdown.count("cpu share") == 1 + 1  # row + note
    assert "cpu share 0.50" in format_csv(rows)
    from rich.console import Console

    console = Console(width=250, record=True)
    render_table(rows, console)
    assert "cpu share 0.50" in console.export_text()
    wide = {**steady, "name": "wide", "step_ms_iqr": 2.0}
    _warn_flagged([loaded, steady, wide])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "loaded (cpu share 0.50)" in err[0] and "wide (IQR 20% of median)" in err[0]
    assert "steady" not in err[0]


def test_compilation_is_timed_apart_and_graph_breaks_counted():
    import torch
    from torch import nn

    from leanstep.bench.measure import compile_step
    from leanstep.bench.row import flags
    from leanstep.bench.step import TrainStep

    class Breaking(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.a(x.flatten(1)[:, :4])
            torch._dynamo.graph_break()
            return self.b(x)

    torch._dynamo.reset()
    step = TrainStep(Breaking(), batch_size=2, image_size=2, in_channels=1, compile="eager")
    stats = compile_step(step)
    assert stats["compile_seconds"] > 0
    assert stats["compile_graphs"] >= 2 and stats["compile_graph_breaks"] >= 1
    row = {**_row(), "compile": True, **stats}
    assert any("graph break" in flag for flag in flags(row))
