"""lean and checkpoint_blocks on models written as the world writes them: float64-exact
(loss, every gradient, running statistics), names unchanged, idempotent, switchable, leaner."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transform_models import MODELS, TorchvisionResNet

import leanstep
from leanstep.bench.memory import measured_peak
from leanstep.bench.verify import verify_models
from leanstep.transforms import last_summary
from leanstep.transforms.regions import region_state

BATCH, SIZE = 4, 16
TRANSFORMS = {
    "lean": lambda m: leanstep.lean(m),
    "checkpoint": lambda m: leanstep.checkpoint_blocks(m),
    "checkpoint_every_2": lambda m: leanstep.checkpoint_blocks(m, every=2),
    "lean+checkpoint": lambda m: leanstep.checkpoint_blocks(leanstep.lean(m), every=2,
                                                            blocks=None),
}


def _step(model, x, seed=0):
    torch.manual_seed(seed)  # dropout draws the same mask in both
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_float64_training_step_is_exact(name, transform):
    plain = MODELS[name]().double()
    model = copy.deepcopy(plain)
    TRANSFORMS[transform](model)
    result = verify_models([("plain", plain), (transform, model)], batch_size=BATCH,
                           image_size=SIZE, tolerance=1e-10)
    assert result["passed"], result
    # two steps: running statistics updated exactly once per step, by identical values
    x = torch.randn(BATCH, 3, SIZE, SIZE, dtype=torch.float64)
    for seed in range(2):
        assert torch.equal(_step(plain, x, seed), _step(model, x, seed))
    for (key, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(),
                                strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=0), key
    for (key, a), (_, b) in zip(plain.named_parameters(), model.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_names_paths_and_state_dict_keys_unchanged(name):
    plain = MODELS[name]()
    model = leanstep.checkpoint_blocks(leanstep.lean(copy.deepcopy(plain)), every=2)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    model.load_state_dict(plain.state_dict())


def test_attribute_paths_and_types_survive():
    model = leanstep.lean(TorchvisionResNet())
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    assert region_state(model.layer1[0]).mode == "lean"


def _peak(model, x) -> dict:
    if not hasattr(model, "_warm"):
        model(x).mean().backward()  # gradients allocated, as after the benchmark's warm-up
        model._warm = True
    return measured_peak(lambda: model(x).mean().backward(), model, x)


@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize("name", ["torchvision_resnet", "timm", "mobilenet"])
def test_lean_lowers_the_measured_peak_deterministically(name):
    """MemTracker's peak of a training step: lean below plain, checkpoint below lean (it
    keeps block inputs only); the figures repeat exactly."""
    x = torch.randn(8, 3, 32, 32, requires_grad=True)
    plain = MODELS[name]()
    lean = leanstep.lean(copy.deepcopy(plain))
    figures = {label: _peak(m, x)["memory"]["activations"] for label, m in
               (("plain", plain), ("lean", lean))}
    assert figures["lean"] < 0.8 * figures["plain"], figures
    assert _peak(lean, x)["memory"]["activations"] == figures["lean"]


def test_idempotent_and_switchable():
    plain = TorchvisionResNet()
    model = leanstep.lean(leanstep.lean(copy.deepcopy(plain)))
    assert region_state(model.layer1[0]).mode == "lean"
    leanstep.checkpoint_blocks(model)
    assert region_state(model.layer1[0]).mode == "checkpoint"  # checkpoint supersedes lean
    leanstep.checkpoint_blocks(model, enable=False)
    assert region_state(model.layer1[0]) is None and "forward" not in model.layer1[0].__dict__
    leanstep.lean(model)
    leanstep.lean(model, enable=False)
    assert all(region_state(m) is None and "forward" not in m.__dict__ for m in model.modules())


def test_eval_and_no_grad_run_the_plain_forward(monkeypatch):
    model = leanstep.lean(TorchvisionResNet())
    import leanstep.transforms.regions as regions

    calls = []
    monkeypatch.setattr(regions, "checkpoint", lambda *a, **k: calls.append(1))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert calls == []


def test_lean_of_one_block_and_of_a_blockless_module():
    plain = TorchvisionResNet().double()
    model = copy.deepcopy(plain)
    leanstep.lean(model.layer2[0])
    assert region_state(model.layer2[0]).mode == "lean"
    assert all(region_state(m) is None for n, m in model.named_modules() if n != "layer2.0")
    assert verify_models([("plain", plain), ("one block", model)], batch_size=2,
                         image_size=SIZE, tolerance=1e-10)["passed"]
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    leanstep.lean(conv)
    assert "whole module is one region" in str(last_summary("lean"))


def test_summary_names_blocks_and_what_is_left():
    leanstep.lean(TorchvisionResNet())
    text = str(last_summary("lean"))
    assert "5 block(s)" in text and "layer1.0" in text
    assert "conv1+bn1+relu+maxpool" in text  # the stem chain of the model's own forward
    assert "left plain (1): fc (outside the blocks)" in text


def test_nothing_to_transform_warns_and_returns_unchanged():
    model = nn.Sequential(nn.ReLU(), nn.Identity())
    with pytest.warns(UserWarning, match="lean: nothing to transform in Sequential"):
        assert leanstep.lean(model) is model
    assert all(region_state(m) is None for m in model.modules())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # the recompute takes the other branch
        return self.conv(x.relu()) if self.calls % 2 else self.conv(x).relu()


def test_data_dependent_block_fails_loudly_naming_it():
    model = nn.Sequential(nn.Sequential(DataDependent(), DataDependent()))
    leanstep.lean(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"block '0\.[01]' ran differently in its recompute "
                                           r"than in its forward pass \(a kept layer, batch "
                                           r"norm or the block's output got other values\)"):
        model(x).sum().backward()


def test_compiled_transformed_model_is_one_graph_and_exact():
    """Under torch.compile the regions are torch's checkpoint higher-order op (lean: with its
    selective policy that keeps conv/matmul outputs): one graph, no breaks, and in float64 the
    loss, gradients and running statistics of the eager plain model, updated once a step."""
    plain = TorchvisionResNet().double()
    model = TRANSFORMS["lean+checkpoint"](copy.deepcopy(plain))  # both kinds, nested
    x = torch.randn(BATCH, 3, SIZE, SIZE, dtype=torch.float64)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), (
        explanation.break_reasons)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for seed in range(2):
        torch.testing.assert_close(_step(compiled, x, seed), _step(plain, x, seed),
                                   rtol=1e-10, atol=0)
    torch._dynamo.reset()
    for (key, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=key)
    for (key, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=key)


def test_bad_arguments():
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        leanstep.checkpoint_blocks(TorchvisionResNet(), every=0)
    with pytest.raises(TypeError, match="needs an nn.Module"):
        leanstep.lean("resnet50")
    with pytest.raises(ValueError, match="neither a module name nor a class name"):
        leanstep.checkpoint_blocks(TorchvisionResNet(), blocks=["Nope"])


def test_inplace_abn_zoo_model_lean_is_exact():
    """InplaceABN writes over conv outputs: lean recomputes those convs instead of keeping
    stale values, and the step stays exact."""
    from leanstep.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = create_model("resnet18", norm="inplace_abn", activation="leaky_relu",
                             num_classes=4).double()
    model = leanstep.lean(copy.deepcopy(plain))
    assert verify_models([("plain", plain), ("lean", model)], batch_size=2, image_size=32,
                         tolerance=1e-10)["passed"]


def test_mixed_choices_per_block_are_exact():
    """A plan may lean some blocks and checkpoint others (issue 10): both orders, exact."""
    from transform_models import vgg

    plain = vgg().double()
    for order in ("lean first", "checkpoint first"):
        model = copy.deepcopy(plain)
        if order == "lean first":
            leanstep.lean(model, blocks=["[0:3]", "[7:13]"])
            leanstep.checkpoint_blocks(model, blocks=["[3:7]"])
        else:
            leanstep.checkpoint_blocks(model, blocks=["[3:7]"])
            leanstep.lean(model, blocks=["[0:3]", "[7:13]"])
        modes = sorted(mode for _, mode, _ in region_state(model).segments.values())
        assert modes == ["checkpoint", "lean", "lean"], order
        assert verify_models([("plain", plain), (order, model)], batch_size=4, image_size=16,
                             tolerance=1e-10)["passed"]
    resnet = TorchvisionResNet().double()
    model = copy.deepcopy(resnet)
    leanstep.lean(model, blocks=["layer1.0", "layer2.1"])
    leanstep.checkpoint_blocks(model, blocks=["layer1.1", "layer2.0"])
    assert verify_models([("plain", resnet), ("mixed", model)], batch_size=4, image_size=16,
                         tolerance=1e-10)["passed"]


@pytest.mark.parametrize("package, build", [
    ("torchvision", lambda: __import__("torchvision").models.resnet18(num_classes=4)),
    ("timm", lambda: __import__("timm").create_model("efficientnet_b0", num_classes=4)),
])
def test_real_timm_and_torchvision_models(package, build):
    pytest.importorskip(package, reason=f"{package} is not installed (optional)")
    plain = build().double()
    for transform in ("lean", "checkpoint"):
        model = copy.deepcopy(plain)
        TRANSFORMS[transform](model)
        assert verify_models([("plain", plain), (transform, model)], batch_size=2,
                             image_size=32, tolerance=1e-10)["passed"]
