"""Tables, figures and one self-contained HTML report of an experiment (`ExperimentResults`).

    write_tables(results, out)     # <table>.parquet and <table>.csv, matrices.npz, metadata.json
    write_report(results, out)     # figures/<name>.png and report.html with the figures embedded
    rerender(out)                  # figures and report again, from what write_tables saved

Figures use matplotlib's object API (a `Figure` per plot, no pyplot state, PNG through Agg). Every
file is written under a temporary name in its own directory and then renamed over the target, so an
interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxprobe.errors import InputError
from jaxprobe.reporting.figures import save_figures
from jaxprobe.reporting.html import figure_html, page, settings_html, table_html
from jaxprobe.runtime.files import write_atomic
from jaxprobe.studies.norms_probing.decoding import best, short_site, site_order, stage_of, text_towers
from jaxprobe.studies.norms_probing.disentanglement import entanglement_index
from jaxprobe.studies.norms_probing.summary import PAPER, SAMPLED_STAGES, ExperimentResults, along_steps, summarize
from jaxprobe.studies.norms_probing.variance import section_html as variance_section

__all__ = ["ExperimentResults", "ReportConfig", "make_figures", "read_results", "rerender", "write_report",
           "write_tables"]

TABLES = ("probes", "decoding", "groups", "similarity", "confusability", "dropped")
MATRICES, METADATA, REPORT = "matrices.npz", "metadata.json", "report.html"


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """dpi of the PNG figures; top_rows of each table shown in the HTML (the files hold them all);
    level: the FDR level called significant; focus_site: the sampled site whose steps the heatmaps
    and the summary follow (default: the UNet site with the best decoding)."""

    dpi: int = 110
    top_rows: int = 12
    level: float = 0.05
    focus_site: str | None = None


# --- files ---------------------------------------------------------------------------------------------


def _tables(results: ExperimentResults) -> dict[str, pd.DataFrame]:
    return dict(zip(TABLES, (results.table, results.profile, results.groups, results.similarity,
                             results.confusability, results.dropped)))


def write_tables(results: ExperimentResults, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every table as <name>.parquet and <name>.csv (probes: one row per feature set x target; decoding,
    similarity, confusability: per feature set; groups: per feature set x group; dropped concepts), the
    matrices as matrices.npz and the settings as metadata.json. Returns {file name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frame in _tables(results).items():
        for suffix, write in ((".parquet", frame.to_parquet), (".csv", frame.to_csv)):
            written[name + suffix] = write_atomic(out / (name + suffix), lambda p, w=write: w(p, index=False))

    def save_matrices(path: Path) -> None:
        with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez_compressed(
                file, feature_sets=np.array(results.feature_sets), targets=np.array(results.targets),
                groups=np.array([results.target_groups[t] for t in results.targets]),
                human_correlation=results.human_correlation, predicted_correlation=results.predicted_correlation,
                confusion=results.confusion)

    written[MATRICES] = write_atomic(out / MATRICES, save_matrices)
    text = json.dumps(results.metadata, indent=2, default=str)  # non-JSON values (paths, numpy scalars) as text
    written[METADATA] = write_atomic(out / METADATA, lambda p: p.write_text(text))
    return written


def read_results(out_dir: str | os.PathLike) -> ExperimentResults:
    """The `ExperimentResults` that `write_tables` saved under out_dir."""
    out = Path(out_dir)
    missing = [f for f in (*(f"{n}.parquet" for n in TABLES), MATRICES, METADATA) if not (out / f).exists()]
    if missing:
        raise InputError(f"{out} lacks {missing}: give the folder a `jaxprobe run` wrote (write_tables).")
    frames = {name: pd.read_parquet(out / f"{name}.parquet") for name in TABLES}
    with np.load(out / MATRICES, allow_pickle=False) as m:
        targets = tuple(str(t) for t in m["targets"])
        return ExperimentResults(
            table=frames["probes"], profile=frames["decoding"], groups=frames["groups"],
            similarity=frames["similarity"], confusability=frames["confusability"],
            feature_sets=tuple(str(f) for f in m["feature_sets"]), targets=targets,
            target_groups=dict(zip(targets, (str(g) for g in m["groups"]))),
            human_correlation=m["human_correlation"], predicted_correlation=m["predicted_correlation"],
            confusion=m["confusion"], metadata=json.loads((out / METADATA).read_text()), dropped=frames["dropped"])


# --- figures -------------------------------------------------------------------------------------------


def _band(ax: Axes, x, low: pd.Series, high: pd.Series, **style) -> None:
    if low.notna().any() and high.notna().any():
        ax.fill_between(x, low.to_numpy(float), high.to_numpy(float), linewidth=0, **style)


def _has_null(frame: pd.DataFrame) -> bool:
    return "null_mean" in frame and frame["null_mean"].notna().any()


def _sampled_sites(frame: pd.DataFrame) -> list[str]:
    return site_order(frame.loc[frame["stage"].isin(SAMPLED_STAGES) & (frame["timestep"] >= 0), "site"])


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _per_site(ax: Axes, frame: pd.DataFrame, value: str, sites: list[str], band_site: str | None = None) -> None:
    """One line of `value` over the denoising steps per site (dashed: the sampler's latents), and the
    bootstrap band of `band_site` only: one band reads, seven stacked ones hide each other."""
    for site, color in zip(sites, _colors(len(sites))):
        curve = frame[(frame["site"] == site) & (frame["timestep"] >= 0)].sort_values("timestep")
        if site == band_site:
            _band(ax, curve["timestep"], curve["ci_low"], curve["ci_high"], color=color, alpha=0.2,
                  label=f"bootstrap 95% interval ({short_site(site)})")
        style = "--" if stage_of(site) == "latent" else "-"
        ax.plot(curve["timestep"], curve[value], style, color=color, label=short_site(site),
                linewidth=2.0 if site == band_site else 1.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _decoding_text(results: ExperimentResults, config: ReportConfig) -> Figure | None:
    profile = results.profile[results.profile["stage"] == "text"]
    if profile.empty:
        return None
    profile = profile.set_index("site").loc[site_order(profile["site"])]
    x = np.arange(len(profile))
    fig = Figure(figsize=(max(5.0, 0.35 * len(x) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    if _has_null(profile):
        _band(ax, x, profile["null_mean"], profile["null_high"], color="0.6", alpha=0.5,
              label="permutation null (mean to 95th percentile)")
    _band(ax, x, profile["ci_low"], profile["ci_high"], color="tab:blue", alpha=0.25,
          label="bootstrap 95% interval (mean over attributes)")
    ax.plot(x, profile["score"], "o-", color="tab:blue", label="mean over attributes")
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xticks(x, [short_site(s) for s in profile.index], rotation=60, ha="right", fontsize=7)
    plural = "s" if len(text_towers(profile.index)) > 1 else ""   # SDXL: both towers, the second's labelled "te2"
    ax.set(ylabel="decoding (Pearson r)", title=f"Decoding along the text encoder{plural}")
    ax.legend(fontsize=7, loc="best")
    return fig


def _reference_lines(ax: Axes, results: ExperimentResults, value_of: Callable[[str], float]) -> None:
    """Horizontal lines for the best text layer and the image-encoder sites, which have no step."""
    text = best(results.profile, "text")
    if text is not None:
        ax.axhline(value_of(text["feature_set"]), color="k", linestyle="--", linewidth=1,
                   label=f"best text layer ({short_site(text['site'])})")
    for row in results.profile[results.profile["stage"] == "image"].itertuples():
        ax.axhline(value_of(row.feature_set), color="0.3", linestyle=":", linewidth=1, label=short_site(row.site))


def _decoding_steps(results: ExperimentResults, config: ReportConfig) -> Figure | None:
    profile = results.profile
    sites = _sampled_sites(profile)
    if not sites:
        return None
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.subplots()
    stepped = profile[profile["site"].isin(sites) & (profile["timestep"] >= 0)]
    if _has_null(stepped):
        null = stepped.groupby("timestep")[["null_mean", "null_high"]].mean()
        _band(ax, null.index, null["null_mean"], null["null_high"], color="0.6", alpha=0.5,
              label="permutation null (mean over sites)")
    _per_site(ax, stepped, "score", sites, band_site=results.focus_site(config.focus_site))
    scores = profile.set_index("feature_set")["score"]
    _reference_lines(ax, results, scores.get)
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set(xlabel="denoising step (0 = pure noise)", ylabel="decoding (Pearson r, mean over attributes)",
           title="Decoding along the reverse diffusion")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _group_bars(results: ExperimentResults, config: ReportConfig) -> Figure | None:
    rows = [r for r in (best(results.profile, "text"), best(results.profile, SAMPLED_STAGES)) if r is not None]
    if not rows or results.groups.empty or results.groups["group"].nunique() < 2:  # one bar compares nothing
        return None
    fig = Figure(figsize=(4.5 * len(rows), 3.8), layout="constrained")
    for ax, row in zip(fig.subplots(1, len(rows), squeeze=False)[0], rows):
        groups = results.groups[results.groups["feature_set"] == row["feature_set"]]
        significant = groups["q"] < config.level
        colors = np.where(significant & (groups["difference"] > 0), "tab:green",
                          np.where(significant & (groups["difference"] < 0), "tab:red", "0.65"))
        x = np.arange(len(groups))
        ax.bar(x, groups["group_score"], color=colors)
        ax.axhline(groups["mean_score"].iloc[0], color="k", linestyle="--", linewidth=1, label="all attributes")
        for xi, height in zip(x[significant.to_numpy()], groups["group_score"][significant]):
            ax.annotate("*", (xi, height), ha="center", va="bottom" if height >= 0 else "top")
        ax.set_xticks(x, groups["group"], rotation=60, ha="right", fontsize=7)
        where = short_site(row["site"]) + (f" @ step {row['timestep']}" if row["timestep"] >= 0 else "")
        ax.set(ylabel="decoding (mean Pearson r of the group)", title=where)
        ax.legend(fontsize=7)
    fig.suptitle(f"Attribute groups (* and colour: differs from the average, q < {config.level:g})", fontsize=9)
    return fig


def _heatmap_panels(results: ExperimentResults, config: ReportConfig) -> list[tuple[str, np.ndarray]]:
    similarity = results.similarity.set_index("feature_set")["similarity"]

    def panel(feature_set: str, title: str) -> tuple[str, np.ndarray]:
        return (f"{title}\nrho to human = {similarity.get(feature_set, np.nan):.2f}",
                results.predicted_correlation[results.matrix_index(feature_set)])

    panels = [("human ratings", results.human_correlation)]
    text = best(results.profile, "text")
    if text is not None:
        panels.append(panel(text["feature_set"], f"best text layer: {short_site(text['site'])}"))
    site = results.focus_site(config.focus_site)
    if site is not None:
        steps = along_steps(results.profile, site, "score")["timestep"].to_numpy()
        chosen = dict.fromkeys(steps[[0, len(steps) // 2, -1]]) if len(steps) else {}
        for step in chosen:
            row = results.profile[(results.profile["site"] == site) & (results.profile["timestep"] == step)].iloc[0]
            panels.append(panel(row["feature_set"], f"{short_site(site)} @ step {step}"))
    return panels


def _attribute_order(results: ExperimentResults) -> tuple[np.ndarray, list[str], list[int]]:
    """Attributes ordered by group (so blocks show): the order, each ordered attribute's group, the block edges."""
    groups = [results.target_groups[t] for t in results.targets]
    rank = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    order = np.argsort([rank[g] for g in groups], kind="stable")
    ordered = [groups[i] for i in order]
    return order, ordered, [i for i in range(1, len(ordered)) if ordered[i] != ordered[i - 1]]


def group_correlations(matrix: np.ndarray, groups: list[str]) -> tuple[np.ndarray, list[str]]:
    """(g, g) mean attribute correlation within and between groups (the diagonal leaves out each attribute's
    correlation with itself), and the group names in first-seen order."""
    names = list(dict.fromkeys(groups))
    member = np.array([[g == name for g in groups] for name in names])              # (g, attributes)
    off_diagonal = ~np.eye(len(groups), dtype=bool)
    out = np.full((len(names), len(names)), np.nan)
    for a in range(len(names)):
        for b in range(len(names)):
            block = matrix[np.ix_(member[a], member[b])][off_diagonal[np.ix_(member[a], member[b])]]
            if np.isfinite(block).any():
                out[a, b] = np.nanmean(block)
    return out, names


def _heatmaps(results: ExperimentResults, config: ReportConfig, by_group: bool) -> Figure:
    """One panel per correlation matrix (human, best text layer, steps of one UNet site): per attribute, or
    the group-level means, which stay readable when there are hundreds of attributes."""
    order, ordered, edges = _attribute_order(results)
    panels = _heatmap_panels(results, config)
    size = 3.0 if by_group else max(3.0, min(12.0, 0.045 * len(order) + 1))
    fig = Figure(figsize=(size * len(panels) + 1.6, size + 0.9), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    for ax, (title, matrix) in zip(axes, panels):
        if by_group:
            shown, names = group_correlations(matrix, [results.target_groups[t] for t in results.targets])
        else:
            shown = matrix[np.ix_(order, order)]
        image = ax.imshow(shown, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        for edge in [] if by_group else edges:
            ax.axhline(edge - 0.5, color="k", linewidth=0.3)
            ax.axvline(edge - 0.5, color="k", linewidth=0.3)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if by_group:
        axes[0].set_yticks(np.arange(len(names)), names, fontsize=7)
    elif len(order) <= 80:
        axes[0].set_yticks(np.arange(len(order)), [results.targets[i] for i in order], fontsize=5)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="mean correlation over concepts" if by_group else
                 "correlation over concepts")
    what = "mean within and between attribute groups" if by_group else "every pair of attributes, grouped"
    fig.suptitle(f"Attribute correlations ({what}): human ratings and probe predictions", fontsize=9)
    return fig


def _correlation_summary(results: ExperimentResults, config: ReportConfig) -> Figure:
    """The page's correlation figure: per attribute when they can be read (<= 30), else per group."""
    by_group = len(results.targets) > 30 and len(set(results.target_groups.values())) > 1
    return _heatmaps(results, config, by_group)


def _correlation_matrices(results: ExperimentResults, config: ReportConfig) -> Figure | None:
    """Every attribute pair, as a figure file beside the report when the page shows the group summary."""
    if len(results.targets) <= 30 or len(set(results.target_groups.values())) < 2:
        return None
    return _heatmaps(results, config, by_group=False)


def _entanglement(results: ExperimentResults, config: ReportConfig) -> Figure | None:
    sites = _sampled_sites(results.similarity)
    if not sites:
        return None
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = ((results.similarity, "similarity", "similarity to human correlations (Spearman rho)"),
              (results.confusability, "entanglement", "entanglement index (mean off-diagonal |C|)"))
    for ax, (frame, value, label) in zip(axes, panels):
        _per_site(ax, frame, value, sites)
        _reference_lines(ax, results, frame.set_index("feature_set")[value].get)
        ax.set(xlabel="denoising step (0 = pure noise)", ylabel=label)
    axes[1].axhline(entanglement_index(results.human_correlation), color="0.4", linestyle="-.", linewidth=1,
                    label="probe reproducing the human ratings")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Disentanglement along the reverse diffusion", fontsize=9)
    return fig


def _pvalues(results: ExperimentResults, config: ReportConfig) -> Figure | None:
    table = results.table
    if "p" not in table or table["p"].isna().all():
        return None
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.subplots()
    for stages, label in ((("text",), "text encoder"), (SAMPLED_STAGES, "UNet and latents"), (("image",), "image")):
        p = table.loc[table["stage"].isin(stages), "p"].dropna()
        if len(p):
            ax.hist(p, bins=20, range=(0, 1), density=True, histtype="step", linewidth=1.5, label=f"{label} ({len(p)})")
    ax.axhline(1, color="k", linestyle="--", linewidth=1, label="uniform: no attribute decodable")
    ax.set(xlabel="permutation p-value", ylabel="density",
           title=f"Permutation p-values ({int((table['q'] < config.level).sum())} probes at q < {config.level:g})")
    ax.legend(fontsize=7)
    return fig


FIGURES: dict[str, tuple[Callable[[ExperimentResults, ReportConfig], Figure | None], str]] = {
    "decoding_text": (_decoding_text, "Mean decoding (Pearson r of out-of-fold predictions, averaged over attributes) "
                      "at every text-encoder layer; blue: mean of the per-attribute bootstrap intervals; grey: "
                      "permutation null."),
    "decoding_steps": (_decoding_steps, "Mean decoding at every denoising step, one line per UNet site (dashed: "
                       "sampler latents and x0-predictions); the shaded band is the bootstrap 95% interval of the "
                       "best-decoding UNet site (thick line), grey the permutation null averaged over sites; the "
                       "dashed black line is the best text layer."),
    "groups": (_group_bars, "Mean decoding per attribute group at the best text layer and the best UNet feature "
               "set; the dashed line is the average over all attributes."),
    "correlations": (_correlation_summary, "Correlation between attributes over concepts: the human ratings, "
                     "and the probes' predictions at the best text layer and at the first, middle and last step of "
                     "the best-decoding UNet site. With more than 30 attributes, each cell is the mean correlation "
                     "within (diagonal) or between two attribute groups; every pair is in "
                     "figures/correlation_matrices.png."),
    "correlation_matrices": (_correlation_matrices, ""),
    "entanglement": (_entanglement, "Left: how closely predicted attribute correlations follow the human ones. "
                     "Right: confusability index; rising = attributes harder to tell apart."),
    "pvalues": (_pvalues, "Permutation p-values of all probes: flat at 1 when nothing is decodable (the null), "
                "piled up at 0 when attributes are decodable."),
}


LINKED_FIGURES = ("correlation_matrices",)   # too large to read in the page: files beside it, named in captions


def make_figures(results: ExperimentResults, out_dir: str | os.PathLike,
                 config: ReportConfig = ReportConfig()) -> dict[str, Path]:
    """Every figure the results allow, as out_dir/figures/<name>.png; returns {name: path}.

    Names (see `FIGURES`): decoding_text, decoding_steps, groups, correlations, correlation_matrices (every
    attribute pair, when `correlations` shows group means), entanglement, pvalues; a figure whose data the run
    lacks (no text layers, no UNet steps, no permutations, one attribute group) is left out."""
    return save_figures(out_dir, {name: draw(results, config) for name, (draw, _) in FIGURES.items()}, config.dpi)


# --- the HTML report -----------------------------------------------------------------------------------

_METHODS = (
    "Decoding: a ridge probe per attribute and feature set (a site, at one denoising step for UNet and latent "
    "sites), fit by nested cross-validation; its score is the Pearson correlation between the out-of-fold "
    "predictions and the human ratings. Intervals bootstrap the concepts; p-values come from refitting on "
    "shuffled ratings, with Benjamini-Hochberg FDR over all probes.",
    "Attribute groups: a group's mean score minus the mean over all attributes, tested by shuffling the group "
    "labels over attributes (two-sided), with Benjamini-Hochberg FDR over every feature set and group.",
    "Correlation similarity: Spearman rho between the upper triangles of the attribute correlation matrix of "
    "the predictions and that of the human ratings (pairs of attributes over the concepts rated on both). It is "
    "above 0 even at chance: a probe that learns nothing predicts its training folds' mean ratings, which vary "
    "from fold to fold together as the attributes do. Compare stages with each other and with a random model.",
    "Confusability: C[a, b] = corr(prediction of a, rating of b) / corr(prediction of a, rating of a), for "
    "attributes whose own probe reaches the threshold; the entanglement index is the mean off-diagonal |C|. A "
    "probe that reproduced the human ratings would give C = the human correlation matrix. The ratio grows as "
    "the own score shrinks, so read the index beside the decoding curve: a rising index with falling decoding "
    "may be noise rather than entanglement.",
)


def _evenly(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most n rows, spread evenly over the frame (first and last kept)."""
    return frame if len(frame) <= n else frame.iloc[np.unique(np.linspace(0, len(frame) - 1, n).round().astype(int))]


def _readable(frame: pd.DataFrame) -> pd.DataFrame:
    """A results table for the page: one short site column and a step column instead of the feature-set
    name that repeats them (the CSV files keep every column)."""
    shown = frame.drop(columns=[c for c in ("feature_set",) if c in frame])
    if "site" in shown:
        shown = shown.assign(site=shown["site"].map(short_site))
    if "timestep" in shown:
        step = shown.pop("timestep")
        shown.insert(list(shown.columns).index("site") + 1 if "site" in shown else 0, "step",
                     step.map(lambda s: "-" if s < 0 else f"{s:.0f}"))
    return shown


def _result_tables(results: ExperimentResults, config: ReportConfig) -> list[str]:
    top, level = config.top_rows, config.level
    groups = results.groups[results.groups["q"] < level]
    groups = groups.reindex(groups["difference"].abs().sort_values(ascending=False).index)
    site = results.focus_site(config.focus_site)
    followed = results.similarity.merge(results.confusability.drop(columns=["stage", "site", "timestep"]),
                                        on="feature_set")
    text = _evenly(followed[followed["stage"] == "text"], top)
    steps = _evenly(followed[followed["site"] == site].sort_values("timestep"), top)
    return [
        table_html(_readable(results.profile.sort_values("score", ascending=False).head(top)),
                    f"Decoding per feature set, best {top} (decoding.csv has all)"),
        table_html(_readable(groups.head(top)), f"Attribute groups that differ from the average at q < {level:g}, largest "
                    "first (groups.csv has all)", empty=f"No group differs from the average at q < {level:g}."),
        table_html(_readable(pd.concat([text, steps])), "Disentanglement along the text encoder and at "
                    f"{short_site(site) if site else 'no UNet site'} (similarity.csv, confusability.csv have all)"),
    ]


def _citations(results: ExperimentResults) -> list[str]:
    cited = results.metadata.get("citation") or []
    return [*([cited] if isinstance(cited, str) else cited), f"Method reproduced: {PAPER}"]


def _html(results: ExperimentResults, figures: dict[str, Path], config: ReportConfig,
          sections: Sequence[str] = ()) -> str:
    title = f"jaxprobe: semantic attributes in {results.metadata.get('model', 'the pipeline')}"
    summary = summarize(results, config.level, config.focus_site)
    random = summary[0] if results.random_weights else None  # summarize puts the warning first
    images = [figure_html(path.read_bytes(), name, FIGURES[name][1]) for name, path in figures.items()
              if name not in LINKED_FIGURES]
    dropped = results.dropped
    return page(title, [
        "<h2>What the numbers show</h2><ul>",
        *(f"<li>{html.escape(line)}</li>" for line in summary if line != random),
        "</ul>",
        "<h2>Figures</h2>", *images,
        "<h2>Tables</h2>", *_result_tables(results, config),
        *sections,
        "<h2>Run settings</h2>", settings_html({k: v for k, v in results.metadata.items() if k != "citation"}),
        f"<h2>Concepts left out ({len(dropped)})</h2>",
        table_html(dropped.head(config.top_rows), f"First {config.top_rows} (dropped.csv has all)",
                    empty="None: every concept of the norms was probed."),
        "<h2>Methods</h2>", *(f"<p class='small'>{html.escape(m)}</p>" for m in _METHODS),
        "<h2>Citations</h2><ul>", *(f"<li>{html.escape(c)}</li>" for c in _citations(results)), "</ul>",
    ], notice=random)


def write_report(results: ExperimentResults, out_dir: str | os.PathLike,
                 config: ReportConfig = ReportConfig()) -> Path:
    """Figures (`make_figures`) and out_dir/report.html: one file with the figures embedded as base64 PNG,
    the summary in words, the top rows of the tables, the run settings, the left-out concepts and the
    citations. Returns the report's path."""
    out = Path(out_dir)
    page = _html(results, make_figures(results, out, config), config,
                 variance_section(out, dpi=config.dpi, level=config.level, top_rows=config.top_rows))
    return write_atomic(out / REPORT, lambda p: p.write_text(page, encoding="utf-8"))


def rerender(out_dir: str | os.PathLike, config: ReportConfig = ReportConfig()) -> Path:
    """Figures and report.html again from the tables `write_tables` saved under out_dir."""
    return write_report(read_results(out_dir), out_dir, config)
