"""``softlabels inspect DIR --plot FILE.png``: the inspect report's histograms drawn into one PNG.

matplotlib is an optional extra (``pip install 'softlabels[plot]'``) imported only here, and only
through its object-oriented API on the Agg canvas: no display, no pyplot state. Every panel is drawn
from the report of :func:`softlabels.inspect.inspect`, never recomputed, so the picture shows the same
numbers as ``--json``: captured top-k mass per position, confidence and entropy per row, agreement per
row (ensembles only), and the most frequent top-1 classes. The file is written with the storage
layer's atomic writer (staged, fsync'd, renamed), so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .storage import atomic_write_bytes

__all__ = ["HISTOGRAMS", "TOP1_PANEL", "require_matplotlib", "check_plot_path", "draw", "save_plot"]

MISSING = "--plot needs matplotlib: pip install 'softlabels[plot]'"

HISTOGRAMS = (
    # (report key = Axes label, title, x label, y label)
    ("captured_mass", "captured top-k mass", "sum of the k stored probabilities", "positions"),
    ("unique_ids", "distinct sampled ids", "distinct ids among a position's draws", "positions"),
    ("drawn_mass", "drawn mass", "teacher probability of a position's distinct drawn ids", "positions"),
    ("confidence", "confidence", "mean top-1 probability of a row", "rows"),
    ("entropy", "entropy", "mean entropy of a row (nats)", "rows"),
    ("agreement", "ensemble agreement", "mean fraction of teachers agreeing with the ensemble", "rows"),
)
TOP1_PANEL = "top1_classes"
COLUMNS = 3
DPI = 100


def require_matplotlib() -> None:
    """Raises UserError (one line, exit 1) when the ``[plot]`` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise UserError(MISSING) from None


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """The target of ``--plot``, refused before any work when it cannot be written as a PNG."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--plot {target}: is a directory; give a file name ending in .png")
    if target.suffix.lower() != ".png":
        raise UserError(f"--plot {target}: the plot is a PNG; give a file name ending in .png")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"--plot {target}: directory {parent} does not exist")
    return target


def draw(report: dict[str, Any]) -> Any:
    """A matplotlib ``Figure`` (Agg canvas) with one panel per figure of the report.

    Each histogram panel's bars are the report's ``histogram`` counts over its ``edges``; the top-1
    panel's bars are ``top1_classes`` positions, labelled with the class ids. Every Axes carries its
    report key as its label (``ax.get_label()``), so a caller can find a panel.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[str] = [key for key, *_ in HISTOGRAMS if (report.get(key) or {}).get("histogram")]
    if report.get("top1_classes"):
        panels.append(TOP1_PANEL)
    columns = max(1, min(COLUMNS, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(5.2 * columns, 3.8 * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(
        f"{report.get('directory', '')}: {report.get('rows', 0):,} rows, {report.get('positions', 0):,} positions, "
        + (f"{report.get('samples')} draws" if report.get("targets") == "sample" else f"top-{report.get('top_k')}")
        + f" of {report.get('vocab_size', 0):,} classes"
    )
    if not panels:
        axes = figure.add_subplot(1, 1, 1, label="empty")
        axes.text(0.5, 0.5, "no positions to plot", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return figure
    titles = {key: (title, xlabel, ylabel) for key, title, xlabel, ylabel in HISTOGRAMS}
    for index, key in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, index, label=key)
        if key == TOP1_PANEL:
            _top1(axes, report[TOP1_PANEL], report.get("positions", 0))
        else:
            _histogram(axes, report[key], *titles[key])
    return figure


def _histogram(axes: Any, figure: dict[str, Any], title: str, xlabel: str, ylabel: str) -> None:
    edges = [float(e) for e in figure["histogram"]["edges"]]
    counts = [int(c) for c in figure["histogram"]["counts"]]
    widths = [high - low for low, high in zip(edges[:-1], edges[1:])]
    axes.bar(edges[:-1], counts, width=widths, align="edge", color="#4c72b0", edgecolor="white")
    axes.axvline(figure["mean"], color="#c44e52", linestyle="-", linewidth=1.2, label=f"mean {figure['mean']:.4g}")
    if figure.get("p5") is not None:
        axes.axvline(figure["p5"], color="#dd8452", linestyle="--", linewidth=1.2, label=f"p5 {figure['p5']:.4g}")
    axes.set_xlim(edges[0], edges[-1])
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(loc="best", fontsize="small")


def _top1(axes: Any, classes: list[dict[str, Any]], positions: int) -> None:
    labels = [str(entry["class"]) for entry in classes]
    heights = [int(entry["positions"]) for entry in classes]
    axes.bar(range(len(heights)), heights, color="#55a868", edgecolor="white")
    axes.set_xticks(range(len(heights)), labels, rotation=45 if max(map(len, labels)) > 3 else 0)
    shown = sum(heights) / max(positions, 1)
    axes.set_title(f"most frequent top-1 classes ({shown:.1%} of positions)")
    axes.set_xlabel("class id")
    axes.set_ylabel("positions")


def save_plot(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw the report and write it as a PNG atomically (``storage.atomic_write_bytes``); returns the path.

    Raises:
        UserError: the disk refused it, naming ``--plot`` and the file (no temporary file stays).
    """
    target = check_plot_path(path)
    figure = draw(report)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(target, buffer.getvalue(), shown=f"--plot {target}")
    return target
