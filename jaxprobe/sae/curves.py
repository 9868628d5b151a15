"""The training-curves figures of a run of SAEs: written by `train_saes` and shown on the inspect page.

A run trains one SAE per site and step (51 SAEs for 3 sites x 17 steps), too many lines to tell apart:
`training_curves` draws each site's median over its SAEs with the range as a band, one legend entry per
site; `training_curves_per_sae` draws every SAE, for a file beside it.
"""

from __future__ import annotations

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from jaxprobe.pipeline.sites import short_site


def _panels(dead_window: int) -> tuple[tuple[str, str], ...]:
    return (("explained_variance", "explained variance (training batch)"),
            ("l0", "L0: active latents per input"),
            ("dead_fraction", f"dead fraction: silent for the last {dead_window:,} training rows"),
            ("loss", "training loss"))


def site_of(feature_set: str) -> str:
    """"unet.mid_block@3" -> "unet.mid_block": the site an SAE's feature set was captured at."""
    return feature_set.split("@")[0]


def _figure(dead_window: int) -> tuple[Figure, list]:
    figure = Figure(figsize=(11, 6.5), layout="constrained")
    axes = list(figure.subplots(2, 2).ravel())
    for ax, (_, title) in zip(axes, _panels(dead_window)):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    return figure, axes


def training_curves(history: pd.DataFrame, dead_window: int) -> Figure:
    """Per site: the median over its SAEs (one per step, or one) of explained variance, L0, dead fraction
    and loss against the training step, with the range (min to max) as a band; one legend entry per site.
    dead_window: the rows that define a dead latent (`SAEs.dead_window`), named in that panel's title."""
    figure, axes = _figure(dead_window)
    sites = list(dict.fromkeys(history["feature_set"].map(site_of)))
    cmap = colormaps["tab10" if len(sites) <= 10 else "tab20"]
    by_site = history.assign(site=history["feature_set"].map(site_of))
    for i, site in enumerate(sites):
        rows = by_site[by_site["site"] == site]
        n = rows["feature_set"].nunique()
        for ax, (column, _) in zip(axes, _panels(dead_window)):
            summary = rows.groupby("step")[column].agg(["median", "min", "max"])
            color = cmap(i % cmap.N)
            if n > 1:
                ax.fill_between(summary.index, summary["min"], summary["max"], color=color, alpha=0.2, linewidth=0)
            ax.plot(summary.index, summary["median"], color=color, lw=1.5,
                    label=f"{short_site(site)} (median of {n} SAEs)" if n > 1 else short_site(site))
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    return figure


def training_curves_per_sae(history: pd.DataFrame, dead_window: int) -> Figure:
    """Every SAE's own curves (one thin line each, coloured by site), the detail `training_curves` sums up."""
    figure, axes = _figure(dead_window)
    sites = list(dict.fromkeys(history["feature_set"].map(site_of)))
    cmap = colormaps["tab10" if len(sites) <= 10 else "tab20"]
    for name, rows in history.groupby("feature_set", sort=False):
        i = sites.index(site_of(name))
        for ax, (column, _) in zip(axes, _panels(dead_window)):
            ax.plot(rows["step"], rows[column], lw=0.6, alpha=0.7, color=cmap(i % cmap.N),
                    label=short_site(sites[i]))
    handles, labels = axes[0].get_legend_handles_labels()
    first = {label: handle for handle, label in zip(handles, labels)}  # one entry per site, not per SAE
    figure.legend(first.values(), first.keys(), loc="outside right upper", fontsize=7)
    return figure
