"""The ``leanstep`` command line: one subcommand per module under ``leanstep.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# Subcommand name -> module defining `add_arguments(parser)` and `run(args) -> int`;
# the module docstring's first line is the subcommand's help.
COMMANDS = {
    "list": "leanstep.commands.list_choices",
    "layers": "leanstep.commands.layers",
    "bench": "leanstep.commands.bench",
    "report": "leanstep.commands.report",
    "predict": "leanstep.commands.predict",
    "max-batch": "leanstep.commands.max_batch",
    "verify": "leanstep.commands.verify",
    "plan": "leanstep.commands.plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanstep",
        description="Lean CNN training steps: layers, models, and a benchmark that measures them.",
    )
    from leanstep import __version__

    parser.add_argument("--version", action="version", version=f"leanstep {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; bad input is one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args._argv = argv  # the command line as given, for hints that repeat it
    # A warning is one line, as errors are (not Python's file:line and source line).
    default_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: (
        f"leanstep {args.command}: warning: {message}\n")
    try:
        return args._run(args)
    except ValueError as error:
        print(f"leanstep {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
