"""`leanstep list`: the names of every activation and norm, through the command line."""

import pytest

from leanstep.cli import main
from leanstep.layers import list_activations, list_norms


def _listed(output, kind):
    lines = [line for line in output.splitlines() if line.startswith(f"{kind}:")]
    assert len(lines) == 1, output
    return [name.strip() for name in lines[0].split(":", 1)[1].split(",")]


def test_list_prints_every_activation_and_norm(capsys):
    assert main(["list"]) == 0
    output = capsys.readouterr().out
    assert _listed(output, "activations") == list_activations()
    assert _listed(output, "norms") == list_norms()
    for name in ("leaky_relu", "swish_me", "mish_naive", "hard_swish", "inplace_abn", "abn", "bn"):
        assert name in output


def test_list_one_kind(capsys):
    assert main(["list", "norms"]) == 0
    output = capsys.readouterr().out
    assert _listed(output, "norms") == list_norms()
    assert "activations:" not in output


def test_list_unknown_kind_exits_with_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "colours"])
    assert exit_info.value.code == 2
    assert "colours" in capsys.readouterr().err
