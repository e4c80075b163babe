"""`leanstep plan` on the command line: output, JSON, the plan file, exit codes and errors."""

from __future__ import annotations

import json

import pytest

from leanstep.cli import main
from leanstep.planner import Plan

MODEL = "_plan_models:tiny_resnet"
STEP = ["--bs", "8", "--size", "16"]


def _run(capsys, *argv):
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_output_and_plan_file(capsys, tmp_path):
    out_file = tmp_path / "plan.json"
    code, out, _ = _run(capsys, MODEL, "--memory", "1.1MiB", *STEP, "--out", str(out_file))
    assert code == 0
    assert "chosen:" in out and "every block checkpointed" in out and "every block lean" in out
    assert "estimated step time" in out and "max batch" in out
    plan = Plan.load(out_file)
    assert plan.model == MODEL and plan.batch_size == 8 and plan.input_size == (16, 16)
    assert plan.report["plan"]["predicted_mib"] * 2**20 <= 1.1 * 2**20


def test_json_is_one_object(capsys):
    code, out, _ = _run(capsys, MODEL, "--memory", "2MiB", *STEP, "--json", "--no-max-batch",
                        "--optimizer", "adamw", "--size", "16x24")
    assert code == 0
    data = json.loads(out)
    assert data["status"] == "ok" and data["optimizer"] == "adamw"
    assert data["input_size"] == [16, 24]
    assert set(data["report"]["baselines"]) == {"lean", "checkpoint"}
    Plan.from_dict({k: v for k, v in data.items() if k != "status"})


def test_nothing_fits_exits_1(capsys):
    code, _, err = _run(capsys, MODEL, "--memory", "64KiB", *STEP)
    assert code == 1
    assert "nothing fits" in err and "smallest achievable peak" in err
    code, out, _ = _run(capsys, MODEL, "--memory", "64KiB", *STEP, "--json")
    assert code == 1 and json.loads(out)["status"] == "nothing_fits"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([MODEL, "--memory", "16 GigaBytes", *STEP], "bad memory budget"),
        ([MODEL, "--memory", "0GiB", *STEP], "is not more than 0"),
        ([MODEL, "--memory", "1GiB", "--bs", "0", "--size", "16"], "--bs must be"),
        ([MODEL, "--memory", "1GiB", "--bs", "8,16", "--size", "16"], "--bs must be"),
        ([MODEL, "--memory", "1GiB", "--bs", "8", "--size", "16x"], "bad input size"),
        ([MODEL, "--memory", "1GiB", *STEP, "--precision", "fp8"], "unknown precision"),
        ([MODEL, "--memory", "1GiB", *STEP, "--precision", "amp_fp16"], "--device-like cuda"),
        (["_plan_models:no_blocks", "--memory", "1GiB", *STEP], "--blocks NAME"),
        ([MODEL, "--memory", "1GiB", *STEP, "--blocks", "Nope"], "neither a module name"),
        (["_plan_models:branchy", "--memory", "1GiB", *STEP], "leanstep bench"),
        (["nosuchmodel", "--memory", "1GiB", *STEP], "unknown model"),
        (["resnet18", "--memory", "1GiB", "--bs", "1", "--size", "32"], "one value per channel"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_blocks_option_takes_module_names(capsys):
    code, out, _ = _run(capsys, MODEL, "--memory", "1.1MiB", *STEP, "--no-max-batch",
                        "--blocks", "layer1.0,layer1.1", "--json")
    assert code == 0
    assert json.loads(out)["blocks"] == ["layer1.0", "layer1.1"]


def test_measure_refuses_what_bench_cannot_run_yet(capsys):
    code, _, err = _run(capsys, MODEL, "--memory", "1.1MiB", *STEP, "--no-max-batch",
                        "--measure", "--optimizer", "adam")
    assert code == 2 and "SGD" in err


def _mixed_plan_file(tmp_path, capsys) -> str:
    """A plan for leanstep's resnet18 with every choice in it."""
    path = tmp_path / "mix.json"
    code, _, _ = _run(capsys, "resnet18", "--memory", "1GiB", "--bs", "2", "--size", "32",
                      "--no-max-batch", "--out", str(path))
    assert code == 0
    plan = Plan.load(path)
    plan.choices = ["checkpoint", "lean", "plain", "lean", "checkpoint", "plain", "lean",
                    "checkpoint"]
    plan.save(path)
    return str(path)


def test_plan_file_reaches_predict_and_verify(capsys, tmp_path):
    path = _mixed_plan_file(tmp_path, capsys)
    code = main(["predict", "resnet18", "--plan", f"none,{path}", "--bs", "16", "--size", "64",
                 "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [row["name"] for row in rows] == [
        "resnet18 plan=none", f"resnet18 plan={path}"]
    assert rows[1]["predicted_mib"] < rows[0]["predicted_mib"]
    code = main(["verify", "resnet18", "--plan", f"none,{path}", "--bs", "2", "--size", "32"])
    assert code == 0 and "passed" in capsys.readouterr().out


def test_plan_file_errors(capsys, tmp_path):
    path = _mixed_plan_file(tmp_path, capsys)
    code = main(["predict", "resnet34", "--plan", path, "--bs", "2", "--size", "32"])
    assert code == 2 and "made for 'resnet18'" in capsys.readouterr().err
    code = main(["predict", "resnet18", "--plan", str(tmp_path / "none.json"), "--bs", "2"])
    assert code == 2 and "not found" in capsys.readouterr().err
