"""Subcommands of the ``leanstep`` command line, one module each."""
