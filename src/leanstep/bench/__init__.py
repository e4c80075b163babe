"""Measuring training steps: timing, memory (measured and predicted), suites, reports."""
