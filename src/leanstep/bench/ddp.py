"""``leanstep bench --ddp``: time a training step on every rank of a torchrun launch.

Launched as ``torchrun --nproc_per_node=N -m leanstep bench MODEL ... --ddp``, every process
(rank) builds the same case, wraps the model in ``DistributedDataParallel`` and takes its share of
the global batch (``--bs``; an uneven split gives the first ranks one image more). Each rank times
its own steps with the harness's methodology: ``TrainStep``'s forward and backward phases, W
warm-up steps, then R runs x I iterations, mean +- std over the run averages, median and IQR of
the step time, then a separate memory pass. Backward therefore includes DDP's gradient all-reduce.
Ranks start every run together (a barrier); rank 0 alone appends the JSONL row.

The process group's backend follows the device: gloo on CPU, nccl on CUDA (each rank on
``cuda:LOCAL_RANK``). Cases run one after another in the rank process itself, not in fresh
workers, since the ranks must stay in step: a rank that fails ends the launch (torchrun stops the
others) and rank 0 records the failure if it can.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import Case, build_model, make_step
from .device import device_name
from .flops import count_step_flops
from .measure import memory_pass
from .measurement import measure, warm_up
from .report import render_table
from .results import ResultsFile, environment
from .runner import make_row
from .validate import validate_case
from .worker import failure_status

__all__ = [
    "Launch",
    "backend_for",
    "check_launch",
    "run_ddp",
    "split_batch",
    "torchrun_launch",
]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# How long rank 0 waits for the first failing rank's reason (written before that rank exits).
FAILURE_WAIT = datetime.timedelta(seconds=10)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_launch(environ: dict | None = None) -> Launch:
    """This process's place in the launch, read from torchrun's environment variables.

    Raises ValueError naming the missing variables when the process was not started by torchrun.
    """
    environ = os.environ if environ is None else environ
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise ValueError(
            f"--ddp needs torchrun's environment ({', '.join(missing)} not set); launch with "
            f"`torchrun --nproc_per_node=N -m leanstep bench ... --ddp`"
        )
    world_size = int(environ["WORLD_SIZE"])
    return Launch(
        rank=int(environ["RANK"]),
        world_size=world_size,
        local_rank=int(environ["LOCAL_RANK"]),
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world_size)),
    )


def split_batch(global_batch: int, world_size: int, label: str = "--bs") -> list[int]:
    """Each rank's share of ``global_batch``: as even as possible, the first ranks one more."""
    if global_batch < world_size:
        raise ValueError(
            f"{label} {global_batch} is smaller than the world size {world_size}: every rank "
            f"needs at least one image; use {label} >= {world_size}"
        )
    share, extra = divmod(global_batch, world_size)
    return [share + (rank < extra) for rank in range(world_size)]


def backend_for(device: str) -> str:
    """The process-group backend for ``device``: gloo on CPU, nccl on CUDA."""
    kind = torch.device(device).type
    backends = {"cpu": "gloo", "cuda": "nccl"}
    if kind not in backends:
        raise ValueError(f"--ddp runs on cpu or cuda, got device {device!r}")
    return backends[kind]


def _local_device(device: str, launch: Launch) -> torch.device:
    if torch.device(device).type != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if launch.local_world_size > torch.cuda.device_count():
        raise ValueError(
            f"{launch.local_world_size} ranks on this node but {torch.cuda.device_count()} GPU(s) "
            f"visible; use --nproc_per_node <= {torch.cuda.device_count()}"
        )
    return torch.device("cuda", launch.local_rank)


def _rank_case(case: Case, launch: Launch, device: torch.device) -> Case:
    """``case`` as this rank runs it: its share of the (memory) batch, on its own device."""
    memory_batch = case.memory_batch_size
    if memory_batch:
        memory_batch = split_batch(memory_batch, launch.world_size, "memory batch size")[
            launch.rank
        ]
    return dataclasses.replace(
        case,
        batch_size=split_batch(case.batch_size, launch.world_size)[launch.rank],
        memory_batch_size=memory_batch,
        device=str(device),
    )


def _measure_rank(case: Case, launch: Launch, device: torch.device) -> dict:
    """This rank's figures for ``case``, measured as the worker measures one case: warm-up,
    ``measure`` (each run starting on every rank at once), the memory pass, then FLOPs."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    mine = _rank_case(case, launch, device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    model = build_model(mine).to(device, memory_format=memory_format)
    wrapped = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    step = make_step(mine, wrapped)
    warm_up(step, mine.warmup)
    measurement = measure(step, runs=mine.runs, iters=mine.iters, before_run=dist.barrier)
    dist.barrier()
    memory = memory_pass(step, mine)
    summary = measurement.summary(mine.batch_size)
    return {
        "rank": launch.rank,
        "local_rank": launch.local_rank,
        "host": platform.node(),
        "device": str(device),
        "device_name": device_name(device),
        "batch_size": mine.batch_size,
        "params": sum(p.numel() for p in model.parameters()),
        **measurement.to_dict(),
        **summary,
        **memory,
        "flops": count_step_flops(mine, fallback=step),
        "status": "ok",
    }


# Per-iteration lists stay out of a row's per-rank summaries (the row has the slowest rank's).
_RANK_LISTS = ("fwd_ms_iters", "bwd_ms_iters")


def _ddp_fields(launch: Launch, backend: str, ranks: list[dict] | None = None) -> dict:
    fields = {"ddp": True, "world_size": launch.world_size, "backend": backend}
    if ranks:
        fields.update(
            rank_batch_sizes=[r["batch_size"] for r in ranks],
            rank_step_ms=[r["step_ms_median"] for r in ranks],
            rank_peak_mib=[r["peak_mib"] for r in ranks],
            ranks=[{k: v for k, v in r.items() if k not in _RANK_LISTS} for r in ranks],
        )
    return fields


def _row(case: Case, launch: Launch, backend: str, ranks: list[dict], env: dict) -> dict:
    """The harness's row for ``case`` (global batch) from the slowest rank's times, since it
    sets the pace of a synchronised step (so imgs/sec is the aggregate: global batch over that
    step time), the largest peak of any rank, and the FLOPs of all ranks; plus every rank's own
    figures under ``ranks``."""
    slowest = max(ranks, key=lambda r: r["step_ms_median"])
    largest = max(ranks, key=lambda r: r["peak_mib"] or 0.0)  # None: not measured (compiled)
    combined = {
        **slowest,
        **{key: largest.get(key) for key in ("peak_mib", "reserved_mib", "memory",
                                             "memory_note")},
        "flops": sum(r["flops"] for r in ranks),
    }
    return {**make_row(case, [combined], env), **_ddp_fields(launch, backend, ranks)}


def _failure(error: BaseException, launch: Launch) -> dict:
    reason = (str(error).strip().splitlines() or [""])[0]
    return {
        "status": failure_status(error),
        "error": f"rank {launch.rank}: {type(error).__name__}: {reason}",
    }


def _first_failure(case: Case, launch: Launch, error: BaseException) -> dict:
    """The failure of the rank that failed first on ``case``, as rank 0 should record it.

    A rank that fails makes the others fail in their next collective ("connection closed by
    peer"), which says nothing of the cause. So every failing rank counts itself in the launch's
    store (torchrun's rendezvous store, which needs no collective); the first one writes its
    reason there before it exits, and rank 0 reads that reason rather than its own symptom.
    """
    mine = _failure(error, launch)
    try:
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        prefix = f"leanstep/failure/{case.index}"
        if store.add(f"{prefix}/count", 1) == 1:
            store.set(f"{prefix}/first", json.dumps(mine))
            return mine
        if launch.rank == 0:
            store.wait([f"{prefix}/first"], FAILURE_WAIT)
            return json.loads(store.get(f"{prefix}/first"))
    except Exception:  # no store, or it is gone: this rank's own failure is all there is
        pass
    return mine


def _failure_row(case: Case, launch: Launch, backend: str, failure: dict, env) -> dict:
    return {**make_row(case, [failure], env), **_ddp_fields(launch, backend)}


def _summary(row: dict) -> str:
    ranks = "; ".join(
        f"rank {r['rank']}: bs {r['batch_size']}, step {r['step_ms_median']:.2f} ms, "
        f"peak {r['peak_mib']:.1f} MiB"
        for r in row["ranks"]
    )
    return (
        f"{row['name']}: {row['world_size']} ranks ({row['backend']}), global bs "
        f"{row['batch_size']}: {row['imgs_per_sec']:.2f} imgs/sec; {ranks}"
    )


def check_launch(cases: list[Case], launch: Launch) -> None:
    """Launch problems (a batch smaller than the world size, a rank without a GPU, mixed
    devices) and the harness's checks at the smallest share of a batch, as ValueError."""
    devices = {case.device_type for case in cases}
    if len(devices) != 1:
        raise ValueError(f"--ddp runs every case on one device kind, got {sorted(devices)}")
    backend_for(cases[0].device)
    _local_device(cases[0].device, launch)
    for case in cases:
        split_batch(case.batch_size, launch.world_size)
        if case.memory_batch_size:
            split_batch(case.memory_batch_size, launch.world_size, "memory batch size")
        _validate_rank_share(case, launch)


def run_ddp(cases: list[Case], out: str | Path, launch: Launch | None = None) -> int:
    """Run ``cases`` (validated, defaults resolved) on this rank in turn; rank 0 appends one row
    per case to ``out``. Call it on every rank of a torchrun launch.

    Launch problems (no torchrun environment, a batch smaller than the world size, a rank without
    a GPU) raise ValueError before the process group starts. Returns 0 if every case ran, 1 if
    one failed (the launch stops there).
    """
    launch = torchrun_launch() if launch is None else launch
    check_launch(cases, launch)
    device = _local_device(cases[0].device, launch)
    out = Path(out)

    backend = backend_for(cases[0].device)

    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    dist.init_process_group(
        backend, rank=launch.rank, world_size=launch.world_size, timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    env = environment() if launch.rank == 0 else {}
    rows = []
    results = ResultsFile(out, new=True) if launch.rank == 0 else None
    if results is not None:
        results.open()
    try:
        for case in cases:
            torch.set_num_threads(case.threads)
            try:
                mine = _measure_rank(case, launch, device)
            except Exception as error:  # recorded; the ranks are out of step now, so stop
                print(f"leanstep bench --ddp: rank {launch.rank}: {error}", file=sys.stderr)
                failure = _first_failure(case, launch, error)
                if launch.rank == 0:
                    results.append(_failure_row(case, launch, backend, failure, env))
                return 1
            ranks = [None] * launch.world_size
            dist.all_gather_object(ranks, mine)
            if launch.rank == 0:
                rows.append(_row(case, launch, backend, ranks, env))
                results.append(rows[-1])
                print(_summary(rows[-1]), flush=True)
        if launch.rank == 0:
            render_table(rows)
            print(f"results: {out}", flush=True)
        # Every rank tears the group down together, once nothing of a case is left to free:
        # a rank that closes its connections while a peer still holds work in flight can abort
        # in gloo's teardown, after every row was written.
        gc.collect()
        dist.barrier()
        return 0
    finally:
        if results is not None:
            results.close()
        dist.destroy_process_group()


def _validate_rank_share(case: Case, launch: Launch) -> None:
    """The harness's checks, at the smallest share of the batch that a rank gets."""
    share = dataclasses.replace(
        case,
        batch_size=min(split_batch(case.batch_size, launch.world_size)),
        memory_batch_size=case.memory_batch_size
        and min(split_batch(case.memory_batch_size, launch.world_size, "memory batch size")),
    )
    try:
        validate_case(share)
    except ValueError as error:
        if share.batch_size == case.batch_size:
            raise
        raise ValueError(
            f"{error} (a rank's share of --bs {case.batch_size} over {launch.world_size} ranks)"
        ) from None
