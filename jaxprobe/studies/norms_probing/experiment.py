"""The main job: where along a text-to-image pipeline are human semantic attributes decodable?

    norms -> prompts (templates x seeds) -> features at every text layer and every UNet site x step
    (cached, resumable) -> nested-CV ridge probes per attribute -> group and disentanglement
    analyses -> tables, figures, one HTML report.

`ExperimentConfig` holds every choice (a TOML file can set any field); `run_experiment` is what
`jaxprobe run` calls.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import jaxprobe
from jaxprobe.captures import Captures
from jaxprobe.captures import feature_sets as split_feature_sets
from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError
from jaxprobe.features.extract import build_prompts, extract_features
from jaxprobe.features.settings import ModelSettings, RunSettings, SamplingSettings, StudyConfig
from jaxprobe.norms import load_norms
from jaxprobe.pipeline.sites import TEXT_TOWER_SITES
from jaxprobe.probes.sweep import probe_sweep_across_processes
from jaxprobe.runtime.files import write_atomic
from jaxprobe.studies.norms_probing import disentanglement, groups, report, variance

DEFAULT_UNET_SITES = ("unet.down_blocks.*", "unet.mid_block", "unet.up_blocks.*", "latents", "pred_original_sample")


@dataclass(frozen=True)
class ExperimentConfig(StudyConfig, RunSettings, SamplingSettings, ModelSettings):
    """Everything one run depends on. Defaults: the bundled tiny model on Binder's concrete nouns.

    The fields of ModelSettings (model, dtype, scheduler), SamplingSettings (num_inference_steps,
    guidance_scale, seeds) and RunSettings (batch_size, chunk_size, cache, force) are its fields too;
    a TOML file sets them in [experiment] (or at the top level) or in [model], [sampling], [run]."""

    TABLE = "experiment"

    norms: str = "binder"                      # a bundled norms name or a CSV/TSV path
    norms_groups: str | None = None            # groups file for a user's norms
    max_concepts: int | None = None            # keep the first N concepts (quick looks)
    templates: tuple[str, ...] = ("a photo of a {concept}",)
    repeats: str = "average"                   # "average" templates x seeds per concept, or "keep" them as rows
    text_sites: tuple[str, ...] = (TEXT_TOWER_SITES,)   # every text tower: SDXL's two are probed side by side
    unet_sites: tuple[str, ...] = DEFAULT_UNET_SITES
    image_encoder: str | None = None           # CLIP vision checkpoint: embed the generated images
    token_reduce: str = "eos"
    spatial_reduce: str = "mean"
    outer_cv: int = 5
    inner_cv: int | str = 5
    alphas: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 6, 20))
    fold_groups: str | None = None             # a norms metadata column whose values stay on one side of splits
    n_permutations: int = 200                  # smallest p = 1/201: BH can reach q < 0.05 (see summary.py)
    n_bootstrap: int = 200
    variance: bool = True                      # unique vs shared variance of every sampled site beyond a text space
    variance_reference: tuple[str, ...] = ()   # text feature sets joined as that space; () = best mean decoding
    variance_permutations: int = 20            # permutations per site x step for the unique-variance test
    variance_null: str = "permute_b"           # "permute_b" (exact, a joint refit each) or "freedman_lane" (cheap)
    seed: int = 0
    out: str = "jaxprobe-runs/default"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repeats not in ("average", "keep"):
            raise InputError(f"repeats must be 'average' or 'keep', not {self.repeats!r}")
        if not self.templates or any("{concept}" not in t for t in self.templates):
            raise InputError(f"every template needs a '{{concept}}' placeholder; got {list(self.templates)}")
        if self.n_permutations < 0 or self.n_bootstrap < 0:
            raise InputError(f"n_permutations and n_bootstrap must be >= 0, not {self.n_permutations} and "
                             f"{self.n_bootstrap}")


# `jaxprobe run` with no config and the tiny model: a visible config file over the same defaults, sized
# to finish in a few minutes on 2 CPU cores (fewer steps, a smaller permutation null and bootstrap).
QUICK_LOOK = Path(__file__).parent / "assets" / "quick_look.toml"


def describe_settings(config: ExperimentConfig) -> str:
    """The settings a run's numbers depend on, in one line (the console and the report state them)."""
    guidance = (f"guidance {config.guidance_scale:g}" if config.guidance_scale > 1 else
                f"guidance {config.guidance_scale:g} (no classifier-free guidance)")
    return (f"{config.model} ({config.dtype}), {config.num_inference_steps} steps, {guidance}, "
            f"seeds {list(config.seeds)}, {len(config.templates)} template(s); probes: {config.outer_cv}x"
            f"{config.inner_cv} nested CV, {len(config.alphas)} alphas, {config.n_permutations} permutations, "
            f"{config.n_bootstrap} bootstraps; out {config.out}")


def concept_features(features: Mapping[str, np.ndarray], concept_index: np.ndarray, n_concepts: int,
                     repeats: str) -> tuple[Mapping[str, np.ndarray], np.ndarray]:
    """Average every concept's repeats (templates x seeds) or keep them as rows.

    Returns the features and, per row, its concept index (used to keep a concept's repeats on one
    side of every split)."""
    if repeats == "keep":
        return features, concept_index
    counts = np.bincount(concept_index, minlength=n_concepts).astype(np.float64)
    averaged = {}
    for site, value in features.items():
        sums = np.zeros((n_concepts, *value.shape[1:]), np.float64)
        np.add.at(sums, concept_index, value)
        averaged[site] = (sums / counts.reshape(-1, *[1] * (value.ndim - 1))).astype(np.float32)
    if isinstance(features, Captures):  # rows are concepts now: the steps and reductions still hold
        averaged = features.replace(arrays=averaged, prompts=(), seed=None,
                                    options={**features.options, "rows": "concept means over repeats"})
    return averaged, np.arange(n_concepts)


IMAGE_SITE = "image_encoder.visual_projection"   # the generated images' CLIP embeddings (with image_encoder)


def study_norms(config: ExperimentConfig) -> Any:
    """The norms a run probes: config.norms (with its groups file), cut to the first max_concepts."""
    options = {"groups": config.norms_groups} if config.norms_groups else {}
    norms = load_norms(config.norms, **options)
    if config.max_concepts:
        norms = norms.select(list(norms.concepts[: config.max_concepts]), reason=f"beyond max_concepts={config.max_concepts}")
    return norms


def study_features(config: ExperimentConfig, pipe: Any, norms: Any, *, text_sites: Sequence[str] = (),
                   sampled_sites: Sequence[str] = (), progress: bool = True) -> tuple[Mapping[str, np.ndarray], np.ndarray]:
    """The run's features of the given sites (through the feature store: a finished run's are read back, others
    computed by the same extraction) as `concept_features` rows, and each row's concept index."""
    prompt_set = build_prompts(norms.concepts, config.templates)
    raw = extract_features(
        pipe, prompt_set.prompts, text_sites=text_sites, sampled_sites=sampled_sites,
        token_reduce=config.token_reduce, spatial_reduce=config.spatial_reduce, sampling=config.sampling,
        run=config.run, progress=progress)
    rows_concept = np.tile(prompt_set.concept_index, len(config.seeds))
    return concept_features(raw, rows_concept, len(norms.concepts), config.repeats)


@dataclass
class RunLog:
    timings: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - start, 2)
        return result


def run_experiment(config: ExperimentConfig = ExperimentConfig(), *, progress: bool = True,
                   log: Callable[[str], None] = print) -> Any:
    """Run the whole study and write tables, figures and report.html under `config.out`.

    Returns the `summary.ExperimentResults` it reported on. In a multi-process job
    (`jaxprobe.runtime.distributed`) every process extracts and probes its share; process 0 reports and
    returns the results, the others return None.
    """
    import jax

    run = RunLog()
    log(f"settings: {describe_settings(config)}")
    norms = study_norms(config)
    log(f"norms: {norms}")
    pipe = run.timed("load", lambda: jaxprobe.load(config.model, image_encoder=config.image_encoder,
                                                    **config.model_settings.load_kwargs()))
    check_results_folder(config)  # after the inputs are known good, before any extraction or probing
    prompt_set = build_prompts(norms.concepts, config.templates)
    log(f"model: {pipe.source}; {len(prompt_set.prompts)} prompts x {len(config.seeds)} seed(s); "
        f"JAX on {jax.local_device_count()} {jax.default_backend()} device(s)"
        + (f" in each of {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    sampled = [*config.unet_sites, *([IMAGE_SITE] if config.image_encoder else [])]
    feats, row_concepts = run.timed("extract", lambda: study_features(
        config, pipe, norms, text_sites=config.text_sites, sampled_sites=sampled, progress=progress))
    targets = norms.to_frame().iloc[row_concepts].reset_index(drop=True)
    fold_groups = row_concepts
    if config.fold_groups:
        if config.fold_groups not in norms.metadata.columns:
            raise InputError(f"fold_groups={config.fold_groups!r} is not a metadata column of {norms.name}; "
                             f"choose from {list(norms.metadata.columns)}")
        fold_groups = norms.metadata[config.fold_groups].to_numpy()[row_concepts]
    log(f"probing {len(split_feature_sets(feats))} feature sets x "
        f"{len(norms.attributes)} attributes ({config.outer_cv}x{config.inner_cv} nested CV, "
        f"{config.n_permutations} permutations, {config.n_bootstrap} bootstraps)")
    swept = run.timed("probe", lambda: probe_sweep_across_processes(
        feats, targets, Path(config.out) / ".probe-parts", alphas=np.asarray(config.alphas), outer_cv=config.outer_cv,
        inner_cv=config.inner_cv, groups=fold_groups, target_groups=norms.groups, n_permutations=config.n_permutations,
        n_bootstrap=config.n_bootstrap, seed=config.seed, return_predictions=True, progress=progress))
    if swept is None:  # a multi-process job: process 0 analyses and reports
        log(f"process {jax.process_index()}: my share of features and probes is done; process 0 writes the report")
        return None
    table, predictions = swept
    if config.variance:
        log(f"variance partitioning: every sampled feature set against the text reference "
            f"({config.variance_permutations} permutations, null {config.variance_null}; variance = false skips it)")
    partitioned = None if not config.variance else run.timed("variance", lambda: variance.partition_denoiser(
        feats, targets, table, reference=config.variance_reference, alphas=np.asarray(config.alphas),
        outer_cv=config.outer_cv, inner_cv=config.inner_cv, groups=fold_groups, target_groups=norms.groups,
        n_permutations=config.variance_permutations, null=config.variance_null, n_bootstrap=config.n_bootstrap,
        seed=config.seed, progress=progress))
    feature_sets = list(dict.fromkeys(table["feature_set"]))
    Y = targets.to_numpy(dtype=np.float64)
    results = report.ExperimentResults.build(
        table=table, predictions=predictions, Y=Y, feature_sets=feature_sets, targets=list(norms.attributes),
        target_groups=dict(norms.groups),
        group_table=groups.group_decoding(table),
        similarity=disentanglement.correlation_similarity(predictions, Y, feature_sets),
        confusability=disentanglement.confusability(predictions, Y, feature_sets),
        metadata=_metadata(config, pipe, norms, run))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / CONFIG_FILE, lambda path: path.write_text(config.to_toml()))
    report.write_tables(results, out)
    variance.write_table(partitioned, out)
    path = report.write_report(results, out)
    log(f"report: {path}")
    return results


CONFIG_FILE = "config.toml"
# Settings that change how a run goes, not what it finds (batching within floating-point tolerance).
_HOW_NOT_WHAT = ("batch_size", "chunk_size", "cache", "force", "out")


def check_results_folder(config: ExperimentConfig) -> None:
    """Refuse, before any work, to replace the finished results in `config.out` with those of other
    settings: a rerun with the same settings (to resume or re-render) is fine, `force` replaces them."""
    previous = Path(config.out) / CONFIG_FILE
    if config.force or not previous.is_file():
        return
    try:
        before = ExperimentConfig.from_toml(previous)
    except (InputError, OSError, ValueError) as err:
        raise InputError(f"{config.out} holds the results of a run whose settings ({previous}) cannot be read "
                         f"({err}); pass --force to replace them, or --out another folder") from err
    changed = [f"{f.name}: {getattr(before, f.name)!r} -> {getattr(config, f.name)!r}"
               for f in dataclasses.fields(config)
               if f.name not in _HOW_NOT_WHAT and getattr(before, f.name) != getattr(config, f.name)]
    if changed:
        raise InputError(f"{config.out} holds the results of a run with other settings ({'; '.join(changed[:6])}"
                         f"{'; ...' if len(changed) > 6 else ''}): pass --out another folder to keep both, or "
                         "--force to replace them")


def _metadata(config: ExperimentConfig, pipe: Any, norms: Any, run: RunLog) -> dict[str, Any]:
    import jax

    return {
        "model": pipe.source, "random_weights": is_random_weights(pipe), "loaded": pipe.provenance,
        "norms": norms.name,
        "citation": norms.citation, "n_concepts": len(norms.concepts), "n_attributes": len(norms.attributes),
        "templates": list(config.templates), "seeds": list(config.seeds), "repeats": config.repeats,
        "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
        "sampler": getattr(pipe.scheduler, "kind", None), "token_reduce": config.token_reduce,
        "spatial_reduce": config.spatial_reduce, "cv": f"{config.outer_cv} outer x {config.inner_cv} inner folds",
        "n_permutations": config.n_permutations, "n_bootstrap": config.n_bootstrap, "dropped": norms.dropped,
        "timings_s": dict(run.timings), "devices": f"{jax.device_count()} x {jax.default_backend()}",
        "python": platform.python_version(), "jax": jax.__version__,
    }
