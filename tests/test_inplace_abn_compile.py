"""InplaceABN under torch.compile (one graph, no breaks), without host-device syncs, and its
clear errors for double backward and TorchScript."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from leanstep.layers import ABN, InplaceABN, InplaceABNSync
from leanstep.models import create_model

# Operations that make the host wait for the device (their result decides a shape or a value
# the host reads).
SYNCING_OPS = {
    "aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
    "aten::equal", "aten::masked_select", "aten::unique", "aten::_unique2",
    "aten::unique_consecutive", "aten::nonzero_static", "aten::allclose", "aten::tolist",
    "aten::argwhere",
}


class SyncDetector(TorchDispatchMode):
    """Fails on any operation of SYNCING_OPS that reaches the dispatcher (every ATen operation
    InplaceABN runs does: it is written with ATen operations only)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNCING_OPS:
            raise AssertionError(f"host-device synchronisation: {func._schema.name}")
        self.seen.add(func._schema.name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        if not hasattr(self, "seen"):
            self.seen = set()
        return super().__enter__()


def _stack(**options):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), InplaceABN(8, **options),
        nn.Conv2d(8, 8, 3, padding=1), InplaceABN(8, "elu", 0.5, momentum=None),
        nn.Conv2d(8, 8, 3, padding=1), InplaceABN(8, "identity", affine=False),
        nn.Conv2d(8, 8, 3, padding=1), InplaceABNSync(8, "leaky_relu", 0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def test_the_detector_catches_a_sync():
    with pytest.raises(AssertionError, match="nonzero"), SyncDetector():
        torch.tensor([0.0, 1.0]).nonzero()


def test_training_step_has_no_host_device_sync():
    torch.manual_seed(0)
    model = _stack()
    with torch.no_grad():
        model[1].weight[:3] = torch.tensor([0.0, 1e-6, -1e-3])  # ill-conditioned channels
        model[1].bias.fill_(5.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 8, 8)
    detector = SyncDetector()
    for _ in range(2):
        with detector:
            loss = model(x).square().mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert "aten::native_batch_norm_backward" in detector.seen  # backward ran inside the mode
    assert model[1].num_batches_tracked.item() == 2


def _explain(model, x):
    explanation = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    return explanation


@pytest.mark.parametrize(
    ("name", "activation"),
    [("resnet50", "leaky_relu"), ("se_resnext50_32x4d", "leaky_relu"),
     ("efficientnet_b0", "elu"), ("vgg16_bn", "leaky_relu")],
)
def test_zoo_model_compiles_to_one_graph_in_training(name, activation):
    torch.manual_seed(0)
    model = create_model(name, norm="inplace_abn", activation=activation, num_classes=10).train()
    explanation = _explain(model, torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    norms = [m for m in model.modules() if isinstance(m, InplaceABN)]
    assert norms and all(m.num_batches_tracked.item() == 1 for m in norms)


def test_inplace_abn_sync_without_a_group_compiles_to_one_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), InplaceABNSync(4), nn.Conv2d(4, 4, 3))
    explanation = _explain(model, torch.randn(2, 3, 8, 8))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_training_equals_eager():
    torch.manual_seed(0)
    eager = _stack()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        for model in (eager, compiled):
            model(x).square().mean().backward()
    torch._dynamo.reset()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled_model[1].num_batches_tracked.item() == 2  # updated once per step

def test_compiled_layer_on_a_graph_input_keeps_its_gradient():
    # torch 2.13's compile drops an autograd Function's mark_dirty on a graph input (the
    # gradient would skip the layer); compiled, the layer runs ABN's maths instead, returns
    # what eager returns, and leaves its input as it was (documented).
    torch.manual_seed(0)
    eager = InplaceABN(6, "leaky_relu", 0.1)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 3.0)
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, grad = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    results = []
    for model in (eager, compiled):
        leaf = x.clone().requires_grad_(True)
        inner = leaf * 1.0
        out = model(inner)
        out.backward(grad)
        results.append((leaf.grad, out.detach(), inner.detach()))
    torch._dynamo.reset()
    (eager_dx, eager_out, eager_inner), (compiled_dx, compiled_out, compiled_inner) = results
    torch.testing.assert_close(compiled_dx, eager_dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager_inner, eager_out)  # eager: written in place
    torch.testing.assert_close(compiled_inner, x)  # compiled: left as it was
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-5)


def test_double_backward_raises_one_clear_error():
    layer = InplaceABN(3).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = layer(x * 1)
    with pytest.raises(RuntimeError, match=r"does not support double backward.*norm='abn'"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_torchscript_raises_naming_the_layer_and_the_alternative():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), InplaceABN(4))
    for training in (True, False):
        with pytest.raises(RuntimeError, match=r"InplaceABN.*torch.jit.script.*norm='abn'"):
            torch.jit.script(model.train(training))
    assert isinstance(model[1], InplaceABN)
    with pytest.raises(RuntimeError, match=r"InplaceABN.*torch.jit.trace.*norm='abn'"):
        torch.jit.trace(model.train(), torch.randn(2, 3, 6, 6))


def test_trace_in_eval_mode_works_and_computes_plain_batchnorm_then_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), InplaceABN(4, "leaky_relu", 0.2)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    traced = torch.jit.trace(model, x)
    reference = nn.Sequential(copy.deepcopy(model[0]), ABN(4, "leaky_relu", 0.2)).eval()
    reference[1].load_state_dict(model[1].state_dict())
    torch.testing.assert_close(traced(x), reference(x))


def _compiled_saved_mib(norm: str) -> float:
    """MiB the compiled training step keeps for backward (the partitioned forward graph's
    outputs: saved tensors, plus the loss and buffers, alike for every norm)."""
    from functools import partial

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    kept = []

    def partition(joint, inputs, **kwargs):
        forward, backward = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        output = next(n for n in forward.graph.nodes if n.op == "output")
        kept.append(sum(v.meta["val"].numel() * v.meta["val"].element_size()
                        for v in output.args[0]
                        if isinstance(getattr(v, "meta", {}).get("val"), torch.Tensor)))
        return forward, backward

    backend = aot_autograd(fw_compiler=lambda gm, _: gm.forward,
                           bw_compiler=lambda gm, _: gm.forward, partition_fn=partial(partition))
    torch.manual_seed(0)
    model = create_model("resnet18", norm=norm, activation="leaky_relu", num_classes=10)
    torch.compile(model, backend=backend, fullgraph=True)(
        torch.randn(4, 3, 64, 64)).mean().backward()
    torch._dynamo.reset()
    return sum(kept) / 2**20


def test_compiled_inplace_abn_keeps_no_more_than_compiled_abn():
    """Compiled, the partitioner decides what backward keeps; InplaceABN (ABN's maths there,
    activation in place) keeps what ABN keeps, not more."""
    abn, inplace = _compiled_saved_mib("abn"), _compiled_saved_mib("inplace_abn")
    assert 0 < inplace <= abn * 1.001


def test_compiled_gradients_are_accurate_for_ill_conditioned_channels():
    torch.manual_seed(0)
    layer = InplaceABN(8, "leaky_relu", 0.01)
    with torch.no_grad():
        layer.weight[:4] = torch.tensor([0.0, 1e-6, -1e-3, 2e-2])
        layer.bias[:4] = torch.tensor([10.0, -1e4, 50.0, 1e3])
    reference = copy.deepcopy(layer).double()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, grad = torch.randn(4, 8, 6, 6) * 3 + 1, torch.randn(4, 8, 6, 6)
    got = []
    for model, dtype in ((compiled, torch.float32), (reference, torch.float64)):
        leaf = x.to(dtype, copy=True).requires_grad_(True)
        model(leaf * 1.0).backward(grad.to(dtype))
        got.append((leaf.grad, model.weight.grad, model.bias.grad))
    torch._dynamo.reset()
    for a, b in zip(*got, strict=True):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-5
    assert layer.unprotected_channels.item() == 0  # nothing rebuilt, nothing left out
