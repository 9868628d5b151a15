"""Decoding Diffusion (Zeng, Chen & Wong 2024): directions in h-space from prompts and captions, and the
association (bias) analysis built on them.

    build(config)   prompts -> h-space (UNet mid_block output, every step) and CLIP text features, cached
                    -> one unit direction per concept, site and step -> OUT/directions.npz + tables
    score(config)   project the generations onto the directions; associations of each query concept
                    with each attribute axis, bootstrap intervals, side by side with CLIP text space;
                    k-means clusters labelled with their nearest directions -> tables
    report(out)     figures and one self-contained report.html from the saved tables

The maths (definitions of directions and association scores) lives in `maths`.
`DirectionsConfig` holds every choice; `jaxprobe directions build|score|report` call these functions.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import jaxprobe
from jaxprobe.captures import Captures
from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError
from jaxprobe.features.extract import extract_features, image_features
from jaxprobe.features.settings import ModelSettings, RunSettings, SamplingSettings, StudyConfig
from jaxprobe.pipeline.images import ImageDataset
from jaxprobe.probes.stats import percentile_interval
from jaxprobe.runtime.files import read_lines, write_atomic, write_table
from jaxprobe.studies.decoding_diffusion import maths
from jaxprobe.studies.decoding_diffusion.maths import contrast, project
from jaxprobe.studies.decoding_diffusion.report import (  # noqa: F401 - the study's public names
    BASELINE_FAMILY,
    DIRECTIONS,
    NEUTRAL,
    PAPER,
    REPORT,
    make_figures,
    read_tables,
    report,
    summarize,
)

EXAMPLE = Path(__file__).parent / "assets" / "directions" / "professions.toml"


@dataclass(frozen=True)
class DirectionsConfig(StudyConfig, RunSettings, SamplingSettings, ModelSettings):
    """Everything a directions study depends on (a TOML file can set any field; see the bundled example).

    families: {family: concepts}; associations: (query family, attribute family) pairs. An attribute
    family of two concepts is one axis (first vs second); of k > 2, k axes (each vs the rest).
    prompt_files: {concept: text file, one prompt or caption per line} used instead of the templates.
    images: a CSV with columns image, caption, concept (image paths relative to the CSV): directions from
    the images themselves (`capture_images` at training step image_t) beside those from their captions.
    baseline: "neutral" (the neutral prompts), "others" (all other concepts) or "family" (the other
    concepts of the same family). whiten: use the inverse shrunk pooled within-concept covariance as the
    metric. spatial_reduce: "mean" (default) or "max" pools h over space; "none" keeps the maps (their
    directions are saved as (C, T, h, w, c)). sites: denoiser site patterns; empty (the default): the family's
    bottleneck, h-space (`hspace_sites`). text_site: one text-encoder site, the text-side comparison; "auto"
    (the default): the family's first text tower's last layer (`Pipeline.summary_text_site`: CLIP's final norm,
    T5's for PixArt, none for the class-conditioned DiT); None or "": no text comparison.
    focus_step: the step the ranked bars, clusters and 2-D projections show (-1: the last).
    The fields of ModelSettings, SamplingSettings (seeds default to four here) and RunSettings are its
    fields too; a TOML file sets them in [directions] or in [model], [sampling], [run]. prompt_files
    and images are read relative to the TOML file.
    """

    TABLE = "directions"
    FILE_PATHS = ("prompt_files", "images")

    seeds: tuple[int, ...] = (0, 1, 2, 3)     # SamplingSettings' field, with more seeds by default here
    families: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    associations: tuple[tuple[str, str], ...] = ()
    templates: tuple[str, ...] = ("a photo of a {concept}",)
    prompt_files: Mapping[str, str] = field(default_factory=dict)
    neutral_prompts: tuple[str, ...] = ("a photo", "a photo of a person")
    baseline: str = "neutral"
    whiten: bool = False
    shrinkage: float = 0.1
    sites: tuple[str, ...] = ()    # empty: the denoiser family's bottleneck (`hspace_sites`)
    text_site: str | None = "auto"
    token_reduce: str = "eos"
    spatial_reduce: str = "mean"
    images: str | None = None
    image_t: int = 25
    n_bootstrap: int = 1000
    level: float = 0.95
    n_clusters: int = 6
    focus_step: int = -1
    seed: int = 0
    out: str = "jaxprobe-runs/directions"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "families", {str(k): tuple(v) for k, v in dict(self.families).items()})
        object.__setattr__(self, "associations", tuple(tuple(a) for a in self.associations))
        if not self.families:
            raise InputError("give at least one concept family, e.g. [directions.families] gender = ['man', 'woman']")
        seen: dict[str, str] = {}
        for family, concepts in self.families.items():
            if not concepts:
                raise InputError(f"family {family!r} has no concepts")
            for concept in concepts:
                if concept in seen:
                    raise InputError(f"concept {concept!r} is in families {seen[concept]!r} and {family!r}; "
                                     "give each concept one family")
                seen[concept] = family
        for pair in self.associations:
            if len(pair) != 2 or any(p not in self.families for p in pair):
                raise InputError(f"association {list(pair)} must name a query family and an attribute family "
                                 f"among {sorted(self.families)}")
            if len(self.families[pair[1]]) < 2:
                raise InputError(f"attribute family {pair[1]!r} needs at least two concepts to make an axis")
        if any("{concept}" not in t for t in self.templates):
            raise InputError(f"every template needs a '{{concept}}' placeholder; got {list(self.templates)}")
        unknown = sorted(set(self.prompt_files) - set(seen))
        if unknown:
            raise InputError(f"prompt_files names concept(s) {unknown} that are in no family")
        if self.baseline == "neutral" and not self.neutral_prompts:
            raise InputError("baseline='neutral' needs neutral_prompts (or choose baseline='others')")
        if self.baseline not in ("neutral", "others", "family"):
            raise InputError(f"baseline must be 'neutral', 'others' or 'family', not {self.baseline!r}")
        if not self.seeds:
            raise InputError("give at least one seed")
        if self.whiten and self.spatial_reduce == "none":
            raise InputError("whiten=true cannot whiten whole spatial maps (a d x d covariance of h*w*c dimensions); "
                             "use spatial_reduce='mean' or whiten=false")
        if not 0 < self.level < 1 or self.n_bootstrap < 10:
            raise InputError("level must lie in (0, 1) and n_bootstrap be at least 10")
        if not -self.num_inference_steps <= self.focus_step <= self.num_inference_steps:  # PNDM: steps + 1 entries
            raise InputError(f"focus_step={self.focus_step} is outside the {self.num_inference_steps} steps; "
                             "give a step index (0 = first, -1 = last)")

    @classmethod
    def example(cls, **overrides: Any) -> "DirectionsConfig":
        """The bundled example: professions x gender and professions x age on the tiny model."""
        return cls.from_toml(EXAMPLE, **overrides)

    @property
    def axes(self) -> list[tuple[str, str, str, list[str]]]:
        """(query family, attribute family, axis name, [positive concept, *negative concepts]) per axis."""
        out = []
        for query, attribute in self.associations:
            members = list(self.families[attribute])
            poles = [members] if len(members) == 2 else [[m, *(o for o in members if o != m)] for m in members]
            for pole in poles:
                name = f"{pole[0]} vs {pole[1]}" if len(members) == 2 else f"{pole[0]} vs rest"
                out.append((query, attribute, name, pole))
        return out


# --- collection ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generations:
    """Every generation (prompt x seed; rows seed-major, as `features.extract_features` returns them)
    with its features: h-space {site: (n, T, d)} and CLIP text features (n, d) of its prompt."""

    concepts: tuple[str, ...]         # C; the neutral set last when the baseline is neutral
    family_of: dict[str, str]
    rows: pd.DataFrame                # row, concept, family, prompt, seed
    labels: np.ndarray                # (n,) concept index
    features: Captures                # site -> (n, T, d); maps (spatial_reduce="none") flattened to d = h*w*c
    text: np.ndarray | None           # (n, d)
    timesteps: np.ndarray             # (T,) training timestep of each step (features.timesteps)
    map_shapes: dict[str, tuple[int, ...]]  # site -> (d,) or (h, w, c): the shape each direction is saved in

    @property
    def neutral(self) -> int | None:
        return self.concepts.index(NEUTRAL) if NEUTRAL in self.concepts else None


def concept_prompts(config: DirectionsConfig) -> dict[str, list[str]]:
    """{concept: its prompts}: the templates filled in, or the concept's prompt file; then the neutral set."""
    prompts = {c: (read_lines(config.prompt_files[c], f"prompt file of {c!r}") if c in config.prompt_files
                   else [t.format(concept=c) for t in config.templates])
               for concepts in config.families.values() for c in concepts}
    if config.baseline == "neutral":
        prompts[NEUTRAL] = list(config.neutral_prompts)
    return prompts


def hspace_sites(config: DirectionsConfig, pipe: Any) -> list[str]:
    """The sites the directions live at: config.sites, or the denoiser family's declared bottleneck
    (`models.families`: SD 1.x/2.x and SDXL unet.mid_block; a transformer family names its middle block)."""
    if config.sites:
        return pipe.select(config.sites)
    if pipe.family is None:
        raise InputError(f"{pipe.source} has no denoiser: directions need h-space, a diffusion pipeline's bottleneck")
    return pipe.select([pipe.bottleneck_site])


def comparison_text_site(config: DirectionsConfig, pipe: Any) -> str | None:
    """config.text_site, with "auto" resolved to the pipeline's `summary_text_site`; None: no text comparison."""
    return pipe.summary_text_site if config.text_site == "auto" else config.text_site or None


def load_pipeline(config: DirectionsConfig) -> Any:
    return jaxprobe.load(config.model, **config.model_settings.load_kwargs())


def collect(pipe: Any, config: DirectionsConfig, prompts_of: Mapping[str, Sequence[str]], *,
            family_of: Mapping[str, str] | None = None, progress: bool = False) -> Generations:
    """Generate every concept's prompts with every seed and capture h-space (and the CLIP text site),
    through the feature store (`features.extract_features`): finished chunks are never recomputed."""
    concepts = tuple(prompts_of)
    family_of = dict(family_of) if family_of is not None else {c: f for f, cs in config.families.items() for c in cs}
    family_of.setdefault(NEUTRAL, BASELINE_FAMILY)
    prompts = [p for c in concepts for p in prompts_of[c]]
    prompt_concept = np.array([i for i, c in enumerate(concepts) for _ in prompts_of[c]])
    text_site = comparison_text_site(config, pipe)
    raw = extract_features(
        pipe, prompts, text_sites=(text_site,) if text_site else (),
        sampled_sites=hspace_sites(config, pipe),
        token_reduce=config.token_reduce, spatial_reduce=config.spatial_reduce,
        sampling=config.sampling, run=config.run, progress=progress)
    n_prompts, n_seeds = len(prompts), len(config.seeds)
    labels = np.tile(prompt_concept, n_seeds)
    rows = pd.DataFrame({"row": np.arange(len(labels)), "concept": [concepts[i] for i in labels],
                         "family": [family_of[concepts[i]] for i in labels], "prompt": prompts * n_seeds,
                         "seed": np.repeat(np.asarray(config.seeds), n_prompts)})
    sites = hspace_sites(config, pipe)
    text = raw[pipe.select([text_site])[0]] if text_site else None
    features = raw.replace(arrays={s: _flat(raw[s]) for s in sites})
    return Generations(concepts, family_of, rows, labels, features, None if text is None else text.reshape(len(text), -1),
                       features.timesteps, {s: raw[s].shape[2:] for s in sites})


def _flat(x: np.ndarray) -> np.ndarray:
    """(rows, T, ...) -> (rows, T, d): a spatial map is one long vector to the direction maths."""
    return x.reshape(*x.shape[:2], -1)


def _step_labels(features: Captures, site: str) -> tuple[np.ndarray, np.ndarray]:
    """(step, timestep) of each entry on a site's step axis, as its feature sets (site@step) name them: the
    maths runs on whole (n, T, d) stacks, the tables walk site x step like every other consumer."""
    sets = features.feature_sets([site])
    return np.array([s.step for s in sets]), np.array([s.timestep for s in sets])


# --- directions ----------------------------------------------------------------------------------------


MAX_WHITENED_DIM = 2048   # whitening holds and eigendecomposes a d x d covariance per step


def _metric(features_ntd: np.ndarray, averaging_cn: np.ndarray, config: DirectionsConfig) -> Any:
    if not config.whiten:
        return None
    n, _, d = features_ntd.shape
    if d > MAX_WHITENED_DIM:
        raise InputError(f"whiten=true needs a {d} x {d} covariance per step (more than {MAX_WHITENED_DIM} "
                         "dimensions: spatial maps?); pool the maps (spatial_reduce='mean') or set whiten=false")
    if n - len(averaging_cn) < d:
        warnings.warn(f"whitening {d} dimensions from {n} generations: the metric ignores most directions the "
                      "generations do not span, and bootstrap intervals come out too narrow; raise shrinkage or "
                      "add seeds", stacklevel=2)
    return maths.whitening_metric(maths.pooled_covariance(features_ntd, averaging_cn), config.shrinkage)


def directions_of(features_ntd: np.ndarray, labels: np.ndarray, concepts: Sequence[str], config: DirectionsConfig,
                  *, neutral: int | None = None, groups: Sequence[str] | None = None, baseline: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions (C, T, d) and mean-difference lengths (C, T) of every concept (see the maths module)."""
    features = np.asarray(features_ntd, np.float32)
    averaging = maths.averaging_matrix(labels, len(concepts)).astype(np.float32)
    base = maths.baseline_matrix(averaging, baseline or config.baseline, neutral,
                                 np.asarray(groups) if groups is not None else None).astype(np.float32)
    dirs, length = maths.concept_directions(features, averaging, base, _metric(features, averaging, config))
    return np.asarray(dirs), np.asarray(length)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def build(config: DirectionsConfig, *, pipe: Any = None, progress: bool = False,
          log: Callable[[str], None] = print) -> Path:
    """Collect the concepts' generations and write OUT/directions.npz (unit directions per site (C, T, d)
    and in CLIP text space (C, d)), directions.parquet/.csv (one row per concept x site x step: the
    mean-difference length and the cosine to the concept's last-step direction), prompts.parquet/.csv
    (every generation: concept, family, prompt, seed) and config.toml; with `images`, also
    image_directions.parquet/.csv. Returns the npz path. (The neutral set's own direction is zero.)"""
    pipe = pipe or load_pipeline(config)
    gens = collect(pipe, config, concept_prompts(config), progress=progress)
    log(f"{len(gens.rows)} generations of {len(gens.concepts)} concepts; sites {list(gens.features)}")
    groups = [gens.family_of[c] for c in gens.concepts]
    arrays: dict[str, np.ndarray] = {"concepts": np.array(gens.concepts), "families": np.array(groups),
                                     "sites": np.array(list(gens.features)), "timesteps": gens.timesteps}
    frames = []
    for site, h in gens.features.items():
        dirs, length = directions_of(h, gens.labels, gens.concepts, config, neutral=gens.neutral, groups=groups)
        arrays[f"site/{site}"] = dirs.reshape(*dirs.shape[:2], *gens.map_shapes[site])
        steps, timesteps = _step_labels(gens.features, site)
        frames.append(pd.DataFrame({
            "concept": np.repeat(gens.concepts, len(steps)), "family": np.repeat(groups, len(steps)), "site": site,
            "step": np.tile(steps, len(gens.concepts)),
            "timestep": np.tile(timesteps, len(gens.concepts)),
            "length": length.ravel(), "cos_to_last_step": _cos(dirs, dirs[:, -1:]).ravel(),
            "n_generations": np.repeat(np.bincount(gens.labels, minlength=len(gens.concepts)), len(steps))}))
    if gens.text is not None:
        text_dirs, _ = directions_of(gens.text[:, None], gens.labels, gens.concepts, config, neutral=gens.neutral,
                                     groups=groups)
        arrays["text"] = text_dirs[:, 0]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"directions": pd.concat(frames, ignore_index=True), "prompts": gens.rows}
    if config.images:
        image_table, image_arrays = image_directions(pipe, config, progress=progress)
        tables["image_directions"] = image_table
        arrays.update(image_arrays)
    for name, frame in tables.items():
        write_table(frame, out, name)

    def save(path: Path) -> None:
        with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez_compressed(file, **arrays)

    path = write_atomic(out / DIRECTIONS, save)
    write_atomic(out / "config.toml", lambda p: p.write_text(config.to_toml()))
    log(f"directions: {path}")
    return path


def read_directions(out: str | Path) -> dict[str, np.ndarray]:
    path = Path(out) / DIRECTIONS
    if not path.is_file():
        raise InputError(f"{path} does not exist: run `jaxprobe directions build` (directions.build) first")
    with np.load(path, allow_pickle=False) as data:
        return dict(data)


# --- images with captions ------------------------------------------------------------------------------


def _read_captions(path: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the image captions file {path}: {err}") from err
    missing = {"image", "caption", "concept"} - set(frame.columns)
    if missing:
        raise InputError(f"{path} lacks column(s) {sorted(missing)}; it needs image, caption, concept")
    if frame["concept"].nunique() < 2:
        raise InputError(f"{path}: image directions compare concepts with each other; give at least two")
    frame = frame.assign(image=[str((Path(path).parent / p).resolve()) for p in frame["image"]])
    return frame


def image_directions(pipe: Any, config: DirectionsConfig, *, progress: bool = False
                     ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Directions from existing images and from their captions, side by side.

    Image path: each image VAE-encoded, noised to training step `image_t`, one UNet pass (h at that
    step, (n, d)). Caption path: the captions generated like any prompt (h at every step). Both use the
    other image concepts as baseline (there are no neutral images). Returns one row per concept x site x
    step with the cosine between the image direction and the caption direction at that step, and the
    arrays images/<site> (C, d) and captions/<site> (C, T, d)."""
    import os

    table = _read_captions(config.images)
    concepts = tuple(dict.fromkeys(table["concept"]))
    labels = np.array([concepts.index(c) for c in table["concept"]])
    paths = tuple(Path(p) for p in table["image"])
    dataset = ImageDataset(root=Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent,
                           classes=concepts, paths=paths, labels=labels, is_test=np.zeros(len(paths), bool))
    sites = hspace_sites(config, pipe)
    images = image_features(pipe, dataset, sites, config.image_t, cache=config.cache, reduce=config.spatial_reduce,
                            seed=config.seed, batch_size=config.batch_size, force=config.force, progress=progress)
    captions = {c: list(table.loc[table["concept"] == c, "caption"]) for c in concepts}
    gens = collect(pipe, dataclasses.replace(config, text_site=None), captions,
                   family_of={c: "images" for c in concepts}, progress=progress)
    arrays, frames = {}, []
    for site in sites:
        image_dirs, _ = directions_of(_flat(images[site][:, None]), labels, concepts, config, baseline="others")
        caption_dirs, _ = directions_of(gens.features[site], gens.labels, concepts, config, baseline="others")
        shape = gens.map_shapes[site]
        arrays[f"images/{site}"] = image_dirs[:, 0].reshape(len(concepts), *shape)
        arrays[f"captions/{site}"] = caption_dirs.reshape(*caption_dirs.shape[:2], *shape)
        steps, timesteps = _step_labels(gens.features, site)
        frames.append(pd.DataFrame({
            "concept": np.repeat(concepts, len(steps)), "site": site, "step": np.tile(steps, len(concepts)),
            "timestep": np.tile(timesteps, len(concepts)),
            "cos_image_caption": _cos(image_dirs, caption_dirs).ravel(), "image_t": config.image_t}))
    return pd.concat(frames, ignore_index=True), arrays


# --- scoring -------------------------------------------------------------------------------------------


def _axes_matrix(config: DirectionsConfig, concepts: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(concepts)}
    return np.stack([contrast(len(concepts), index[pole[0]], [index[c] for c in pole[1:]])
                     for *_, pole in config.axes]).astype(np.float32)


def _interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    return percentile_interval(samples, level, axis=0)


def _unet_effect(h: np.ndarray, clip: np.ndarray, level: float) -> np.ndarray:
    """Per (step, axis, query): does the UNet push the association beyond the text encoder's, pull it back
    towards 0, or flip its sign? From paired bootstrap samples h, clip (1 + B, ...), row 0 observed."""
    h_lo, h_hi = _interval(h[1:], level)
    c_lo, c_hi = _interval(clip[1:], level)
    m_lo, m_hi = _interval(np.abs(h[1:]) - np.abs(clip[1:]), level)
    effect = np.full(h.shape[1:], "no clear change", dtype=object)
    effect[m_lo > 0] = "amplifies"
    effect[m_hi < 0] = "attenuates"
    effect[((h_lo > 0) & (c_hi < 0)) | ((h_hi < 0) & (c_lo > 0))] = "reverses"
    return effect


def association_table(gens: Generations, config: DirectionsConfig) -> pd.DataFrame:
    """One row per site x step x axis x query concept: the association score with its bootstrap interval,
    the same association in CLIP text space and their paired difference, ranked within site, step and axis."""
    import jax.numpy as jnp

    C = len(gens.concepts)
    averaging = maths.averaging_matrix(gens.labels, C)
    plans = np.concatenate([averaging[None], maths.bootstrap_averaging(
        np.random.default_rng(config.seed), config.n_bootstrap, gens.labels, C)]).astype(np.float32)
    axes = _axes_matrix(config, gens.concepts)
    index = {c: i for i, c in enumerate(gens.concepts)}

    def scores(features_ntd: np.ndarray) -> np.ndarray:
        x = np.asarray(features_ntd, np.float32)
        return np.asarray(maths.association_scores(x, jnp.asarray(plans), axes, _metric(x, averaging, config)))

    clip = scores(gens.text[:, None]) if gens.text is not None else None   # (1 + B, 1, A, C)
    frames = []
    for site, h in gens.features.items():
        s = scores(h)                                                      # (1 + B, T, A, C)
        lo, hi = _interval(s[1:], config.level)
        steps, timesteps = _step_labels(gens.features, site)
        T = len(steps)
        for a, (query_family, attribute_family, axis, _) in enumerate(config.axes):
            queries = [index[q] for q in config.families[query_family]]
            s_q, lo_q, hi_q = s[:, :, a][..., queries], lo[:, a][..., queries], hi[:, a][..., queries]  # (.., T, Q)
            cols = {"site": site, "step": np.repeat(steps, len(queries)),
                    "timestep": np.repeat(timesteps, len(queries)),
                    "query_family": query_family, "attribute_family": attribute_family, "axis": axis,
                    "query": np.tile([gens.concepts[q] for q in queries], T),
                    "score": s_q[0].ravel(), "ci_low": lo_q.ravel(), "ci_high": hi_q.ravel()}
            if clip is not None:
                c = np.broadcast_to(clip[:, :, a][..., queries], s_q.shape)
                c_lo, c_hi = _interval(c[1:], config.level)
                d = s_q - c
                d_lo, d_hi = _interval(d[1:], config.level)
                cols |= {"clip_score": c[0].ravel(), "clip_ci_low": c_lo.ravel(), "clip_ci_high": c_hi.ravel(),
                         "delta": d[0].ravel(), "delta_ci_low": d_lo.ravel(), "delta_ci_high": d_hi.ravel(),
                         "unet_effect": _unet_effect(s_q, c, config.level).ravel()}
            frames.append(pd.DataFrame(cols))
    table = pd.concat(frames, ignore_index=True)
    table["rank"] = table.groupby(["site", "step", "axis"])["score"].rank(ascending=False, method="first").astype(int)
    return table


def generation_table(gens: Generations, dirs: Mapping[str, np.ndarray], config: DirectionsConfig
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(generations, clusters). generations: one row per generation x site x step with its projection onto
    every direction (dir:<concept>), its position on every axis (axis:<name>), its k-means cluster and its
    first two principal components. clusters: one row per site x step x cluster with its size, the
    concepts in it and the directions nearest to its centroid (cosine of centroid minus the mean)."""
    import jax

    C = len(gens.concepts)
    averaging = maths.averaging_matrix(gens.labels, C).astype(np.float32)
    axes = _axes_matrix(config, gens.concepts)
    k = min(config.n_clusters, len(gens.rows))
    frames, cluster_frames = [], []
    for site, h in gens.features.items():
        h = np.asarray(h, np.float32)
        steps, timesteps = _step_labels(gens.features, site)
        T = len(steps)
        site_dirs = _flat(dirs[f"site/{site}"])
        projection = np.asarray(maths.project(h, site_dirs))                              # (n, T, C)
        positions = np.asarray(maths.generation_scores(h, averaging, axes, _metric(h, averaging, config)))
        keys = jax.random.split(jax.random.key(config.seed), T)
        centroids, members, _ = jax.vmap(lambda x, key: maths.kmeans(x, key, k))(np.moveaxis(h, 1, 0), keys)
        centroids, members = np.asarray(centroids), np.asarray(members)                   # (T, k, d), (T, n)
        nearest = np.asarray(jax.vmap(maths.nearest_directions)(centroids, h.mean(0), np.moveaxis(site_dirs, 1, 0)))
        pcs = np.asarray(jax.vmap(maths.principal_components, in_axes=1, out_axes=1)(h))  # (n, T, 2)
        frame = pd.concat([gens.rows] * T, ignore_index=True)
        frame = frame.assign(site=site, step=np.repeat(steps, len(gens.rows)),
                             timestep=np.repeat(timesteps, len(gens.rows)),
                             cluster=members.ravel(), pc1=pcs[..., 0].T.ravel(), pc2=pcs[..., 1].T.ravel())
        extra = {f"dir:{c}": projection[:, :, i].T.ravel() for i, c in enumerate(gens.concepts)}
        extra |= {f"axis:{name}": positions[:, :, a].T.ravel() for a, (_, _, name, _) in enumerate(config.axes)}
        frames.append(pd.concat([frame, pd.DataFrame(extra)], axis=1))
        for t in range(T):
            for j in range(k):
                inside = members[t] == j
                if not inside.any():
                    continue
                shares = pd.Series(gens.labels[inside]).value_counts(normalize=True)
                order = np.argsort(-nearest[t, j])[:3]
                cluster_frames.append({
                    "site": site, "step": t, "timestep": timesteps[t], "cluster": j, "size": int(inside.sum()),
                    "purity": float(shares.iloc[0]),
                    "concepts": "; ".join(f"{gens.concepts[c]} {v:.0%}" for c, v in shares.head(3).items()),
                    "nearest_direction": gens.concepts[order[0]], "nearest_cos": float(nearest[t, j, order[0]]),
                    "nearest": "; ".join(f"{gens.concepts[c]} {nearest[t, j, c]:+.2f}" for c in order)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(cluster_frames)


def project_prompts(config: DirectionsConfig, prompts: Sequence[str], *, pipe: Any = None,
                    progress: bool = False) -> pd.DataFrame:
    """Any prompts, generated with the config's seeds and sampling settings, projected onto the saved
    directions (OUT/directions.npz): one row per prompt x seed x site x step, a dir:<concept> column each."""
    dirs = read_directions(config.out)
    pipe = pipe or load_pipeline(config)
    gens = collect(pipe, dataclasses.replace(config, text_site=None), {"(prompts)": list(prompts)},
                   family_of={"(prompts)": "(prompts)"}, progress=progress)
    concepts = [str(c) for c in dirs["concepts"]]
    _check_directions(dirs, gens)
    frames = []
    for site, h in gens.features.items():
        projection = np.asarray(project(np.asarray(h, np.float32), _flat(dirs[f"site/{site}"])))
        steps, timesteps = _step_labels(gens.features, site)
        frame = pd.concat([gens.rows.drop(columns=["concept", "family"])] * len(steps), ignore_index=True)
        frame = frame.assign(site=site, step=np.repeat(steps, len(gens.rows)),
                             timestep=np.repeat(timesteps, len(gens.rows)))
        frames.append(pd.concat([frame, pd.DataFrame({f"dir:{c}": projection[:, :, i].T.ravel()
                                                      for i, c in enumerate(concepts)})], axis=1))
    return pd.concat(frames, ignore_index=True)


def _check_directions(dirs: Mapping[str, np.ndarray], gens: Generations) -> None:
    for site, h in gens.features.items():
        key = f"site/{site}"
        if key not in dirs:
            raise InputError(f"{DIRECTIONS} has no directions at {site}: build them with the same sites")
        if h.shape[1:] != _flat(dirs[key]).shape[1:]:
            raise InputError(f"{site}: features {h.shape[1:]} (steps, dim) do not match the directions "
                             f"{_flat(dirs[key]).shape[1:]}: score with the sampling and reduction settings the "
                             "directions were built with")


def score(config: DirectionsConfig, *, prompts: Sequence[str] | None = None, pipe: Any = None,
          progress: bool = False, log: Callable[[str], None] = print) -> Path:
    """Score the study's generations against the directions `build` saved under OUT: associations.*,
    generations.*, clusters.* (and prompt_projections.* for extra `prompts`). Returns OUT."""
    dirs = read_directions(config.out)
    pipe = pipe or load_pipeline(config)
    gens = collect(pipe, config, concept_prompts(config), progress=progress)
    if [str(c) for c in dirs["concepts"]] != list(gens.concepts):
        raise InputError(f"{config.out}/{DIRECTIONS} was built for other concepts; run build with this config")
    _check_directions(dirs, gens)
    if not config.associations:
        log("no associations configured: scoring projections and clusters only")
    out = Path(config.out)
    tables = dict(zip(("generations", "clusters"), generation_table(gens, dirs, config)))
    if config.associations:
        tables["associations"] = association_table(gens, config)
    if prompts:
        tables["prompt_projections"] = project_prompts(config, prompts, pipe=pipe, progress=progress)
    for name, frame in tables.items():
        write_table(frame, out, name)

    meta = {"model": pipe.source, "random_weights": is_random_weights(pipe), "loaded": pipe.provenance,
            "concepts": list(gens.concepts), "families": dict(config.families), "axes": [a[2] for a in config.axes],
            "baseline": config.baseline, "whiten": config.whiten, "seeds": list(config.seeds), "templates": list(config.templates),
            "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
            "n_generations": len(gens.rows), "n_bootstrap": config.n_bootstrap, "level": config.level,
            "focus_step": config.focus_step, "text_site": comparison_text_site(config, pipe), "sites": list(gens.features)}

    write_atomic(out / "metadata.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
    log(f"scores: {out}")
    return out
