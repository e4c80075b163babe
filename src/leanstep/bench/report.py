"""Reports of a results file: the seed's text format, a terminal table, markdown and CSV.

Every report groups rows as the suite does and compares each case with its group's first case
that ran: "time x" is the ratio of median step times (a median, so that one stalled iteration
does not drag it), "memory x" of peak memory and "act x" of the activation memory at the peak.
Where the suite carries reference_* figures (the seed's published numbers), the table and
markdown show them beside ours. A row whose timing cannot be trusted (``row.flags``: too small a
share of the cores, a wide IQR, graph breaks) is marked "!" in every format, with the reason.
"""

from __future__ import annotations

import csv
import io
from collections import Counter

from .results import latest_rows
from .row import CASE_FIELDS, MEASURED_FIELDS, flags
from .table import console as make_console
from .table import markdown_table, print_table

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
    return row["step_ms_median"]


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
            "memory_x": (row["peak_mib"] / base["peak_mib"]
                         if row["peak_mib"] is not None and base["peak_mib"] else None),
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
    peak = row["peak_mib"]
    memory_config = (row.get("memory_batch_size"), row.get("memory_image_size"))
    if peak is None:
        memory = "Max memory: not measured."
    elif memory_config != (row["batch_size"], row["image_size"]) and None not in memory_config:
        memory = f"Max memory: {peak:.2f}Mb at BS={memory_config[0]}, {memory_config[1]}px."
    else:
        memory = f"Max memory: {peak:.2f}Mb."
    lines = [
        f"**{row['name']} {row['params'] / 1e6:.2f}M params**",
        f"Mean of {row['runs']} runs {row['iters']} iters each BS={row['batch_size']}{size}: "
        f"{timing} {memory} {row['imgs_per_sec']:.2f} imgs/sec",
    ]
    if flags(row):
        lines.append(f"! timing not to be trusted: {', '.join(flags(row))}")
    return lines


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
    if any(row.get("compile") for row in group):
        columns += ["graphs", "breaks", "compile s"]
    if _has_reference(group):
        columns += ["ref ms", "ref MiB"]
    return columns + ["!"]


def _optional(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _cells(row: dict, group_ratios: dict, columns: list[str]) -> list[str]:
    extra = []
    if "graphs" in columns:
        extra += [_optional(row.get("compile_graphs"), "d"),
                  _optional(row.get("compile_graph_breaks"), "d"),
                  _optional(row.get("compile_seconds"), ".1f")]
    if "ref ms" in columns:
        reference = row.get("reference") or {}
        extra += [_optional(_reference_ms(reference), ".2f"),
                  _optional(reference.get("reference_mib"), ".0f")]
    flag = ", ".join(flags(row))
    if not _ok(row):
        return [row["name"], _reason(row), *[""] * 8, *extra, flag]
    ratio = group_ratios.get(row["name"], {})
    return [
        row["name"],
        f"{row['params'] / 1e6:.2f}",
        f"{row['fwd_ms_mean']:.2f} ± {row['fwd_ms_std']:.2f}",
        f"{row['bwd_ms_mean']:.2f} ± {row['bwd_ms_std']:.2f}",
        f"{row['step_ms_median']:.2f} ({row['step_ms_iqr']:.2f})",
        _optional(row.get("imgs_per_sec"), ".1f"),
        _mib(row["peak_mib"]),
        _optional(ratio.get("time_x"), ".2f"),
        _optional(ratio.get("memory_x"), ".2f"),
        _optional(ratio.get("act_x"), ".2f"),
        *extra,
        flag,
    ]


def _mib(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def _group_lines(group: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = _columns(group)
    group_ratios = ratios(group)
    return columns, [_cells(row, group_ratios, columns) for row in group]


_NOTE = "! = timing not to be trusted (cpu share < 0.85, IQR > 10% of median, graph breaks)"


def _memory_notes(rows: list[dict]) -> list[str]:
    """Why some rows' peak is missing or has no breakdown (compiled steps), once per reason."""
    notes = dict.fromkeys(row["memory_note"] for row in rows
                          if _ok(row) and row.get("memory_note"))
    return [f"peak memory: {note}" for note in notes]


def render_table(rows: list[dict], console=None) -> None:
    """Print a rich table per group; failed rows in yellow, flagged rows in red."""
    console = console or make_console()
    for name, group in group_rows(rows).items():
        columns, lines = _group_lines(group)
        styles = ["yellow" if not _ok(row) else "red" if flags(row) else None for row in group]
        print_table(columns, lines, title=name, styles=styles, out=console)
    if any(flags(row) for row in rows):
        console.print(_NOTE, highlight=False)
    for note in _memory_notes(rows):
        console.print(note, highlight=False)


def format_markdown(rows: list[dict]) -> str:
    """A markdown table per group, under a heading with the group's name."""
    parts = []
    for name, group in group_rows(rows).items():
        columns, lines = _group_lines(group)
        parts.append(f"### {name}\n\n" + markdown_table(columns, lines))
    if any(flags(row) for row in rows):
        parts.append(_NOTE)
    parts.extend(_memory_notes(rows))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# csv

# Scalar columns of the row schema (lists and tables are spread or left to the JSONL file).
_CSV_FIELDS = tuple(
    name for name in (*CASE_FIELDS, *MEASURED_FIELDS)
    if name not in ("options", "reference", "memory", "env", "fwd_ms_iters", "bwd_ms_iters",
                    "phase_seconds", "worker_seconds", "compile_break_reasons")
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
            line["flags"] = "; ".join(flags(row))
            table.append(line)
    fieldnames = [*_CSV_FIELDS, "options", "time_x", "memory_x", "act_x", "flags", *categories,
                  *references]
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    return stream.getvalue()
