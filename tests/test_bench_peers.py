"""Peer model specs (`timm:`, `torchvision:`, `efficientnet_pytorch:`): their builders run.

Small stand-in packages under the peers' names (files in a temporary folder, on the path of
this process and of the bench workers) record how leanstep calls them, so the code path runs
without the packages; with the real packages installed, a small real model is built and stepped.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import textwrap

import pytest
import torch

from leanstep.bench.specs import build_from_spec
from leanstep.cli import main

PEERS = ("timm", "torchvision", "efficientnet_pytorch")

_TINY = '''
import torch
from torch import nn

CALLS = []


def tiny(num_classes, in_channels, width=4):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )
'''
STAND_INS = {
    "timm/__init__.py": _TINY + '''

def is_model(name):
    return name in ("tiny_net", "efficientnet_b0")


def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kwargs):
    CALLS.append({"name": name, "pretrained": pretrained, "num_classes": num_classes,
                  "in_chans": in_chans, **kwargs})
    if pretrained is not False:
        raise RuntimeError("a benchmark must not download weights")
    return tiny(num_classes, in_chans, **kwargs)
''',
    "torchvision/__init__.py": "from . import models\n",
    "torchvision/models/__init__.py": _TINY + '''

def list_models():
    return ["tiny_net", "resnet18"]


def get_model(name, weights=None, num_classes=1000, **kwargs):
    CALLS.append({"name": name, "weights": weights, "num_classes": num_classes, **kwargs})
    if weights is not None:
        raise RuntimeError("a benchmark must not download weights")
    return tiny(num_classes, 3, **kwargs)
''',
    "efficientnet_pytorch/__init__.py": _TINY + '''

class EfficientNet:
    @classmethod
    def from_name(cls, model_name, in_channels=3, num_classes=1000, **kwargs):
        CALLS.append({"name": model_name, "in_channels": in_channels,
                      "num_classes": num_classes, **kwargs})
        return tiny(num_classes, in_channels, **kwargs)
''',
}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """The stand-in packages, importable here and in bench workers; the real ones (if any) and
    the stand-ins are out of sys.modules afterwards."""
    root = tmp_path / "peers"
    for relative, text in STAND_INS.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    saved = {name: module for name, module in sys.modules.items()
             if name.split(".")[0] in PEERS}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    importlib.invalidate_caches()
    yield root
    for name in [name for name in sys.modules if name.split(".")[0] in PEERS]:
        del sys.modules[name]
    sys.modules.update(saved)
    importlib.invalidate_caches()


def _calls(package: str) -> list:
    module = importlib.import_module(package if package != "torchvision" else "torchvision.models")
    return module.CALLS


def test_timm_builder_asks_for_no_weights_and_passes_classes_channels_and_options(stand_ins):
    model = build_from_spec("timm:tiny_net", num_classes=5, in_channels=2, options={"width": 3})
    assert model(torch.ones(1, 2, 4, 4)).shape == (1, 5)
    assert _calls("timm") == [{"name": "tiny_net", "pretrained": False, "num_classes": 5,
                               "in_chans": 2, "width": 3}]
    with pytest.raises(ValueError, match="unknown timm model 'nope'; see timm.list_models()"):
        build_from_spec("timm:nope", num_classes=5, in_channels=2, options={})


def test_torchvision_builder_asks_for_no_weights_and_refuses_other_channels(stand_ins):
    model = build_from_spec("torchvision:tiny_net", num_classes=7, in_channels=3,
                            options={"width": 2})
    assert model(torch.ones(1, 3, 4, 4)).shape == (1, 7)
    assert _calls("torchvision") == [
        {"name": "tiny_net", "weights": None, "num_classes": 7, "width": 2}
    ]
    with pytest.raises(ValueError, match="torchvision models take in_channels=3 only"):
        build_from_spec("torchvision:tiny_net", num_classes=7, in_channels=1, options={})
    with pytest.raises(ValueError, match="unknown torchvision model 'nope'"):
        build_from_spec("torchvision:nope", num_classes=7, in_channels=3, options={})


def test_efficientnet_pytorch_builder_passes_classes_channels_and_options(stand_ins):
    model = build_from_spec("efficientnet_pytorch:efficientnet-b0", num_classes=3,
                            in_channels=1, options={"width": 2})
    assert model(torch.ones(1, 1, 4, 4)).shape == (1, 3)
    assert _calls("efficientnet_pytorch") == [
        {"name": "efficientnet-b0", "in_channels": 1, "num_classes": 3, "width": 2}
    ]


def test_bench_runs_every_peer_spec_in_its_workers(stand_ins, tmp_path, monkeypatch, capsys):
    suite = tmp_path / "peers.toml"
    suite.write_text(textwrap.dedent("""
        name = "peers"
        [defaults]
        batch_size = 2
        image_size = 8
        runs = 1
        iters = 1
        warmup = 0
        threads = 1
        num_classes = 6
        [[group]]
        name = "peers"
        [[group.case]]
        name = "timm"
        model = "timm:tiny_net"
        options = { width = 3 }
        [[group.case]]
        name = "torchvision"
        model = "torchvision:tiny_net"
        [[group.case]]
        name = "lukemelas"
        model = "efficientnet_pytorch:efficientnet-b0"
        options = { width = 5 }
    """))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "peers.jsonl"
    assert main(["bench", str(suite), "--out", str(out), "--no-progress"]) == 0
    rows = {row["name"]: row for row in map(json.loads, out.read_text().splitlines())}
    for name, width in (("timm", 3), ("torchvision", 4), ("lukemelas", 5)):
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        # conv, BatchNorm, Linear of the stand-in at that width, 6 classes: built as asked
        assert row["params"] == (3 * 9 * width + width) + 2 * width + (width * 6 + 6)
        assert row["fwd_ms_mean"] > 0 and row["peak_mib"] > 0 and row["predicted_mib"] > 0


_REAL = [
    ("timm", "timm:resnet18", {}),
    ("torchvision", "torchvision:resnet18", {}),
    ("efficientnet_pytorch", "efficientnet_pytorch:efficientnet-b0", {}),
]


@pytest.mark.parametrize(("package", "spec", "options"), _REAL, ids=[p for p, *_ in _REAL])
def test_a_real_peer_model_is_built_and_stepped(package, spec, options):
    if not _installed(package):
        pytest.skip(f"{package} is not installed (optional peer)")
    from leanstep.bench.cases import Case, make_step

    case = Case("s", "g", "n", spec, options=options, batch_size=2, image_size=32,
                num_classes=10)
    step = make_step(case)
    step()
    assert step.model(step.input).shape == (2, 10)
    assert all(p.grad is not None for p in step.model.parameters() if p.requires_grad)
