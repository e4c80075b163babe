"""leanstep: memory-lean CNN training steps, and a benchmark that measures them."""

__version__ = "0.1.0"
