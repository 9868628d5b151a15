"""Figures as files: the one way a report writes its PNGs (matplotlib's object API, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxprobe.runtime.files import write_atomic


def save_figures(out_dir: str | os.PathLike, figures: Mapping[str, Any], dpi: int = 110) -> dict[str, Path]:
    """out_dir/figures/<name>.png for every figure that is not None (a figure whose data a run lacks
    is None); each written atomically. Returns {name: path} in the order given."""
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return {name: write_atomic(folder / f"{name}.png", lambda p, f=figure: f.savefig(p, format="png", dpi=dpi))
            for name, figure in figures.items() if figure is not None}


def image_grid(images: Any, row_labels: Sequence[str], col_labels: Sequence[str], *, cell: float = 1.6,
               label_chars: int = 40) -> Any:
    """A Figure of images (rows, cols, H, W, 3) in [0, 1], rows and columns labelled (long labels cut)."""
    from matplotlib.figure import Figure

    rows, cols = len(row_labels), len(col_labels)
    figure = Figure(figsize=(cell * cols + 2.2, cell * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r][c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=8)
            if c == 0:
                label = row_labels[r]
                ax.set_ylabel(label if len(label) <= label_chars else label[:label_chars - 1] + "…", fontsize=7)
    return figure


def dose_response_figure(panels: Mapping[str, Any], *, xlabel: str, value: str = "association",
                         hue: str | None = None) -> Any:
    """A Figure of dose-response curves (stats.dose_response tables): one panel per entry of `panels`
    ({title: table}), one line per value of column `hue` (one line without), the bootstrap band around each."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6 * len(panels) + 0.4, 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, table) in zip(axes, panels.items()):
        for name, part in (table.groupby(hue, sort=False) if hue else [(None, table)]):
            line, = ax.plot(part["scale"], part[value], marker="o", label=name)
            ax.fill_between(part["scale"], part["ci_low"], part["ci_high"], alpha=0.2, color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
        if hue:
            ax.legend(fontsize=7)
    return figure
