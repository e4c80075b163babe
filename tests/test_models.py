"""The model zoo: reference state dicts, shapes, every norm x checkpoint, float64 equivalences.

Key, shape and parameter-count checks build models on the meta device: no memory, no
initialisation. The forward + backward runs of 19 models x 3 norms x 2 checkpoint forms (which
also check output shapes, in_channels and num_classes) use 32x32 inputs, where every model's
last stage is 1x1 (five stride-2 stages), to stay affordable on CPU. The float64 equivalence
tests use 48x48 (32x32 for VGG), which leaves 2x2 maps in the last stage: with 1x1 maps and a
batch of 2, BN's input gradient vanishes and would hide errors there.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_data import REFERENCE_NAMES, load
from torch import nn

from leanstep.bench.memory import saved_tensor_bytes
from leanstep.layers import get_norm_act
from leanstep.layers.activations import canonical_activation
from leanstep.models import create_model, efficientnet, list_models, resnet, vgg
from leanstep.models.stochastic_depth import DropPath

# Parameter counts published by torchvision / timm for the models the reference file lacks.
PUBLISHED_PARAMS = {
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg19_bn": 143_678_248,
    "resnet18": 11_689_512,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}
NORMS = [("bn", None), ("abn", None), ("inplace_abn", "leaky_relu")]


def _reference() -> dict:
    """tests/data/state_dicts.json under our model names; the test fails if it is missing."""
    return {REFERENCE_NAMES.get(name, name): entry
            for name, entry in load("state_dicts.json").items()}


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def _materialised(model: nn.Module) -> nn.Module:
    """A meta-device model made real with PyTorch's default initialisation of each layer:
    cheaper than the models' own initialisation, and as good for comparing variants."""
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def _sharing_weights_of(model: nn.Module, name: str, **kwargs) -> nn.Module:
    """Model ``name`` built with ``kwargs`` on the meta device, then given ``model``'s very
    tensors (no initialisation, no copy); gradients stay its own."""
    other = _meta_model(name, **kwargs)
    other.load_state_dict(model.state_dict(), assign=True)
    return other


def _parameters_by_key(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters under their state-dict keys (which checkpoint wrappers do not change)."""
    return {
        key: value for key, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, nn.Parameter)
    }


# --- the registry --------------------------------------------------------------------------


def test_list_models_has_every_family_member():
    expected = {
        "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "resnet18", "resnet34", "resnet50",
        "resnet101", "resnet152", "resnext50_32x4d", "se_resnext50_32x4d",
        *(f"efficientnet_b{i}" for i in range(8)),
    }
    assert set(list_models()) == expected


# --- reference facts ------------------------------------------------------------------------


REFERENCE_VARIANTS = [
    {},
    {"norm": "abn", "checkpoint": "blocks"},
    {"norm": "inplace_abn", "activation": "leaky_relu", "checkpoint": 2},
]


@pytest.mark.parametrize(
    "name", ["resnet34", "resnet50", "se_resnext50_32x4d", "vgg16_bn",
             *(f"efficientnet_b{i}" for i in range(4))],
)
def test_state_dict_matches_reference(name):
    """Keys, shapes and parameter count of every norm, checkpointed or not."""
    reference = _reference()[name]
    variants = list(REFERENCE_VARIANTS)
    if name.startswith("vgg"):
        variants += [{"pre_act": True, **kwargs} for kwargs in REFERENCE_VARIANTS]
    for kwargs in variants:
        model = _meta_model(name, **kwargs)
        assert _shapes(model) == reference["state_dict"], kwargs
        assert sum(p.numel() for p in model.parameters()) == reference["params"], kwargs


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    model = _meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_checkpointed_blocks_keep_their_names():
    """checkpoint="blocks" recomputes every block without wrapping it: same names and paths."""
    from leanstep.transforms.regions import region_state

    for name in ("resnet50", "efficientnet_b0"):
        plain, model = _meta_model(name), _meta_model(name, checkpoint="blocks")
        assert [n for n, _ in model.named_parameters()] == [
            n for n, _ in plain.named_parameters()]
        blocks = list(model.layer3) if name == "resnet50" else [
            b for stage in model.blocks for b in stage]
        assert all(region_state(b).mode == "checkpoint" for b in blocks)
    model = _meta_model("resnet50", checkpoint="blocks")
    assert type(model.layer1[0].bn1).__name__ == "BatchNormAct"


def test_reference_shaped_state_dicts_load_strict():
    """Every reference entry loads strictly (keys and shapes, on meta); two load real values,
    through checkpoint wrappers, and land on the right parameters."""
    reference = _reference()
    for name, entry in reference.items():
        model = _meta_model(name, norm="inplace_abn", activation="leaky_relu", checkpoint="blocks")
        state = {key: torch.empty(shape, device="meta")
                 for key, shape in entry["state_dict"].items()}
        model.load_state_dict(state, strict=True, assign=True)

    for name in ("resnet34", "efficientnet_b0"):
        state = {
            key: (torch.tensor(7) if not shape else torch.randn(shape))
            for key, shape in reference[name]["state_dict"].items()
        }
        model = _meta_model(name, checkpoint="blocks").to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_state_dict_with_a_wrong_shape_does_not_load():
    model = _meta_model("resnet34")
    state = {key: torch.empty(shape, device="meta")
             for key, shape in _reference()["resnet34"]["state_dict"].items()}
    state["layer1.0.conv1.weight"] = torch.empty(64, 64, 1, 1, device="meta")
    with pytest.raises(RuntimeError, match="layer1.0.conv1.weight"):
        model.load_state_dict(state, strict=True, assign=True)


# --- every model x norm x checkpoint: forward + backward ------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_norm_and_checkpoint(name):
    """Output (2, num_classes) from a 2-channel input; a finite gradient for every parameter.
    Weights are initialised once per model and shared by its six variants."""
    base = _materialised(_meta_model(name, in_channels=2, num_classes=5))
    x = torch.randn(2, 2, 32, 32)
    for norm, activation in NORMS:
        for checkpoint in (None, "blocks"):
            model = _sharing_weights_of(base, name, norm=norm, activation=activation,
                                        checkpoint=checkpoint, in_channels=2, num_classes=5)
            out = model(x)
            assert out.shape == (2, 5)
            out.square().mean().backward()
            for key, parameter in _parameters_by_key(model).items():
                assert parameter.grad is not None, (norm, checkpoint, key)
                # a sum is finite only if every element is (inf and nan propagate)
                assert torch.isfinite(parameter.grad.sum()), (norm, checkpoint, key)


# --- float64 equivalences -------------------------------------------------------------------


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BN parameters and statistics (gamma of either sign, |gamma| in [0.5, 1.5]),
    so that InplaceABN's inversion and the running-statistics update are really exercised."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                sign = torch.randint(0, 2, module.weight.shape).to(module.weight) * 2 - 1
                module.weight.copy_(sign * torch.empty_like(module.weight).uniform_(0.5, 1.5))
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)


def _training_step(model: nn.Module, x: torch.Tensor, seed: int = 1) -> dict:
    """One training step; besides its results, what shows how it ran: the calls of every norm
    (a checkpointed block runs again in backward) and the bytes autograd saved for backward."""
    model.train()
    torch.manual_seed(seed)  # dropout and drop path draw the same masks in every variant
    x = x.clone().requires_grad_(True)
    calls = dict.fromkeys(_norm_names(model), 0)
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(
        name, calls[name] + 1)) for name, module in _norm_names(model).items()]
    own = {_storage(t) for t in (*model.parameters(), *model.buffers())}
    saved = {}

    def pack(tensor):
        if _storage(tensor) not in own:
            saved[_storage(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).square().mean()
    loss.backward()
    for hook in hooks:
        hook.remove()
    state = model.state_dict()
    return {
        "loss": loss.detach(),
        "input_grad": x.grad,
        "grads": {key: p.grad for key, p in _parameters_by_key(model).items()},
        "buffers": {key: v for key, v in state.items() if key not in _parameters_by_key(model)},
        "norm_calls": calls,
        "saved_bytes": sum(saved.values()),
    }


def _storage(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()


def _norm_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm layer by a name without checkpoint wrappers' levels (``layer1.0.bn1``)."""
    return {name.replace("module.", ""): module for name, module in model.named_modules()
            if isinstance(module, nn.BatchNorm2d)}


# Where each family's checkpointed blocks (or VGG units) live: the stem and head never are.
CHECKPOINTED_PARTS = {"resnet": "layer", "se_resnext": "layer", "efficientnet": "blocks.",
                      "vgg": "features."}


def _assert_variant_is_what_it_claims(name: str, kwargs: dict, model: nn.Module,
                                      step: dict) -> None:
    """The variant really has the norm and activation it was asked for, and a checkpoint
    variant really recomputes its blocks in backward (every norm in them runs twice per step,
    the others once) and keeps fewer bytes for backward than the baseline (``step`` of the
    baseline given as ``step["baseline_saved_bytes"]``)."""
    label = f"{name} {kwargs}"
    norms = _norm_names(model)
    norm_class = get_norm_act(kwargs.get("norm", "bn"))
    wrong = {key: type(m).__name__ for key, m in norms.items() if type(m) is not norm_class}
    assert not wrong, (f"{label}: {len(wrong)} norms are not {norm_class.__name__}, e.g. "
                       f"{dict(list(wrong.items())[:3])}")
    if "activation" in kwargs:
        activation = canonical_activation(kwargs["activation"])
        activated = [m for m in norms.values() if m.activation_name != "identity"]
        assert activated and all(m.activation_name == activation for m in activated), label
        if activation == "swish_me":  # the memory-efficient Function, not the native op
            assert all(getattr(m.act, "name", None) == "swish_me" for m in activated), label
    part = next(value for key, value in CHECKPOINTED_PARTS.items() if name.startswith(key))
    checkpointed = kwargs.get("checkpoint") is not None
    expected = {key: 2 if checkpointed and key.startswith(part) else 1 for key in norms}
    assert step["norm_calls"] == expected, f"{label}: norm calls per step"
    if checkpointed:
        assert step["saved_bytes"] < step["baseline_saved_bytes"], label


def _assert_same_step(expected: dict, got: dict, label: str) -> None:
    def close(a, b, what):
        scale = max(1.0, a.abs().max().item()) if a.numel() else 1.0
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8 * scale), (
            f"{label}: {what} differs by {(a - b).abs().max().item():.3g}"
        )

    close(expected["loss"], got["loss"], "loss")
    close(expected["input_grad"], got["input_grad"], "input gradient")
    assert expected["grads"].keys() == got["grads"].keys()
    for key, grad in expected["grads"].items():
        assert got["grads"][key] is not None, f"{label}: no gradient for {key}"
        close(grad, got["grads"][key], f"gradient of {key}")
    for key, buffer in expected["buffers"].items():
        if buffer.is_floating_point():
            close(buffer, got["buffers"][key], f"buffer {key}")
        else:
            assert torch.equal(buffer, got["buffers"][key]), f"{label}: {key}"


def _check_equivalent(name, size, baseline, variants, *, adapt=lambda model: None) -> None:
    """One float64 training step of ``name`` built as ``baseline`` and as each variant, from the
    same weights: loss, input and parameter gradients, running statistics and the eval-mode
    output after the step must agree. ``adapt`` edits every model alike before weights are
    copied. Variants are built one at a time to bound memory."""
    reference = _meta_model(name, num_classes=10, **baseline)
    adapt(reference)
    reference = _materialised(reference).to(torch.float64)
    _randomise_norms(reference)
    initial = {key: value.clone() for key, value in reference.state_dict().items()}
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    expected = _training_step(reference, x)
    _assert_variant_is_what_it_claims(name, baseline, reference, expected)
    with torch.no_grad():
        expected_eval = reference.eval()(x)
    del reference
    for kwargs in variants:
        model = _meta_model(name, num_classes=10, **kwargs)
        adapt(model)
        model = model.to_empty(device="cpu").to(torch.float64)
        model.load_state_dict(initial)
        step = _training_step(model, x)
        _assert_same_step(expected, step, f"{name} {kwargs}")
        step["baseline_saved_bytes"] = expected["saved_bytes"]
        _assert_variant_is_what_it_claims(name, kwargs, model, step)
        with torch.no_grad():
            got_eval = model.eval()(x)
        assert torch.allclose(expected_eval, got_eval, rtol=1e-8, atol=1e-10), kwargs
        del model


INPLACE = {"norm": "inplace_abn", "activation": "leaky_relu"}
SIZE = 48  # 2x2 maps in the last stage of ResNet and EfficientNet


def test_resnet50_inplace_abn_and_checkpoint_are_equivalent():
    _check_equivalent("resnet50", SIZE, {"activation": "leaky_relu"}, [
        INPLACE,
        {**INPLACE, "checkpoint": "blocks"},
    ])


def test_se_resnext50_inplace_abn_and_checkpoint_are_equivalent():
    _check_equivalent("se_resnext50_32x4d", SIZE, {"activation": "leaky_relu"}, [
        {**INPLACE, "checkpoint": 2},
    ])


def _small_vgg_head(model: nn.Module) -> None:
    """Swap the 124M-parameter classifier (plain linear layers, the same in every variant) for
    one small linear layer: float64 copies of the original would cost gigabytes."""
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, 10)


def test_vgg16_pre_and_post_act_inplace_abn_and_checkpoint_are_equivalent():
    """PreAct and PostAct group the same layers differently (see leanstep.models.vgg), so all
    variants compute the same step; a PreAct InplaceABN checkpoint unit starts by writing in
    place over its input. 32x32 leaves 2x2 maps in VGG's last stage."""
    _check_equivalent("vgg16_bn", 32, {"activation": "leaky_relu"}, [
        {**INPLACE, "checkpoint": 3},
        {"activation": "leaky_relu", "pre_act": True, "checkpoint": "blocks"},
        {**INPLACE, "pre_act": True, "checkpoint": "blocks"},
    ], adapt=_small_vgg_head)


def test_efficientnet_b0_swish_me_and_checkpoint_are_equivalent():
    """ABN with the memory-efficient swish equals plain swish; drop path is on, so checkpoint
    recomputes must redraw the same masks."""
    common = {"norm": "abn", "drop_path_rate": 0.3}
    _check_equivalent("efficientnet_b0", SIZE, {"activation": "swish", **common}, [
        {"activation": "swish_me", **common},
        {"activation": "swish_me", "checkpoint": "blocks", **common},
    ])


def test_efficientnet_b0_inplace_abn_with_checkpoint_equals_bn():
    _check_equivalent("efficientnet_b0", SIZE, {"activation": "leaky_relu"}, [
        {**INPLACE, "checkpoint": "blocks"},
    ])


# --- details of the architectures -----------------------------------------------------------


def test_drop_path_grows_with_block_index():
    model = _meta_model("efficientnet_b0", drop_path_rate=0.2)
    rates = [m.rate for m in model.modules() if isinstance(m, DropPath)]
    assert rates[0] == 0.0 and rates == sorted(rates)
    assert math.isclose(rates[-1], 0.2 * (len(rates) - 1) / len(rates))
    model = _meta_model("resnet50", drop_path_rate=0.2)
    rates = [m.rate for m in model.modules() if isinstance(m, DropPath)]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.2) and rates == sorted(rates)


def test_drop_path_is_identity_in_eval_and_drops_whole_samples_in_training():
    drop = DropPath(0.5)
    x = torch.randn(64, 3, 4, 4)
    assert drop.eval()(x) is x
    out = drop.train()(x)
    kept = (out != 0).flatten(1).all(1)
    assert 0 < kept.sum() < 64
    assert torch.allclose(out[kept], 2 * x[kept]) and (out[~kept] == 0).all()


def test_family_defaults_and_se_activation():
    assert resnet.DEFAULT_ACTIVATION == "relu" and vgg.DEFAULT_ACTIVATION == "relu"
    model = _meta_model("efficientnet_b0")
    assert model.bn1.activation_name == "swish"
    assert isinstance(model.blocks[1][0].se.act, nn.SiLU)
    model = _meta_model("se_resnext50_32x4d", norm="inplace_abn", activation="leaky_relu")
    assert isinstance(model.layer1[0].se.act, nn.ReLU)  # the reference SE keeps ReLU
    assert model.layer1[0].bn3.activation_name == "identity"
    assert model.layer1[0].bn1.activation_name == "leaky_relu"


def test_vgg_units_start_at_the_conv_or_at_the_norm():
    """PostAct units are conv -> norm (-> pool); PreAct units norm (-> pool) -> conv, after a
    lone first conv and closing with the last norm and pool. These are the checkpoint cuts."""
    post = _meta_model("vgg16_bn").features.units
    assert post[:3] == [["0", "1"], ["3", "4", "6"], ["7", "8"]] and post[-1] == ["40", "41", "43"]
    pre = _meta_model("vgg16_bn", pre_act=True).features.units
    assert pre[:3] == [["0"], ["1", "3"], ["4", "6", "7"]] and pre[-1] == ["41", "43"]
    for units in (post, pre):
        assert sorted(sum(units, []), key=int) == list(_meta_model("vgg16_bn").features._modules)


def test_efficientnet_channel_rounding():
    assert efficientnet.round_channels(32, 1.1) == 32  # 35.2 -> 32 (within 10 %)
    assert efficientnet.round_channels(16, 1.1) == 16
    assert efficientnet.round_channels(40, 1.2) == 48
    assert efficientnet.round_channels(1280, 1.8) == 2304
    assert efficientnet.round_repeats(3, 1.1) == 4


# --- bad names and combinations ---------------------------------------------------------------


@pytest.fixture
def builders_forbidden(monkeypatch):
    """Make building any model fail loudly, to prove validation happens first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were validated")

    for cls in (vgg.VGG, resnet.ResNet, efficientnet.EfficientNet):
        monkeypatch.setattr(cls, "__init__", refuse)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("resnet51", {}, r"unknown model 'resnet51'.*resnet50"),
        ("efficientnet-b0", {}, r"did you mean efficientnet_b0"),
        (None, {}, r"unknown model None"),
        ("resnet50", {"norm": "inplace_abn"},
         r"InplaceABN needs an invertible activation.*leaky_relu.*norm='abn'"),
        ("efficientnet_b0", {"norm": "inplace_abn"}, r"activation='swish'.*leaky_relu"),
        ("vgg16_bn", {"norm": "inplace_abn", "activation": "mish"}, r"invertible"),
        ("resnet50", {"norm": "group"}, r"unknown norm 'group'.*inplace_abn"),
        ("resnet50", {"activation": "reluu"}, r"unknown activation 'reluu'.*relu"),
        ("resnet50", {"checkpoint": "block"}, r"checkpoint='block'.*'blocks'.*int >= 1"),
        ("resnet50", {"checkpoint": 0}, r"checkpoint=0.*None, 'blocks'"),
        ("resnet50", {"checkpoint": True}, r"checkpoint=True"),
        ("resnet50", {"checkpoint": 1.5}, r"checkpoint=1.5"),
        ("resnet50", {"pre_act": True}, r"unknown option\(s\) pre_act.*allowed: none"),
        ("vgg16_bn", {"preact": True}, r"unknown option\(s\) preact.*allowed: pre_act, dropout"),
        ("vgg16_bn", {"pre_act": "yes"}, r"pre_act must be True or False"),
        ("vgg16_bn", {"dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
        ("vgg16_bn", {"drop_path_rate": 0.1}, r"no residual branches.*drop_path_rate"),
        ("efficientnet_b0", {"drop_path_rate": 1.0}, r"drop_path_rate must be a float in \[0, 1\)"),
        ("efficientnet_b0", {"dropout": -0.1}, r"dropout must be None"),
        ("resnet18", {"num_classes": -1}, r"num_classes must be an int >= 0.*got -1"),
        ("resnet18", {"in_channels": 2.0}, r"in_chans must be an int >= 1, got 2.0"),
    ],
)
def test_bad_arguments_raise_before_building(builders_forbidden, name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_inplace_abn_and_checkpointing_save_less_for_backward(name):
    """What the variants are for: fewer bytes saved for backward than plain BN + activation."""
    base = create_model(name, activation="leaky_relu")
    x = torch.randn(2, 3, 64, 64)

    def saved(**kwargs):
        return saved_tensor_bytes(_sharing_weights_of(base, name, **kwargs), x)

    plain = saved(activation="leaky_relu")
    assert saved(norm="abn", activation="leaky_relu") < plain
    assert saved(**INPLACE) < saved(norm="abn", activation="leaky_relu")
    assert saved(activation="leaky_relu", checkpoint="blocks") < saved(**INPLACE)


@pytest.mark.parametrize("name, options", [
    ("resnet18", {}), ("efficientnet_b0", {}), ("vgg11_bn", {}), ("vgg11_bn", {"pre_act": True}),
])
def test_checkpoint_blocks_and_segments_save_less_for_backward(name, options):
    """checkpoint="blocks" keeps less than no checkpointing, and segments of two blocks (VGG:
    units) keep less again: only each segment's input is saved. Measured, not inferred from
    the wrappers, so it holds however the zoo implements checkpointing."""
    x = torch.randn(2, 3, 64, 64)

    def saved(checkpoint):
        model = _meta_model(name, checkpoint=checkpoint, **options)
        if name.startswith("vgg"):
            _small_vgg_head(model)
        torch.manual_seed(0)
        return saved_tensor_bytes(_materialised(model), x)

    plain, blocks, pairs = saved(None), saved("blocks"), saved(2)
    assert plain > blocks > pairs, (plain, blocks, pairs)
