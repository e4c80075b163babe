"""Reference data kept in tests/data/ (see tests/data/README.md): a missing file fails the
test that needs it, never skips it, so a checkout without the data cannot pass silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"
# Our names for the reference files' entries (timm calls it seresnext50_32x4d).
REFERENCE_NAMES = {"seresnext50_32x4d": "se_resnext50_32x4d"}


def load(filename: str) -> dict:
    """The parsed JSON file ``tests/data/<filename>``; fails the calling test if it is absent."""
    path = DATA_DIR / filename
    if not path.is_file():
        pytest.fail(f"reference data {path} is missing (see tests/data/README.md)", pytrace=False)
    with path.open() as f:
        return json.load(f)
