"""Reports of a results file: the seed's text format, a terminal table, markdown and CSV.

Every report groups rows as the suite does and compares each case with its group's first case
that ran: "time x" is the ratio of forward + backward time, "memory x" of peak memory and
"act x" of the activation memory at the peak. Where the suite carries reference_* figures (the
seed's published numbers), the table and markdown show them beside ours.
"""

from __future__ import annotations

import csv
import io
from collections import Counter

from .results import latest_rows

__all__ = ["FORMATS", "format_csv", "format_markdown", "format_seed", "group_rows", "ratios",
           "render_table"]

FORMATS = ("seed", "table", "markdown", "csv", "plot")


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """The latest row of each case, by group, groups and rows in suite order."""
    groups: dict[str, list[dict]] = {}
    for row in latest_rows(rows):
        groups.setdefault(row["group"], []).append(row)
    return groups


def _ok(row: dict) -> bool:
    return row.get("status") == "ok"


def _step_ms(row: dict) -> float:
    return row["fwd_ms_mean"] + row["bwd_ms_mean"]


def _activations(row: dict) -> float | None:
    return (row.get("memory") or {}).get("activations")


def ratios(group: list[dict]) -> dict[str, dict[str, float | None]]:
    """time x, memory x and act x of each ok row of a group against its first ok row."""
    base = next((row for row in group if _ok(row)), None)
    result: dict[str, dict[str, float | None]] = {}
    if base is None:
        return result
    for row in group:
        if not _ok(row):
            continue
        act, base_act = _activations(row), _activations(base)
        result[row["name"]] = {
            "time_x": _step_ms(row) / _step_ms(base),
            "memory_x": row["peak_mib"] / base["peak_mib"] if base["peak_mib"] else None,
            "act_x": act / base_act if act is not None and base_act else None,
        }
    return result


def _reference_ms(reference: dict) -> float | None:
    if "reference_ms" in reference:
        return reference["reference_ms"]
    if "reference_fwd_ms" in reference and "reference_bwd_ms" in reference:
        return reference["reference_fwd_ms"] + reference["reference_bwd_ms"]
    return None


def _has_reference(rows: list[dict]) -> bool:
    return any(row.get("reference") for row in rows)


def _reason(row: dict) -> str:
    return f"{row.get('status')}: {row.get('error') or 'no reason recorded'}"


# ---------------------------------------------------------------------------------------------
# seed


def _common_image_size(rows: list[dict]) -> int | None:
    sizes = Counter(row.get("image_size") for row in rows)
    return sizes.most_common(1)[0][0] if sizes else None


def _seed_lines(row: dict, common_size: int | None) -> list[str]:
    if not _ok(row):
        return [f"**{row['name']}**", _reason(row)]
    size = "" if row["image_size"] == common_size else f", {row['image_size']}px"
    timing = f"{row['fwd_ms_mean']:.2f}+-{row['fwd_ms_std']:.2f} msecs Forward."
    if row.get("mode") != "infer":
        timing += f" {row['bwd_ms_mean']:.2f}+-{row['bwd_ms_std']:.2f} msecs Backward."
    memory = f"Max memory: {row['peak_mib']:.2f}Mb."
    memory_config = (row.get("memory_batch_size"), row.get("memory_image_size"))
    if memory_config != (row["batch_size"], row["image_size"]) and None not in memory_config:
        memory = (
            f"Max memory: {row['peak_mib']:.2f}Mb at BS={memory_config[0]}, {memory_config[1]}px."
        )
    return [
        f"**{row['name']} {row['params'] / 1e6:.2f}M params**",
        f"Mean of {row['runs']} runs {row['iters']} iters each BS={row['batch_size']}{size}: "
        f"{timing} {memory} {row['imgs_per_sec']:.2f} imgs/sec",
    ]


def format_seed(rows: list[dict]) -> str:
    """The seed table's own text: a bold title line and a "Mean of ..." line per case, groups
    apart, lines inside a group ending in markdown's two-space line break."""
    groups = group_rows(rows)
    every = [row for group in groups.values() for row in group]
    common_size = _common_image_size(every)
    first = every[0] if every else {}
    env = first.get("env") or {}
    header = [
        f"# {first.get('suite', 'results')}: speed and memory of one training step",
        "",
        f"{env.get('device_name') or first.get('device', '')}, torch {env.get('torch', '?')}, "
        f"{first.get('threads')} threads, {common_size} px images unless a row says otherwise.",
    ]
    blocks = []
    for group in groups.values():
        lines = [line for row in group for line in _seed_lines(row, common_size)]
        blocks.append("\n".join(line + "  " for line in lines[:-1]) + "\n" + lines[-1])
    return "\n".join(header) + "\n\n" + "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------------------------
# table and markdown


def _columns(group: list[dict]) -> list[str]:
    columns = ["case", "params (M)", "fwd ms", "bwd ms", "step ms median (IQR)", "imgs/s",
               "peak MiB", "time x", "memory x", "act x"]
    if _has_reference(group):
        columns += ["ref ms", "ref MiB"]
    return columns


def _cells(row: dict, group_ratios: dict, with_reference: bool) -> list[str]:
    reference_cells = []
    if with_reference:
        reference = row.get("reference") or {}
        ref_ms, ref_mib = _reference_ms(reference), reference.get("reference_mib")
        reference_cells = [
            f"{ref_ms:.2f}" if ref_ms is not None else "",
            f"{ref_mib:.0f}" if ref_mib is not None else "",
        ]
    if not _ok(row):
        return [row["name"], _reason(row), "", "", "", "", "", "", "", "", *reference_cells]
    ratio = group_ratios.get(row["name"], {})

    def times(value):
        return f"{value:.2f}" if value is not None else ""

    return [
        row["name"],
        f"{row['params'] / 1e6:.2f}",
        f"{row['fwd_ms_mean']:.2f} ± {row['fwd_ms_std']:.2f}",
        f"{row['bwd_ms_mean']:.2f} ± {row['bwd_ms_std']:.2f}",
        f"{row['step_ms_median']:.2f} ({row['step_ms_iqr']:.2f})",
        f"{row['imgs_per_sec']:.1f}",
        _mib(row["peak_mib"]),
        times(ratio.get("time_x")),
        times(ratio.get("memory_x")),
        times(ratio.get("act_x")),
        *reference_cells,
    ]


def _mib(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def render_table(rows: list[dict], console=None) -> None:
    """Print a rich table per group."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
    for name, group in group_rows(rows).items():
        with_reference = _has_reference(group)
        table = Table(title=name, title_justify="left")
        for index, column in enumerate(_columns(group)):
            table.add_column(column, justify="left" if index == 0 else "right")
        group_ratios = ratios(group)
        for row in group:
            cells = _cells(row, group_ratios, with_reference)
            if not _ok(row):
                table.add_row(cells[0], f"[yellow]{cells[1]}[/]", *cells[2:])
            else:
                table.add_row(*cells)
        console.print(table)


def format_markdown(rows: list[dict]) -> str:
    """A markdown table per group, under a heading with the group's name."""
    parts = []
    for name, group in group_rows(rows).items():
        columns = _columns(group)
        lines = [f"### {name}", "", "| " + " | ".join(columns) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
        group_ratios = ratios(group)
        for row in group:
            cells = _cells(row, group_ratios, _has_reference(group))
            cells = [cell.replace("|", "\\|") for cell in cells]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# csv

_CSV_FIELDS = (
    "suite", "group", "name", "model", "batch_size", "image_size", "device", "precision",
    "channels_last", "compile", "mode", "params", "runs", "iters", "warmup", "threads",
    "fwd_ms_mean", "fwd_ms_std", "bwd_ms_mean", "bwd_ms_std", "step_ms_median", "step_ms_iqr",
    "imgs_per_sec", "peak_mib", "reserved_mib", "predicted_mib", "flops", "gflops_per_sec",
    "memory_batch_size", "memory_image_size", "status", "error", "timestamp",
)


def format_csv(rows: list[dict]) -> str:
    """One CSV line per case: scalar fields, options, memory categories, ratios, references."""
    table = []
    categories: list[str] = []
    references: list[str] = []
    for group in group_rows(rows).values():
        group_ratios = ratios(group)
        for row in group:
            line = {key: row.get(key) for key in _CSV_FIELDS}
            line["options"] = " ".join(f"{k}={v}" for k, v in (row.get("options") or {}).items())
            for category, mib in (row.get("memory") or {}).items():
                line[f"memory_{category}"] = mib
                if f"memory_{category}" not in categories:
                    categories.append(f"memory_{category}")
            for key, value in (row.get("reference") or {}).items():
                line[key] = value
                if key not in references:
                    references.append(key)
            line.update(group_ratios.get(row["name"], {}))
            table.append(line)
    fieldnames = [*_CSV_FIELDS, "options", "time_x", "memory_x", "act_x", *categories, *references]
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    return stream.getvalue()
