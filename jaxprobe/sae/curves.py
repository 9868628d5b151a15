"""The training-curves figure of a run of SAEs: written by `train_saes` and shown on the inspect page."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

_CURVES = (("explained_variance", "explained variance"), ("l0", "L0 (active latents per input)"),
           ("dead_fraction", "dead-latent fraction"), ("loss", "training loss"))


def training_curves(history: pd.DataFrame) -> Figure:
    """Explained variance, L0, dead fraction and loss against the step, one line per feature set."""
    figure = Figure(figsize=(10, 6.5), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    for ax, (column, title) in zip(axes, _CURVES):
        for name, rows in history.groupby("feature_set", sort=False):
            ax.plot(rows["step"], rows[column], lw=1, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
    if history["feature_set"].nunique() <= 12:
        axes[0].legend(fontsize=7)
    return figure
