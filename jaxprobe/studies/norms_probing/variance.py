"""What does the denoiser add beyond the text encoder? Variance partitioning, per attribute and step.

Every sampled feature set (a denoiser or latent site at one step) is paired with one reference text
space — by default the text feature set with the best mean decoding; several names are joined side by
side (SDXL: both text encoders) — and `jaxprobe.probes.variance_partition` splits each attribute's
held-out R² into what only the text space explains, what only the denoiser site explains and what
both share. Unique denoiser variance (unique_b) gets a bootstrap interval over concepts and a
permutation p-value (the site's rows shuffled, the joint model refitted), BH-corrected over the table.

Unique variance is relative to the reference: "the UNet adds nothing beyond CLIP's last layer" is a
statement about that layer. Files: variance.parquet / variance.csv (one row per site x step x
attribute), figures/variance.png; the report's section reads them, so `jaxprobe report` re-renders it.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from jaxprobe.captures import feature_sets as split_feature_sets
from jaxprobe.errors import InputError
from jaxprobe.probes.partition import variance_partition
from jaxprobe.reporting.figures import save_figures
from jaxprobe.reporting.html import figure_html, table_html
from jaxprobe.runtime.files import write_atomic
from jaxprobe.studies.norms_probing.decoding import (
    decoding_profile,
    short_site,
    stage_of,
)

TABLE = "variance"
TITLE = "What does the denoiser add beyond the text encoder?"


def choose_reference(table: pd.DataFrame, names: Sequence[str] = ()) -> list[str]:
    """The reference text feature sets: `names` if given (each a text feature set of the probe
    table), else the text feature set with the best mean decoding score."""
    profile = decoding_profile(table)
    text = profile[profile["stage"] == "text"]
    if names:
        unknown = [n for n in names if n not in set(text["feature_set"])]
        if unknown:
            raise InputError(f"variance_reference {unknown} are not text feature sets of this run; choose from "
                             f"{list(text['feature_set'])}")
        return list(names)
    if text.empty:
        raise InputError("variance partitioning needs a text site as its reference: capture one (text_sites) "
                         "or turn it off (variance = false)")
    return [text.loc[text["score"].idxmax(), "feature_set"]]


def partition_denoiser(
    features: Mapping[str, np.ndarray], targets: pd.DataFrame, probe_table: pd.DataFrame, *,
    reference: Sequence[str] = (), **options,
) -> pd.DataFrame:
    """`variance_partition` of the reference text space against every sampled feature set (a site
    with a step axis); the table gains `reference` (the text feature sets joined) and `stage`.
    options: variance_partition's (folds, alphas, permutations, bootstrap, groups, target_groups, ...)."""
    chosen = choose_reference(probe_table, reference)
    sets = {s.name: s for s in split_feature_sets(features)}
    sampled = {site: features[site] for site in dict.fromkeys(s.site for s in sets.values() if s.step >= 0)}
    if not sampled:
        raise InputError("variance partitioning needs sampled sites (unet_sites) to compare with the text "
                         "encoder; capture some or turn it off (variance = false)")
    joined = " + ".join(chosen)
    table = variance_partition({joined: np.hstack([sets[name].array for name in chosen])}, sampled, targets,
                               **options)
    return table.assign(reference=joined, stage=[stage_of(s) for s in table["site"]])


def write_table(table: pd.DataFrame | None, out_dir: str | os.PathLike) -> None:
    """out_dir/variance.parquet and .csv; None (partitioning off) removes those of an earlier run, so
    the report never shows stale results."""
    paths = [Path(out_dir) / f"{TABLE}{suffix}" for suffix in (".parquet", ".csv")]
    if table is None:
        for path in paths:
            path.unlink(missing_ok=True)
        return
    for path, write in zip(paths, (table.to_parquet, table.to_csv)):
        write_atomic(path, lambda p, w=write: w(p, index=False))


def read_table(out_dir: str | os.PathLike) -> pd.DataFrame | None:
    path = Path(out_dir) / f"{TABLE}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def along_steps(table: pd.DataFrame) -> pd.DataFrame:
    """Per (site, step, group): mean unique_b over the group's attributes, the means of their interval
    bounds (a band for the typical attribute) and of the null's 95th percentile when there is one."""
    columns = [c for c in ("unique_b", "unique_b_low", "unique_b_high", "null_high", "shared") if c in table]
    group = table["group"].fillna("all")
    return (table.assign(group=group).groupby(["site", "step", "group"], sort=False)[columns].mean()
            .reset_index().sort_values(["site", "group", "step"]))


def figure(table: pd.DataFrame) -> Figure | None:
    """Unique denoiser variance vs step, one panel per sampled site: a thin line per attribute group, and
    the mean over all attributes in black with its bootstrap band and the null's 95th percentile (dashed).
    One band per panel: a band per group would hide the lines under one another."""
    if table is None or table.empty or (table["step"] < 0).all():
        return None
    curves = along_steps(table)
    overall = along_steps(table.assign(group="all attributes"))
    sites = list(dict.fromkeys(curves["site"]))
    fig = Figure(figsize=(4.2 * min(len(sites), 3) + 1.6, 3.2 * -(-len(sites) // 3)), layout="constrained")
    axes = fig.subplots(-(-len(sites) // 3), min(len(sites), 3), squeeze=False).ravel()
    for ax, site in zip(axes, sites):
        for group, curve in curves[curves["site"] == site].groupby("group", sort=False):
            ax.plot(curve["step"], curve["unique_b"], label=group, linewidth=0.9)
        mean = overall[overall["site"] == site]
        if mean["unique_b_low"].notna().any():
            ax.fill_between(mean["step"], mean["unique_b_low"], mean["unique_b_high"], color="k", alpha=0.12,
                            label="bootstrap interval (all attributes)")
        ax.plot(mean["step"], mean["unique_b"], color="k", linewidth=2.0, label="all attributes")
        if "null_high" in mean and mean["null_high"].notna().any():
            ax.plot(mean["step"], mean["null_high"], color="k", linestyle="--", linewidth=0.9,
                    label="null, 95th percentile")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set(title=short_site(site), xlabel="denoising step (position)", ylabel="unique R² beyond text")
    for ax in axes[len(sites):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return fig


def summary(table: pd.DataFrame, level: float = 0.05) -> list[str]:
    """Plain-language lines: the headline sentence, then the attributes with the most unique denoiser
    variance at q < level."""
    reference = short_site(str(table["reference"].iloc[0])) if "reference" in table else "the text space"
    attributes = table["target"].nunique()
    if table["q"].isna().all():
        best = table.loc[table["unique_b"].idxmax()]
        return [(f"Without permutations there is no test; the largest unique denoiser R² beyond {reference} is "
                f"{best['unique_b']:.3f} ({best['target']}, {short_site(best['site'])} step {best['step']}).")]
    significant = table[table["q"] < level]
    found = significant["target"].nunique()
    if not found:
        return [(f"Beyond {reference}, no denoiser site at any step explains significant unique variance of any of "
                f"the {attributes} attributes (q < {level:g}): what the denoiser carries of them, the text encoder "
                "carries too.")]
    top = significant.sort_values("unique_b", ascending=False).drop_duplicates("target").head(5)
    listed = "; ".join(f"{r.target} ({short_site(r.site)} step {r.step}: {r.unique_b:.3f}, "
                       f"[{r.unique_b_low:.3f}, {r.unique_b_high:.3f}])" for r in top.itertuples())
    return [(f"Beyond {reference}, the denoiser explains significant unique variance (q < {level:g}) of {found} of "
            f"{attributes} attributes at some site and step; for the others the text encoder carries what it does."),
            f"Most unique denoiser variance (unique R², 95% interval): {listed}."]


def section_html(out_dir: str | os.PathLike, *, dpi: int = 110, level: float = 0.05, top_rows: int = 12) -> list[str]:
    """The report's section from out_dir/variance.parquet (nothing when the run has none)."""
    table = read_table(out_dir)
    if table is None:
        return []
    figures = save_figures(out_dir, {TABLE: figure(table)}, dpi)
    permuted = "null_high" in table and table["null_high"].notna().any()
    caption = ("Unique R² beyond the reference text space, per denoising step: thin lines, the mean over each "
               "attribute group's attributes; black, the mean over all attributes with the mean of their bootstrap "
               "intervals" + (" and, dashed, the mean 95th percentile of the permutation null." if permuted else
                              "; this run made no permutations, so there is no null."))
    top = table[table["q"] < level].sort_values("unique_b", ascending=False)
    shown = ["target", "group", "site", "step", "r2_a", "r2_b", "r2_joint", "unique_b", "unique_b_low",
             "unique_b_high", "shared", "q"]
    return [
        f"<h2>{html.escape(TITLE)}</h2><ul>", *(f"<li>{html.escape(line)}</li>" for line in summary(table, level)),
        "</ul>",
        *(figure_html(path.read_bytes(), name, caption) for name, path in figures.items()),
        table_html(top[shown].head(top_rows), f"Attributes with significant unique denoiser variance at q < "
                   f"{level:g}, largest first ({TABLE}.csv has every site, step and attribute)",
                   empty=f"None at q < {level:g}."),
        ("<p class='small'>Unique variance depends on the reference: it is what the site explains beyond "
        f"{html.escape(str(table['reference'].iloc[0]))}, not beyond the text encoder as a whole.</p>"),
    ]

