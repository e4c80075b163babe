"""Reports of a results file: seed text, table, markdown, CSV, plot, and `leanstep report`."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from leanstep.bench.cases import Case
from leanstep.bench.report import format_csv, format_markdown, format_seed, ratios, render_table
from leanstep.bench.runner import make_row
from leanstep.cli import main

ENV = {"torch": "x", "leanstep": "y", "git_commit": None, "python": "3", "cpu": "cpu"}


def _ok_result(fwd: float, bwd: float, peak: float, activations: float) -> dict:
    return {
        "status": "ok", "threads": 2, "device_name": "test cpu", "params": 1_234_567,
        "fwd_ms_iters": [[fwd, fwd + 1.0], [fwd + 2.0, fwd]],
        "bwd_ms_iters": [[bwd, bwd], [bwd + 3.0, bwd + 1.0]],
        "peak_mib": peak, "reserved_mib": None, "flops": 10**9, "predicted_mib": peak,
        "memory": {"parameters": 4.7, "activations": activations},
    }


def _rows() -> list[dict]:
    plain = Case("suite", "ABN vs InplaceABN", "Net ABN", "resnet18", {"norm": "abn"}, 8, 64,
                 runs=2, iters=2, reference={"reference_fwd_ms": 5.0, "reference_bwd_ms": 9.0,
                                             "reference_mib": 300.0})
    lean = Case("suite", "ABN vs InplaceABN", "Net InplaceABN", "resnet18",
                {"norm": "inplace_abn"}, 8, 64, runs=2, iters=2, index=1,
                reference={"reference_ms": 15.0, "reference_mib": 200.0})
    broken = Case("suite", "Other", "Broken", "x.y:z", batch_size=8, image_size=64, index=2)
    return [
        make_row(plain, [_ok_result(10.0, 20.0, 400.0, 300.0)], ENV),
        make_row(lean, [_ok_result(11.0, 23.0, 250.0, 150.0)], ENV),
        make_row(broken, [{"status": "error", "error": "RuntimeError: boom"}], ENV),
    ]


def test_ratios_are_against_the_groups_first_case():
    plain, lean, _ = _rows()
    result = ratios([plain, lean])
    step = lambda row: row["step_ms_median"]  # noqa: E731
    assert result["Net ABN"]["time_x"] == pytest.approx(1.0)
    assert result["Net InplaceABN"]["time_x"] == pytest.approx(step(lean) / step(plain))
    memory_x = lean["peak_mib"] / plain["peak_mib"]
    assert result["Net InplaceABN"]["memory_x"] == pytest.approx(memory_x)
    assert result["Net InplaceABN"]["act_x"] == pytest.approx(
        lean["memory"]["activations"] / plain["memory"]["activations"]
    )


def test_seed_format_is_the_seed_texts():
    rows = _rows()
    text = format_seed(rows)
    lines = text.splitlines()
    plain = rows[0]
    title = f"**Net ABN {plain['params'] / 1e6:.2f}M params**  "
    assert title in lines
    mean = lines[lines.index(title) + 1]
    assert mean == (
        f"Mean of 2 runs 2 iters each BS=8: {plain['fwd_ms_mean']:.2f}+-{plain['fwd_ms_std']:.2f}"
        f" msecs Forward. {plain['bwd_ms_mean']:.2f}+-{plain['bwd_ms_std']:.2f} msecs Backward."
        f" Max memory: {plain['peak_mib']:.2f}Mb. {plain['imgs_per_sec']:.2f} imgs/sec  "
    )
    assert "**Broken**" in text and "error: RuntimeError: boom" in text
    assert re.search(r"\n\n\*\*Broken\*\*", text), "groups are separated by a blank line"


def test_table_and_markdown_show_ratios_and_references():
    from rich.console import Console

    rows = _rows()
    console = Console(file=io.StringIO(), width=250)
    render_table(rows, console)
    table = console.file.getvalue()
    markdown = format_markdown(rows)
    for text in (table, markdown):
        assert "ABN vs InplaceABN" in text and "Other" in text
        assert "ref ms" in text and "ref MiB" in text
        assert "14.00" in text and "15.00" in text  # fwd + bwd reference, and the total one
        assert "error: RuntimeError: boom" in text
    lean_memory_x = f"{rows[1]['peak_mib'] / rows[0]['peak_mib']:.2f}"
    assert lean_memory_x in markdown
    assert markdown.count("### ") == 2


def test_a_row_without_a_measured_peak_reports_every_format_and_says_why():
    """A compiled CPU row has no peak (the tracker would run it eagerly): every format shows
    the rest of it, blank where the peak would be, and the note once."""
    from rich.console import Console

    from leanstep.bench.measure import COMPILED_CPU_MEMORY

    plain, lean, _ = _rows()
    compiled = Case("suite", "ABN vs InplaceABN", "Net compiled", "resnet18", {}, 8, 64,
                    runs=2, iters=2, index=2, compile=True)
    result = {**_ok_result(9.0, 18.0, 0.0, 0.0), "peak_mib": None, "memory": None,
              "memory_note": COMPILED_CPU_MEMORY}
    rows = [plain, lean, make_row(compiled, [result], ENV)]
    assert rows[2]["peak_mib"] is None and rows[2]["memory_note"] == COMPILED_CPU_MEMORY
    assert ratios(rows)["Net compiled"]["memory_x"] is None
    assert "Max memory: not measured." in format_seed(rows)
    console = Console(file=io.StringIO(), width=250)
    render_table(rows, console)
    for text in (console.file.getvalue(), format_markdown(rows)):
        assert "Net compiled" in text
        assert text.count(f"peak memory: {COMPILED_CPU_MEMORY}") == 1
    assert "Net compiled" in format_csv(rows)


def test_csv_has_a_line_per_case_with_ratios_and_categories():
    rows = _rows()
    parsed = list(csv.DictReader(io.StringIO(format_csv(rows))))
    assert [line["name"] for line in parsed] == [row["name"] for row in rows]
    assert float(parsed[1]["memory_x"]) == pytest.approx(rows[1]["peak_mib"] / rows[0]["peak_mib"])
    assert float(parsed[0]["memory_activations"]) == rows[0]["memory"]["activations"]
    assert parsed[0]["reference_mib"] == "300.0"
    assert parsed[2]["status"] == "error" and parsed[2]["fwd_ms_mean"] == ""


def test_report_command_writes_every_format(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(row) + "\n" for row in _rows()))
    for fmt, marker in (("seed", "Mean of 2 runs"), ("markdown", "### Other"), ("csv", "time_x")):
        assert main(["report", str(results), "--format", fmt]) == 0
        assert marker in capsys.readouterr().out
    assert main(["report", str(results), "--format", "plot"]) == 0
    assert results.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_rounds_merge_into_one_row_with_every_run():
    case = Case("suite", "g", "n", "resnet18", batch_size=8, runs=4, iters=2)
    first, second = _ok_result(10.0, 20.0, 400.0, 300.0), _ok_result(12.0, 21.0, 999.0, 1.0)
    row = make_row(case, [first, second], ENV, rounds=2)
    assert row["fwd_ms_iters"] == first["fwd_ms_iters"] + second["fwd_ms_iters"]
    assert row["peak_mib"] == first["peak_mib"] and row["rounds"] == 2
    run_means = [sum(run) / len(run) for run in row["fwd_ms_iters"]]
    assert row["fwd_ms_mean"] == pytest.approx(sum(run_means) / len(run_means))
