"""The eager lean region as one autograd node: what a training loop does around it (gradients
asked for with ``autograd.grad``, parameter hooks, a second backward, double backward, hooks
inside a block, autocast) and the layers it keeps (padding modes, linear layers, norms that
call ``F.batch_norm`` themselves) stay exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transform_models import MobileNet, TorchvisionResNet

import leanstep


def _loss(model, x, seed=0):
    torch.manual_seed(seed)
    return model(x).square().mean()


def _pair(build, dtype=torch.float64):
    torch.manual_seed(0)
    plain = build().to(dtype)
    return plain, leanstep.lean(copy.deepcopy(plain))


def test_autograd_grad_of_parameters_returns_them_and_leaves_grad_alone():
    plain, lean = _pair(TorchvisionResNet)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = list(plain.parameters())
    expected = torch.autograd.grad(_loss(plain, x), want)
    found = torch.autograd.grad(_loss(lean, x), list(lean.parameters()))
    for a, b in zip(expected, found, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in lean.parameters())


def test_parameter_hooks_fire_once_per_step():
    _, lean = _pair(TorchvisionResNet)
    calls = {}
    for name, param in lean.named_parameters():
        param.register_hook(lambda g, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    _loss(lean, torch.randn(2, 3, 16, 16, dtype=torch.float64)).backward()
    assert set(calls) == {name for name, _ in lean.named_parameters()}
    assert set(calls.values()) == {1}


def test_a_second_backward_with_retain_graph_is_exact():
    plain, lean = _pair(MobileNet)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for model in (plain, lean):
        loss = _loss(model, x)
        loss.backward(retain_graph=True)
        loss.backward()  # the kept outputs were let go of: the layers are recomputed
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=0, msg=name)


def test_double_backward_is_refused_with_one_clear_error():
    _, lean = _pair(TorchvisionResNet)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(_loss(lean, x), x, create_graph=True)


class _Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1),
                                                    nn.BatchNorm2d(4), nn.ReLU())
                                      for _ in range(2)])

    def forward(self, x):
        return self.blocks(x)


def test_a_block_with_hooks_inside_runs_plain_with_a_warning():
    """A hook inside a block would see tensors of the forward pass, which has no autograd
    history: a feature taken there for a loss would silently get no gradient."""
    model = leanstep.lean(_Hooked())
    features = []
    model.blocks[1][0].register_forward_hook(lambda m, i, o: features.append(o))
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(UserWarning, match=r"lean: block 'blocks\.1' runs plain: 0 has hooks"):
        out = model(x)
    assert features[0].requires_grad  # the feature can carry a loss
    (out.sum() + features[0].sum()).backward()
    assert model.blocks[1][0].weight.grad is not None


class _Layers(nn.Module):
    """Kept layers of every kind the region hands back: padding modes and 'same' padding,
    a linear layer on a 3-d input, a norm that calls F.batch_norm itself (as timm's
    BatchNormAct2d does), grouped and dilated convolutions."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2, bias=False)
        self.odd = nn.Conv2d(8, 8, 2, padding="same")  # asymmetric: run again, not kept
        self.norm = nn.BatchNorm2d(8)
        self.linear = nn.Linear(8, 6)

    def forward(self, x):
        x = self.reflect(x)
        x = F.silu(F.batch_norm(x, self.norm.running_mean, self.norm.running_var,
                                self.norm.weight, self.norm.bias, True, 0.1, 1e-5))
        x = self.odd(self.same(x))
        return self.linear(x.flatten(2).transpose(1, 2))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_every_kind_of_kept_layer_is_exact_bit_for_bit():
    plain, lean = _pair(_Layers, torch.float32)
    x = torch.randn(2, 3, 9, 9)
    for _ in range(2):
        for model in (plain, lean):
            model.zero_grad()
            _loss(model, x).backward()
    for (name, a), b in zip(plain.state_dict().items(), lean.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_the_layers_kept_are_the_convs_and_linears_not_the_asymmetric_one():
    from leanstep.transforms.lean_region import _region_members

    model = _Layers()
    layers, norms, params, _, hooked = _region_members([model], model)
    assert [type(m).__name__ for m, _ in layers] == ["Conv2d", "Conv2d", "Linear"]
    assert layers[1][0] is model.same and norms == [model.norm] and hooked is None
    assert len(params) == len(list(model.parameters()))


def test_under_cpu_autocast_lean_matches_plain():
    plain, lean = _pair(TorchvisionResNet, torch.float32)
    x = torch.randn(2, 3, 16, 16)
    losses = []
    for model in (plain, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, x)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-2, atol=1e-3, msg=name)


def test_a_kept_output_the_caller_overwrites_is_recomputed():
    class Block(nn.Module):  # a block that returns its conv's output
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.norm(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, x):
            out = self.blocks[0](x)
            out.mul_(0.5)  # overwrites the first block's kept conv output
            return self.blocks[1](out)

    torch.manual_seed(0)
    plain = Net().double()
    lean = leanstep.lean(copy.deepcopy(plain), blocks=["blocks.0", "blocks.1"])
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for model in (plain, lean):
        _loss(model, x).backward()
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("stem", [True, False])
def test_module_trackers_see_a_lean_step_and_count_plain_flops(stem):
    """FlopCounterMode and MemTracker hook every module's inputs; inside a region's backward
    those hooks run within autograd.grad, where they must not meet a leaf tensor."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    plain = TorchvisionResNet()
    lean = copy.deepcopy(plain)
    if stem:
        leanstep.lean(lean)
    else:
        leanstep.lean(lean, blocks=[name for name, _ in leanstep.find_blocks(lean)])
    x = torch.randn(2, 3, 16, 16)
    counts = []
    for model in (plain, lean):
        with FlopCounterMode(display=False) as counter:
            _loss(model, x).backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_a_lean_step_runs_on_the_meta_device():
    """FLOPs are counted on the meta device (no autocast there, no values to compare)."""
    with torch.device("meta"):
        model = leanstep.lean(TorchvisionResNet())
        x = torch.randn(2, 3, 16, 16)
    _loss(model, x).backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters())


def _exact(plain, lean, x, steps=2):
    for step in range(steps):
        for model in (plain, lean):
            model.zero_grad()
            _loss(model, x, seed=step).backward()
    for (name, a), b in zip(plain.state_dict().items(), lean.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=0, msg=name)


class _StandardisedConv(nn.Conv2d):
    """A conv that changes its weight in ``_conv_forward`` (weight standardisation)."""

    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std((1, 2, 3),
                                                                               keepdim=True)
        return super()._conv_forward(x, weight, bias)


class _Ema(nn.Module):
    """State of its own: a counter updated by assignment, a mean written through .data, and a
    batch norm called functionally (not a _BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.conv = _StandardisedConv(4, 4, 3, padding=1)
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x):
        x = self.conv(x)
        self.steps = self.steps + 1
        self.mean.data.mul_(0.9).add_(0.1 * x.detach().mean((0, 2, 3)))
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var,
                                       training=True))


def test_module_state_is_updated_once_and_custom_convs_are_run_again():
    plain, lean = _pair(lambda: nn.Sequential(nn.Sequential(_Ema(), _Ema())))
    _exact(plain, lean, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert lean[0][0].steps.item() == 2


def test_an_argument_that_may_hide_tensors_runs_the_block_plain():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, projection):
            return projection(torch.relu(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = nn.Conv2d(4, 4, 1)
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, x):
            for block in self.blocks:
                x = block(x, self.projection)
            return x

    plain, lean = _pair(Net)
    with pytest.warns(UserWarning, match=r"runs plain: it takes a Conv2d argument"):
        _exact(plain, lean, torch.randn(2, 4, 8, 8, dtype=torch.float64))


def test_a_parameter_changed_between_forward_and_backward_is_an_error():
    _, lean = _pair(TorchvisionResNet)
    loss = _loss(lean, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with torch.no_grad():
        lean.layer1[0].conv1.weight.mul_(2)
    with pytest.raises(RuntimeError, match=r"was modified in place between the forward pass "
                                           r"and backward"):
        loss.backward()


def test_nested_blocks_are_recomputed_by_the_outer_one():
    plain, lean = _pair(TorchvisionResNet)
    leanstep.lean(lean, blocks=["layer1", "layer1.0"])  # layer1.0 inside layer1's region
    _exact(plain, lean, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert all(isinstance(p, nn.Parameter) for p in lean.parameters())


def test_python_state_read_after_the_last_kept_layer_is_an_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.conv(x) * self.calls  # the recompute scales by another count

    _, lean = _pair(lambda: nn.Sequential(nn.Sequential(Block(), Block())))
    with pytest.raises(RuntimeError, match=r"the block's output got other values"):
        _loss(lean, torch.randn(2, 4, 8, 8, dtype=torch.float64)).backward()


@pytest.mark.parametrize("in_place", [True, False])
def test_python_state_between_a_kept_conv_and_its_norm_is_an_error(in_place):
    """A norm's input that is, unchanged, the conv's kept output needs no fingerprint of its
    own; one that the block changes after the conv with Python state (in place or not) still
    makes the recompute fail loudly."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.conv(x)
            out = out.mul_(self.calls) if in_place else out * self.calls
            return self.bn(out).relu()

    _, lean = _pair(lambda: nn.Sequential(nn.Sequential(Block(), Block())))
    with pytest.raises(RuntimeError, match=r"ran differently in its recompute"):
        _loss(lean, torch.randn(2, 4, 8, 8, dtype=torch.float64)).backward()


def test_each_kept_output_is_let_go_of_once_backward_is_past_it(monkeypatch):
    """A region's backward frees every kept conv output as soon as the layers that need it
    (its norm, its own backward) are done: nothing of the region holds one to the end."""
    import weakref

    from leanstep.transforms import lean_region

    handed, done, held = [], set(), []
    kept = lean_region._KeptConv
    apply, forward, backward = kept.apply, kept.forward, kept.backward

    def recording_apply(*args):
        out = apply(*args)
        handed.append(weakref.ref(out))
        return out

    def checking_backward(ctx, grad):
        held.extend(i for i in done if handed[i]() is not None)
        done.add(ctx.index)
        return backward(ctx, grad)

    def indexed_forward(ctx, *args):
        ctx.index = len(handed)
        return forward(ctx, *args)

    monkeypatch.setattr(kept, "apply", recording_apply)
    monkeypatch.setattr(kept, "forward", staticmethod(indexed_forward))
    monkeypatch.setattr(kept, "backward", staticmethod(checking_backward))
    _, lean = _pair(TorchvisionResNet)
    _loss(lean, torch.randn(2, 3, 16, 16, dtype=torch.float64)).backward()
    assert len(done) == len(handed) > 4
    assert held == []
