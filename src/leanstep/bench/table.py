"""The one table renderer of every command: rich on a terminal, the same columns in markdown.

A table is a title, headers and lines of text cells; the first ``left`` columns align left,
the rest right. Outside a terminal rich prints plain text at a width that fits the table.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["console", "markdown_table", "print_table"]


def console(stderr: bool = False, file=None, width: int | None = None):
    """A rich Console; outside a terminal wide enough for benchmark tables."""
    from rich.console import Console

    if file is not None:
        return Console(file=file, width=width or 200)
    made = Console(stderr=stderr)
    if not made.is_terminal:
        made = Console(stderr=stderr, width=width or 200)
    return made


def print_table(
    headers: Sequence[str],
    lines: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    caption: str | None = None,
    left: int = 1,
    styles: Sequence[str | None] | None = None,
    out=None,
) -> None:
    """Print a table; ``styles`` gives each line a rich style (None: plain)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=escape(title) if title else None, title_justify="left",
        caption=escape(caption) if caption else None, caption_justify="left",
    )
    for index, header in enumerate(headers):
        table.add_column(escape(header), justify="left" if index < left else "right")
    for index, cells in enumerate(lines):
        style = styles[index] if styles else None
        table.add_row(*(escape(str(cell)) for cell in cells), style=style)
    (out or console()).print(table)


def markdown_table(
    headers: Sequence[str], lines: Sequence[Sequence[str]], *, left: int = 1
) -> str:
    """The same table in markdown (pipes in cells escaped)."""
    def row(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"
    return "\n".join([row(headers), rule, *(row(cells) for cells in lines)])
