"""What InplaceABN's protected channels cost in step time; and InplaceABN vs ABN compiled.

One process, every variant alive, steps interleaved (so machine drift hits all alike), medians:

- ``abn``: ABN, the baseline;
- ``inplace_abn``: InplaceABN as shipped (the default budget of protected channels);
- ``unprotected_identity``: InplaceABN with no protected channels in its identity layers;
- ``unprotected``: InplaceABN with no protected channels at all.

The two unprotected variants are diagnostics only: without protection, a channel with a large
|beta / gamma| gets inaccurate gradients (see ``leanstep.layers.inplace_abn_function``).
Compiled, InplaceABN runs ABN's maths and protects nothing, so ``--compile`` compares ``abn``
and ``inplace_abn`` (the default there) and rejects the unprotected variants.

    .venv/bin/python benchmarks/inplace_abn_protect_cost.py --compile        # resnet50 bs16 128 px
    .venv/bin/python benchmarks/inplace_abn_protect_cost.py --model se_resnext50_32x4d --bs 8

Run it on an idle machine, nothing else heavy alongside. Interleaving the models' steps in one
process lets each evict the other's caches, which hides part of a difference: SE-ResNeXt50
batch 8 measured inplace_abn / abn 1.031 here, 1.066 with one model per process and
consecutive steps (six processes each), which is what training does and ``leanstep bench``
measures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leanstep.layers.norm_act import InplaceABN
from leanstep.models import create_model

VARIANTS = ("abn", "inplace_abn", "unprotected_identity", "unprotected")


def build(variant: str, model: str, compile_: bool):
    torch.manual_seed(0)
    norm = "abn" if variant == "abn" else "inplace_abn"
    net = create_model(model, norm=norm, activation="leaky_relu")
    for layer in net.modules():
        if isinstance(layer, InplaceABN) and (
                variant == "unprotected"
                or (variant == "unprotected_identity" and layer.activation_name == "identity")):
            layer.protected_channels = 0
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    return (torch.compile(net) if compile_ else net), optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--bs", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--variants", help="comma list, the first is the baseline (default: "
                        "all; with --compile: abn,inplace_abn)")
    args = parser.parse_args()
    valid = VARIANTS[:2] if args.compile else VARIANTS
    variants = tuple(args.variants.split(",")) if args.variants else valid
    for variant in variants:
        if variant not in valid:
            parser.error(f"--variants: {variant!r} is not one of {', '.join(valid)}"
                         + (" (compiled, InplaceABN protects nothing)" if args.compile else ""))
    if args.bs < 2 or args.size < 32 or args.steps < 1:
        parser.error("--bs must be >= 2, --size >= 32, --steps >= 1")
    images = torch.randn(args.bs, 3, args.size, args.size)
    steps = {variant: build(variant, args.model, args.compile) for variant in variants}

    def step(variant: str) -> float:
        net, optimizer = steps[variant]
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        net(images).mean().backward()
        optimizer.step()
        return (time.perf_counter() - started) * 1e3

    for variant in variants:  # warm-up (and compilation)
        seconds = (step(variant) + step(variant)) / 1e3
        print(f"{variant}: warm-up {seconds:.1f} s", flush=True)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_ in range(args.steps):
        for variant in (variants if round_ % 2 == 0 else variants[::-1]):
            times[variant].append(step(variant))
    base = statistics.median(times[variants[0]])
    mode = "compiled" if args.compile else "eager"
    print(f"{args.model} bs {args.bs} {args.size} px, {mode}, {args.steps} interleaved steps")
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"  {variant:22s} median {median:8.1f} ms  min {min(times[variant]):8.1f} ms  "
              f"x {variants[0]} {median / base:.3f}")


if __name__ == "__main__":
    main()
