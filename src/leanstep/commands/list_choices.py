"""List the activations, norms, models and shipped suites that leanstep can build or run."""

from __future__ import annotations

import argparse

KINDS = ("activations", "norms", "models", "suites")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", nargs="?", choices=KINDS, help="list only this kind")


def run(args: argparse.Namespace) -> int:
    from leanstep.bench.suite import list_suites
    from leanstep.layers import list_activations, list_norms
    from leanstep.models import list_models

    choices = {"activations": list_activations, "norms": list_norms, "models": list_models,
               "suites": list_suites}
    for kind, names in choices.items():
        if args.kind in (None, kind):
            print(f"{kind}: {', '.join(names())}")
    return 0
