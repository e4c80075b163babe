"""`leanstep bench --ddp` keeps the README's promises, in real 2-process torchrun launches (gloo):
inplace_abn_sync synchronises the ranks' statistics under the benchmark, each rank gets its share
of the cores, FLOPs add up over the ranks, and a rank's failure is recorded by rank 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from leanstep.bench.cases import Case, available_cores, make_step
from leanstep.bench.flops import count_step_flops

LAUNCH_TIMEOUT_S = 120
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")

RANKED = '''
import json
import os
from pathlib import Path

import torch
from torch import nn

from leanstep.layers import get_norm_act


class RankShifted(nn.Module):
    """Each rank adds its rank to the input, so unsynchronised batch statistics differ between
    ranks; after every real training forward the norm's running mean is written to a file."""

    def __init__(self, norm, num_classes, in_channels, fail_rank):
        super().__init__()
        self.norm_name, self.fail_rank = norm, fail_rank
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1, bias=False)
        self.norm = get_norm_act(norm)(4, activation="leaky_relu", activation_param=0.01)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x):
        rank = int(os.environ.get("RANK", "0"))
        real = type(x) is torch.Tensor and x.device.type != "meta"
        if real and rank == self.fail_rank:
            raise RuntimeError(f"rank {rank} fails on purpose")
        y = self.norm(self.conv(x + rank))
        if real and self.training:
            path = Path(os.environ["LEANSTEP_TEST_DIR"]) / f"{self.norm_name}-rank{rank}.json"
            path.write_text(json.dumps(self.norm.running_mean.tolist()))
        return self.head(y)


def ranked(norm="inplace_abn", num_classes=4, in_channels=3, fail_rank=-1):
    return RankShifted(norm, num_classes, in_channels, fail_rank)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(workdir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    (workdir / "ranked_i15.py").write_text(RANKED)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "leanstep", "bench", "ranked_i15:ranked", "--size", "8", "--bs", "3",
        "--runs", "1", "--iters", "1", "--warmup", "1", *args, "--ddp", "--out", str(out),
    ]
    environ = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    environ.update(
        LEANSTEP_TEST_DIR=str(workdir),
        PYTHONPATH=os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=environ, cwd=workdir)


def _launch_report(completed: subprocess.CompletedProcess, out: Path) -> str:
    """What a failed launch printed (rank 0's summary lines tell how far it got)."""
    rows = out.read_text().count("\n") if out.exists() else "no"
    return (f"{rows} rows written\nstdout:\n{completed.stdout[-1500:]}\n"
            f"stderr:\n{completed.stderr[:3000]}")


def _rows(out: Path) -> dict[str, dict]:
    return {row["options"]["norm"]: row for row in map(json.loads, out.read_text().splitlines())}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp")
    out = workdir / "ddp.jsonl"
    completed = _launch(workdir, out, "--norm", "inplace_abn,inplace_abn_sync")
    assert completed.returncode == 0, _launch_report(completed, out)
    return workdir, _rows(out)


def test_inplace_abn_sync_shares_the_statistics_of_the_ranks_under_bench(launched):
    workdir, rows = launched
    assert rows["inplace_abn_sync"]["status"] == "ok"

    def running_means(norm):
        return [json.loads((workdir / f"{norm}-rank{rank}.json").read_text()) for rank in (0, 1)]

    plain = running_means("inplace_abn")
    synced = running_means("inplace_abn_sync")
    assert max(abs(a - b) for a, b in zip(*plain, strict=True)) > 1e-3  # the ranks differ
    assert synced[0] == pytest.approx(synced[1], abs=1e-6)


def test_each_rank_gets_its_share_of_the_cores(launched):
    _, rows = launched
    per_rank = max(1, available_cores() // 2)
    for row in rows.values():
        assert row["threads"] == per_rank
        assert [rank["threads"] for rank in row["ranks"]] == [per_rank, per_rank]


def test_flops_are_the_sum_over_the_ranks(launched, monkeypatch, tmp_path):
    _, rows = launched
    monkeypatch.setenv("LEANSTEP_TEST_DIR", str(tmp_path))
    row = rows["inplace_abn"]
    ranks = [rank["flops"] for rank in row["ranks"]]
    assert row["rank_batch_sizes"] == [2, 1] and ranks[0] == 2 * ranks[1] > 0
    assert row["flops"] == sum(ranks)
    whole = Case("s", "g", "n", "ranked_i15:ranked", options={"norm": "inplace_abn"},
                 batch_size=3, image_size=8)
    sys.path.insert(0, str(launched[0]))
    try:
        # (inplace_abn cannot run on the meta device: the count is of one real step)
        assert row["flops"] == count_step_flops(whole, fallback=make_step(whole))
    finally:
        sys.path.remove(str(launched[0]))
        sys.modules.pop("ranked_i15", None)


def test_a_rank_that_fails_is_recorded_by_rank_0(tmp_path):
    out = tmp_path / "failing.jsonl"
    completed = _launch(tmp_path, out, "--norm", "inplace_abn", "--option", "fail_rank=1")
    assert completed.returncode != 0
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["status"] == "error" and row["ddp"] is True and row["world_size"] == 2
    assert row["error"] == "rank 1: RuntimeError: rank 1 fails on purpose"
