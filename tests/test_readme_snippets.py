"""Every ```python block of README.md runs (so the README cannot rot).

The test takes whatever python blocks the README has. A block may say what it needs in an HTML
comment on the line just before its fence, shown on GitHub as nothing:
``<!-- snippet: needs torchvision -->`` (skipped, with the reason, unless those packages
import) or ``<!-- snippet: skip REASON -->``. Keep blocks cheap: tiny tensors, no downloads.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!--\s*snippet:\s*(needs|skip)\b\s*(.*?)\s*-->")


def _blocks() -> list[tuple[int, str, tuple[str, str] | None]]:
    """(line, code, marker) of every python block; marker: ("needs"|"skip", text) or None."""
    text = README.read_text()
    blocks = []
    for found in _BLOCK.finditer(text):
        before = text[: found.start()].rstrip("\n").splitlines()
        marker = _MARKER.search(before[-1]) if before else None
        line = text.count("\n", 0, found.start()) + 1
        blocks.append((line, found[1], marker.groups() if marker else None))
    return blocks


def test_the_readme_has_python_blocks():
    assert README.is_file() and _blocks()


@pytest.mark.parametrize(
    ("line", "code", "marker"), _blocks(), ids=[f"README.md:{line}" for line, *_ in _blocks()]
)
def test_readme_snippet_runs(line, code, marker):
    if marker and marker[0] == "skip":
        pytest.skip(f"README.md:{line}: {marker[1] or 'marked skip'}")
    if marker and marker[0] == "needs":
        missing = [name for name in re.split(r"[\s,]+", marker[1])
                   if name and importlib.util.find_spec(name) is None]
        if missing:
            pytest.skip(f"README.md:{line} needs {', '.join(missing)} (not installed)")
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme_snippet"})
