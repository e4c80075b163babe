"""Issue 9's targets: lean / checkpoint_blocks against the plain step, memory and time.

Per model (efficientnet_b0 bs16 160 px, resnet50 bs16 160 px, vgg16_bn bs16 224 px by
default) and variant (plain, lean, checkpoint = checkpoint_blocks every 1, lean+checkpoint):

- memory: predicted peak and activation memory (fake tensors, ``predict_peak``), and with
  ``--measure-memory`` MemTracker's measured peak of the real step after a warm-up step
  (deterministic; the prediction equals it within 1%);
- time (``--time``): every (variant, round) in a fresh process, variants interleaved over
  ``--rounds`` rounds, each process warm-up steps then ``--runs`` x ``--iters`` timed steps with
  leanstep's ``time_step`` (no tracker active); medians of the step time and their ratio to
  plain.

    .venv/bin/python benchmarks/lean_targets.py                     # predicted memory, seconds
    .venv/bin/python benchmarks/lean_targets.py --measure-memory    # + measured peaks (minutes)
    .venv/bin/python benchmarks/lean_targets.py --time --rounds 5   # step times (idle machine!)

Targets (issue 9): efficientnet_b0 lean act <= 0.45x, time <= 1.15x; resnet50 lean act
<= 0.85x, time <= 1.08x; vgg16_bn: report peak and activation ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from functools import partial

import leanstep
from leanstep.bench.memory import measured_peak
from leanstep.bench.predict import predict_peak
from leanstep.bench.step import TrainStep
from leanstep.models import create_model

CASES = {"efficientnet_b0": (16, 160), "resnet50": (16, 160), "vgg16_bn": (16, 224)}
VARIANTS = ("plain", "lean", "checkpoint", "lean+checkpoint")


def build(name: str, variant: str):
    model = create_model(name)
    if "lean" in variant:
        leanstep.lean(model)
    if "checkpoint" in variant:
        leanstep.checkpoint_blocks(model)
    return model


def memory(name: str, variant: str, measure: bool) -> dict:
    batch, size = CASES[name]
    predicted = predict_peak(partial(build, name, variant), batch_size=batch, image_size=size)
    row = {"predicted_mib": predicted["predicted_mib"],
           "predicted_act_mib": predicted["memory"]["activations"]}
    if measure:
        step = TrainStep(build(name, variant), batch_size=batch, image_size=size)
        step()
        peak = measured_peak(step, *step.tracked_objects())
        row.update(measured_mib=peak["peak_mib"], measured_act_mib=peak["memory"]["activations"])
    return row


def time_one(name: str, variant: str, runs: int, iters: int, threads: int) -> float:
    """Median step time (ms) of ``variant`` in this process."""
    import torch

    from leanstep.bench.measurement import measure, warm_up

    torch.set_num_threads(threads)
    batch, size = CASES[name]
    step = TrainStep(build(name, variant), batch_size=batch, image_size=size)
    warm_up(step, 2)
    return measure(step, runs=runs, iters=iters).median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--measure-memory", action="store_true")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--_time_one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args._time_one:
        print(json.dumps(time_one(*args._time_one, args.runs, args.iters, args.threads)))
        return
    models, variants = args.models.split(","), args.variants.split(",")
    for name in models:
        if name not in CASES:
            sys.exit(f"unknown model {name!r}; valid: {', '.join(CASES)}")
    for variant in variants:
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    for name in models:
        batch, size = CASES[name]
        rows = {v: memory(name, v, args.measure_memory) for v in variants}
        base = rows[variants[0]]
        print(f"{name} batch {batch}, {size} px (ratios against {variants[0]})")
        for variant, row in rows.items():
            line = (f"  {variant:16s} predicted peak {row['predicted_mib']:8.1f} MiB "
                    f"({row['predicted_mib'] / base['predicted_mib']:.3f}x)  act "
                    f"{row['predicted_act_mib']:8.1f} MiB "
                    f"({row['predicted_act_mib'] / base['predicted_act_mib']:.3f}x)")
            if args.measure_memory:
                line += (f" | measured peak {row['measured_mib']:8.1f} MiB act "
                         f"{row['measured_act_mib']:8.1f} MiB "
                         f"({row['measured_act_mib'] / base['measured_act_mib']:.3f}x)")
            print(line, flush=True)
        if not args.time:
            continue
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:  # interleaved, one fresh process per (variant, round)
                out = subprocess.run(
                    [sys.executable, __file__, "--_time_one", name, variant, "--runs",
                     str(args.runs), "--iters", str(args.iters), "--threads", str(args.threads)],
                    check=True, capture_output=True, text=True)
                times[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
        plain = statistics.median(times[variants[0]])
        for variant in variants:
            median = statistics.median(times[variant])
            print(f"  {variant:16s} step {median:9.1f} ms median of {len(times[variant])} "
                  f"processes ({median / plain:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
