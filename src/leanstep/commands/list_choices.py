"""List the activations, norms and models that leanstep can build."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind", nargs="?", choices=("activations", "norms", "models"), help="list only this kind"
    )


def run(args: argparse.Namespace) -> int:
    from leanstep.layers import list_activations, list_norms
    from leanstep.models import list_models

    choices = {"activations": list_activations, "norms": list_norms, "models": list_models}
    for kind, names in choices.items():
        if args.kind in (None, kind):
            print(f"{kind}: {', '.join(names())}")
    return 0
