"""The Decoding Diffusion report: figures, a plain-language summary and one HTML page from the
tables `directions.build` and `score` wrote (so `jaxprobe directions report` needs no model)."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError
from jaxprobe.reporting.figures import save_figures
from jaxprobe.reporting.html import figure_html, page, settings_html, table_html
from jaxprobe.runtime.files import write_atomic

# Shared with directions.py: the saved files, and the labels of the neutral set and its family.
DIRECTIONS, REPORT = "directions.npz", "report.html"
NEUTRAL, BASELINE_FAMILY = "(neutral)", "(baseline)"
PAPER = ("Zeng, Chen & Wong (2024). Decoding Diffusion: A Scalable Framework for Unsupervised Analysis of "
         "Latent Space Biases and Representations Using Natural Language Prompts. arXiv:2410.21314")
_METHODS = (
    "Direction of a concept at step t: the mean h (the UNet mid_block output, spatially averaged) over the "
    "concept's generations (prompts x seeds) minus the mean over the baseline, normalised to unit length; "
    "with whitening, multiplied first by the inverse of the shrunk pooled within-concept covariance.",
    "Association of a query q with the axis a vs b at step t: 2 (mu_q - (mu_a + mu_b)/2) . (mu_a - mu_b) / "
    "|mu_a - mu_b|^2, i.e. where q's mean falls on the line from b's mean (-1) to a's mean (+1); 0 is midway. "
    "It does not depend on the baseline and has the same scale in h-space and in CLIP text space (the text "
    "encoder's features of the same prompts), so the two are compared directly. An attribute family of k > 2 "
    "concepts gives one axis per member against the mean of the others.",
    "Intervals: percentile bootstrap, resampling generations with replacement within every concept (queries "
    "and attributes), the same samples for h-space and CLIP text space, so the difference has a paired "
    "interval (with whitening, the covariance is held fixed across samples and intervals come out too "
    "narrow). UNet effect: 'amplifies' / 'attenuates' when the interval of |h| - |CLIP| excludes 0, "
    "'reverses' when both intervals exclude 0 with opposite signs.",
    "Clusters: k-means (k-means++ seeding, restarts) on the generations' h at each step; each cluster is "
    "labelled with the directions closest (cosine) to its centroid's offset from the mean of all generations.",
)


def _axis_title(name: str) -> str:
    """"man vs woman" -> two lines: the axis, then which pole is +1 (one line overflows a panel)."""
    first, second = name.split(" vs ")
    return f"{name}\n(+1 = {first}, -1 = {second})"


def _series_colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _focus(frame: pd.DataFrame, focus_step: int) -> int:
    steps = sorted(frame["step"].unique())
    if not -len(steps) <= focus_step < len(steps):
        raise InputError(f"focus_step={focus_step} is outside the {len(steps)} captured steps; give 0..{len(steps) - 1} "
                         "or a negative index from the end")
    return int(steps[focus_step])


def _association_steps(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    assoc = tables.get("associations")
    if assoc is None or assoc.empty:
        return None
    site = meta["sites"][0]
    assoc = assoc[assoc["site"] == site]
    axes_names = list(dict.fromkeys(assoc["axis"]))
    fig = Figure(figsize=(5.0 * len(axes_names), 3.8), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(axes_names), squeeze=False)[0], axes_names):
        rows = assoc[assoc["axis"] == name]
        colors = _series_colors(list(dict.fromkeys(rows["query"])))
        for query, color in colors.items():
            curve = rows[rows["query"] == query].sort_values("step")
            ax.fill_between(curve["step"], curve["ci_low"], curve["ci_high"], color=color, alpha=0.12, linewidth=0)
            ax.plot(curve["step"], curve["score"], "-o", markersize=3, color=color, label=query)
            if "clip_score" in curve:
                ax.axhline(curve["clip_score"].iloc[0], color=color, linestyle=":", linewidth=1)
        ax.axhline(0, color="k", linewidth=0.5)
        ax.set(xlabel="denoising step (0 = pure noise)", ylabel="association")
        ax.set_title(_axis_title(name), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # one legend for all panels (every panel has the same queries), outside them so it hides no line
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.suptitle(f"Association along the reverse diffusion at {site}", fontsize=10)
    return fig


def _first_site_at_focus(table: pd.DataFrame | None, meta: dict[str, Any]) -> tuple[pd.DataFrame, str, int] | None:
    """The rows of the study's first site at its focus step, with that site and step; None without rows."""
    if table is None or table.empty:
        return None
    site = meta["sites"][0]
    table = table[table["site"] == site]
    step = _focus(table, meta["focus_step"])
    return table[table["step"] == step], site, step


def _association_ranked(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    focused = _first_site_at_focus(tables.get("associations"), meta)
    if focused is None:
        return None
    assoc, site, step = focused
    axes_names = list(dict.fromkeys(assoc["axis"]))
    n_queries = assoc.groupby("axis").size().max()
    fig = Figure(figsize=(4.6 * len(axes_names), 1.2 + 0.32 * n_queries), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(axes_names), squeeze=False)[0], axes_names):
        rows = assoc[assoc["axis"] == name].sort_values("score")
        y = np.arange(len(rows))
        err = np.stack([rows["score"] - rows["ci_low"], rows["ci_high"] - rows["score"]]).clip(0)
        colors = np.where(rows["ci_low"] > 0, "tab:blue", np.where(rows["ci_high"] < 0, "tab:orange", "0.65"))
        ax.barh(y, rows["score"], xerr=err, color=colors, error_kw={"linewidth": 0.8}, label="h-space")
        if "clip_score" in rows:
            clip_err = np.stack([rows["clip_score"] - rows["clip_ci_low"], rows["clip_ci_high"] - rows["clip_score"]])
            ax.errorbar(rows["clip_score"], y, xerr=clip_err.clip(0), fmt="D", color="k", markersize=4,
                        linewidth=0.6, label="CLIP text space")
        ax.axvline(0, color="k", linewidth=0.5)
        ax.set_yticks(y, rows["query"], fontsize=7)
        ax.set_xlabel("association")
        ax.set_title(_axis_title(name), fontsize=9)
    if "clip_score" in assoc:  # the only thing a legend has to tell apart; outside, so it covers no bar
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
    fig.suptitle(f"Ranked associations at {site}, step {step}", fontsize=10)
    return fig


def _spread_labels(ax: Any, x: np.ndarray, y: np.ndarray, labels: Sequence[str], fontsize: int = 6) -> None:
    """Label every point, moving a label up by a line whenever it would land on one placed before
    (queries with similar scores otherwise print on top of each other)."""
    span_x = float(np.ptp(x)) or 1.0
    span_y = float(np.ptp(y)) or 1.0
    placed: list[tuple[float, float]] = []
    for i in np.argsort(y):
        lift = 0
        while any(abs(x[i] - px) < 0.12 * span_x and abs(y[i] + lift * 0.045 * span_y - py) < 0.04 * span_y
                  for px, py in placed):
            lift += 1
        placed.append((x[i], y[i] + lift * 0.045 * span_y))
        ax.annotate(labels[i], (x[i], y[i]), xytext=(4, 2 + lift * (fontsize + 2)), textcoords="offset points",
                    fontsize=fontsize, arrowprops={"arrowstyle": "-", "linewidth": 0.3, "color": "0.5"} if lift else None)


def _hspace_vs_clip(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    assoc = tables.get("associations")
    if assoc is None or assoc.empty or "clip_score" not in assoc:
        return None
    site = meta["sites"][0]
    assoc = assoc[assoc["site"] == site]
    step = _focus(assoc, meta["focus_step"])
    assoc = assoc[assoc["step"] == step]
    axes_names = list(dict.fromkeys(assoc["axis"]))
    fig = Figure(figsize=(4.4 * len(axes_names), 4.4), layout="constrained")
    colors = _series_colors(axes_names)
    for ax, name in zip(fig.subplots(1, len(axes_names), squeeze=False)[0], axes_names):
        rows = assoc[assoc["axis"] == name]
        ax.errorbar(rows["clip_score"], rows["score"], yerr=np.stack([rows["score"] - rows["ci_low"],
                    rows["ci_high"] - rows["score"]]).clip(0), fmt="o", color=colors[name], markersize=4,
                    linewidth=0.6)
        _spread_labels(ax, rows["clip_score"].to_numpy(), rows["score"].to_numpy(), list(rows["query"]))
        lims = np.array([rows[["clip_score", "ci_low"]].min().min(), rows[["clip_score", "ci_high"]].max().max()])
        ax.plot(lims, lims, "k--", linewidth=0.8, label="UNet adds nothing (y = x)")
        ax.axhline(0, color="0.5", linewidth=0.4)
        ax.axvline(0, color="0.5", linewidth=0.4)
        ax.set(xlabel="association in CLIP text space", ylabel=f"association in h-space (step {step})")
        ax.set_title(_axis_title(name), fontsize=9)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7)
    fig.suptitle(f"Does the UNet add to what the text encoder carries? ({site})", fontsize=10)
    return fig


def _projection_2d(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    gens = tables["generations"]
    site = meta["sites"][0]
    gens = gens[gens["site"] == site]
    step = _focus(gens, meta["focus_step"])
    gens = gens[gens["step"] == step]
    axis_cols = [c for c in gens.columns if c.startswith("axis:")]
    panels = (["axes"] if len(axis_cols) >= 2 else []) + ["pca"]
    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    colors = _series_colors(list(dict.fromkeys(gens["concept"])))
    clusters = tables.get("clusters", pd.DataFrame())
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        x, y = (axis_cols[0], axis_cols[1]) if panel == "axes" else ("pc1", "pc2")
        for concept, color in colors.items():
            rows = gens[gens["concept"] == concept]
            ax.scatter(rows[x], rows[y], s=12, color=color, label=concept, alpha=0.8)
        if panel == "pca" and not clusters.empty:
            here = clusters[(clusters["site"] == site) & (clusters["step"] == step)]
            for row in here.itertuples():
                members = gens[gens["cluster"] == row.cluster]
                ax.annotate(f"C{row.cluster}: {row.nearest_direction}", (members["pc1"].mean(), members["pc2"].mean()),
                            fontsize=7, ha="center", bbox={"boxstyle": "round", "fc": "white", "alpha": 0.7})
            ax.set(xlabel="PC 1", ylabel="PC 2", title="Principal components (clusters: nearest direction)")
        else:
            ax.axhline(0, color="0.5", linewidth=0.4)
            ax.axvline(0, color="0.5", linewidth=0.4)
            ax.set(xlabel=x.removeprefix("axis:"), ylabel=y.removeprefix("axis:"),
                   title="Every generation on two attribute axes")
    fig.axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Generations in h-space at {site}, step {step}", fontsize=9)
    return fig


def _direction_stability(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    dirs = tables.get("directions")
    if dirs is None or dirs["step"].nunique() < 2:
        return None
    site = meta["sites"][0]
    dirs = dirs[(dirs["site"] == site) & (dirs["family"] != BASELINE_FAMILY)]
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for concept, color in _series_colors(list(dict.fromkeys(dirs["concept"]))).items():
        curve = dirs[dirs["concept"] == concept].sort_values("step")
        ax.plot(curve["step"], curve["cos_to_last_step"], "-", color=color, label=concept)
    if "image_directions" in tables:
        image = tables["image_directions"]
        image = image[image["site"] == site]
        for concept, curve in image.groupby("concept"):
            ax.plot(curve["step"], curve["cos_image_caption"], "--", color="k", linewidth=0.8)
    ax.set(xlabel="denoising step (0 = pure noise)", ylabel="cosine to the last step's direction",
           title=f"When do the directions form? ({site})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _query_projections(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> pd.DataFrame | None:
    """(rows: the `score --prompts` queries, then the study's concepts; columns: directions) of the mean
    projection over seeds at the focus step of the first site; None without queries."""
    focused = _first_site_at_focus(tables.get("prompt_projections"), meta)
    if focused is None:
        return None
    queries, site, step = focused
    columns = [c for c in queries.columns if c.startswith("dir:")]
    mean = queries.groupby("prompt", sort=False)[columns].mean()
    gens = tables["generations"]
    gens = gens[(gens["site"] == site) & (gens["step"] == step) & (gens["concept"] != NEUTRAL)]
    reference = gens.groupby("concept", sort=False)[columns].mean()
    frame = pd.concat([mean, reference.rename(index=lambda c: f"{c} (study concept)")])
    frame.columns = [c.removeprefix("dir:") for c in columns]
    return frame.drop(columns=[NEUTRAL], errors="ignore")  # the neutral set's direction is 0: its own baseline


def _query_heatmap(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> Any:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    frame = _query_projections(tables, meta)
    if frame is None:
        return None
    n_queries = tables["prompt_projections"]["prompt"].nunique()
    fig = Figure(figsize=(2.5 + 0.75 * frame.shape[1], 1.4 + 0.3 * len(frame)), layout="constrained")
    ax = fig.subplots()
    limit = float(np.nanmax(np.abs(frame.to_numpy()))) or 1.0
    image = ax.imshow(frame.to_numpy(), cmap=colormaps["RdBu_r"], vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(frame.to_numpy()):
        ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6)
    ax.axhline(n_queries - 0.5, color="k", linewidth=1)  # queries above, the study's concepts below
    ax.set_xticks(np.arange(frame.shape[1]), frame.columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(frame)), frame.index, fontsize=7)
    ax.set_xlabel("direction")
    fig.colorbar(image, ax=ax, shrink=0.8, label="projection of h onto the direction")
    step = _focus(tables["prompt_projections"], meta["focus_step"])
    ax.set_title(f"Queries of `score --prompts` on the concept directions\n{meta['sites'][0]}, step {step}", fontsize=9)
    return fig


def _has_clip(tables: dict[str, pd.DataFrame]) -> bool:
    assoc = tables.get("associations")
    return assoc is not None and "clip_score" in assoc


def _steps_caption(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> str:
    clip = ("; dotted horizontal lines, in the query's colour: the same association in CLIP text space, which "
            "has no steps") if _has_clip(tables) else ""
    return (f"Association of every query with every attribute axis at each denoising step at {meta['sites'][0]}, "
            f"with {meta['level']:.0%} bootstrap bands{clip}.")


def _ranked_caption(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> str:
    clip = "; black diamonds with whiskers: the same in CLIP text space" if _has_clip(tables) else ""
    return (f"Queries ranked by association at the focus step, with {meta['level']:.0%} bootstrap intervals; "
            f"bars blue (towards the first pole) or orange (the second) when the interval excludes 0, grey "
            f"otherwise{clip}.")


def _stability_caption(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> str:
    images = ("; dashed black, one per image concept: cosine between its image and caption directions"
              if "image_directions" in tables else "")
    return f"Cosine between each concept's direction at a step and at the last step{images}."


def _fixed(text: str) -> Callable[[dict[str, pd.DataFrame], dict[str, Any]], str]:
    return lambda tables, meta: text


# name: (draw, caption); a caption is made from the tables, so it names only what the figure draws.
FIGURES: dict[str, tuple[Callable[[dict[str, pd.DataFrame], dict[str, Any]], Any],
                         Callable[[dict[str, pd.DataFrame], dict[str, Any]], str]]] = {
    "association_steps": (_association_steps, _steps_caption),
    "association_ranked": (_association_ranked, _ranked_caption),
    "hspace_vs_clip": (_hspace_vs_clip, _fixed(
        "h-space against CLIP text space at the focus step, one panel per axis and one point per query (whiskers: "
        "the h-space bootstrap interval): above the dashed diagonal on the positive side, or below it on the "
        "negative side, the UNet amplifies the text encoder's association.")),
    "projection_2d": (_projection_2d, _fixed(
        "Left (with two or more axes): every generation's position on the first two attribute axes (-1/+1: the "
        "poles' means). Right: the first two principal components of h, with each k-means cluster labelled by "
        "its nearest direction at the mean of its members.")),
    "direction_stability": (_direction_stability, _stability_caption),
    "query_projections": (_query_heatmap, _fixed(
        "Each `score --prompts` query's projection of h onto each concept's unit direction at the focus step "
        "of the first site, averaged over seeds (above the line), and the study's own concepts' generations "
        "for reference (below it).")),
}


def read_tables(out: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    out = Path(out)
    needed = ["generations.parquet", "clusters.parquet", "directions.parquet", "metadata.json"]
    missing = [f for f in needed if not (out / f).is_file()]
    if missing:
        raise InputError(f"{out} lacks {missing}: run `jaxprobe directions build` and `score` into it first")
    tables = {p.stem: pd.read_parquet(p) for p in out.glob("*.parquet")}
    return tables, json.loads((out / "metadata.json").read_text())


def make_figures(out: str | Path, dpi: int = 110) -> dict[str, Path]:
    """Every figure the tables under `out` allow, as out/figures/<name>.png (names: `FIGURES`)."""
    tables, meta = read_tables(out)
    return save_figures(out, {name: draw(tables, meta) for name, (draw, _) in FIGURES.items()}, dpi)


def summarize(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> list[str]:
    """The findings in words, at the focus step of the first site."""
    lines = []
    if is_random_weights(meta):
        lines.append(f"This model ({meta.get('model', 'unnamed')}) has random weights: any association here is "
                     "noise from the sampling, and most intervals should include 0. Run a real checkpoint for findings.")
    assoc = tables.get("associations")
    if assoc is None or assoc.empty:
        return lines + ["No associations were configured."]
    site = meta["sites"][0]
    assoc = assoc[assoc["site"] == site]
    step = _focus(assoc, meta["focus_step"])
    here = assoc[assoc["step"] == step]
    clear = here[(here["ci_low"] > 0) | (here["ci_high"] < 0)]
    lines.append(f"At {site}, step {step}: {len(clear)} of {len(here)} query x axis associations have a "
                 f"{meta['level']:.0%} interval that excludes 0.")
    for row in clear.reindex(clear["score"].abs().sort_values(ascending=False).index).head(5).itertuples():
        pole = row.axis.split(" vs ")[0 if row.score > 0 else 1]
        lines.append(f"{row.query} leans towards {pole} on {row.axis}: {row.score:+.2f} "
                     f"[{row.ci_low:+.2f}, {row.ci_high:+.2f}]")
    if "unet_effect" in here:
        lines.append(_unet_effect_sentence(here["unet_effect"]))
    return lines


_EFFECT_WORDS = {"amplifies": "the UNet amplifies the association", "attenuates": "the UNet attenuates the association",
                 "reverses": "the UNet reverses its sign",
                 "no clear change": "no clear change (the interval of |h| - |CLIP| includes 0)"}


def _unet_effect_sentence(effects: pd.Series) -> str:
    """The counts of directions.py's `_unet_effect` labels as one sentence (the labels alone read as
    "no clear change 12")."""
    counts = effects.value_counts()
    parts = [f"{_EFFECT_WORDS.get(effect, effect)} in {n}" for effect, n in counts.items()]
    return (f"h-space against CLIP text space of the same prompts, over {len(effects)} "
            f"association{'s' if len(effects) != 1 else ''}: " + "; ".join(parts) + ".")


def _focus_tables(tables: dict[str, pd.DataFrame], meta: dict[str, Any], top: int) -> list[str]:
    site = meta["sites"][0]
    parts = []
    assoc = tables.get("associations")
    if assoc is not None and not assoc.empty:
        assoc = assoc[assoc["site"] == site]
        step = _focus(assoc, meta["focus_step"])
        here = assoc[assoc["step"] == step].sort_values(["axis", "rank"])
        columns = [c for c in ("axis", "rank", "query", "score", "ci_low", "ci_high", "clip_score", "clip_ci_low",
                               "clip_ci_high", "delta", "delta_ci_low", "delta_ci_high", "unet_effect") if c in here]
        parts.append(table_html(here[columns], f"Associations at {site}, step {step}, ranked (associations.csv has "
                                 "every site and step)"))
    clusters = tables["clusters"]
    here = clusters[clusters["site"] == site]
    if not here.empty:
        step = _focus(here, meta["focus_step"])
        parts.append(table_html(here[here["step"] == step].drop(columns=["site"]).head(top),
                                 f"k-means clusters at step {step} (clusters.csv has every step)"))
    queries = _query_projections(tables, meta)
    if queries is not None:
        step = _focus(tables["prompt_projections"], meta["focus_step"])
        parts.append(table_html(queries.reset_index(names="prompt"),
                                f"Projections of the --prompts queries at {site}, step {step}: mean over seeds, "
                                "with the study's concepts for reference (prompt_projections.csv has every seed, "
                                "site and step)"))
    if "image_directions" in tables:
        image = tables["image_directions"]
        summary = image.groupby(["site", "concept"], as_index=False)["cos_image_caption"].agg(["mean", "max"])
        parts.append(table_html(summary, "Image vs caption directions: cosine over the steps (image_directions.csv)"))
    return parts


def report(out: str | Path, *, dpi: int = 110, top: int = 20) -> Path:
    """Figures and out/report.html (figures embedded, summary, ranked tables, settings, methods) from the
    tables `build` and `score` wrote under `out`. Returns the report's path."""
    out = Path(out)
    figures = make_figures(out, dpi)
    tables, meta = read_tables(out)
    summary = summarize(tables, meta)
    notice = summary.pop(0) if is_random_weights(meta) else None
    images = [figure_html(p.read_bytes(), name, FIGURES[name][1](tables, meta)) for name, p in figures.items()]
    title = f"jaxprobe: directions in h-space of {meta.get('model', 'the pipeline')}"
    document = page(title, [
        "<h2>What the numbers show</h2><ul>", *(f"<li>{html.escape(line)}</li>" for line in summary), "</ul>",
        "<h2>Figures</h2>", *images, "<h2>Tables</h2>", *_focus_tables(tables, meta, top),
        "<h2>Run settings</h2>", settings_html(meta),
        "<h2>Methods</h2>", *(f"<p class='small'>{html.escape(m)}</p>" for m in _METHODS),
        f"<h2>Citation</h2><ul><li>Method reproduced: {html.escape(PAPER)}</li></ul>",
    ], notice=notice)
    return write_atomic(out / REPORT, lambda p: p.write_text(document, encoding="utf-8"))
