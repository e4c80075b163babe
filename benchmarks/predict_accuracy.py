"""Predicted vs measured peak memory over the whole model zoo.

For every leanstep model with norm bn, abn and inplace_abn, each plain and with
checkpoint="blocks", at a small batch: the prediction (``leanstep.bench.predict``, fake tensors)
beside the measurement (MemTracker's peak of the real step after one warm-up step, as
``leanstep bench`` takes it on CPU). Prints one line per case and the spread,
max |predicted - measured| / measured; exit code 1 if a case is off by more than 1%.

    .venv/bin/python benchmarks/predict_accuracy.py [--bs 8] [--size 96] [--models a,b]

"act" is the share of activations and temporaries in the measured peak: where it is high the
peak falls in the backward pass, where it is low in the optimizer step.

Runs the real steps, so it takes minutes on two cores (the VGGs allocate about 2 GiB each).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from functools import partial

import torch

from leanstep.bench.memory import measured_peak
from leanstep.bench.predict import predict_peak
from leanstep.bench.step import TrainStep
from leanstep.models import create_model, list_models

NORMS = ("bn", "abn", "inplace_abn")
CHECKPOINTS = (None, "blocks")
ACCURACY = 0.01


def measured(model_fn, batch_size: int, image_size: int) -> dict:
    step = TrainStep(model_fn(), batch_size=batch_size, image_size=image_size)
    step()
    peak = measured_peak(step, *step.tracked_objects())
    del step
    gc.collect()
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bs", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--size", type=int, default=96, help="image size (default 96)")
    parser.add_argument("--models", help="comma list of models (default: every model)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models.split(",") if args.models else list_models()

    started = time.perf_counter()
    predict_peak(partial(create_model, "resnet18"), batch_size=2, image_size=32)
    print(f"first prediction in this process (torch's lazy imports): "
          f"{time.perf_counter() - started:.1f} s")
    errors, slowest = [], 0.0
    print(f"{'model':<20} {'norm':<12} {'checkpoint':<10} {'predicted':>10} {'measured':>10} "
          f"{'error':>9} {'act':>5} {'predict s':>9}")
    for name in models:
        for norm in NORMS:
            for checkpoint in CHECKPOINTS:
                activation = None if norm == "bn" else "leaky_relu"
                model_fn = partial(
                    create_model, name, norm=norm, activation=activation, checkpoint=checkpoint
                )
                started = time.perf_counter()
                predicted = predict_peak(model_fn, batch_size=args.bs, image_size=args.size)
                seconds = time.perf_counter() - started
                torch.manual_seed(0)
                real = measured(model_fn, args.bs, args.size)
                peak = real["peak_mib"]
                error = (predicted["predicted_mib"] - peak) / peak
                active = (real["memory"]["activations"] + real["memory"]["temporaries"]) / peak
                errors.append(abs(error))
                slowest = max(slowest, seconds)
                print(
                    f"{name:<20} {norm:<12} {str(checkpoint):<10} "
                    f"{predicted['predicted_mib']:>10.2f} {peak:>10.2f} {error:>+9.2%} "
                    f"{active:>5.0%} {seconds:>9.1f}",
                    flush=True,
                )
    off = sum(error > ACCURACY for error in errors)
    print(
        f"\n{len(errors)} cases at batch {args.bs}, {args.size} px: spread max |predicted - "
        f"measured| / measured = {max(errors):.4%}; {off} beyond {ACCURACY:.0%}; slowest "
        f"prediction {slowest:.1f} s"
    )
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
