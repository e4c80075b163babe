"""``plan``: the fastest training step that fits a memory budget, chosen block by block.

How a plan is made (every figure predicted on fake tensors, nothing allocated):

1. the blocks are found (``leanstep.transforms.find_blocks``, or ``blocks=``);
2. the step is traced once per choice with every block taking that choice (``trace.py``): what
   each block keeps for backward, its transient peak, and its work;
3. the fastest assignment whose composed peak (``compose.py``) fits the budget is found by exact
   dynamic programming (``solve.py``), time estimated as ``cost.py`` explains;
4. the chosen assignment is predicted for real once; if it does not fit (a block's memory
   depending on its neighbours' choices), the search runs again with the budget lowered by the
   difference;
5. for the plan and the two baselines a user would otherwise pick (every block lean, every
   block checkpointed), the largest batch that fits: searched on the composed figures scaled to
   each batch, then confirmed by real predictions at the answer and one above.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from leanstep.bench.max_batch import MAX_BATCH, largest_batch, parse_budget
from leanstep.bench.predict import DEVICE_LIKES
from leanstep.bench.step import PRECISIONS

from .choices import CHOICES, apply_assignment
from .compose import Table
from .cost import Rates, default_rates
from .solve import fastest, smallest_peak
from .step import OPTIMIZERS, parse_input_size
from .trace import FakeStep, Trace

__all__ = ["FORMAT", "NothingFitsError", "Plan", "plan"]

FORMAT = "leanstep-plan/1"
MIB = 2**20
BASELINES = ("lean", "checkpoint")
_RETRIES = 4


class NothingFitsError(Exception):
    """Even the assignment with the smallest peak exceeds the budget. ``details``: the figures
    (smallest peak, its breakdown, what dominates)."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


@dataclass
class Plan:
    """A choice per block, the step it was made for, and its predictions.

    ``apply(model)`` transforms a model in place (the blocks must have the same names);
    ``build()`` builds ``model`` (a spec) and applies. ``to_json``/``from_json`` round-trip.
    ``report`` holds the figures (``predicted_mib``, ``estimated_step_s``, ``slowdown``,
    ``baselines``, ``max_batch``, ``estimate``), informative only: applying needs none;
    ``source``: the file it was loaded from, if any.
    """

    blocks: list[str]
    choices: list[str]
    model: str | None = None
    options: dict = field(default_factory=dict)
    activation: str | None = None
    batch_size: int | None = None
    input_size: tuple[int, int] | None = None
    in_channels: int = 3
    num_classes: int = 1000
    precision: str = "fp32"
    optimizer: str = "sgd"
    device_like: str = "cpu"
    budget_bytes: int | None = None
    report: dict = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self):
        if len(self.blocks) != len(self.choices):
            raise ValueError(f"plan: {len(self.blocks)} blocks but {len(self.choices)} choices")
        unknown = sorted(set(self.choices) - set(CHOICES))
        if unknown:
            raise ValueError(f"plan: unknown choice(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(CHOICES)}")
        if self.input_size is not None:
            self.input_size = tuple(self.input_size)

    def apply(self, model: nn.Module) -> nn.Module:
        """Transform ``model`` in place as planned; returns it."""
        names = dict(model.named_modules())
        missing = [name for name in self.blocks if "[" not in name and name not in names]
        if missing:
            raise ValueError(
                f"plan does not match this model: no module {missing[0]!r} "
                f"({len(missing)} of the plan's {len(self.blocks)} blocks missing)"
            )
        return apply_assignment(model, self.blocks, self.choices, self.activation)

    def build(self) -> nn.Module:
        """The planned model: ``model`` (a spec) built with ``options``, then ``apply``."""
        if self.model is None:
            raise ValueError("this plan was made for a model object, not a spec: "
                             "call plan.apply(your_model)")
        from leanstep.bench.specs import build_from_spec

        model = build_from_spec(self.model, num_classes=self.num_classes,
                                in_channels=self.in_channels, options=self.options)
        return self.apply(model)

    def ranges(self) -> list[dict]:
        """Consecutive blocks with the same choice: ``choice``, ``first``, ``last``, ``count``."""
        out: list[dict] = []
        for name, choice in zip(self.blocks, self.choices, strict=True):
            if out and out[-1]["choice"] == choice:
                out[-1]["last"] = name
                out[-1]["count"] += 1
            else:
                out.append({"choice": choice, "first": name, "last": name, "count": 1})
        return out

    def describe(self) -> str:
        """Compact ranges: "checkpoint layer1.0..layer2.1 (5), lean layer2.2..layer4.2 (11)"."""
        parts = []
        for item in self.ranges():
            span = item["first"] if item["count"] == 1 else f"{item['first']}..{item['last']}"
            parts.append(f"{item['choice']} {span} ({item['count']})")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_size"] = list(self.input_size) if self.input_size else None
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a leanstep plan (format {found!r}, expected {FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"plan: unknown key(s) {', '.join(unknown)}")
        return cls(**fields)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"plan is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"plan file {str(path)!r} not found")
        return cls.from_json(path.read_text())


# ---------------------------------------------------------------------------------------------
# Building the model to plan for


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no data)."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(model, memo)


def _builder(model, *, num_classes: int, in_channels: int, options: dict
             ) -> tuple[Callable[[], nn.Module], str | None]:
    """A function building the model (called on the meta device) and its spec, if any."""
    if isinstance(model, str):
        from leanstep.bench.specs import build_from_spec

        return (lambda: build_from_spec(model, num_classes=num_classes,
                                        in_channels=in_channels, options=options)), model
    if options:
        raise ValueError("options apply to a model spec (a string), not to a model object")
    if isinstance(model, nn.Module):
        return (lambda: _meta_copy(model)), None
    if callable(model):
        def build() -> nn.Module:
            built = model()
            if not isinstance(built, nn.Module):
                raise ValueError(f"the model builder returned a {type(built).__name__}, "
                                 "not an nn.Module")
            return built

        return build, None
    raise ValueError(f"plan needs a model spec, an nn.Module or a function building one; got "
                     f"{type(model).__name__}")


def _check_settings(batch_size, precision, optimizer, device_like) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be an int >= 1, got {batch_size!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "amp_fp16" and device_like != "cuda":
        raise ValueError("precision 'amp_fp16' is planned CUDA-like only: add "
                         "device_like='cuda' (--device-like cuda)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if device_like not in DEVICE_LIKES:
        raise ValueError(f"unknown device_like {device_like!r}; valid: {', '.join(DEVICE_LIKES)}")


def _budget_bytes(memory) -> int:
    if isinstance(memory, str):
        return parse_budget(memory)
    if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
        return memory
    raise ValueError(f"memory must be a budget string such as '16GiB' or a number of bytes > 0, "
                     f"got {memory!r}")


def _inplace_abn_activation(meta: nn.Module, blocks: list[str], allow_change: bool
                            ) -> tuple[str | None, str | None]:
    """Whether InplaceABN is a choice: (activation to convert with, None) or (None, reason)."""
    from leanstep.transforms import convert_norm_act, find_blocks

    reason = None
    for activation in (None, "leaky_relu") if allow_change else (None,):
        trial = copy.deepcopy(meta)
        converted = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _, block in find_blocks(trial, blocks):
                    converted += len(convert_norm_act(block, norm="inplace_abn",
                                                      activation=activation).converted)
        except ValueError as error:
            reason = ("activation not invertible; --allow-activation-change converts it to "
                      f"leaky_relu ({str(error).split(':', 1)[-1].strip().split(';')[0]})")
            continue
        if converted:
            return activation, None
        reason = "no BatchNorm + activation pair to convert in the blocks"
    return None, reason


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class _Context:
    """What every prediction of one planning run shares."""

    build: Callable[[], nn.Module]
    blocks: list[str]
    activation: str | None
    input_size: tuple[int, int]
    in_channels: int
    precision: str
    optimizer: str
    device_like: str
    progress: Callable[[str], None]

    def model_fn(self, assignment: list[str]) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            return apply_assignment(self.build(), self.blocks, assignment, self.activation)

        return build

    def fake_step(self, assignment: list[str]) -> FakeStep:
        return FakeStep(
            self.model_fn(assignment), self.blocks, input_size=self.input_size,
            in_channels=self.in_channels, precision=self.precision, optimizer=self.optimizer,
            device_like=self.device_like,
        )

    def trace(self, assignment: list[str], batch_size: int) -> Trace:
        return self.fake_step(assignment).trace(batch_size)


def _breakdown(memory: dict) -> dict:
    """A peak's MiB grouped: state (parameters + gradients + optimizer state + buffers),
    activations, temporaries, input."""
    state = sum(memory.get(k, 0.0) for k in
                ("parameters", "gradients", "optimizer_state", "buffers"))
    return {
        "state_mib": state, "activations_mib": memory.get("activations", 0.0),
        "temporaries_mib": memory.get("temporaries", 0.0), "input_mib": memory.get("input", 0.0),
    }


def _nothing_fits(context: _Context, table: Table, allowed, budget: int, batch_size: int
                  ) -> NothingFitsError:
    assignment = smallest_peak(table, allowed)
    context.progress("predicting the smallest achievable peak")
    trace = context.trace(assignment, batch_size)
    _, where = table.peak_parts(assignment)
    parts = _breakdown(trace.memory)
    memory = trace.memory
    budget_mib = budget / MIB
    state = (f"parameters + gradients + optimizer state = {_size(parts['state_mib'] * MIB)} "
             f"(parameters {_size(memory['parameters'] * MIB)}, gradients "
             f"{_size(memory['gradients'] * MIB)}, optimizer state "
             f"{_size(memory['optimizer_state'] * MIB)})")
    if parts["state_mib"] >= budget_mib:
        dominant = f"{state}, already over the {_size(budget)} budget"
    else:
        dominant = (f"activations {_size(parts['activations_mib'] * MIB)}, temporaries "
                    f"{_size(parts['temporaries_mib'] * MIB)}, input "
                    f"{_size(parts['input_mib'] * MIB)}, {state}; at {where}")
    message = (f"nothing fits {_size(budget)}: the smallest achievable peak at batch "
               f"{batch_size} is {_size(trace.peak)} ({_ranges_text(context.blocks, assignment)}); "
               f"{dominant}")
    return NothingFitsError(message, {
        "budget_mib": budget_mib, "smallest_peak_mib": trace.peak / MIB,
        "assignment": assignment, "memory": trace.memory, **parts, "peak_at": where,
    })


def _ranges_text(blocks: list[str], assignment: list[str]) -> str:
    return Plan(blocks=blocks, choices=assignment).describe()


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / MIB:.0f} MiB"


def _batch_one_trains(meta: nn.Module, in_channels: int, size: tuple[int, int]) -> bool:
    """False if a BatchNorm would see one value per channel at batch 1 (it cannot train)."""
    single = []

    def check(module, inputs):
        x = inputs[0]
        if x.dim() >= 2 and x.numel() // max(x.shape[1], 1) <= 1:
            single.append(module)

    hooks = [m.register_forward_pre_hook(check) for m in meta.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    training = meta.training
    meta.eval()
    try:
        with torch.no_grad():
            meta(torch.ones(1, in_channels, *size, device="meta"))
    except Exception:  # data-dependent code on meta tensors: assume batch 1 trains
        pass
    finally:
        for hook in hooks:
            hook.remove()
        meta.train(training)
    return not single


def _max_batch(context: _Context, table: Table, assignment: list[str], budget: int,
               start: int, known: dict[int, int]) -> dict:
    """Largest batch whose predicted peak fits: searched on the scaled composed figures, then
    confirmed (and corrected if needed) with real predictions. ``known``: {batch: peak bytes}
    already predicted."""
    estimate = largest_batch(
        lambda b: table.scaled(b).peak(assignment) / MIB, budget / MIB, start=start,
    )["batch_size"]
    cache = dict(known)
    fake_step = None

    def fits(batch: int) -> bool:
        nonlocal fake_step
        if batch not in cache:
            fake_step = fake_step or context.fake_step(assignment)
            cache[batch] = fake_step.trace(batch).peak
        return cache[batch] <= budget

    batch = max(estimate, start)
    if fits(batch):
        low, high, step = batch, None, 1
        while high is None and low < MAX_BATCH:
            probe = min(low + step, MAX_BATCH)
            if fits(probe):
                low, step = probe, step * 2
            else:
                high = probe
    else:
        high, low, step = batch, None, 1
        while low is None:
            probe = max(high - step, start)
            if fits(probe):
                low = probe
            elif probe == start:
                return {"batch_size": 0, "predicted_mib": cache[start] / MIB,
                        "estimated": estimate, "predictions": len(cache) - len(known)}
            else:
                high, step = probe, step * 2
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return {"batch_size": low, "predicted_mib": cache[low] / MIB, "estimated": estimate,
            "predictions": len(cache) - len(known)}


def plan(
    model,
    *,
    memory,
    batch_size: int,
    input_size=224,
    in_channels: int = 3,
    num_classes: int = 1000,
    options: dict | None = None,
    precision: str = "fp32",
    optimizer: str = "sgd",
    device_like: str = "cpu",
    blocks=None,
    allow_activation_change: bool = False,
    rates: Rates | None = None,
    max_batch: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """The fastest assignment of plain / lean / checkpoint (/ InplaceABN) to the blocks of
    ``model`` whose predicted training-step peak fits ``memory``.

    ``model``: a spec ("resnet50", "timm:NAME", "pkg.mod:fn"; ``options`` are its keywords), an
    ``nn.Module`` (planned on a weightless copy) or a function building one. ``memory``: "16GiB",
    "800MB", ... or bytes. ``input_size``: S or (H, W) or "HxW". ``blocks``: module or class
    names (default: found automatically). InplaceABN is a choice where the blocks' activations
    are invertible, or with ``allow_activation_change`` (converted to leaky_relu: outputs
    change). ``rates``: the time model's throughputs (``cost.calibrate``; default: the device
    kind's). ``max_batch``: also search the largest batch of the plan and the baselines.

    Raises ValueError for bad input, ``NothingFitsError`` when no assignment fits.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    progress = progress or (lambda message: None)
    budget = _budget_bytes(memory)
    _check_settings(batch_size, precision, optimizer, device_like)
    size = parse_input_size(input_size)
    build, spec = _builder(model, num_classes=num_classes, in_channels=in_channels,
                           options=dict(options or {}))
    from leanstep.transforms import find_blocks

    with torch.device("meta"):
        meta = build()
    names = [name for name, _ in find_blocks(meta, blocks)]
    activation, abn_reason = _inplace_abn_activation(meta, names, allow_activation_change)
    choices = ["plain", "lean", "checkpoint"] + (["inplace_abn"] if abn_reason is None else [])
    context = _Context(build, names, activation, size, in_channels, precision, optimizer,
                       device_like, progress)
    traces: dict[str, Trace] = {}
    for number, choice in enumerate(choices, 1):
        progress(f"tracing every block {choice} ({number}/{len(choices)})")
        traces[choice] = context.trace([choice] * len(names), batch_size)
    table = Table.from_traces(names, traces, batch_size)
    rates = rates or default_rates(device_like)
    seconds = {c: [rates.seconds(w) for w in table.work[c]] for c in choices}
    allowed = [list(choices)] * len(names)

    def cost(choice: str, index: int) -> float:
        return seconds[choice][index]

    limit = budget
    chosen, confirmed = None, None
    for _ in range(_RETRIES):
        chosen = fastest(table, limit, cost, allowed)
        if chosen is None:
            break
        uniform = len(set(chosen)) == 1
        progress("predicting the chosen plan")
        confirmed = traces[chosen[0]] if uniform else context.trace(chosen, batch_size)
        if confirmed.peak <= budget:
            break
        limit -= confirmed.peak - table.peak(chosen) + 1
        chosen = None
    if chosen is None:
        raise _nothing_fits(context, table, allowed, budget, batch_size)

    plain_s = rates.seconds(table.work_of(["plain"] * len(names)))
    scale = rates.plain_step_s / plain_s if rates.plain_step_s else 1.0

    def figures(assignment: list[str], peak: int, memory_mib: dict) -> dict:
        modelled = rates.seconds(table.work_of(assignment))
        return {
            "predicted_mib": peak / MIB, "fits": peak <= budget,
            "estimated_step_s": modelled * scale, "slowdown": modelled / plain_s,
            "memory": memory_mib,
        }

    report = {
        "budget_mib": budget / MIB,
        "plan": {**figures(chosen, confirmed.peak, confirmed.memory),
                 "composed_mib": table.peak(chosen) / MIB},
        "plain": figures(["plain"] * len(names), traces["plain"].peak, traces["plain"].memory),
        "baselines": {
            c: figures([c] * len(names), traces[c].peak, traces[c].memory) for c in BASELINES
        },
        "choices": choices,
        "inplace_abn": (f"not a choice: {abn_reason}" if abn_reason is not None else
                        f"converts activations to {activation}: outputs change" if activation
                        else None),
        "estimate": {"rates": rates.to_dict(), "calibrated": rates.plain_step_s is not None},
    }
    if max_batch:
        start = 1 if _batch_one_trains(meta, in_channels, size) else 2
        for label, assignment in (("plan", chosen), *((c, [c] * len(names)) for c in BASELINES)):
            progress(f"largest batch: {label}")
            known = {batch_size: confirmed.peak if label == "plan" else traces[label].peak}
            found = _max_batch(context, table, assignment, budget, start, known)
            target = report["plan"] if label == "plan" else report["baselines"][label]
            target["max_batch"] = found["batch_size"]
            target["max_batch_predicted_mib"] = found["predicted_mib"]
            target["max_batch_predictions"] = found["predictions"]
    report["seconds"] = time.perf_counter() - started
    report["cpu_seconds"] = time.process_time() - cpu_started
    return Plan(
        blocks=names, choices=chosen, model=spec, options=dict(options or {}),
        activation=activation if "inplace_abn" in chosen else None, batch_size=batch_size,
        input_size=size, in_channels=in_channels, num_classes=num_classes, precision=precision,
        optimizer=optimizer, device_like=device_like, budget_bytes=budget, report=report,
    )

