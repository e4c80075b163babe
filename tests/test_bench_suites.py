"""Shipped suites by name (`leanstep bench seed-cpu`, `leanstep list suites`), `--version`."""

from __future__ import annotations

import argparse
from importlib import resources

import pytest

import leanstep
from leanstep.bench.suite import is_suite, list_suites, load_suite
from leanstep.cli import main
from leanstep.commands.case_args import add_case_arguments, suite_from_args


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_case_arguments(parser)
    return parser.parse_args(list(argv))


def test_shipped_suites_are_listed_and_found_by_name(capsys):
    assert {"seed", "seed-cpu"} <= set(list_suites())
    assert main(["list", "suites"]) == 0
    assert capsys.readouterr().out.strip() == f"suites: {', '.join(list_suites())}"
    assert is_suite("seed-cpu") and not is_suite("resnet50")


def test_a_suite_by_name_is_the_suite_file(tmp_path):
    by_name = load_suite("seed-cpu")
    assert by_name.name == "seed-cpu" and by_name.timeout == 600
    path = tmp_path / "copy.toml"
    path.write_text((resources.files("leanstep") / "suites" / "seed-cpu.toml").read_text())
    assert load_suite(path).cases == by_name.cases
    suite = suite_from_args(_args("seed-cpu", "--group", "VGG16: ABN vs InplaceABN"))
    assert {case.group for case in suite.cases} == {"VGG16: ABN vs InplaceABN"}


def test_an_unknown_suite_name_lists_the_shipped_ones(capsys):
    with pytest.raises(ValueError, match="unknown suite 'seed-gpu.toml'|not found"):
        load_suite("seed-gpu.toml")
    assert main(["bench", "seed-cpu", "--group", "nope", "--no-progress"]) == 2
    assert "unknown group(s) 'nope'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"leanstep {leanstep.__version__}"
