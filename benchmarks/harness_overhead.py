"""How much does `leanstep bench` add to the time of a training step? Goal: under 3%.

Two comparisons of the same step (model, batch, image size, threads), each in pairs run in
alternating order (A B, B A, ...) so that drift and other load on a shared machine hit both sides
alike; the figure is the median over pairs of harness / bare:
  1. in this process: a bare loop (``step()`` in a loop, one perf_counter around the block)
     against the harness's timing pass (``measure``: every iteration's forward and backward
     timed), by wall time; also how much of the harness's wall time its reported figures miss;
  2. across processes (--process-pairs): a fresh process running the bare loop against the whole
     harness (``run_worker``: a fresh worker process, warm-up, timing pass), by the step time
     each reports.

    .venv/bin/python benchmarks/harness_overhead.py [--model resnet18 --bs 4 --size 64]
Exit code 1 if an overhead exceeds --goal percent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from leanstep.bench.cases import Case, make_step
from leanstep.bench.measurement import measure, warm_up
from leanstep.bench.validate import validate_case
from leanstep.bench.worker import run_worker


def _bare_loop(step, iters: int) -> tuple[float, float]:
    """Wall and CPU ms per step of a plain loop."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    return (
        (time.perf_counter() - wall) * 1e3 / iters,
        (time.process_time() - cpu) * 1e3 / iters,
    )


def _harness_loop(step, iters: int) -> tuple[float, float, float]:
    """Reported, wall and CPU ms per step of the harness's timing pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    measurement = measure(step, runs=1, iters=iters)
    wall = (time.perf_counter() - wall) * 1e3 / iters
    cpu = (time.process_time() - cpu) * 1e3 / iters
    reported = sum(measurement.step_ms) / iters
    return reported, wall, cpu


def _bare_process(case: Case, warmup: int) -> tuple[float, float]:
    """Median wall and CPU ms/step of bare-loop runs in a fresh process (--bare-case)."""
    completed = subprocess.run(
        [sys.executable, __file__, "--bare-case", json.dumps(case.to_dict()),
         "--warmup", str(warmup)],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, OMP_NUM_THREADS=str(case.threads)),
    )
    wall, cpu = json.loads(completed.stdout.strip().splitlines()[-1])
    return wall, cpu


def _worker_process(case: Case) -> tuple[float, float]:
    """The whole harness's reported ms/step (median of runs) and its CPU ms/step."""
    result = run_worker(
        {"case": case.to_dict(), "measure_memory": False, "flops": False, "predict": False},
        threads=case.threads,
    )
    if result.get("status") != "ok":
        raise RuntimeError(f"worker failed: {result.get('error')}")
    wall = statistics.median(
        statistics.fmean(f) + statistics.fmean(b)
        for f, b in zip(result["fwd_ms_iters"], result["bwd_ms_iters"], strict=True)
    )
    return wall, result["timing_cpu_s"] * 1e3 / (case.runs * case.iters)


def _in_process(case: Case, pairs: int, iters: int) -> dict:
    torch.manual_seed(0)
    step = make_step(case)
    warm_up(step, case.warmup)
    bare, harness, reported_vs_wall = [], [], []
    for pair in range(pairs):
        for kind in ("bare", "harness") if pair % 2 == 0 else ("harness", "bare"):
            if kind == "bare":
                bare.append(_bare_loop(step, iters))
            else:
                reported, wall, cpu = _harness_loop(step, iters)
                harness.append((wall, cpu))
                reported_vs_wall.append(reported / wall)
    return {
        "bare_ms": statistics.median(wall for wall, _ in bare),
        "wall": [h[0] / b[0] for h, b in zip(harness, bare, strict=True)],
        "cpu": [h[1] / b[1] for h, b in zip(harness, bare, strict=True)],
        "missed": (1 - statistics.median(reported_vs_wall)) * 100,
    }


def _percent(ratios: list[float]) -> str:
    return (
        f"{(statistics.median(ratios) - 1) * 100:+.2f}% "
        f"(pairs {min(ratios) - 1:+.1%} .. {max(ratios) - 1:+.1%})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3, help="steps per block / run")
    parser.add_argument("--pairs", type=int, default=15, help="in-process block pairs")
    parser.add_argument("--process-pairs", type=int, default=0, help="cross-process pairs")
    parser.add_argument("--runs", type=int, default=3, help="runs per process")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--goal", type=float, default=3.0, help="percent")
    parser.add_argument("--bare-case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.bare_case:
        case = Case.from_dict(json.loads(args.bare_case))
        torch.set_num_threads(case.threads)
        torch.manual_seed(0)
        step = make_step(case)
        warm_up(step, args.warmup)
        runs = [_bare_loop(step, case.iters) for _ in range(case.runs)]
        wall = statistics.median(wall for wall, _ in runs)
        print(json.dumps([wall, sum(cpu for _, cpu in runs) / len(runs)]))
        return 0

    torch.set_num_threads(args.threads)
    case = Case(
        "overhead", "overhead", args.model, args.model, batch_size=args.bs,
        image_size=args.size, runs=args.runs, iters=args.iters, warmup=args.warmup,
        threads=args.threads,
    )
    case = case.with_defaults()
    validate_case(case)
    print(f"{args.model}, batch {args.bs}, {args.size} px, {args.threads} thread(s)")
    inside = _in_process(case, args.pairs, args.iters)
    print(f"  in process, {args.pairs} pairs of {args.iters}-step blocks, bare loop "
          f"{inside['bare_ms']:.2f} ms/step:")
    print(f"    harness / bare, wall time {_percent(inside['wall'])}")
    print(f"    harness / bare, CPU time  {_percent(inside['cpu'])}")
    print(f"    share of the harness's wall time outside what it reports: "
          f"{inside['missed']:.3f}%")
    overheads = [statistics.median(inside["wall"]), statistics.median(inside["cpu"])]
    if args.process_pairs:
        walls, cpus, bare_runs = [], [], []
        for pair in range(args.process_pairs):
            order = ("bare", "worker") if pair % 2 == 0 else ("worker", "bare")
            measured = {}
            for kind in order:
                measured[kind] = (
                    _bare_process(case, args.warmup) if kind == "bare" else _worker_process(case)
                )
            bare_runs.append(measured["bare"][0])
            walls.append(measured["worker"][0] / measured["bare"][0])
            cpus.append(measured["worker"][1] / measured["bare"][1])
        print(f"  across processes, {args.process_pairs} pairs of fresh processes "
              f"({args.runs} runs x {args.iters} steps), bare loop "
              f"{statistics.median(bare_runs):.2f} ms/step:")
        print(f"    whole harness / bare, reported vs wall time {_percent(walls)}")
        print(f"    whole harness / bare, CPU time              {_percent(cpus)}")
        overheads.append(statistics.median(cpus))
    print("(wall-time ratios carry the load of a shared machine; CPU-time ratios much less)")
    worst = max(overheads) * 100 - 100
    print(f"largest median overhead {worst:+.2f}% (goal < {args.goal:g}%)")
    return 0 if worst < args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
