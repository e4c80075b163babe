"""InplaceABNSync and convert_sync: two gloo processes on 127.0.0.1 against one process."""

from __future__ import annotations

import copy
import socket
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanstep.bench.memory import saved_tensor_bytes
from leanstep.layers import (
    ABN,
    BatchNormAct,
    InplaceABN,
    InplaceABNSync,
    SyncBatchNormAct,
    check_norm_activation,
    convert_sync,
    get_norm_act,
)

CHANNELS = 4
RANK_BATCHES = (3, 5)
STEPS = 2
TOLERANCE = 1e-10
SPAWN_TIMEOUT_S = 60
# Two layer configurations: the default group with an exponential average, and an explicit group
# with a cumulative average. A negative gamma and one below InplaceABN's small-gamma threshold.
CONFIGS = {
    "world": {"activation": "leaky_relu", "activation_param": 0.1, "momentum": 0.1},
    "explicit_group": {"activation": "elu", "activation_param": 0.7, "momentum": None},
}
WEIGHT = (1.5, -0.7, 5e-4, 2.0)
BIAS = (0.1, -0.3, 0.2, 0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(cls, config, **extra):
    layer = cls(CHANNELS, **config, **extra).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(WEIGHT))
        layer.bias.copy_(torch.tensor(BIAS))
    return layer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_rows(rank: int) -> slice:
    start = sum(RANK_BATCHES[:rank])
    return slice(start, start + RANK_BATCHES[rank])


def _run_steps(layer, inputs, upstreams):
    """Train ``layer`` for one step per input; return what each step produced."""
    results = []
    for x, upstream in zip(inputs, upstreams, strict=True):
        leaf = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        output = layer(leaf * 1.0)  # a non-leaf input, so InplaceABN really works in place
        (output * upstream).sum().backward()
        results.append(
            {
                "output": output.detach().clone(),
                "grad_input": leaf.grad.clone(),
                "grad_weight": layer.weight.grad.clone(),
                "grad_bias": layer.bias.grad.clone(),
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "num_batches_tracked": layer.num_batches_tracked.clone(),
            }
        )
    return results


def _sync_worker(rank, world_size, port, inputs, upstreams, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=__import__("datetime").timedelta(seconds=SPAWN_TIMEOUT_S),
    )
    try:
        rows = _rank_rows(rank)
        mine = [x[rows] for x in inputs]
        upstream_mine = [g[rows] for g in upstreams]
        groups = {"world": None, "explicit_group": dist.new_group(list(range(world_size)))}
        results = {}
        for name, config in CONFIGS.items():
            layer = _layer(InplaceABNSync, config, group=groups[name])
            results[name] = _run_steps(layer, mine, upstream_mine)
        singles = [dist.new_group([member]) for member in range(world_size)]
        results["group_of_one"] = _run_steps(
            _layer(InplaceABNSync, CONFIGS["world"], group=singles[rank]), mine, upstream_mine
        )
        results["local"] = _run_steps(_layer(InplaceABN, CONFIGS["world"]), mine, upstream_mine)
        for name, config in CONFIGS.items():
            # Compiled (AOTAutograd, where the in-place write is functionalised): the layer's
            # input is a graph input, the case where torch drops mark_dirty.
            layer = torch.compile(_layer(InplaceABNSync, config, group=groups[name]),
                                  backend="aot_eager")
            results[f"compiled {name}"] = _run_steps(layer, mine, upstream_mine)
            explained = torch._dynamo.explain(_layer(InplaceABNSync, config, group=groups[name]))
            results.setdefault("graph breaks", {})[name] = explained(
                mine[0].clone().requires_grad_(True) * 1.0).graph_break_count
        x = mine[0].clone().requires_grad_(True) * 1.0
        results["saved_bytes"] = {
            "sync": saved_tensor_bytes(_layer(InplaceABNSync, CONFIGS["world"]), x.clone()),
            "local": saved_tensor_bytes(_layer(InplaceABN, CONFIGS["world"]), x.clone()),
            "input": x.numel() * x.element_size(),
        }
        torch.save(results, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, nprocs):
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers did not finish in {SPAWN_TIMEOUT_S} s")


class _BatchNorm2dThenActivation(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by the functional activation: the textbook computation."""

    def __init__(self, num_features, activation, activation_param, momentum):
        super().__init__(num_features, momentum=momentum)
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, x):
        y = super().forward(x)
        if self.activation == "elu":
            return F.elu(y, self.activation_param)
        return F.leaky_relu(y, self.activation_param)


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    total = sum(RANK_BATCHES)
    shape = (total, CHANNELS, 3, 2)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
              for _ in range(STEPS)]
    upstreams = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(STEPS)]
    result_dir = tmp_path_factory.mktemp("sync")
    _spawn(_sync_worker, (len(RANK_BATCHES), _free_port(), inputs, upstreams, str(result_dir)),
           len(RANK_BATCHES))
    ranks = [torch.load(result_dir / f"rank{rank}.pt") for rank in range(len(RANK_BATCHES))]
    return inputs, upstreams, ranks


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("reference", ["inplace_abn", "batchnorm2d"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_two_ranks_with_uneven_batches_match_one_process(
    two_process_results, config_name, reference, mode
):
    inputs, upstreams, ranks = two_process_results
    config = CONFIGS[config_name]
    cls = InplaceABN if reference == "inplace_abn" else _BatchNorm2dThenActivation
    expected = _run_steps(_layer(cls, config), inputs, upstreams)
    entry = config_name if mode == "eager" else f"compiled {config_name}"
    diffs = {}
    for step in range(STEPS):
        per_rank = [rank[entry][step] for rank in ranks]
        for key in ("output", "grad_input"):
            got = torch.cat([result[key] for result in per_rank])
            diffs[key] = max(diffs.get(key, 0.0), _max_diff(got, expected[step][key]))
        for key in ("grad_weight", "grad_bias"):
            got = sum(result[key] for result in per_rank)
            diffs[key] = max(diffs.get(key, 0.0), _max_diff(got, expected[step][key]))
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            for result in per_rank:
                diffs[key] = max(diffs.get(key, 0.0), _max_diff(result[key], expected[step][key]))
    print(f"{mode} {config_name} vs {reference}: max abs diffs {diffs}")
    assert all(diff <= TOLERANCE for diff in diffs.values()), diffs


def test_synchronised_layer_compiles_to_one_graph_with_a_process_group(two_process_results):
    for rank in two_process_results[2]:
        assert rank["graph breaks"] == {name: 0 for name in CONFIGS}


def test_synchronised_layer_saves_what_inplace_abn_saves(two_process_results):
    for rank in two_process_results[2]:
        saved = rank["saved_bytes"]
        # The same tensors, plus the group's statistics for the group backward: mean, invstd
        # and gamma per channel and the element count (float64 here).
        assert saved["sync"] == saved["local"] + 8 * (3 * CHANNELS + 1)
        assert saved["input"] <= saved["sync"] < 2 * saved["input"]


def test_in_a_group_of_one_it_is_inplace_abn(two_process_results):
    for rank in two_process_results[2]:
        for got, expected in zip(rank["group_of_one"], rank["local"], strict=True):
            for key in expected:
                assert torch.equal(got[key], expected[key]), key


def test_without_a_process_group_it_is_inplace_abn():
    config = CONFIGS["world"]
    inputs = [torch.randn(4, CHANNELS, 3, 3, dtype=torch.float64) for _ in range(STEPS)]
    upstreams = [torch.randn_like(x) for x in inputs]
    synced = _run_steps(_layer(InplaceABNSync, config), inputs, upstreams)
    plain = _run_steps(_layer(InplaceABN, config), inputs, upstreams)
    for got, expected in zip(synced, plain, strict=True):
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_registered_as_a_norm_and_checked_like_inplace_abn():
    assert get_norm_act("inplace_abn_sync") is InplaceABNSync
    with pytest.raises(ValueError, match="relu"):
        check_norm_activation("inplace_abn_sync", "relu")
    with pytest.raises(ValueError, match="leaky_relu"):
        InplaceABNSync(CHANNELS, activation="relu")


NORM_TYPES = (nn.BatchNorm2d, BatchNormAct, ABN, InplaceABN)


@pytest.mark.parametrize("norm", ["bn", "abn", "inplace_abn"])
def test_convert_sync_keeps_the_state_dict_and_the_computation(norm):
    from leanstep.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", norm=norm, activation="leaky_relu", num_classes=10)
    model(torch.randn(2, 3, 32, 32))  # running statistics away from their initial values
    original = copy.deepcopy(model)
    before = model.state_dict()
    parameters = list(model.parameters())
    norms = sum(type(module) in NORM_TYPES for module in model.modules())

    converted = convert_sync(model)

    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert all(a is b for a, b in zip(converted.parameters(), parameters, strict=True))
    assert not any(type(module) in NORM_TYPES for module in converted.modules())
    synced = sum(isinstance(m, (nn.SyncBatchNorm, InplaceABNSync)) for m in converted.modules())
    assert synced == norms > 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(converted(x), original(x))
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_convert_sync_keeps_each_activation_and_its_placement():
    model = nn.Sequential(
        nn.Conv2d(3, CHANNELS, 1),
        BatchNormAct(CHANNELS, "elu", 0.5),
        ABN(CHANNELS, "relu"),
        nn.BatchNorm2d(CHANNELS),
        InplaceABN(CHANNELS, "leaky_relu", 0.2, momentum=None),
    ).eval()
    converted = convert_sync(copy.deepcopy(model))
    kinds = [type(module) for module in converted]
    expected = [nn.Conv2d, SyncBatchNormAct, SyncBatchNormAct, nn.SyncBatchNorm, InplaceABNSync]
    assert kinds == expected
    assert (converted[1].activation_name, converted[1].activation_param) == ("elu", 0.5)
    assert not converted[1].act.inplace and converted[2].act.inplace
    assert (converted[4].slope, converted[4].momentum, converted[4].training) == (0.2, None, False)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(converted(x), model(x))


def test_convert_sync_of_a_norm_layer_returns_its_replacement_and_leaves_others():
    layer = ABN(CHANNELS)
    replacement = convert_sync(layer)
    assert type(replacement) is SyncBatchNormAct and replacement.weight is layer.weight
    other = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    assert convert_sync(other) is other and [type(m) for m in other] == [nn.Conv2d, nn.ReLU]
