"""`leanstep bench --ddp`: a real 2-process torchrun launch on 127.0.0.1 (gloo); bad launches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from leanstep.bench.ddp import split_batch, torchrun_launch
from leanstep.bench.memory import MIB
from leanstep.cli import main

LAUNCH_TIMEOUT_S = 90
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_split_batch_shares_the_global_batch_first_ranks_taking_the_rest():
    assert split_batch(4, 2) == [2, 2]
    assert split_batch(5, 2) == [3, 2]
    assert split_batch(7, 4) == [2, 2, 2, 1]
    assert split_batch(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="--bs 2 is smaller than the world size 3"):
        split_batch(2, 3)


def test_launch_is_read_from_torchrun_environment():
    environ = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    launch = torchrun_launch(environ)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (
        3, 8, 1, 4
    )
    with pytest.raises(ValueError, match="RANK, MASTER_PORT not set.*torchrun"):
        torchrun_launch({k: v for k, v in environ.items() if k not in ("RANK", "MASTER_PORT")})


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def as_rank(monkeypatch):
    """Pretend to be one rank of a 2-process torchrun launch (checks fail before any rendezvous)."""

    def become(rank: int):
        for name, value in {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank,
                            "LOCAL_WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": _free_port()}.items():
            monkeypatch.setenv(name, str(value))

    return become


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_ddp_without_torchrun_is_one_line_and_exit_2(no_torchrun, capsys, tmp_path):
    code = main(["bench", "resnet18", "--bs", "4", "--ddp", "--out", str(tmp_path / "r.jsonl")])
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1
    assert "torchrun" in lines[0] and "RANK" in lines[0]
    assert not (tmp_path / "r.jsonl").exists()


def test_batch_smaller_than_world_size_is_one_line_from_rank_0_only(as_rank, capsys, tmp_path):
    argv = ["bench", "resnet18", "--size", "32", "--bs", "1", "--ddp",
            "--out", str(tmp_path / "r.jsonl")]
    as_rank(0)
    assert main(argv) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "--bs 1 is smaller than the world size 2" in lines[0]
    as_rank(1)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and _error_lines(capsys) == []


def test_single_process_options_are_refused_with_ddp(as_rank, capsys, tmp_path):
    as_rank(0)
    out = tmp_path / "r.jsonl"
    assert main(["bench", "resnet18", "--bs", "4", "--ddp", "--resume", str(out)]) == 2
    assert "--resume does not combine with --ddp" in capsys.readouterr().err


def test_torchrun_two_ranks_write_one_row(tmp_path):
    from leanstep.models import create_model

    out = tmp_path / "ddp.jsonl"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "leanstep", "bench", "resnet18", "--size", "32", "--bs", "4", "--runs", "1",
        "--iters", "2", "--ddp", "--out", str(out),
    ]
    environ = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=environ,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["ddp"], row["world_size"], row["backend"]) == ("ok", True, 2, "gloo")
    assert row["batch_size"] == 4 and row["rank_batch_sizes"] == [2, 2]
    assert [rank["rank"] for rank in row["ranks"]] == [0, 1]
    params = sum(p.numel() for p in create_model("resnet18").parameters())
    assert row["params"] == params
    for rank in row["ranks"]:
        assert rank["step_ms_median"] > 0 and rank["fwd_ms_mean"] > 0 and rank["bwd_ms_mean"] > 0
        assert rank["peak_mib"] >= params * 4 / MIB
        assert rank["memory"]["parameters"] == pytest.approx(params * 4 / MIB)
    assert row["rank_step_ms"] == [rank["step_ms_median"] for rank in row["ranks"]]
    assert row["rank_peak_mib"] == [rank["peak_mib"] for rank in row["ranks"]]
    assert row["peak_mib"] == max(row["rank_peak_mib"])
    assert row["imgs_per_sec"] == pytest.approx(4 * 1000 / max(row["rank_step_ms"]))
    assert "2 ranks (gloo)" in completed.stdout and str(out) in completed.stdout
