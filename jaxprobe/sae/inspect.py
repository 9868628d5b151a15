"""What the SAE latents respond to: top-activating inputs, human-norm correlations, category purity, HTML.

    table = latent_table(saes, features, labels=prompts, norms=load_norms("binder"))
    inspect_saes(saes, features, "runs/sae/inspect", labels=prompts, norms=..., images=None)

One row per (feature set, latent): how often it fires, its mean activation over all inputs, its `top_n`
top-activating inputs; with norms, the attribute its activation correlates with best across inputs
(Pearson r over the inputs whose concept is rated) and, where the norms give categories, the purity of
its top inputs (the share of them in their most common category). A latent is named by an attribute
only when at least `min_rated` inputs (MIN_RATED) are rated on it, and by a category only when at least
`min_rated` inputs have one: an r or a purity of 1.00 over a dozen inputs names nothing. The page shows
the model and settings (with a caveat for random weights), per feature set the explained variance, L0
and dead fraction, the training curves, and the latents with their inputs (thumbnails for images).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from jaxprobe.captures import Captures
from jaxprobe.errors import InputError
from jaxprobe.pipeline.images import load_images
from jaxprobe.pipeline.sites import short_site
from jaxprobe.reporting.html import figure_html, page, png_bytes, settings_html, table_html
from jaxprobe.runtime.files import write_atomic
from jaxprobe.sae.curves import site_of, training_curves
from jaxprobe.sae.train import (ALL_CURVES, SAEs, as_source, features_provenance, latent_statistics, load_saes,
                                reconstruction_metrics)

TABLE, PAGE = "latents", "sae_report.html"
MIN_RATED = 20  # the fewest rated inputs a latent's attribute or category label may rest on
RANDOM_NOTICE = ("The features come from a model with random weights ({model}): it learnt nothing, so an SAE "
                 "latent that correlates with a norms attribute or gathers one category does so by chance or "
                 "through surface form (word length, tokens), not meaning. Train on a real checkpoint's features "
                 "for findings.")


def concepts_in(prompts: Sequence[str], concepts: Sequence[str]) -> list[str | None]:
    """Per prompt, the longest concept it contains as whole words (None: none)."""
    ordered = sorted(concepts, key=len, reverse=True)
    patterns = [(c, re.compile(rf"(?<!\w){re.escape(c)}(?!\w)", re.IGNORECASE)) for c in ordered]
    return [next((c for c, p in patterns if p.search(prompt)), None) for prompt in prompts]


def _correlations(s: Any, y: np.ndarray) -> np.ndarray:
    """Pearson r (m, A) of each latent's activation with each attribute, over the rows rating it."""
    rated = np.isfinite(y)
    n = rated.sum(0).astype(np.float64)
    y0 = np.where(rated, y, 0.0)
    sy, syy = y0.sum(0), np.square(y0).sum(0)
    cov = n * s.a_y - s.a_rated * sy
    var_a = n * s.a2_rated - np.square(s.a_rated)
    var_y = n * syy - np.square(sy)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(var_a * var_y)
    return np.where((var_a > 1e-12 * np.maximum(n, 1) ** 2) & (var_y > 0), r, np.nan)


def latent_table(saes: SAEs, features: Any, *, labels: Sequence[str] | None = None,
                 concepts: Sequence[str | None] | None = None, norms: Any = None,
                 categories: Sequence[str | None] | None = None, top_n: int = 8,
                 sites: Sequence[str] | None = None, min_rated: int = MIN_RATED) -> pd.DataFrame:
    """One row per (feature set, latent); see the module docstring.

    labels: per input, the text shown for it (default: its row number). concepts: per input, its norms
    concept (default: the longest norms concept in its label). categories: per input (default: the
    norms' `category` metadata of its concept). Columns: feature_set, latent, frequency, mean_activation,
    top_rows, top_activations, top_labels and, with norms, best_attribute, best_r (over the attributes
    rated on at least `min_rated` inputs; None and NaN when none is), n_rated (the inputs that r rests on;
    without a best attribute, the most any attribute has); with categories, top_category, purity (None and
    NaN when fewer than `min_rated` inputs have a category), n_categorised (inputs with a category) and
    n_top_categorised (the top inputs with one: purity's denominator).
    """
    return _latents(saes, features, labels=labels, concepts=concepts, norms=norms, categories=categories,
                    top_n=top_n, sites=sites, min_rated=min_rated)[0]


def _latents(saes: SAEs, features: Any, *, labels: Sequence[str] | None, concepts: Sequence[str | None] | None,
             norms: Any, categories: Sequence[str | None] | None, top_n: int, sites: Sequence[str] | None,
             min_rated: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(latent_table, reconstruction_metrics) from one pass over the data."""
    if min_rated < 1:
        raise InputError(f"min_rated must be at least 1, not {min_rated}")
    source = as_source(features, sites)
    labels = [str(i) for i in range(source.n)] if labels is None else [str(x) for x in labels]
    if len(labels) != source.n:
        raise InputError(f"{len(labels)} labels for {source.n} inputs: give one label (prompt) per feature row")
    targets = None
    if norms is not None:
        concepts = concepts_in(labels, norms.concepts) if concepts is None else list(concepts)
        if len(concepts) != source.n:
            raise InputError(f"{len(concepts)} concepts for {source.n} inputs: give one concept per feature row")
        if not any(concepts):
            raise InputError("no input names a concept of the norms: pass concepts= (one per input)")
        row = {c: i for i, c in enumerate(norms.concepts)}
        targets = np.full((source.n, len(norms.attributes)), np.nan)
        known = [i for i, c in enumerate(concepts) if c in row]
        targets[known] = norms.values[[row[concepts[i]] for i in known]]
        if categories is None:
            column = next((c for c in ("category", "super_category") if c in norms.metadata), None)
            if column:
                categories = [norms.metadata[column].get(c) if c in row else None for c in concepts]
    stats = latent_statistics(saes, source, top_n=top_n, targets=targets)
    frames = []
    for name, s in stats.items():
        n = float(s.n_rows)
        top_rows = [rows[values > 0].tolist() for rows, values in zip(s.top_rows, s.top_values)]
        frame = pd.DataFrame({
            "feature_set": name, "latent": np.arange(len(s.fire_count)), "frequency": s.fire_count / n,
            "mean_activation": s.activation_sum / n, "top_rows": top_rows,
            "top_activations": [values[values > 0].tolist() for values in s.top_values],
            "top_labels": [[labels[r] for r in rows] for rows in top_rows]})
        if targets is not None:
            n_rated = np.isfinite(targets).sum(0)  # (A,): the inputs each attribute's r is taken over
            r = np.where(n_rated >= min_rated, _correlations(s, targets), np.nan)
            best = np.nanargmax(np.where(np.isnan(r), -np.inf, np.abs(r)), axis=1)
            frame["best_attribute"] = np.asarray(norms.attributes)[best]
            frame["best_r"] = r[np.arange(len(r)), best]
            frame["n_rated"] = n_rated[best]
            unnamed = np.isnan(frame["best_r"])
            frame.loc[unnamed, "best_attribute"] = None
            frame.loc[unnamed, "n_rated"] = n_rated.max()
        if categories is not None:
            n_categorised = sum(_known(c) for c in categories)
            top_category, purity, n_top = zip(*(_purity([categories[i] for i in rows]) for rows in top_rows))
            few = n_categorised < min_rated
            frame["top_category"] = [None] * len(frame) if few else top_category
            frame["purity"] = np.full(len(frame), np.nan) if few else purity
            frame["n_categorised"], frame["n_top_categorised"] = n_categorised, n_top
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), reconstruction_metrics(stats)


def _known(category: Any) -> bool:
    return bool(pd.notna(category))  # None, or NaN: a concept the metadata leaves blank


def _purity(categories: list[str | None]) -> tuple[str | None, float, int]:
    """(most common category, its share, how many had a category) of a latent's top inputs."""
    known = [c for c in categories if _known(c)]
    if not known:
        return None, float("nan"), 0
    category, count = Counter(known).most_common(1)[0]
    return category, count / len(known), len(known)


# --- the page ------------------------------------------------------------------------------------------


def _frequency_histogram(table: pd.DataFrame) -> Figure:
    """Latents per log10 firing frequency, one outline per site (its SAEs' latents pooled)."""
    figure = Figure(figsize=(7, 3), layout="constrained")
    ax = figure.subplots()
    for site, rows in table.groupby(table["feature_set"].map(site_of), sort=False):
        n = rows["feature_set"].nunique()
        ax.hist(np.log10(rows["frequency"].clip(lower=1e-7)), bins=40, histtype="step",
                label=f"{short_site(site)} ({n} SAEs)" if n > 1 else short_site(site))
    ax.set_xlabel("log10 firing frequency over the inputs (never fired: -7)")
    ax.set_ylabel("latents")
    figure.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    return figure


def _thumbnail_css(images: Any, rows: set[int], size: int) -> str:
    """One CSS class per shown input (.i<row>) carrying its thumbnail, so each image is embedded once."""
    from PIL import Image

    rows = sorted(rows)
    if isinstance(images, np.ndarray):
        pixels = load_images(images[rows], size)
    else:
        pixels = load_images([images[r] for r in rows], size)
    rules = []
    for row, image in zip(rows, pixels):
        buffer = io.BytesIO()
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        rules.append(f".i{row}{{background-image:url(data:image/png;base64,{data})}}")
    return "\n".join(rules)


def _order(frame: pd.DataFrame, min_inputs: int = 3) -> pd.DataFrame:
    """Live latents, most interpretable first: by |best_r|, else purity, else frequency; latents that
    fire on fewer than `min_inputs` inputs (whose r and purity mean little) come last."""
    live = frame[frame["frequency"] > 0]
    key = next((c for c in ("best_r", "purity") if c in live and live[c].notna().any()), "frequency")
    few = live["top_rows"].map(len) < min(min_inputs, live["top_rows"].map(len).max())
    order = pd.DataFrame({"few": few, "key": -live[key].abs()}).sort_values(["few", "key"], na_position="last")
    return live.loc[order.index]


def _label_cells(label: Any, value: str, n: int, min_rated: int, span: int) -> str:
    """The cells of one norms label (attribute or category): the label and its numbers; or why there is
    none: too few rated inputs, or "-" when there are enough but no value (r of a latent constant on
    them; no top input with a category)."""
    if pd.notna(label):
        return f"<td class='left'>{html.escape(str(label))}</td>{value}"
    if n < min_rated:
        return f"<td class='left' colspan='{span}'>too few rated inputs ({n})</td>"
    return f"<td colspan='{span}'>-</td>"


def _latent_rows(frame: pd.DataFrame, images: bool, min_rated: int) -> str:
    out = []
    for row in frame.itertuples(index=False):
        cells = [f"<td>{row.latent}</td>", f"<td>{row.frequency:.3g}</td>", f"<td>{row.mean_activation:.3g}</td>"]
        if "best_r" in frame:
            cells.append(_label_cells(row.best_attribute, f"<td>{row.best_r:.2f}</td><td>{row.n_rated}</td>",
                                      row.n_rated, min_rated, 3))
        if "purity" in frame:
            purity = f"<td>{row.purity:.2f} ({row.n_top_categorised} of {len(row.top_rows)})</td>"
            cells.append(_label_cells(row.top_category, purity, row.n_categorised, min_rated, 2))
        inputs = []
        for r, label, value in zip(row.top_rows, row.top_labels, row.top_activations):
            tip = html.escape(f"{label} ({value:.3g})", quote=True)
            inputs.append(f"<span class='thumb i{r}' title='{tip}'></span>" if images
                          else f"<span class='input' title='{value:.3g}'>{html.escape(label)}</span>")
        cells.append(f"<td class='left'>{''.join(inputs)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out)


_EXTRA_CSS = """body{max-width:1300px}
.input{display:inline-block;background:#eef;border-radius:3px;margin:1px 2px;padding:0 4px}
.thumb{display:inline-block;width:{size}px;height:{size}px;margin:1px;background-size:cover}
details{margin:1em 0}summary{font-size:1.15em;font-weight:600;cursor:pointer}"""


def _curves_caption(saes: SAEs) -> str:
    return (f"Training curves: for each site, the median over its SAEs (one per denoising step, or one) of the "
            f"metric logged every {saes.config.log_every} steps on the training batch, with the range from "
            "the lowest to the highest SAE shaded. Dead fraction: the share of latents that did not fire in the "
            f"last {saes.dead_window:,} training rows (dead_tokens {saes.config.dead_tokens:,}, capped at one pass "
            f"over the {saes.n_rows or 'training'} rows). Every SAE's own curves: {ALL_CURVES} in the training "
            "folder.")


def sae_page(table: pd.DataFrame, metrics: pd.DataFrame | None = None, saes: SAEs | None = None,
             images: Any = None, max_latents: int = 40, thumbnail: int = 64, title: str = "SAE latents", *,
             settings: dict[str, Any] | None = None, min_rated: int = MIN_RATED) -> str:
    """The self-contained HTML page of `latent_table`'s table (base64 figures and thumbnails).

    saes: for the training curves and the random-weights caveat (their `model`); settings: the run
    settings table; min_rated: the `latent_table` setting that decided which latents are named."""
    shown = {name: _order(frame).head(max_latents) for name, frame in table.groupby("feature_set", sort=False)}
    css = _EXTRA_CSS.replace("{size}", str(thumbnail))
    if images is not None:
        css += "\n" + _thumbnail_css(images, {r for f in shown.values() for rows in f["top_rows"] for r in rows},
                                     thumbnail)
    parts = []
    if metrics is not None:
        parts.append("<h2>Reconstruction</h2><p>One pass over all the inputs with the final weights: explained "
                     "variance, L0 (active latents per input) and dead fraction (the share of latents that fired on "
                     "no input).</p>" + table_html(metrics, "Per feature set (metrics.csv in the training folder)"))
    if saes is not None and len(saes.history):
        parts.append("<h2>Training</h2>" + figure_html(png_bytes(training_curves(saes.history, saes.dead_window)),
                                                       "training curves", _curves_caption(saes)))
    labels = []
    if "best_r" in table:
        labels.append(f"the attribute is named only when at least {min_rated} inputs are rated on it (r: Pearson "
                      "correlation of the activation with the ratings over those inputs, whose number is shown)")
    if "purity" in table:
        labels.append(f"the category only when at least {min_rated} inputs have one (purity: the share of the "
                      "top inputs with a category that are in the most common one, of how many)")
    parts.append("<h2>Latents</h2>" + figure_html(
        png_bytes(_frequency_histogram(table)), "firing frequencies",
        "Latents per firing frequency (the share of inputs a latent is active on), one outline per site with "
        "the latents of its SAEs pooled; latents that never fired are at -7.") +
        f"<p>Per feature set, up to {max_latents} live latents, ordered by |best r| with the norms, else by the "
        "purity of their top inputs, else by firing frequency. Hover an input for its activation."
        + (f" Norms labels: {'; '.join(labels)}." if labels else "") + "</p>")
    header = "<tr><th>latent</th><th>frequency</th><th>mean act.</th>"
    header += "<th>best attribute</th><th>r</th><th>rated inputs</th>" if "best_r" in table else ""
    header += "<th>top category</th><th>purity (of top inputs)</th>" if "purity" in table else ""
    header += "<th class='left'>top-activating inputs</th></tr>"
    for i, (name, frame) in enumerate(shown.items()):
        n_live = int((table.loc[table["feature_set"] == name, "frequency"] > 0).sum())
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{html.escape(name)} ({n_live} live latents)"
                     f"</summary><table>{header}{_latent_rows(frame, images is not None, min_rated)}</table></details>")
    if settings:
        parts += ["<h2>Run settings</h2>", settings_html(settings)]
    model = saes.model if saes is not None else None
    notice = RANDOM_NOTICE.format(model=model) if saes is not None and saes.random_weights else None
    return page(title, parts, notice=notice, extra_css=css)


def _manifest_prompts(features: Any) -> list[str] | None:
    """The prompts of a Captures, of a `jaxprobe extract` folder (manifest.json), or of a FeatureStore entry."""
    if isinstance(features, Captures):
        return list(features.prompts) or None
    if not isinstance(features, (str, Path)):
        return None
    manifest = Path(features) / "manifest.json"
    if not manifest.is_file():
        return None
    meta = json.loads(manifest.read_text())
    prompts = meta.get("prompts") or meta.get("description", {}).get("prompts")
    return [str(p) for p in prompts] if prompts else None


def _image_list(images: Any) -> Any:
    """A folder of image files (sorted by name), a .npy array file, or what `pipeline.images.load_images` takes."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r")
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
            if not files:
                raise InputError(f"no image files (.png, .jpg, .webp, .bmp) in {path}")
            return files
        raise InputError(f"images: {path} is neither a folder of images nor a .npy array")
    return images


def inspect_saes(saes: SAEs | str | Path, features: Any, out: str | Path, *, images: Any = None,
                 norms: Any = None, labels: Sequence[str] | None = None, concepts: Sequence[str | None] | None = None,
                 categories: Sequence[str | None] | None = None, top_n: int = 8,
                 sites: Sequence[str] | None = None, max_latents: int = 40, min_rated: int = MIN_RATED) -> Path:
    """latent_table -> out/latents.parquet (+ .csv) and out/sae_report.html. Returns the page's path.

    saes: SAEs or the folder `train_saes` wrote. sites: default the sites they were trained on. norms: a Norms or a `load_norms` name/path. labels:
    default the prompts of a `jaxprobe extract` folder's manifest; concepts: default its concepts.txt
    (`jaxprobe extract --concepts`), else guessed from the labels (`concepts_in`). images: (n, H, W, 3)
    array, n paths, a folder of n image files or a .npy, one per input, shown as thumbnails. min_rated:
    see `latent_table`."""
    saes = load_saes(saes)
    if saes.model is None:  # SAEs trained before checkpoints recorded the model: the features may say
        saes = dataclasses.replace(saes, **features_provenance(features))
    if sites is None:  # the sites the SAEs were trained on, whatever else the features hold
        sites = sorted({name.split("@")[0] for name in saes.names})
    if isinstance(norms, (str, Path)):
        from jaxprobe.norms import load_norms

        norms = load_norms(norms)
    labels = _manifest_prompts(features) if labels is None else labels
    if concepts is None and isinstance(features, (str, Path)) and (Path(features) / "concepts.txt").is_file():
        from jaxprobe.runtime.files import read_lines  # written by `jaxprobe extract --concepts`: exact, no guessing

        concepts = read_lines(Path(features) / "concepts.txt", "concepts file")
    source = as_source(features, sites)
    images = _image_list(images)
    if images is not None and len(images) != source.n:
        raise InputError(f"{len(images)} images for {source.n} inputs: give one image (or path) per feature row")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, metrics = _latents(saes, source, labels=labels, concepts=concepts, norms=norms, categories=categories,
                              top_n=top_n, sites=None, min_rated=min_rated)
    write_atomic(out / f"{TABLE}.parquet", lambda p: table.to_parquet(p, index=False))
    write_atomic(out / f"{TABLE}.csv", lambda p: table.to_csv(p, index=False))
    c = saes.config
    settings = {
        "model": saes.model or "not recorded (features without a manifest)", "random weights": saes.random_weights,
        "loaded": saes.loaded or "not recorded",
        "features": str(features) if isinstance(features, (str, Path)) else type(features).__name__,
        "inputs": source.n, "SAEs": len(saes.names), "sites": sites,
        "SAE": f"TopK k={c.k}, {c.expansion}x expansion, aux_k={c.aux_k}",
        "training": f"{saes.step} of {c.steps} steps, batches of {min(c.batch_size, saes.n_rows or c.batch_size)} "
                    f"rows, lr {c.learning_rate:g} after {c.warmup_steps} warm-up steps, seed {c.seed}",
        "dead latent (training curves)": f"silent for {saes.dead_window:,} training rows "
                                         f"(dead_tokens {c.dead_tokens:,})",
        "norms": getattr(norms, "name", None) or ("given" if norms is not None else "none"),
        "min rated inputs per label": min_rated, "top inputs per latent": top_n}
    page = sae_page(table, metrics, saes, images=images, max_latents=max_latents, settings=settings,
                    min_rated=min_rated, title=f"SAE latents: features of {saes.model or 'an unnamed model'}")
    return write_atomic(out / PAGE, lambda p: p.write_text(page, encoding="utf-8"))
