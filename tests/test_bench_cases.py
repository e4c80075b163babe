"""Cases, suites and the bench command's checks of bad input (exit 2 before any case runs)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
from pathlib import Path

import pytest
import torch

from leanstep.bench import validate as validate_module
from leanstep.bench.cases import Case
from leanstep.bench.measurement import Measurement
from leanstep.bench.runner import schedule, split_runs
from leanstep.bench.suite import load_suite
from leanstep.bench.validate import MissingPackageError, validate_case
from leanstep.bench.worker import run_worker
from leanstep.cli import main
from leanstep.commands.case_args import add_case_arguments, suite_from_args

SUITES = Path(__file__).resolve().parents[1] / "src" / "leanstep" / "suites"


def cases_from_args(args):
    return list(suite_from_args(args).cases)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_case_arguments(parser)
    return parser.parse_args(list(argv))


def _bench_error(capsys, *argv: str) -> str:
    code = main(["bench", *argv, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_comma_lists_expand_into_one_group():
    cases = cases_from_args(
        _args("resnet50", "--norm", "abn,inplace_abn", "--activation", "leaky_relu",
              "--bs", "16", "--size", "128")
    )
    assert [case.options for case in cases] == [
        {"norm": "abn", "activation": "leaky_relu"},
        {"norm": "inplace_abn", "activation": "leaky_relu"},
    ]
    assert len({case.group for case in cases}) == 1
    assert len({case.name for case in cases}) == 2
    assert all(case.batch_size == 16 and case.image_size == 128 for case in cases)
    assert all(case.warmup == 5 and case.threads >= 1 for case in cases)


def test_options_parse_to_python_values():
    (case,) = cases_from_args(
        _args("vgg11_bn", "--checkpoint", "2", "--pre-act", "--option", "dropout=0.25")
    )
    assert case.options == {"pre_act": True, "dropout": 0.25}
    assert case.checkpoint == 2  # a transform of any model now, not a zoo option


@pytest.mark.parametrize("suite", ["seed.toml", "seed-cpu.toml"])
def test_shipped_suites_are_valid(suite):
    cases = load_suite(SUITES / suite).cases
    assert len({case.key for case in cases}) == len(cases)
    for case in cases:
        try:
            validate_case(case.with_defaults(), require_device=False)
        except MissingPackageError as error:
            assert case.model.split(":")[0] in str(error)


SEED_TABLE = Path(__file__).resolve().parent / "data" / "seed_table.md"
_SEED_TITLE = re.compile(r"^\*\*(?P<title>[^*]+)\*\*")
_SEED_FIGURES = re.compile(
    r"^Mean of (?P<runs>\d+) runs (?P<iters>\d+) iters each BS=(?P<bs>\d+): "
    r"(?:(?P<ms>[\d.]+)\+-[\d.]+ msecs gpu\. |(?P<fwd>[\d.]+)\+-[\d.]+ msecs Forward\. "
    r"(?P<bwd>[\d.]+)\+-[\d.]+ msecs Backward\. )Max memory: (?P<mib>[\d.]+)Mb\.?"
    r"(?: (?P<ips>[\d.]+) imgs/sec)?\s*$"
)
_SEED_MODELS = {
    "VGG 16": "vgg16_bn", "Resnet50": "resnet50", "SE Resnext50_32x4": "se_resnext50_32x4d",
    "Resnet34": "resnet34",
}
_SEED_FIGURE_KEYS = {"ms": "reference_ms", "fwd": "reference_fwd_ms", "bwd": "reference_bwd_ms",
                     "mib": "reference_mib", "ips": "reference_imgs_per_sec"}


def _seed_rows() -> list[dict]:
    """Every row of the seed table (tests/data/seed_table.md): its name and every figure."""
    if not SEED_TABLE.is_file():
        pytest.fail(f"seed table {SEED_TABLE} is missing (see tests/data/README.md)",
                    pytrace=False)
    rows, title = [], None
    for line in SEED_TABLE.read_text().splitlines():
        found = _SEED_TITLE.match(line)
        if found:
            title = re.sub(r":?(\s+[\d.]+M params)?:?$", "", found["title"].strip())
            continue
        figures = _SEED_FIGURES.match(line.strip())
        if figures:
            assert title, line
            rows.append({"name": title, **{k: v for k, v in figures.groupdict().items() if v}})
            title = None
    return rows


def _expected_case(name: str) -> dict:
    """What seed.toml's header says a seed label maps to: model, options, precision."""
    options: dict = {}
    words = name.split()
    if name.startswith("EffNet"):
        number = re.search(r"B(\d)", name)[1]
        model = (f"efficientnet_pytorch:efficientnet-b{number}" if "lukemelas" in name
                 else f"timm:efficientnet_b{number}")
    else:
        model = next(spec for label, spec in _SEED_MODELS.items() if name.startswith(label + " "))
    if words[-1] in ("ABN", "InplaceABN"):
        options = {"norm": "abn" if words[-1] == "ABN" else "inplace_abn",
                   "activation": "leaky_relu"}
    if name.endswith(("PostAct", "PreAct")):
        options["pre_act"] = name.endswith("PreAct")
        if "Chpnt" in words:
            options["checkpoint"] = "blocks"
    if "CUDA Swish" in name:
        options["act_layer"] = "swish"
    elif "rwightman RELU" in name:
        options["act_layer"] = "relu"
    if model == "resnet34":
        options["activation"] = {"Leaky ReLU": "leaky_relu", "ReLU": "relu", "Mish": "mish_me",
                                 "Mish Naive": "mish_naive"}[name.removeprefix("Resnet34 ")]
    precision = "amp_fp16" if name.endswith("AMP") else "fp32"
    return {"model": model, "options": options, "precision": precision}


def _case_of_seed_row(seed_row: dict, cases: list) -> Case:
    matching = [c for c in cases
                if c.name == seed_row["name"] and c.batch_size == int(seed_row["bs"])]
    assert len(matching) == 1, (
        f"seed row {seed_row['name']!r} at BS={seed_row['bs']}: {len(matching)} cases in "
        f"seed.toml"
    )
    return matching[0]


def _check_seed_suite(cases: list) -> None:
    """Each seed row is one case with the row's name, batch size, runs, iterations, model,
    options, precision and every published figure."""
    used = set()
    for seed_row in _seed_rows():
        case = _case_of_seed_row(seed_row, cases)
        assert case.key not in used
        used.add(case.key)
        expected = _expected_case(seed_row["name"])
        options = dict(case.options)  # checkpointing is a transform field now, any model
        if case.checkpoint is not None:
            options["checkpoint"] = case.checkpoint
        assert (case.model, options, case.precision) == (
            expected["model"], expected["options"], expected["precision"]
        ), case.name
        assert (case.runs, case.iters) == (int(seed_row["runs"]), int(seed_row["iters"]))
        assert (case.device, case.image_size) == ("cuda", 224)
        assert case.reference == {
            _SEED_FIGURE_KEYS[key]: float(value)
            for key, value in seed_row.items() if key in _SEED_FIGURE_KEYS
        }, case.name
    # the other cases are leanstep's own EfficientNets, referenced to the rwightman rows
    others = [case for case in cases if case.key not in used]
    assert {case.model for case in others} == {f"efficientnet_b{i}" for i in range(4)}


def test_seed_table_is_parsed_whole():
    rows = _seed_rows()
    assert len(rows) == SEED_TABLE.read_text().count("Mean of ") == 26
    assert sum("ms" in row for row in rows) == 12 and sum("ips" in row for row in rows) == 1


def test_seed_suite_carries_every_seed_row():
    _check_seed_suite(list(load_suite(SUITES / "seed.toml").cases))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: _without_group(text, "VGG16 PreAct"), "'VGG 16 Naive PreAct' at BS=128"),
        (lambda text: text.replace("reference_mib = 13423.22", "reference_mib = 13423.2", 1),
         "VGG 16 Chpnt PostAct"),
        (lambda text: text.replace("pre_act = true", "pre_act = false", 1), "VGG 16 Naive PreAct"),
        (lambda text: text.replace("reference_imgs_per_sec = 545.56\n", "", 1), "Resnet50 AMP"),
    ],
)
def test_a_seed_suite_missing_a_row_or_figure_fails_the_check(tmp_path, edit, message):
    text = (SUITES / "seed.toml").read_text()
    path = tmp_path / "seed.toml"
    path.write_text(edit(text))
    assert path.read_text() != text
    with pytest.raises(AssertionError, match=re.escape(message)):
        _check_seed_suite(list(load_suite(path).cases))


def _without_group(text: str, name: str) -> str:
    start = text.index(f'[[group]]\nname = "{name}')
    return text[:start] + text[text.index("[[group]]\n", start + 1):]


def test_unknown_suite_key_names_it_and_the_allowed_keys(tmp_path, capsys):
    suite = tmp_path / "typo.toml"
    suite.write_text(
        '[[group]]\nname = "g"\n[[group.case]]\nname = "c"\nmodel = "resnet18"\nbatchsize = 4\n'
    )
    with pytest.raises(ValueError, match="unknown suite key 'batchsize'.*allowed: .*batch_size"):
        load_suite(suite)
    assert "unknown suite key 'batchsize'" in _bench_error(capsys, str(suite))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["resnet5"], "unknown model 'resnet5'"),
        (["resnet18", "--option", "colour=red"], "unknown option(s) colour"),
        (["resnet18", "--bs", "0"], "batch size must be an int >= 1, got 0"),
        (["resnet18", "--bs", "-3"], "batch size must be an int >= 1, got -3"),
        (["vgg11_bn", "--size", "8"], "image size 8 is too small for vgg11_bn"),
        (["resnet18", "--size", "16", "--bs", "1"], "image size 16 is too small for resnet18"),
        (["resnet18", "--precision", "amp_fp16"], "'amp_fp16' needs CUDA"),
        (["resnet18", "--precision", "fp8"], "unknown precision 'fp8'"),
        (["resnet18", "--norm", "inplace_abn", "--activation", "relu"],
         "InplaceABN needs an invertible activation"),
        (["resnet18", "--device", "tpu"], "unknown device 'tpu'"),
        (["no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["suites/none.toml"], "suite file 'suites/none.toml' not found"),
        (["resnet18", "--bs", "8,8"], "the same case twice: resnet18 bs=8"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert message in _bench_error(capsys, *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(capsys):
    assert "CUDA is not available" in _bench_error(capsys, "resnet18", "--device", "cuda")


def test_missing_peer_package_exits_2_ad_hoc(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        validate_module.require_package.__globals__["importlib"].util, "find_spec",
        lambda name, *a: None if name == "timm" else real_find_spec(name, *a),
    )
    assert _bench_error(capsys, "timm:efficientnet_b0") == (
        "leanstep bench: error: pip install timm to benchmark timm models"
    )


def test_rounds_interleave_a_group_and_share_the_runs():
    a, b = (Case("s", "g", name, "resnet18", runs=5) for name in "ab")
    c = Case("s", "h", "c", "resnet18", runs=1)
    order = [(case.name, round_index, runs) for case, round_index, runs in schedule([a, b, c], 2)]
    assert order == [("a", 0, 3), ("b", 0, 3), ("a", 1, 2), ("b", 1, 2), ("c", 0, 1)]
    assert sum(split_runs(7, 3)) == 7 and max(split_runs(7, 3)) - min(split_runs(7, 3)) <= 1


def test_summary_uses_run_averages_and_every_iteration():
    forward = [[10.0, 12.0], [14.0, 20.0]]
    backward = [[30.0, 30.0], [31.0, 33.0]]
    summary = Measurement(forward, backward).summary(batch_size=8)
    run_means = [statistics.fmean(run) for run in forward]
    assert summary["fwd_ms_mean"] == pytest.approx(statistics.fmean(run_means))
    assert summary["fwd_ms_std"] == pytest.approx(statistics.pstdev(run_means))
    steps = [
        f + b
        for run_f, run_b in zip(forward, backward, strict=True)
        for f, b in zip(run_f, run_b, strict=True)
    ]
    assert summary["step_ms_median"] == pytest.approx(statistics.median(steps))
    assert 0 < summary["step_ms_iqr"] <= max(steps) - min(steps)
    assert summary["imgs_per_sec"] == pytest.approx(8000 / summary["step_ms_median"])


def test_worker_past_its_timeout_is_a_timeout_row():
    request = {"case": Case("s", "g", "n", "resnet18").to_dict(), "runs": 1}
    result = run_worker(request, threads=1, timeout=0.3)
    assert result["status"] == "timeout" and "0.3" in result["error"]


def test_cpu_case_predicted_past_the_free_ram_is_skipped(monkeypatch):
    from leanstep.bench import measure

    monkeypatch.setattr(measure, "available_memory_mib", lambda: 10 * 1024.0)
    case = Case("s", "g", "n", "resnet18")
    reason = measure._ram_skip_reason(case, predicted_mib=8.1 * 1024.0)
    assert reason == "would need 8.1 GiB, 10.0 GiB free"
    assert measure._ram_skip_reason(case, predicted_mib=7.9 * 1024.0) is None
    cuda_case = Case("s", "g", "n", "resnet18", device="cuda")
    assert measure._ram_skip_reason(cuda_case, predicted_mib=9 * 1024.0) is None


@pytest.mark.parametrize(("share", "status"), [(0.79, "ok"), (0.81, "skipped")])
def test_the_80_percent_ram_rule_through_bench_writes_the_skipped_row(
    tmp_path, monkeypatch, capsys, share, status
):
    """A case predicted at 79% of the free RAM runs, at 81% it is skipped, and its row (with
    the prediction and the reason) is in the results file. The workers run in this process
    here, so that the free-RAM reader can be replaced."""
    from leanstep.bench import measure, runner
    from leanstep.bench.predict import predict_case

    case = Case("ram", "g", "tiny", "resnet18", batch_size=2, image_size=32, runs=1, iters=1,
                warmup=0, threads=1)
    predicted = predict_case(case)["predicted_mib"]
    monkeypatch.setattr(measure, "available_memory_mib", lambda: predicted / share)

    def in_process(request, *, threads, timeout=None, on_phase=lambda name: None):
        result = measure.measure_case(
            Case.from_dict(request["case"]), runs=request["runs"], flops=False,
            predict=request["predict"], phase=on_phase,
        )
        torch.set_num_threads(1)
        return result

    monkeypatch.setattr(runner, "run_worker", in_process)
    suite = tmp_path / "ram.toml"
    suite.write_text(
        'name = "ram"\n[[group]]\nname = "g"\n[[group.case]]\nname = "tiny"\n'
        'model = "resnet18"\nbatch_size = 2\nimage_size = 32\nruns = 1\niters = 1\n'
        "warmup = 0\nthreads = 1\n"
    )
    out = tmp_path / "ram.jsonl"
    assert main(["bench", str(suite), "--out", str(out), "--no-progress"]) == 0
    import json

    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["status"] == status and row["predicted_mib"] == pytest.approx(predicted)
    free_gib = predicted / share / 1024
    if status == "skipped":
        assert row["error"] == f"would need {predicted / 1024:.1f} GiB, {free_gib:.1f} GiB free"
        assert row["fwd_ms_mean"] is None and row["peak_mib"] is None
    else:
        assert row["error"] is None and row["fwd_ms_mean"] > 0 and row["peak_mib"] > 0


def test_resume_drops_a_line_cut_short(tmp_path):
    from leanstep.bench.results import ResultsFile, read_rows

    path = tmp_path / "r.jsonl"
    with ResultsFile(path, new=True) as out:
        out.append({"name": "a", "group": "g", "suite": "s"})
    with path.open("a") as stream:
        stream.write('{"name": "b", "gro')
    assert [row["name"] for row in read_rows(path)] == ["a"]
    with ResultsFile(path, new=False) as out:
        out.append({"name": "c", "group": "g", "suite": "s"})
    assert [row["name"] for row in read_rows(path)] == ["a", "c"]


def test_flops_of_a_step_are_three_forwards_with_depthwise_convs():
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from leanstep.bench.flops import count_flops
    from leanstep.bench.step import TrainStep

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    step = TrainStep(model, batch_size=2, image_size=8)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(step.input)
    assert count_flops(step) == 3 * forward.get_total_flops()


def test_rows_record_the_allocator_settings(monkeypatch):
    """On the CPU the allocator's settings change step times by a tenth: rows say which."""
    from leanstep.bench.results import environment

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "100000000000")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    recorded = environment()["allocator_env"]
    assert recorded["MALLOC_TRIM_THRESHOLD_"] == "100000000000"
    assert recorded["LD_PRELOAD"] == "libjemalloc.so.2"
    assert "PATH" not in recorded
