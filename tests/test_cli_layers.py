"""`leanstep layers` on a tiny stack: every variant measured, ratios to the first row, a table."""

import contextlib
import io
import json

import pytest
import torch
from rich.console import Console

from leanstep.bench.layer_bench import VARIANTS, Variant, run_layer_bench
from leanstep.bench.table import print_table
from leanstep.cli import main
from leanstep.commands.layers import table_lines

EXPECTED_LABELS = [
    "BatchNormAct+leaky_relu", "ABN+leaky_relu", "InplaceABN+leaky_relu", "ABN+relu",
    "ABN+swish", "ABN+swish_me", "ABN+swish_naive", "ABN+mish", "ABN+mish_me", "ABN+mish_naive",
    "ABN+hard_swish", "ABN+hard_swish_me", "ABN+hard_swish_naive",
]


@pytest.fixture(scope="module")
def result():
    """One tiny run of the whole command, as JSON."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["layers", "--batch", "2", "--size", "8", "--iters", "3", "--threads", "1",
                     "--json"])
    assert code == 0
    return json.loads(stdout.getvalue())


def test_every_variant_is_measured_in_order(result):
    assert [row["variant"] for row in result["rows"]] == EXPECTED_LABELS
    assert [row["variant"] for row in result["rows"]] == [v.label for v in VARIANTS]
    config = result["config"]
    assert (config["batch_size"], config["image_size"], config["iters"], config["threads"]) == (
        2, 8, 3, 1)


def test_figures_are_positive_and_ratios_are_to_the_first_row(result):
    rows = result["rows"]
    first = rows[0]
    for row in rows:
        assert row["saved_mib"] > 0 and row["peak_mib"] > 0 and row["time_ms_median"] > 0
        assert row["time_ms_iqr"] >= 0
        assert row["peak_mib"] >= row["memory_mib"]["parameters"]
        assert row["saved_ratio"] == pytest.approx(row["saved_mib"] / first["saved_mib"])
        assert row["peak_ratio"] == pytest.approx(row["peak_mib"] / first["peak_mib"])
        assert row["time_ratio"] == pytest.approx(row["time_ms_median"] / first["time_ms_median"])
    assert first["saved_ratio"] == first["time_ratio"] == 1.0


def test_saved_memory_ranks_the_variants_as_expected(result):
    saved = {row["variant"]: row["saved_mib"] for row in result["rows"]}
    plain, abn = saved["BatchNormAct+leaky_relu"], saved["ABN+leaky_relu"]
    assert saved["InplaceABN+leaky_relu"] <= 0.55 * plain
    assert saved["InplaceABN+leaky_relu"] < abn < plain
    for name in ("swish", "mish", "hard_swish"):
        assert saved[f"ABN+{name}_me"] == pytest.approx(saved[f"ABN+{name}"])
        assert saved[f"ABN+{name}_me"] < saved[f"ABN+{name}_naive"]


def test_table_shows_every_variant_and_its_ratios(result):
    console = Console(width=160, record=True)
    title, headers, lines, caption = table_lines(result)
    print_table(headers, lines, title=title, caption=caption, out=console)
    text = console.export_text()
    assert "6 x [conv3x3 64, norm+act], batch 2, 8x8" in text
    for row in result["rows"]:
        line = next(line for line in text.splitlines() if f" {row['variant']} " in line)
        assert f"{row['saved_ratio']:.2f}" in line
        assert f"{row['time_ms_median']:.1f}" in line


@pytest.mark.parametrize(
    ("option", "value"),
    [("--bs", "0"), ("--batch", "0"), ("--size", "-3"), ("--iters", "0"), ("--threads", "0")],
)
def test_bad_option_is_one_line_on_stderr_and_exit_code_2(capsys, option, value):
    assert main(["layers", option, value]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert value in error


def test_one_value_per_channel_is_rejected_before_measuring():
    with pytest.raises(ValueError, match="1 value per channel"):
        run_layer_bench(batch_size=1, image_size=1, iters=1, threads=1)


def test_threads_are_set_for_the_run_and_restored_and_a_subset_of_variants_runs():
    """The run uses the threads asked for (not those already set) and gives the previous
    count back, also when a variant fails to build."""
    before = torch.get_num_threads()
    threads = before + 1
    during = set()
    result = run_layer_bench(batch_size=2, image_size=4, iters=1, threads=threads,
                             variants=[Variant("abn", "relu"), Variant("inplace_abn", "elu")],
                             progress=lambda message: during.add(torch.get_num_threads()))
    assert during == {threads}
    assert result["config"]["threads"] == threads
    assert torch.get_num_threads() == before
    assert [row["variant"] for row in result["rows"]] == ["ABN+relu", "InplaceABN+elu"]
    assert result["rows"][1]["saved_ratio"] < 1

    with pytest.raises(ValueError, match="no_such_norm"):
        run_layer_bench(batch_size=2, image_size=4, iters=1, threads=threads,
                        variants=[Variant("no_such_norm", "relu")])
    assert torch.get_num_threads() == before
