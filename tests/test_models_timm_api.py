"""The zoo speaks timm: keywords, feature extraction, heads and pretrained weights.

Expected feature_info values are timm's, read from its source (timm is not installed here):
ResNet ``act1`` + ``layer1..4``; EfficientNet the last block of each stride ("bottleneck"
location: ``blocks.0/1/2/4/6``); VGG the map before each of the five max pools, then after the
last (timm's VGG has six feature points, stride 1 to 32). With timm importable the same values
are also compared with timm's own models. Small inputs keep the runs cheap on CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
import warnings

import pytest
import torch
from reference_data import load
from torch import nn

from leanstep.models import create_model
from leanstep.models import pretrained as pretrained_module

# name: (channels, reductions) of every feature point, as timm defines them.
TIMM_FEATURES = {
    "resnet50": ([64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    "se_resnext50_32x4d": ([64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    "efficientnet_b0": ([16, 24, 40, 112, 320], [2, 4, 8, 16, 32]),
    "vgg16_bn": ([64, 128, 256, 512, 512, 512], [1, 2, 4, 8, 16, 32]),
}
TIMM_NAMES = {"se_resnext50_32x4d": "seresnext50_32x4d"}
# name: (num_features, what num_classes=0 returns); timm 1.x VGG: 512 features, 4096 pre-logits.
TIMM_WIDTHS = {"resnet50": (2048, 2048), "se_resnext50_32x4d": (2048, 2048),
               "efficientnet_b0": (1280, 1280), "vgg16_bn": (512, 4096)}
# The classifier and first-conv keys of each reference state dict.
HEAD_AND_STEM = {
    "resnet50": (("fc.weight", "fc.bias"), "conv1.weight"),
    "seresnext50_32x4d": (("fc.weight", "fc.bias"), "conv1.weight"),
    "efficientnet_b0": (("classifier.weight", "classifier.bias"), "conv_stem.weight"),
    "vgg16_bn": (("classifier.6.weight", "classifier.6.bias"), "features.0.weight"),
}


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed: compared with the values written into this file only")
    import timm

    return timm


# --- features_only -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TIMM_FEATURES))
def test_feature_info_is_timms(name):
    channels, reductions = TIMM_FEATURES[name]
    model = _meta(name, features_only=True)
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == reductions
    full = _meta(name)  # a classifier model lists the same points
    assert [d["num_chs"] for d in full.feature_info] == channels
    for module_name in model.feature_info.module_name():
        assert model.get_submodule(module_name) is not None


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "vgg16_bn"])
def test_features_only_shapes(name):
    channels, reductions = TIMM_FEATURES[name]
    model = create_model(name, features_only=True).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [
        (1, c, 64 // r, 64 // r) for c, r in zip(channels, reductions, strict=True)
    ]


@pytest.mark.parametrize("name", list(TIMM_FEATURES))
def test_features_and_widths_equal_timm(name):
    timm = _timm()
    ours = create_model(name, features_only=True).eval()
    theirs = timm.create_model(TIMM_NAMES.get(name, name), features_only=True).eval()
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert [f.shape for f in ours(x)] == [f.shape for f in theirs(x)]
    reference = timm.create_model(TIMM_NAMES.get(name, name), num_classes=0)
    model = _meta(name, num_classes=0)
    assert model.num_features == reference.num_features
    assert model.head_hidden_size == getattr(reference, "head_hidden_size",
                                             reference.num_features)


def test_out_indices_select_prune_and_accept_negatives():
    model = create_model("resnet18", features_only=True, out_indices=(1, -3))
    assert model.feature_info.out_indices == (1, 2)
    assert model.feature_info.channels() == [64, 128]
    assert model.feature_info.reduction() == [4, 8]
    assert not hasattr(model, "layer3") and not hasattr(model, "fc")
    features = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in features] == [(2, 64, 8, 8), (2, 128, 4, 4)]
    sum(f.sum() for f in features).backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing left unused

    effnet = _meta("efficientnet_b0", features_only=True, out_indices=(0, 2))
    assert len(effnet.blocks) == 3 and not hasattr(effnet, "conv_head")
    vgg = _meta("vgg11_bn", features_only=True, out_indices=(1,))
    assert vgg.feature_info.module_name() == ["features.5"]  # conv 4, norm 5, pool 7
    assert max(int(k) for k in vgg.features._modules) == 5  # built up to that norm
    assert not hasattr(vgg, "classifier") and not hasattr(vgg, "avgpool")  # no head built


def _share(model: nn.Module, name: str, **kwargs) -> nn.Module:
    """Model ``name`` built with ``kwargs``, given copies of ``model``'s tensors."""
    other = _meta(name, **kwargs)
    other.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    return other


@pytest.mark.parametrize(
    "name, size, kwargs",
    [
        ("resnet18", 48, {"norm": "inplace_abn", "activation": "leaky_relu"}),
        ("efficientnet_b0", 48, {"norm": "abn"}),
        ("vgg11_bn", 32, {"norm": "inplace_abn", "activation": "leaky_relu"}),
        ("vgg11_bn", 32, {"norm": "inplace_abn", "activation": "leaky_relu", "pre_act": True}),
    ],
)
def test_features_only_with_checkpointing_equals_plain_in_float64(name, size, kwargs):
    """Checkpointed (``checkpoint="blocks"``, as on main) with a memory-saving norm: the same
    feature maps, gradients and running statistics as the plain model."""
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "norm"}
    plain = create_model(name, features_only=True, **plain_kwargs).double()
    lean = _share(plain, name, features_only=True, checkpoint="blocks", **kwargs)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    results = []
    for model in (plain, lean):
        features = model.train()(x)
        generator = torch.Generator().manual_seed(1)
        loss = sum((f * torch.randn(f.shape, generator=generator, dtype=f.dtype)).sum()
                   for f in features)
        loss.backward()
        results.append(([f.detach() for f in features],
                        {k: p.grad for k, p in model.state_dict(keep_vars=True).items()
                         if isinstance(p, nn.Parameter)},
                        {k: v for k, v in model.state_dict().items() if "running" in k}))
    (f0, g0, s0), (f1, g1, s1) = results
    assert len(f0) == len(model.feature_info.out_indices) > 1
    torch.testing.assert_close(f1, f0)
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close(s1, s0)


# --- classifier heads ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TIMM_WIDTHS))
def test_num_classes_0_in_chans_1_counts_equal_reference_arithmetic(name):
    reference_name = TIMM_NAMES.get(name, name)
    entry = load("state_dicts.json")[reference_name]
    shapes = entry["state_dict"]
    head, stem = HEAD_AND_STEM[reference_name]
    head_params = sum(torch.Size(shapes[k]).numel() for k in head)
    out_ch, in_ch, kh, kw = shapes[stem]
    expected = entry["params"] - head_params - out_ch * (in_ch - 1) * kh * kw
    model = _meta(name, num_classes=0, in_chans=1)
    assert _count(model) == expected
    assert model.num_features == TIMM_WIDTHS[name][0]


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("efficientnet_b0", 1280),
                                         ("vgg11_bn", 4096)])
def test_num_classes_0_returns_pooled_features(name, width):
    model = create_model(name, num_classes=0, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, width) == (2, model.head_hidden_size)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x),
                                                           pre_logits=True))
    assert isinstance(model.get_classifier(), nn.Identity)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vgg11_bn"])
def test_forward_split_reset_classifier_and_max_pool(name):
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(logits, model.forward_head(features))
        pre = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(logits, model.get_classifier()(pre))
        assert features.shape[:2] == (2, model.num_features)
        model.reset_classifier(5, "max")
        assert model.num_classes == 5 and model(x).shape == (2, 5)
        assert model.get_classifier().out_features == 5
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)


def test_global_pool_empty_returns_the_feature_map_and_max_differs_from_avg():
    model = create_model("resnet18", num_classes=0, global_pool="").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 512, 2, 2)
        avg = create_model("resnet18", num_classes=0).eval()
        avg.load_state_dict(model.state_dict())
        mx = _share(avg, "resnet18", num_classes=0, global_pool="max").eval()
        torch.testing.assert_close(avg(x), model(x).mean((2, 3)))
        torch.testing.assert_close(mx(x), model(x).amax((2, 3)))


def test_drop_rate_is_dropout_before_the_classifier():
    model = create_model("resnet18", num_classes=3, drop_rate=0.5)
    same = _share(model, "resnet18", num_classes=3)
    x = torch.randn(4, 3, 32, 32)
    model.eval(), same.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x))  # eval: no dropout
    assert model.drop_rate == 0.5
    assert create_model("efficientnet_b0", drop_rate=0.1).dropout.p == 0.1
    assert create_model("efficientnet_b0").drop_rate == 0.2  # the variant's, unchanged
    vgg = _meta("vgg11_bn", drop_rate=0.3)
    assert vgg.classifier[2].p == vgg.classifier[5].p == 0.3
    vgg.drop_rate = 0.1  # settable, as timm's attribute
    assert vgg.classifier[2].p == vgg.classifier[5].p == 0.1
    with pytest.raises(ValueError, match=r"drop_rate must be a float in \[0, 1\), got 2"):
        vgg.drop_rate = 2
    assert _meta("resnet18", drop_path_rate=0.1).layer4[1].drop_path.rate == pytest.approx(0.1)


def test_norm_layer_and_act_layer_classes_pick_the_registry_entries():
    from leanstep.layers import InplaceABN

    model = _meta("resnet18", norm_layer=InplaceABN, act_layer=nn.LeakyReLU)
    assert type(model.bn1) is InplaceABN and model.bn1.activation_name == "leaky_relu"
    assert _meta("efficientnet_b0", act_layer="mish_me").activation == "mish_me"


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("resnet50", {"features_only": True, "num_classes": 10},
         r"num_classes=10 is not allowed with features_only=True.*leave num_classes out"),
        ("resnet50", {"features_only": True, "global_pool": "avg"}, r"global_pool='avg'"),
        ("resnet50", {"features_only": True, "drop_rate": 0.1}, r"drop_rate=0.1 is not allowed"),
        ("resnet50", {"features_only": True, "out_indices": (5,)},
         r"out_indices=\(5,\): 5 is out of range for resnet50.*0..4 \(or -5..-1\)"),
        ("vgg16_bn", {"features_only": True, "out_indices": (0, 6)}, r"6 is out of range.*0..5"),
        ("resnet50", {"features_only": True, "out_indices": (1, 1)}, r"repeats"),
        ("resnet50", {"features_only": True, "out_indices": ()}, r"expected a tuple"),
        ("resnet50", {"features_only": "yes"}, r"features_only must be True or False"),
        ("resnet50", {"out_indices": (1,)}, r"out_indices=\(1,\) needs features_only=True"),
        ("resnet50", {"drop_rate": 1.5}, r"drop_rate must be a float in \[0, 1\), got 1.5"),
        ("vgg16_bn", {"drop_rate": 0.1, "dropout": 0.2}, r"name the same dropout"),
        ("resnet50", {"global_pool": "mean"}, r"global_pool='mean' is not allowed.*'avg', 'max'"),
        ("resnet50", {"global_pool": ""}, r"global_pool='' \(no pooling\) needs num_classes=0"),
        ("vgg16_bn", {"global_pool": "", "num_classes": 0}, r"not allowed for VGG.*7x7"),
        ("resnet50", {"in_chans": 1, "in_channels": 3}, r"in_chans=1 and in_channels=3"),
        ("resnet50", {"in_chans": 0}, r"in_chans must be an int >= 1, got 0"),
        ("resnet50", {"num_classes": -1}, r"num_classes must be an int >= 0"),
        ("resnet50", {"activation": "relu", "act_layer": nn.GELU}, r"give one of them"),
        ("resnet50", {"act_layer": functools.partial(nn.LeakyReLU, negative_slope=0.2)},
         r"binds a parameter"),
        ("resnet50", {"norm_layer": nn.LayerNorm}, r"norm_layer=LayerNorm is not allowed"),
        ("resnet50", {"pretrained": "weights.onnx"}, r"unknown file type '.onnx'"),
        ("resnet50", {"pretrained": "/nonexistent/w.pth"}, r"no such file"),
        ("resnet50", {"pretrained": 3}, r"pretrained=3 is not allowed"),
        ("resnet50", {"pretrained": True, "checkpoint_path": "w.pth"}, r"give one of them"),
    ],
)
def test_bad_or_contradictory_keywords_raise_one_line_before_building(
        monkeypatch, name, kwargs, message):
    from leanstep.models import efficientnet, resnet, vgg

    def refuse(*args, **kw):
        raise AssertionError("a model was built before the arguments were validated")

    for cls in (vgg.VGG, resnet.ResNet, efficientnet.EfficientNet):
        monkeypatch.setattr(cls, "__init__", refuse)
    with pytest.raises(ValueError, match=message) as info:
        create_model(name, **kwargs)
    assert "\n" not in str(info.value)


def test_features_only_model_refuses_head_methods():
    model = _meta("resnet18", features_only=True)
    with pytest.raises(RuntimeError, match="features_only model"):
        model.forward_features(torch.empty(1, 3, 32, 32, device="meta"))


# --- pretrained ------------------------------------------------------------------------------


@pytest.fixture
def resnet18_file(tmp_path):
    model = create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_pretrained_path_loads_and_adapts_like_timm(resnet18_file, tmp_path):
    source, path = resnet18_file
    reference = source.state_dict()
    loaded = create_model("resnet18", pretrained=str(path))
    torch.testing.assert_close(loaded.state_dict(), reference)

    other_head = create_model("resnet18", pretrained=path, num_classes=10)
    assert other_head.fc.out_features == 10
    torch.testing.assert_close(other_head.layer4[1].conv2.weight,
                               reference["layer4.1.conv2.weight"])

    gray = create_model("resnet18", pretrained=path, in_chans=1, num_classes=0)
    torch.testing.assert_close(gray.conv1.weight, reference["conv1.weight"].sum(1, keepdim=True))
    five = create_model("resnet18", pretrained=path, in_chans=5, num_classes=0)
    torch.testing.assert_close(five.conv1.weight[:, 3:5], reference["conv1.weight"][:, :2] * 0.6)

    encoder = create_model("resnet18", pretrained=path, features_only=True, out_indices=(0, 1))
    torch.testing.assert_close(encoder.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    vgg = create_model("vgg11_bn")
    torch.save(vgg.state_dict(), tmp_path / "vgg.pth")
    vgg_encoder = create_model("vgg11_bn", pretrained=tmp_path / "vgg.pth", features_only=True,
                               out_indices=(0, 2))
    torch.testing.assert_close(vgg_encoder.features[8].weight, vgg.features[8].weight)

    wrapped = tmp_path / "ddp.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.items()}},
               wrapped)
    torch.testing.assert_close(create_model("resnet18", checkpoint_path=wrapped).state_dict(),
                               reference)
    checkpointed = create_model("resnet18", pretrained=path, checkpoint="blocks")
    torch.testing.assert_close(checkpointed.state_dict(), reference)


def test_pretrained_file_of_another_model_lists_missing_and_unexpected(resnet18_file):
    _, path = resnet18_file
    with pytest.raises(ValueError) as info:
        create_model("resnet34", pretrained=path)
    message = str(info.value)
    assert "does not fit resnet34" in message and "missing keys (" in message
    assert "layer1.2.conv1.weight" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"missing keys.*; wrong shapes \(23\): "
                                         r"layer1.0.conv1.weight \(64, 64, 3, 3\) \(model: "):
        create_model("resnet50", pretrained=path)
    torch.save({"extra.weight": torch.zeros(1), **torch.load(path)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): extra.weight"):
        create_model("resnet18", pretrained=path)


def test_timm_vgg_layout_loads(tmp_path):
    model = create_model("vgg11_bn", num_classes=4)
    state = model.state_dict()
    timm_layout = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    timm_layout["pre_logits.fc1.weight"] = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    timm_layout["pre_logits.fc1.bias"] = state["classifier.0.bias"]
    timm_layout["pre_logits.fc2.weight"] = state["classifier.3.weight"].reshape(4096, 4096, 1, 1)
    timm_layout["pre_logits.fc2.bias"] = state["classifier.3.bias"]
    timm_layout["head.fc.weight"] = state["classifier.6.weight"]
    timm_layout["head.fc.bias"] = state["classifier.6.bias"]
    path = tmp_path / "vgg.pth"
    torch.save(timm_layout, path)
    torch.testing.assert_close(create_model("vgg11_bn", num_classes=4, pretrained=path)
                               .state_dict(), state)


def test_safetensors_file(resnet18_file, tmp_path, monkeypatch):
    source, _ = resnet18_file
    path = tmp_path / "w.safetensors"
    if importlib.util.find_spec("safetensors") is None:
        path.write_bytes(b"")
        with pytest.raises(ValueError, match=r"needs the safetensors package"):
            create_model("resnet18", pretrained=path)
        return
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(path))
    torch.testing.assert_close(create_model("resnet18", pretrained=path).state_dict(),
                               source.state_dict())
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ValueError, match=r"\.safetensors needs the safetensors package: pip"):
        create_model("resnet18", pretrained=path)


def _fake_torchvision(monkeypatch, state, calls):
    weights = types.SimpleNamespace(get_state_dict=lambda progress: calls.append(progress) or state)
    models = types.ModuleType("torchvision.models")
    models.get_model_weights = lambda name: calls.append(name) or types.SimpleNamespace(
        DEFAULT=weights)
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def test_pretrained_true_uses_torchvision_download_and_warns_on_other_activation(monkeypatch):
    state = create_model("resnet18").state_dict()
    calls: list = []
    _fake_torchvision(monkeypatch, state, calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_model("resnet18", pretrained=True)
    assert calls == ["resnet18", True]
    torch.testing.assert_close(model.state_dict(), state)
    with pytest.warns(UserWarning, match=r"trained with activation 'relu'.*'leaky_relu'"):
        create_model("resnet18", pretrained=True, norm="inplace_abn", activation="leaky_relu")


def test_pretrained_true_uses_timm_download(monkeypatch):
    state = create_model("efficientnet_b0").state_dict()
    created = []
    fake = types.ModuleType("timm")
    fake.create_model = lambda name, pretrained: created.append((name, pretrained)) or (
        types.SimpleNamespace(state_dict=lambda: state))
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = create_model("efficientnet_b0", pretrained=True, num_classes=3)
    assert created == [("efficientnet_b0", True)]
    torch.testing.assert_close(model.conv_stem.weight, state["conv_stem.weight"])
    # torchvision families fall back to timm's copy of torchvision's weights.
    monkeypatch.setattr(pretrained_module, "_installed", lambda package: package == "timm")
    assert pretrained_module.reference_source("resnet50") == ("timm", "resnet50.tv_in1k")


@pytest.mark.parametrize("name, package", [("resnet50", "torchvision"),
                                           ("efficientnet_b0", "timm")])
def test_pretrained_true_without_the_package_says_what_to_install(monkeypatch, name, package):
    monkeypatch.setattr(pretrained_module, "_installed", lambda package: False)
    with pytest.raises(ValueError, match=rf"pip install {package}") as info:
        create_model(name, pretrained=True)
    assert "\n" not in str(info.value)
