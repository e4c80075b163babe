"""The results plot: step time against peak memory, one labelled point per case, a colour per
group. matplotlib (Agg, no display needed) is imported only here, when a plot is asked for."""

from __future__ import annotations

from pathlib import Path

from .report import group_rows

__all__ = ["plot_rows"]


def plot_rows(rows: list[dict], path: str | Path) -> Path:
    """Write the PNG of ``rows`` (cases that ran) to ``path``; returns the path."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("pip install matplotlib to plot results (or leanstep[plots])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    groups = group_rows(rows)
    figure, axes = plt.subplots(figsize=(10, 6.5))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    plotted = 0
    for index, (name, group) in enumerate(groups.items()):
        ran = [row for row in group if row.get("status") == "ok" and row.get("peak_mib")]
        if not ran:
            continue
        x = [row["peak_mib"] for row in ran]
        y = [row["step_ms_median"] for row in ran]
        colour = colours(index % colours.N)
        axes.scatter(x, y, color=colour, label=name, s=36, zorder=3)
        for row, x_value, y_value in zip(ran, x, y, strict=True):
            axes.annotate(
                row["name"], (x_value, y_value), textcoords="offset points", xytext=(4, 4),
                fontsize=7, color=colour,
            )
        plotted += len(ran)
    suite = next((group[0].get("suite") for group in groups.values() if group), "results")
    axes.set_title(f"{suite}: training step time vs peak memory")
    axes.set_xlabel("peak memory (MiB)")
    axes.set_ylabel("step time, median (ms)")
    axes.grid(True, alpha=0.3)
    if plotted:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
