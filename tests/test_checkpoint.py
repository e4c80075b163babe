"""Checkpointed and CheckpointedSequential: same gradients, statistics and state dict as plain."""

import copy

import pytest
import torch
from torch import nn

from leanstep.bench.memory import saved_tensor_bytes
from leanstep.layers import (
    ABN,
    BatchNormAct,
    Checkpointed,
    CheckpointedSequential,
    InplaceABN,
)

STEPS = 3


def _blocks():
    """Three conv + norm blocks with every norm variant, float64 for exact comparisons."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BatchNormAct(6, "swish")),
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), InplaceABN(6, "elu")),
        nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), ABN(4, "leaky_relu", 0.2)),
    ).double()


def _flat_layers():
    """A flat stack in which some segments start with InplaceABN or an in-place ReLU."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        InplaceABN(6),
        nn.Conv2d(6, 6, 3, padding=1),
        BatchNormAct(6, "identity"),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 5, 3, padding=1),
        InplaceABN(5, "identity"),
    ).double()


def _norms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _train(model, steps=STEPS):
    """``steps`` forward/backward passes on fixed inputs; returns the gradients of each step."""
    generator = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(steps):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=generator, requires_grad=True)
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()] + [x.grad])
    return grads


def _assert_same_training(plain, checkpointed):
    for plain_grads, checkpointed_grads in zip(_train(plain), _train(checkpointed), strict=True):
        for expected, actual in zip(plain_grads, checkpointed_grads, strict=True):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for expected, actual in zip(_norms(plain), _norms(checkpointed), strict=True):
        torch.testing.assert_close(actual.running_mean, expected.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(actual.running_var, expected.running_var, rtol=0, atol=0)
        assert actual.num_batches_tracked.item() == expected.num_batches_tracked.item() == STEPS


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_checkpointed_blocks_train_like_the_plain_model():
    plain = _blocks()
    checkpointed = nn.Sequential(*(Checkpointed(block) for block in copy.deepcopy(plain)))
    calls = _count_calls(checkpointed[1].module)
    _assert_same_training(plain, checkpointed)
    assert len(calls) == 2 * STEPS  # forward, then the recompute in backward: checkpointing ran


def test_checkpointing_saves_less_for_backward():
    plain = _blocks()
    checkpointed = nn.Sequential(*(Checkpointed(block) for block in copy.deepcopy(plain)))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert saved_tensor_bytes(checkpointed, x) < saved_tensor_bytes(plain, x) / 2


@pytest.mark.parametrize("module", [lambda: InplaceABN(3, "elu").double(),
                                    lambda: nn.ReLU(inplace=True)])
def test_checkpointed_module_that_writes_over_its_input(module):
    plain = nn.Sequential(nn.Conv2d(3, 3, 1), module(), nn.Conv2d(3, 2, 1)).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed[1] = Checkpointed(checkpointed[1])
    for expected, actual in zip(_train(plain), _train(checkpointed), strict=True):
        for a, b in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("segment", [1, 2, 3, 7, 20])
def test_checkpointed_sequential_trains_like_the_plain_sequential(segment):
    plain = _flat_layers()
    checkpointed = CheckpointedSequential(*copy.deepcopy(plain), segment=segment)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    calls = [_count_calls(child) for child in checkpointed]
    _assert_same_training(plain, checkpointed)
    # every layer ran twice per step, forward then recompute: checkpointing happened
    assert [len(c) for c in calls] == [2 * STEPS] * len(checkpointed)


@pytest.mark.parametrize("segment", [1, 2, 3, 7, 20])
def test_checkpointed_sequential_saves_only_the_input_of_each_segment(segment):
    """What checkpointing is for: autograd keeps the input of each segment of ``segment``
    layers and nothing inside it (the plain stack keeps every layer's saved tensors)."""
    plain = _flat_layers()
    checkpointed = CheckpointedSequential(*copy.deepcopy(plain), segment=segment)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    inputs, h = [], x
    with torch.no_grad():
        for layer in copy.deepcopy(plain):
            inputs.append(h.numel() * h.element_size())
            h = layer(h)
    expected = sum(inputs[::segment])
    assert saved_tensor_bytes(checkpointed, x) == expected
    if segment > 1:  # a segment per layer keeps more than the plain stack, which shares inputs
        assert expected < saved_tensor_bytes(plain, x)


def _perturbed(model):
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(1 if tensor.is_floating_point() else 3)
    return model


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["blocks", "whole", "sequential"])
def test_state_dict_keys_unchanged_and_loadable_both_ways(wrap):
    plain = _blocks()
    if wrap == "blocks":
        checkpointed = nn.Sequential(*(Checkpointed(block) for block in _blocks()))
    elif wrap == "whole":
        checkpointed = Checkpointed(_blocks())
    else:
        checkpointed = CheckpointedSequential(*_blocks(), segment=2)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())

    source = _perturbed(_blocks())
    checkpointed.load_state_dict(source.state_dict())
    _assert_same_state(checkpointed.state_dict(), source.state_dict())
    _perturbed(checkpointed)
    plain.load_state_dict(checkpointed.state_dict())
    _assert_same_state(plain.state_dict(), checkpointed.state_dict())


def test_loading_a_wrong_key_still_fails_strictly():
    checkpointed = Checkpointed(_blocks())
    state = _blocks().state_dict()
    state["0.0.not_a_parameter"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="not_a_parameter"):
        checkpointed.load_state_dict(state)


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_plain_call_in_eval_or_without_grad(mode):
    plain = _blocks()
    checkpointed = Checkpointed(copy.deepcopy(plain))
    calls = _count_calls(checkpointed.module)
    for model in (plain, checkpointed):
        model.train(mode != "eval")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.set_grad_enabled(mode != "no_grad"):
        torch.testing.assert_close(checkpointed(x), plain(x), rtol=0, atol=0)
    assert len(calls) == 1
    expected_updates = 1 if mode == "no_grad" else 0
    for norm in _norms(checkpointed):
        assert norm.num_batches_tracked.item() == expected_updates


@pytest.mark.parametrize("segment", [0, -1, 1.5, True, "2"])
def test_checkpointed_sequential_rejects_bad_segment(segment):
    with pytest.raises(ValueError, match=repr(segment).replace(".", r"\.")):
        CheckpointedSequential(nn.Identity(), segment=segment)
