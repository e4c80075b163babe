"""What `leanstep bench` promises for its case options and its failures, checked where it
happens: amp_bf16, channels_last, compile, mode=infer and the memory pass's own batch and image
size through the real step (a probe model records what each phase hands it), and failing cases
(OOM, a killed worker, a timeout, `predicted_mib`) as rows in the results file."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from leanstep.bench import cases as cases_module
from leanstep.bench.cases import Case
from leanstep.bench.measure import measure_case
from leanstep.bench.memory import MIB
from leanstep.bench.step import TrainStep
from leanstep.cli import main

PROBE = '''
import os
import signal
import sys
import time

import torch
from torch import nn

RECORDS = []
PHASE = ["none"]


def _real(x):
    return type(x) is torch.Tensor and x.device.type != "meta"


class Probe(nn.Module):
    """Records, for every real forward, what it was given and what its conv computed in."""

    def __init__(self, num_classes=4, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        y = self.conv(x)
        if _real(x):
            RECORDS.append({
                "phase": PHASE[0], "shape": tuple(x.shape), "conv_dtype": y.dtype,
                "channels_last": x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous(),
                "weight_channels_last": self.conv.weight.is_contiguous(
                    memory_format=torch.channels_last) and not self.conv.weight.is_contiguous(),
                "grad": torch.is_grad_enabled(), "training": self.training,
            })
        return self.head(y)


def probe(num_classes=4, in_channels=3):
    return Probe(num_classes, in_channels)


class _Failing(Probe):
    def __init__(self, how, num_classes, in_channels):
        super().__init__(num_classes, in_channels)
        self.how = how

    def forward(self, x):
        if _real(x):
            if self.how == "oom":
                torch.empty(1 << 62, dtype=torch.uint8)
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "exit":
                print("the model gave up", file=sys.stderr, flush=True)
                os._exit(3)
            if self.how == "sleep":
                time.sleep(600)
        return super().forward(x)


def failing(how, num_classes=4, in_channels=3):
    return _Failing(how, num_classes, in_channels)
'''


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    (tmp_path / "probe_i15.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.chdir(tmp_path)
    import probe_i15

    probe_i15.RECORDS.clear()
    yield probe_i15
    torch.set_num_threads(1)


def _probe_case(model: str = "probe_i15:probe", **fields) -> Case:
    return Case("s", "g", "n", model, **{
        "batch_size": 2, "image_size": 8, "runs": 1, "iters": 1, "warmup": 1, "threads": 1,
        **fields,
    })


def _measure(probe_module, case: Case, **kwargs) -> tuple[dict, list[str]]:
    phases = []

    def phase(name):
        phases.append(name)
        probe_module.PHASE[0] = name

    result = measure_case(case, predict=False, phase=phase, **kwargs)
    assert result["status"] == "ok", result
    return result, phases


def _by_phase(records: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for record in records:
        found.setdefault(record["phase"], []).append(record)
    return found


# --------------------------------------------------------------------------------------------
# case options through the real step and memory pass


def test_amp_bf16_runs_the_convolutions_in_bfloat16_in_every_phase(probe_module):
    _measure(probe_module, _probe_case(precision="amp_bf16"), flops=False)
    phases = _by_phase(probe_module.RECORDS)
    assert set(phases) == {"warmup", "timing", "memory"}
    assert all(r["conv_dtype"] == torch.bfloat16 for r in probe_module.RECORDS)
    probe_module.RECORDS.clear()
    _measure(probe_module, _probe_case(), flops=False)
    assert all(r["conv_dtype"] == torch.float32 for r in probe_module.RECORDS)


def test_channels_last_reaches_the_input_and_the_weights(probe_module):
    result, _ = _measure(probe_module, _probe_case(channels_last=True, image_size=6), flops=False)
    assert probe_module.RECORDS
    assert all(r["channels_last"] and r["weight_channels_last"] for r in probe_module.RECORDS)
    probe_module.RECORDS.clear()
    _measure(probe_module, _probe_case(image_size=6), flops=False)
    assert not any(r["channels_last"] for r in probe_module.RECORDS)


def test_infer_mode_runs_eval_forwards_without_gradients_or_optimizer(probe_module):
    result, _ = _measure(probe_module, _probe_case(mode="infer"), flops=False)
    assert probe_module.RECORDS
    assert not any(r["grad"] or r["training"] for r in probe_module.RECORDS)
    assert all(t > 0 for run in result["fwd_ms_iters"] for t in run)
    memory = result["memory"]
    assert memory.get("gradients", 0) == 0 and memory.get("optimizer_state", 0) == 0
    train, _ = _measure(probe_module, _probe_case(), flops=False)
    assert train["memory"]["gradients"] > 0 and train["memory"]["optimizer_state"] > 0


def test_the_memory_pass_runs_at_its_own_batch_and_image_size(probe_module):
    case = _probe_case(memory_batch_size=6, memory_image_size=12)
    result, _ = _measure(probe_module, case)
    phases = _by_phase(probe_module.RECORDS)
    assert {r["shape"] for r in phases["warmup"] + phases["timing"]} == {(2, 3, 8, 8)}
    assert {r["shape"] for r in phases["memory"]} == {(6, 3, 12, 12)}
    # the input counted at the peak is the memory pass's, and so are the FLOPs' images
    assert result["memory"]["input"] == pytest.approx(6 * 3 * 12 * 12 * 4 / MIB)
    plain, _ = _measure(probe_module, _probe_case())
    assert plain["memory"]["input"] == pytest.approx(2 * 3 * 8 * 8 * 4 / MIB)
    assert result["peak_mib"] > plain["peak_mib"]


def test_compile_compiles_before_the_warm_up_and_counts_graphs(probe_module, monkeypatch):
    import torch._dynamo

    def eager_compiled(model, **kwargs):  # the "eager" backend: dynamo without inductor
        return TrainStep(model, **{**kwargs, "compile": "eager" if kwargs["compile"] else False})

    monkeypatch.setattr(cases_module, "TrainStep", eager_compiled)
    torch._dynamo.reset()
    result, phases = _measure(probe_module, _probe_case(compile=True), flops=False)
    assert phases[:3] == ["build", "compile", "warmup"]
    assert result["compile_seconds"] > 0 and result["compile_graphs"] >= 1
    assert result["compile_graph_breaks"] == 0
    # under the tensor-level tracker the compiled model would run eagerly: on the CPU its peak
    # is not measured (and not reported as the eager step's), and the row says why
    assert result["peak_mib"] is None and result["memory"] is None
    assert "compiled on CPU" in result["memory_note"]
    plain, phases = _measure(probe_module, _probe_case(), flops=False)
    assert "compile" not in phases and plain.get("compile_graphs") is None
    assert plain["peak_mib"] > 0 and plain.get("memory_note") is None


# --------------------------------------------------------------------------------------------
# failures end to end: rows in the results file


def _suite(path: Path, cases: str) -> Path:
    path.write_text(textwrap.dedent("""
        name = "failing"
        [defaults]
        batch_size = 2
        image_size = 8
        runs = 1
        iters = 1
        warmup = 0
        threads = 1
        [[group]]
        name = "g"
    """) + textwrap.dedent(cases))
    return path


def _rows(path: Path) -> dict[str, dict]:
    return {row["name"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (MemoryError(), "oom"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"),
         "oom"),
        (RuntimeError("CUDA error: out of memory"), "oom"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "error"),
        (ValueError("bad value"), "error"),
    ],
)
def test_failure_status_names_out_of_memory(error, status):
    from leanstep.bench.worker import failure_status

    assert failure_status(error) == status


def test_failing_workers_become_rows_with_their_reason(probe_module, tmp_path, capsys):
    from leanstep.bench.predict import predict_case

    suite = _suite(tmp_path / "failing.toml", """
        [[group.case]]
        name = "oom"
        model = "probe_i15:failing"
        options = { how = "oom" }
        [[group.case]]
        name = "killed"
        model = "probe_i15:failing"
        options = { how = "kill" }
        [[group.case]]
        name = "exited"
        model = "probe_i15:failing"
        options = { how = "exit" }
        [[group.case]]
        name = "fine"
        model = "probe_i15:probe"
    """)
    out = tmp_path / "failing.jsonl"
    assert main(["bench", str(suite), "--out", str(out), "--no-progress"]) == 1
    rows = _rows(out)
    assert list(rows) == ["oom", "killed", "exited", "fine"]
    assert rows["oom"]["status"] == "oom" and "can't allocate memory" in rows["oom"]["error"]
    assert rows["killed"]["status"] == "error"
    assert rows["killed"]["error"].startswith("worker killed by SIGKILL (out of memory?")
    assert rows["exited"]["status"] == "error"
    assert rows["exited"]["error"] == (
        "worker exited with code 3 without a result: the model gave up"
    )
    for name in ("oom", "killed", "exited"):
        assert rows[name]["fwd_ms_mean"] is None and rows[name]["peak_mib"] is None
    assert rows["fine"]["status"] == "ok"
    # every row that got as far as the prediction carries it, the failed ones too
    predicted = predict_case(_probe_case(warmup=0))["predicted_mib"]
    assert rows["fine"]["predicted_mib"] == pytest.approx(predicted)
    assert rows["oom"]["predicted_mib"] == pytest.approx(predicted)
    assert rows["fine"]["predicted_mib"] > 0 and rows["fine"]["predict_error"] is None


def test_a_timeout_given_on_the_command_line_is_a_timeout_row(probe_module, tmp_path, capsys):
    suite = _suite(tmp_path / "slow.toml", """
        [[group.case]]
        name = "slow"
        model = "probe_i15:failing"
        options = { how = "sleep" }
    """)
    out = tmp_path / "slow.jsonl"
    assert main(["bench", str(suite), "--timeout", "2.5", "--out", str(out),
                 "--no-progress"]) == 1
    (row,) = _rows(out).values()
    assert (row["status"], row["error"]) == ("timeout", "timed out after 2.5 s")
    assert "timed out after 2.5 s" in capsys.readouterr().out
