"""Figures as files: the one way a report writes its PNGs (matplotlib's object API, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping
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
