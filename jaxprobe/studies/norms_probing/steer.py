"""The causal test of the probes: steer generation along an attribute's probe direction and ask whether the
attribute moves downstream, in a later site and in the generated images, not only where the probe reads it.

    probe_steer("runs/sd15", "unet.mid_block@10", ["Happy"], scales=(0, 2, 4, 8))

1. The run's settings (config.toml) give the model, norms, prompts and sampling. The features of the site
   (and of the readout sites) come from the feature store (a finished run's are read back; others are
   computed by the run's own extraction) as concept means, as the study probed them.
2. The attribute's probe is refitted on every concept with the alpha the study selected (the probe table's
   `alpha`, the median over outer folds; RidgeCV's inner selection where the table has none), standardized
   as the sweep fits it. Its weights in feature units (the standardized weights / feature std) are the
   direction, normalised to unit length. **Scale unit:** one standard deviation of the concepts' features
   along that direction, so scale s moves the site's (spatially pooled) activation as far as s concept-to-
   concept standard deviations along the probe: comparable across sites and models, whatever their norms.
3. The prompts (default: the first `n_prompts` concepts with the run's first template) are generated with
   `Steer(site, direction, scale)` at each scale, over `steps` (default: the probe's own step only). One
   compiled program: the scale is a traced input. A text-layer probe (fitted on the EOS token) is added at
   every token of the conditioning, as Steer does with a (c,) vector.
4. Measures, per generation: (a) the attribute's probe read out from the CLIP image embeddings of the
   generated images, that probe fitted on the image embeddings of the unsteered generations of every concept
   (the study's own image features when it had an image encoder, else computed with `image_encoder`);
   (b) the attribute's probe fitted at a later site (default: the same site at the run's last step, which
   the default steering never touches; for a site at the last step, the next site the run captured after it)
   and read out from the steered runs' captures there. Per scale, the mean with a bootstrap interval and
   the change from the first scale with a paired bootstrap interval; both in the attribute's rating units.

Writes OUT (default RESULTS/steer/<site>/<attributes>/): steer.parquet/.csv, figures/dose_response_<group>.png
(one per attribute group), figures/grid_<attribute>.png, steer.html.
"""

from __future__ import annotations

import difflib
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import jaxprobe
from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError, SiteError
from jaxprobe.features.extract import build_prompts
from jaxprobe.features.steering import steered_generations
from jaxprobe.probes.estimators import RidgeCV
from jaxprobe.probes.ridge import fit_ridge
from jaxprobe.probes.stats import dose_response
from jaxprobe.reporting.figures import dose_response_figure, image_grid, save_figures
from jaxprobe.reporting.html import figure_html, page, png_bytes, settings_html, table_html
from jaxprobe.runtime.files import atomic_write_text, read_lines, write_table
from jaxprobe.studies.norms_probing.experiment import CONFIG_FILE, IMAGE_SITE, ExperimentConfig, study_features, study_norms

STEER_PAGE = "steer.html"
PROBES = "probes.parquet"
MEASURES = {"image": "CLIP image embedding", "readout": "later site"}


@dataclass(frozen=True)
class Probe:
    """A probe refitted on every concept: prediction = features @ coef + intercept (feature units)."""

    feature_set: str
    attribute: str
    alpha: float
    coef: np.ndarray        # (d,)
    intercept: float
    std: np.ndarray         # (d,) feature std the standardized fit divided by

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.coef + self.intercept


def split_feature_set(name: str) -> tuple[str, int | None]:
    """"unet.mid_block@3" -> ("unet.mid_block", 3); a site without a step axis -> (site, None)."""
    match = re.fullmatch(r"(.+)@(\d+)", name)
    return (match[1], int(match[2])) if match else (name, None)


def read_study(results: str | Path) -> tuple[ExperimentConfig, pd.DataFrame]:
    """The run's config and probe table, or a named error saying what folder to give."""
    folder = Path(results)
    missing = [f for f in (CONFIG_FILE, PROBES) if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder} is not a norms-probing results folder (it lacks {', '.join(missing)}): give the "
                         "--out folder of a finished `jaxprobe run` (run_experiment)")
    return ExperimentConfig.from_toml(folder / CONFIG_FILE), pd.read_parquet(folder / PROBES)


def check_choices(table: pd.DataFrame, feature_set: str, attributes: Sequence[str]) -> None:
    """Named errors, before any model loads, for a feature set or attribute the run never probed."""
    sets = list(dict.fromkeys(table["feature_set"]))
    if feature_set not in sets:
        close = difflib.get_close_matches(feature_set, sets, n=4, cutoff=0.4)
        raise SiteError(f"site {feature_set!r} is no feature set of this run; give one of its probe table "
                        f"(\"site@step\" for a sampled site), e.g. {', '.join(close or sets[:4])}")
    if not attributes:
        raise InputError("give at least one attribute (--attribute NAME, repeatable)")
    targets = list(dict.fromkeys(table["target"]))
    for attribute in attributes:
        if attribute not in targets:
            close = difflib.get_close_matches(attribute, targets, n=4, cutoff=0.4)
            raise InputError(f"attribute {attribute!r} is not in the run's norms; choose from its targets, e.g. "
                             f"{', '.join(close or targets[:6])} ({len(targets)} in probes.parquet)")


def default_readout(config: ExperimentConfig, table: pd.DataFrame, feature_set: str) -> str:
    """The later feature set the probe is read out at: the same site at the run's last step when the steered
    step is earlier, else the next sampled site the run captured, at the same step."""
    site, step = split_feature_set(feature_set)
    sets = list(dict.fromkeys(table["feature_set"]))
    stepped = [s for s in sets if split_feature_set(s)[1] is not None]
    last = max((split_feature_set(s)[1] for s in stepped), default=None)
    if last is None:
        raise InputError("the run probed no sampled site: a later site needs one; pass --readout FEATURE_SET")
    if step is None:  # a text site acts before sampling: any sampled site is later; the first at the last step
        return f"{split_feature_set(stepped[0])[0]}@{last}"
    if step < last and f"{site}@{last}" in sets:
        return f"{site}@{last}"
    sites = list(dict.fromkeys(split_feature_set(s)[0] for s in stepped))
    later = sites[sites.index(site) + 1:]
    if not later or f"{later[0]}@{step}" not in sets:
        raise InputError(f"{feature_set} is the run's last sampled site at its last step: nothing is later; "
                         "pass --readout FEATURE_SET or steer an earlier step")
    return f"{later[0]}@{step}"


def _alpha(table: pd.DataFrame, feature_set: str, attribute: str) -> float:
    row = table[(table["feature_set"] == feature_set) & (table["target"] == attribute)]
    return float(row["alpha"].iloc[0]) if len(row) and "alpha" in row and np.isfinite(row["alpha"].iloc[0]) else np.nan


def fit_probe(x: np.ndarray, y: np.ndarray, alpha: float, *, feature_set: str, attribute: str,
              alphas: Sequence[float] = (), inner_cv: int | str = 5) -> Probe:
    """Attribute `y` (n,) on features x (n, d), over the concepts rated (NaN ratings left out). alpha: the
    study's; NaN -> RidgeCV's inner selection over `alphas` on the standardized features."""
    rated = np.isfinite(y)
    x, y = np.asarray(x, np.float64)[rated], np.asarray(y, np.float64)[rated]
    if not np.isfinite(alpha):
        std = x.std(0)
        z = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
        alpha = float(RidgeCV(alphas=alphas, cv=None if inner_cv == "loo" else int(inner_cv)).fit(z, y).alpha_)
    coef, intercept, std = fit_ridge(x, y[:, None], np.array([alpha]))
    return Probe(feature_set, attribute, float(alpha), coef[:, 0].astype(np.float64), float(intercept[0]), std)


def steering_vector(probe: Probe, x: np.ndarray) -> tuple[np.ndarray, float]:
    """(the unit direction of the probe in feature units times the concepts' std along it, that std):
    a Steer of this vector at scale s moves the pooled activation s concept standard deviations along it."""
    norm = np.linalg.norm(probe.coef)
    if not norm > 0:
        raise InputError(f"the probe of {probe.attribute!r} at {probe.feature_set} has zero weights (alpha "
                         f"{probe.alpha:g} shrinks it away): no direction to steer along; choose another site")
    unit = probe.coef / norm
    spread = float(np.std(np.asarray(x, np.float64) @ unit))
    return (unit * spread).astype(np.float32), spread


def _folder_name(attributes: Sequence[str]) -> str:
    name = "+".join(attributes) if len(attributes) <= 3 else f"{attributes[0]}+{len(attributes) - 1}-more"
    return re.sub(r"[^\w.@+-]", "_", name)


def probe_steer(results: str | Path, site: str, attributes: str | Sequence[str], *,
                scales: Sequence[float] = (0.0, 2.0, 4.0, 8.0), steps: Sequence[int] | None = None,
                prompts: Sequence[str] | str | Path | None = None, n_prompts: int = 8, readout: str | None = None,
                image_encoder: str | Path | None = None, out: str | Path | None = None, pipe: Any = None,
                n_bootstrap: int | None = None, level: float = 0.95, progress: bool = False, log: Callable[[str], None] = print) -> Path:
    """Steer along the probe direction of each attribute at `site` (a feature set of the run's probe table, e.g.
    "unet.mid_block@2") at each scale and write the dose-response of the attribute read out downstream (see the
    module docstring). Returns the page's path.

    steps: the steps the direction is added at (default: the site's own step; all for a text site).
    prompts: a list, or a file of one prompt per line (default: the first n_prompts concepts of the run).
    readout: the later feature set (default_readout). image_encoder: a CLIP vision checkpoint, when the run
    had none (without either, only the later site is measured). pipe: an already loaded pipeline of the run.
    n_bootstrap: resamples of the intervals (default: the run's, or 1000 where the run drew none)."""
    attributes = [attributes] if isinstance(attributes, str) else list(attributes)
    scales = [float(s) for s in scales]
    if not scales:
        raise InputError("give at least one scale, e.g. 0,2,4,8 (0 first: the unsteered baseline)")
    config, table = read_study(results)
    check_choices(table, site, attributes)
    if site.startswith(IMAGE_SITE.split(".")[0] + "."):
        raise SiteError(f"{site} embeds the finished images: nothing generated comes after it to steer; give a "
                        "UNet feature set (site@step) or a text-encoder layer")
    readout = readout or default_readout(config, table, site)
    check_choices(table, readout, attributes)
    if split_feature_set(readout)[1] is None:   # a text layer or the image embedding: not a site of the sampling
        raise InputError(f"--readout {readout} is not a sampled site: give a feature set site@step of the run "
                         "(the images are read out anyway, with an image encoder)")
    steered_site, step = split_feature_set(site)
    readout_site, readout_step = split_feature_set(readout)
    steps = list(steps) if steps is not None else (None if step is None else [step])
    if isinstance(prompts, (str, Path)):
        prompts = read_lines(prompts, "prompts file")

    n_bootstrap = n_bootstrap or config.n_bootstrap or 1000   # a run without intervals still gets them here
    norms = study_norms(config)
    if pipe is None:
        pipe = jaxprobe.load(config.model, image_encoder=image_encoder or config.image_encoder,
                             **config.model_settings.load_kwargs())
    with_image = pipe.image_encoder is not None
    text = [s for s in (steered_site,) if s.startswith("text_encoder")]
    sampled = list(dict.fromkeys([*(s for s in (steered_site, readout_site) if s not in text),
                                  *([IMAGE_SITE] if with_image else [])]))
    log(f"steer: features of {', '.join([*text, *sampled])} for {len(norms.concepts)} concepts (feature store "
        f"{config.cache})")
    feats, rows = study_features(config, pipe, norms, text_sites=text, sampled_sites=sampled, progress=progress)
    Y = norms.to_frame().iloc[rows].reset_index(drop=True)

    def features(feature_set: str) -> np.ndarray:
        name, i = split_feature_set(feature_set)
        return np.asarray(feats[name] if i is None else feats[name][:, i])

    queries = list(prompts) if prompts is not None else \
        list(build_prompts(norms.concepts[:n_prompts], config.templates[:1]).prompts)
    sampling = {"num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
                "batch_size": config.batch_size, "reduce": config.spatial_reduce}
    parts, grids, notes = [], {}, []
    for attribute in attributes:
        y = Y[attribute].to_numpy(float)
        probe = fit_probe(features(site), y, _alpha(table, site, attribute), feature_set=site, attribute=attribute,
                          alphas=config.alphas, inner_cv=config.inner_cv)
        vector, spread = steering_vector(probe, features(site))
        readers = {"readout": (fit_probe(features(readout), y, _alpha(table, readout, attribute), feature_set=readout,
                                         attribute=attribute, alphas=config.alphas, inner_cv=config.inner_cv),
                               readout_site, readout_step)}
        if with_image:
            readers["image"] = (fit_probe(features(IMAGE_SITE), y, _alpha(table, IMAGE_SITE, attribute),
                                          feature_set=IMAGE_SITE, attribute=attribute, alphas=config.alphas,
                                          inner_cv=config.inner_cv), IMAGE_SITE, None)
        log(f"steer: {attribute} at {site} (alpha {probe.alpha:g}, scale unit {spread:.4g})")
        runs = steered_generations(pipe, queries, steered_site, vector, scales=scales, steps=steps,
                                   sites=list(dict.fromkeys(s for _, s, _ in readers.values())),
                                   seeds=config.seeds, log=log, **sampling)
        for measure, (reader, where, i) in readers.items():
            scores = np.stack([reader.predict(run.features[where] if i is None else run.features[where][:, i])
                               for run in runs])
            frame = dose_response(scores, scales, n_bootstrap, level, config.seed, value="prediction")
            frame = frame.assign(attribute=attribute, group=norms.groups.get(attribute, ""), measure=measure,
                                 site=site, readout=reader.feature_set, alpha=probe.alpha, scale_unit=spread,
                                 readout_alpha=reader.alpha)
            parts.append(frame)
        grids[attribute] = np.stack([run.images for run in runs], axis=1)
    if not with_image:
        notes.append("No image encoder: only the later site was measured (pass --image-encoder PATH, a CLIP vision "
                     "checkpoint, to read the attribute out of the generated images too).")
    if readout_site == steered_site and (steps is None or readout_step in steps):
        notes.append(f"The steering steps include the readout {readout}'s step at the steered site itself: that "
                     "readout is moved by the added vector directly, not only through the sampling.")
    result = pd.concat(parts, ignore_index=True)
    result = result[["attribute", "group", "measure", "site", "readout", *[c for c in result.columns if c not in
                     ("attribute", "group", "measure", "site", "readout")]]]

    folder = Path(out) if out is not None else Path(results) / "steer" / re.sub(r"[^\w.@+-]", "_", site) / \
        _folder_name(attributes)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(result, folder, "steer")
    xlabel = f"scale (concept std along the probe) added at {site}"
    curves = {f"dose_response_{re.sub(r'[^A-Za-z0-9]+', '_', str(group))}": dose_response_figure(
        {f"{attribute_axis(m)} ({result['readout'][result['measure'] == m].iloc[0]})": frame[frame["measure"] == m]
         for m in MEASURES if (frame["measure"] == m).any()}, xlabel=xlabel, value="prediction", hue="attribute")
        for group, frame in result.groupby("group", sort=False)}
    shown = min(len(queries), 8)
    grid_figures = {f"grid_{re.sub(r'[^A-Za-z0-9]+', '_', a)}": image_grid(
        g[:shown], queries[:shown], [f"scale {s:g}" for s in scales]) for a, g in grids.items()}
    save_figures(folder, {**curves, **grid_figures})
    notice = "Random weights: the images and scores show the plumbing, not the probes' claim." \
        if is_random_weights(pipe.source) else None
    body = [
        (f"<p>Each attribute's ridge probe at {html.escape(site)}, refitted on all {len(norms.concepts)} concepts "
         f"with the study's alpha, is a direction in feature units (its weights over the feature std, unit "
         f"length); it is added at steps {'all' if steps is None else steps} at each scale, one unit being the "
         f"concepts' standard deviation along it. The attribute is then read out, in rating units, by its probe "
         f"on the later site {html.escape(readout)}"
         + (" and on the CLIP embeddings of the generated images (fitted on every concept's unsteered images)"
            if with_image else "")
         + f"; {level:.0%} bootstrap intervals over {result['n'].iloc[0]} generations, paired for the change "
           f"from scale {scales[0]:g}.</p>"),
        *(f"<p><em>{html.escape(n)}</em></p>" for n in notes),
        settings_html({"results": str(results), "model": pipe.source, "site": site, "readout": readout,
                       "attributes": attributes, "scales": scales, "steps": "all" if steps is None else steps,
                       "seeds": list(config.seeds), "prompts": len(queries)}),
        *(figure_html(png_bytes(f), "dose-response", f"group {name.removeprefix('dose_response_')}")
          for name, f in curves.items()),
        *(figure_html(png_bytes(f), "steered generations", f"{name.removeprefix('grid_')}: first seed; rows: "
                      "prompts, columns: scales") for name, f in grid_figures.items()),
        table_html(result, "Dose-response"),
    ]
    path = folder / STEER_PAGE
    atomic_write_text(path, page(f"Probe steering at {site}", body, notice=notice))
    log(f"steer: {path}")
    return path


def attribute_axis(measure: str) -> str:
    return f"probe read out: {MEASURES[measure]}"
