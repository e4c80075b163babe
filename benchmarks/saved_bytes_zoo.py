"""Saved-for-backward MiB of the zoo's models with each norm and with checkpointing.

One training-mode forward per configuration on CPU (no timing): every storage autograd saves is
counted once (``leanstep.bench.memory.saved_tensor_bytes``). Columns:

- ``bn*`` / ``abn*``: the family's default activation (relu; swish for EfficientNet);
- ``bn`` / ``abn`` / ``iabn``: leaky_relu for all three, so they are comparable (InplaceABN
  needs an invertible activation);
- ``bn+ckpt`` / ``iabn+ckpt``: leaky_relu with ``checkpoint="blocks"``.

Ratios are to ``bn`` (leaky_relu, no checkpointing). Run: ``python benchmarks/saved_bytes_zoo.py``.
"""

from __future__ import annotations

import argparse

import torch

from leanstep.bench.memory import MIB, saved_tensor_bytes
from leanstep.models import create_model

MODELS = ("vgg16_bn", "resnet50", "se_resnext50_32x4d", "efficientnet_b0")
LEAKY = "leaky_relu"
# column -> create_model arguments (activation None: the family default)
CONFIGS = {
    "bn*": {"norm": "bn", "activation": None},
    "abn*": {"norm": "abn", "activation": None},
    "bn": {"norm": "bn", "activation": LEAKY},
    "abn": {"norm": "abn", "activation": LEAKY},
    "iabn": {"norm": "inplace_abn", "activation": LEAKY},
    "bn+ckpt": {"norm": "bn", "activation": LEAKY, "checkpoint": "blocks"},
    "iabn+ckpt": {"norm": "inplace_abn", "activation": LEAKY, "checkpoint": "blocks"},
}
RATIOS = ("abn", "iabn", "bn+ckpt", "iabn+ckpt")


def saved_mib(name: str, batch: int, size: int, **kwargs) -> float:
    """MiB saved for backward by one training-mode forward of ``name``."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).train()
    x = torch.ones(batch, 3, size, size, requires_grad=True)
    return saved_tensor_bytes(model, x) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"saved for backward, MiB (batch {args.batch}, {args.size}x{args.size}, CPU, fp32; "
          f"* = family default activation, others leaky_relu)")
    header = f"{'model':<20}" + "".join(f"{c:>11}" for c in CONFIGS)
    header += "".join(f"{c + '/bn':>14}" for c in RATIOS)
    print(header)
    for name in args.models:
        mib = {column: saved_mib(name, args.batch, args.size, **kwargs)
               for column, kwargs in CONFIGS.items()}
        row = f"{name:<20}" + "".join(f"{mib[c]:>11.1f}" for c in CONFIGS)
        row += "".join(f"{mib[c] / mib['bn']:>14.2f}" for c in RATIOS)
        print(row, flush=True)


if __name__ == "__main__":
    main()
