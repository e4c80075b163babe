"""--lean, --checkpoint, --convert (+ --activation) on every command and every model spec:
Case fields applied in build_model, checked by validate_case, carried by rows and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from leanstep.bench.cases import Case, build_model, legacy_row
from leanstep.bench.predict import predict_peak
from leanstep.bench.validate import validate_case
from leanstep.cli import main
from leanstep.layers.norm_act import ABN, InplaceABN
from leanstep.transforms.regions import region_state

TESTS = Path(__file__).parent
MODEL = "flag_models:resnet"
pytestmark = pytest.mark.filterwarnings("ignore:Module is None")


@pytest.fixture(autouse=True)
def _tests_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS),
                                                      os.environ.get("PYTHONPATH", "")]))


def _case(**fields) -> Case:
    return Case(suite="t", group="g", name="n", model=fields.pop("model", MODEL),
                batch_size=4, image_size=32, num_classes=10, **fields)


def _json(capsys, *argv) -> tuple[int, list]:
    """Exit code and the JSON lines the command printed."""
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _predicted(case: Case) -> dict:
    return predict_peak(lambda: build_model(case), batch_size=case.batch_size,
                        image_size=case.image_size)


# --- parsing: comma lists are comparison groups of Case fields -------------------------------

def test_axes_make_cases_with_transform_fields():
    import argparse

    from leanstep.commands.case_args import add_case_arguments, suite_from_args

    parser = argparse.ArgumentParser()
    add_case_arguments(parser)
    args = parser.parse_args([MODEL, "--lean", "off,on", "--checkpoint", "none,blocks,2",
                              "--convert", "none,inplace_abn", "--activation", "leaky_relu"])
    cases = suite_from_args(args).cases
    assert len(cases) == 12
    assert {(c.lean, c.checkpoint, c.convert) for c in cases} == {
        (lean, ck, cv) for lean in (False, True) for ck in (None, "blocks", 2)
        for cv in (None, "inplace_abn")}
    for case in cases:  # with --convert, --activation is the converted layers' activation
        if case.convert:
            assert case.convert_activation == "leaky_relu" and "activation" not in case.options
        else:
            assert case.convert_activation is None and case.options == {"activation":
                                                                        "leaky_relu"}
    assert "lean=on" in cases[-1].name and "lean=off" in cases[0].name
    bare = parser.parse_args([MODEL, "--lean"])
    assert suite_from_args(bare).cases[0].lean is True


def test_checkpoint_option_of_suites_and_old_rows_is_the_transform(tmp_path):
    from leanstep.bench.suite import load_suite
    from leanstep.commands.bench import check_resume

    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\n[[group]]\nname = "g"\n[[group.case]]\nname = "a"\n'
                     'model = "resnet18"\ncheckpoint = "blocks"\n')
    case = load_suite(suite).cases[0]
    assert case.checkpoint == "blocks" and "checkpoint" not in case.options
    old = {**case.to_dict(), "options": {"checkpoint": "blocks"}, "checkpoint": None}
    assert legacy_row(old)["checkpoint"] == "blocks"
    check_resume(load_suite(suite).replace(cases=(case.with_defaults(),)),
                 [{**case.with_defaults().to_dict(), "options": {"checkpoint": "blocks"},
                   "checkpoint": None, "status": "ok"}])


# --- validation: one line, before anything runs -----------------------------------------------

@pytest.mark.parametrize("fields, match", [
    ({"lean": "yes"}, "lean must be true or false"),
    ({"checkpoint": 0}, "checkpoint 0 is not allowed"),
    ({"checkpoint": "layers"}, "checkpoint 'layers' is not allowed"),
    ({"convert": "gn"}, "unknown convert 'gn'"),
    ({"convert_activation": "leaky_relu"}, "give convert"),
    ({"convert": "inplace_abn"}, "pass activation='leaky_relu'"),
    ({"convert": "abn", "convert_activation": "nope"}, "unknown activation 'nope'"),
])
def test_bad_transform_fields_are_one_line_errors(fields, match):
    with pytest.raises(ValueError, match=match) as error:
        validate_case(_case(**fields))
    assert "\n" not in str(error.value)


def test_convert_inplace_abn_on_relu_without_activation_exits_2(capsys):
    code = main(["predict", MODEL, "--bs", "2", "--size", "16", "--convert", "inplace_abn"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot invert" in err and "activation='leaky_relu'" in err


def test_zoo_norm_option_on_another_model_points_to_convert(capsys):
    code = main(["predict", MODEL, "--bs", "2", "--size", "16", "--norm", "inplace_abn"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unexpected keyword argument 'norm'" in err
    assert f"--norm is for leanstep's zoo models: for {MODEL} use --convert abn|inplace_abn" in err
    # --activation without --convert (here the first of --convert none,abn).
    code = main(["predict", MODEL, "--bs", "2", "--size", "16", "--convert", "none,abn",
                 "--activation", "leaky_relu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--activation is the activation of the layers --convert converts: give this " \
           "variant --convert abn|inplace_abn too" in err


def test_warnings_of_a_command_are_one_line():
    """Python's default format adds file:line and the source line; the command says one line.
    (A process of its own: pytest records warnings instead of printing them.)"""
    completed = subprocess.run(
        [sys.executable, "-m", "leanstep.cli", "verify", MODEL, "--convert", "abn",
         "--activation", "leaky_relu", "--bs", "2", "--size", "16", "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    err = completed.stderr.strip().splitlines()
    assert err and all(line.startswith("leanstep verify: warning: convert_norm_act: activation "
                                       "replaced by 'leaky_relu'") for line in err), err


# --- the transforms are applied, to any spec --------------------------------------------------

def test_build_model_applies_each_transform():
    plain = build_model(_case())
    assert region_state(plain.layer1[0]) is None
    lean = build_model(_case(lean=True))
    assert region_state(lean.layer1[0]) is not None
    ckpt = build_model(_case(checkpoint="blocks"))
    assert region_state(ckpt.layer1[0]) is not None
    abn = build_model(_case(convert="abn"))
    assert isinstance(abn.layer1[0].bn1, ABN) and isinstance(abn.bn1, ABN)
    with pytest.warns(UserWarning, match="outputs change"):
        inplace = build_model(_case(convert="inplace_abn", convert_activation="leaky_relu"))
    assert isinstance(inplace.layer1[0].bn1, InplaceABN)
    assert inplace.layer1[0].bn1.activation_name == "leaky_relu"
    assert list(inplace.state_dict()) == list(plain.state_dict())


def test_predicted_memory_follows_each_flag():
    plain = _predicted(_case())["memory"]["activations"]
    for fields in ({"lean": True}, {"checkpoint": "blocks"}, {"checkpoint": 2},
                   {"lean": True, "checkpoint": "blocks"}):
        assert _predicted(_case(**fields))["memory"]["activations"] < 0.9 * plain, fields
    converted = _predicted(_case(convert="inplace_abn", convert_activation="leaky_relu"))
    assert converted["memory"]["activations"] < 0.9 * plain


def test_zoo_checkpoint_transform_equals_the_zoo_option():
    from leanstep.models import create_model

    zoo = dataclasses.replace(_case(model="resnet18"), batch_size=8, image_size=96)
    option = predict_peak(lambda: create_model("resnet18", num_classes=10, checkpoint=2),
                          batch_size=8, image_size=96)
    transform = _predicted(dataclasses.replace(zoo, checkpoint=2))
    plain = _predicted(zoo)
    assert transform["predicted_mib"] == option["predicted_mib"]
    assert transform["memory"] == option["memory"]
    assert transform["memory"]["activations"] < 0.9 * plain["memory"]["activations"]
    model = build_model(dataclasses.replace(zoo, checkpoint="blocks"))
    assert list(model.state_dict()) == list(create_model("resnet18").state_dict())


def test_nothing_to_transform_warns_and_is_still_predicted():
    case = _case(model="flag_models:no_norm", convert="abn")
    with pytest.warns(UserWarning, match="nothing to convert"):
        build_model(case)
    validate_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _predicted(case)["predicted_mib"] > 0


# --- commands ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["flag_models:pre_activation"],  # a pair InplaceABN leaves (its input is the shortcut)
    ["resnet18", "--norm", "abn"],  # ABN layers already, which the InplaceABN conversion takes
], ids=["pair left", "abn layers"])
def test_verify_of_an_activation_change_compares_the_same_layers(capsys, argv):
    """The reference converts exactly the layers the variant converts (as ABN)."""
    code = main(["verify", *argv, "--convert", "inplace_abn", "--activation", "leaky_relu",
                 "--bs", "2", "--size", "16", "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0 and result["passed"], result


def test_verify_compares_transformed_with_untouched(capsys):
    code, (result,) = _json(capsys, "verify", MODEL, "--lean", "--checkpoint", "none,2",
                            "--bs", "2", "--size", "16", "--json")
    assert code == 0 and result["passed"]
    assert result["reference"] == f"{MODEL} untouched" and len(result["variants"]) == 2
    # An activation replaced by name: the reference is the untouched model with that
    # activation (as ABN), so InplaceABN's inversion is what is checked, exactly.
    code = main(["verify", MODEL, "--convert", "inplace_abn", "--activation", "leaky_relu",
                 "--bs", "2", "--size", "16", "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0 and result["passed"]
    assert result["reference"] == f"{MODEL} untouched but for activation leaky_relu"
    (variant,) = result["variants"].values()
    assert 0 < variant["gradients"]["rel"] < 1e-8  # InplaceABN's inversion: rounding only
    code, (result,) = _json(capsys, "verify", MODEL, "--convert", "abn", "--bs", "2",
                            "--size", "16", "--json")
    assert code == 0 and result["passed"]


def test_max_batch_follows_lean(capsys):
    code, rows = _json(capsys, "max-batch", MODEL, "--lean", "off,on", "--memory", "24MiB",
                       "--size", "32", "--json")
    assert code == 0 and [row["lean"] for row in rows] == [False, True]
    plain, lean = (row["batch_size"] for row in rows)
    assert lean > plain


def test_bench_rows_carry_columns_and_predict_equals_measured_peak(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    code = main(["bench", MODEL, "--lean", "on", "--checkpoint", "none,blocks", "--bs", "4",
                 "--size", "32", "--runs", "1", "--iters", "1", "--warmup", "1", "--threads",
                 "1", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert [(r["lean"], r["checkpoint"], r["status"]) for r in rows] == [
        (True, None, "ok"), (True, "blocks", "ok")]
    capsys.readouterr()
    code, predicted = _json(capsys, "predict", MODEL, "--lean", "on", "--checkpoint",
                            "none,blocks", "--bs", "4", "--size", "32", "--json")
    assert [p["checkpoint"] for p in predicted] == [None, "blocks"]
    for row, prediction in zip(rows, predicted, strict=True):
        assert prediction["predicted_mib"] == pytest.approx(row["peak_mib"], rel=0.01)


def test_planner_offers_inplace_abn_for_zoo_models_with_activation_change():
    from leanstep.planner.plan import _inplace_abn_activation

    meta_build = Case(suite="t", group="g", name="n", model="resnet50", num_classes=10)
    with torch.device("meta"):
        model = build_model(meta_build)
    blocks = [f"layer1.{i}" for i in range(3)]
    assert _inplace_abn_activation(model, blocks, allow_change=True) == ("leaky_relu", None)
    activation, reason = _inplace_abn_activation(model, blocks, allow_change=False)
    assert activation is None and "not invertible" in reason


def test_zoo_fused_layers_become_inplace_abn_exactly(capsys):
    from leanstep.layers.norm_act import BatchNormAct
    from leanstep.models import create_model
    from leanstep.transforms import convert_norm_act

    model = create_model("resnet18", num_classes=10, activation="leaky_relu")
    before = dict(model.named_parameters())
    summary = convert_norm_act(model, norm="inplace_abn")
    assert isinstance(model.layer1[0].bn1, InplaceABN) and isinstance(model.bn1, InplaceABN)
    assert type(model.layer1[0].bn2) is BatchNormAct  # identity: left
    assert len(summary.converted) == 9 and not summary.changes_outputs
    assert all(p is before[name] for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="cannot invert"):
        convert_norm_act(create_model("resnet18", num_classes=10), norm="inplace_abn")
    code, (result,) = _json(capsys, "verify", "resnet18", "--option", "activation=leaky_relu",
                            "--convert", "inplace_abn", "--bs", "2", "--size", "32", "--json")
    assert code == 0 and result["passed"]


def test_zoo_fused_layers_become_abn_with_the_given_activation():
    from leanstep.models import create_model
    from leanstep.transforms import convert_norm_act

    model = create_model("resnet18", num_classes=10)
    with pytest.warns(UserWarning, match="outputs change"):
        summary = convert_norm_act(model, norm="abn", activation="leaky_relu")
    assert type(model.layer1[0].bn1) is ABN and model.layer1[0].bn1.activation_name == "leaky_relu"
    assert len(summary.converted) == 9 and summary.changes_outputs
