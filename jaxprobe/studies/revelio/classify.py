"""Light-weight classifiers on diffusion features of real images (Revelio, Kim, Thomas & Ghadiyaram 2025).

    dataset = load_image_folder("pets/")                  # one subfolder per class (or train/ test/)
    results = run_classification(ClassifyConfig(data="pets/", model="runwayml/stable-diffusion-v1-5"))
    results.table       # site, t, classifier, accuracy, ci_low, ci_high, n_test, n_train, n_classes

Every image is VAE-encoded, noised to training timestep t and passed once through the UNet
(`Pipeline.capture_images`); features go through the feature store, one entry per t, so reruns
and interrupted runs reuse what was extracted. Two classifiers per (site, t):

- linear: a multi-class softmax probe (`probes.linear.fit_probe`) on the spatially mean-pooled
  features, early-stopped on a stratified validation part of the training images; every (site, t)
  of one width trains in one vmapped program.
- conv: a small convolutional head on the unpooled maps (`ConvHead`), AdamW with a cosine-decayed
  learning rate, a fixed number of epochs on all training images.

Accuracy is measured on the held-out test images with a 95% Wilson score interval (the test images
are the binomial trials; the classifier is held fixed).

`compare(config, models, baselines)` is Revelio's cross-architecture comparison: the same heads, split and
seeds on several denoisers (each at its family's sites) and on CLIP / DINOv2 features of every layer, in one
tidy table (COMPARE_COLUMNS), figure and page.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

import jaxprobe
from jaxprobe.checkpoints.loading import resolve_source
from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError, JaxprobeError
from jaxprobe.features.extract import image_encoder_features, image_features, model_fingerprint
from jaxprobe.features.store import FeatureStore
from jaxprobe.features.settings import StudyConfig
from jaxprobe.pipeline.images import ImageDataset, load_image_folder, validation_mask
from jaxprobe.pipeline.sites import short_site
from jaxprobe.probes.linear import ProbeConfig, fit_probe, predict
from jaxprobe.reporting.html import figure_html, page, settings_html, table_html
from jaxprobe.runtime.batching import run_batched
from jaxprobe.runtime.files import write_atomic
from jaxprobe.runtime.progress import progress as progress_bar

CLASSIFIERS = ("linear", "conv")
TABLE, FIGURE, REPORT = "accuracy", "accuracy.png", "report.html"
COLUMNS = ["site", "t", "classifier", "accuracy", "ci_low", "ci_high", "n_test", "n_train", "n_classes"]


# --- the convolutional head ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvHeadConfig:
    """The conv head and how it trains. width: channels of every conv (Revelio: 1024; smaller for
    quick CPU runs). AdamW with lr cosine-decayed to 0 over all steps; dropout after every block."""

    width: int = 1024
    dropout: float = 0.5
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 30
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.width < 1 or self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"conv head width, epochs and batch_size must be positive; got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")


class ConvHead(nn.Module):
    """Maps (b, h, w, c) -> class logits (b, n_classes): BatchNorm without affine parameters,
    3x3 conv to `width`, three stride-2 3x3 conv + BatchNorm + ReLU + dropout blocks, global
    average pooling, linear."""

    n_classes: int
    width: int = 1024
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # momentum 0.9 (PyTorch's 0.1): a head trained for a few hundred steps must still end with
        # running statistics that describe its data.
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = norm(use_scale=False, use_bias=False, name="input_norm")(x)
        x = nn.Conv(self.width, (3, 3), name="stem")(x)
        for i in range(3):
            x = nn.Conv(self.width, (3, 3), strides=2, name=f"down_{i}")(x)
            x = nn.relu(norm(name=f"norm_{i}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.n_classes, name="classifier")(x.mean(axis=(1, 2)))


class HeadState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: optax.OptState


@functools.lru_cache(maxsize=32)
def _optimizer(config: ConvHeadConfig, total_steps: int) -> optax.GradientTransformation:
    # Cached so that equal settings give the same (hashable) transformation and jit reuses its program.
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
    return optax.adamw(schedule, weight_decay=config.weight_decay)


@functools.partial(jax.jit, static_argnames=("model", "optimizer"), donate_argnames=("state",))
def _train_step(model: ConvHead, optimizer: optax.GradientTransformation, state: HeadState, x: jax.Array,
                y: jax.Array, key: jax.Array) -> tuple[HeadState, jax.Array]:
    """One AdamW step on a batch x (b, h, w, c), y (b,) int; returns the new state and the batch loss."""

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                      rngs={"dropout": key}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return HeadState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss


@functools.partial(jax.jit, static_argnames=("model",))
def _head_logits(model: ConvHead, variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


def train_conv_head(x: np.ndarray, y: np.ndarray, n_classes: int, config: ConvHeadConfig = ConvHeadConfig(),
                    *, seed: int = 0, progress: bool = False, label: str = "conv head"
                    ) -> tuple[ConvHead, dict[str, Any], np.ndarray]:
    """Train a ConvHead on maps x (n, h, w, c) with labels y (n,). Returns the module, its variables
    ({"params", "batch_stats"}) and the loss of every step. Batches are drawn on the host (the maps
    of a large dataset need not fit on the device); every batch has one shape, so it compiles once.
    progress: a bar over the epochs, named `label`."""
    if x.ndim != 4:
        raise InputError(f"the conv head needs unpooled maps (n, h, w, c); got shape {x.shape}: capture "
                         "with reduce='none'")
    model = ConvHead(n_classes, config.width, config.dropout)
    batch = min(config.batch_size, len(x))
    steps_per_epoch = -(-len(x) // batch)
    optimizer = _optimizer(config, config.epochs * steps_per_epoch)
    key = jax.random.key(seed)
    variables = model.init(key, jnp.zeros((1, *x.shape[1:]), jnp.float32), train=False)
    state = HeadState(variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    rng = np.random.default_rng(seed)
    losses = []
    with progress_bar(f"{label} (epochs)", config.epochs, progress) as bar:
        for epoch in range(config.epochs):
            order = rng.permutation(len(x))
            order = np.concatenate([order, order[: steps_per_epoch * batch - len(x)]])  # wrap to full batches
            for step, rows in enumerate(order.reshape(steps_per_epoch, batch)):
                step_key = jax.random.fold_in(key, epoch * steps_per_epoch + step)
                state, loss = _train_step(model, optimizer, state, jnp.asarray(x[rows], jnp.float32),
                                          jnp.asarray(y[rows], jnp.int32), step_key)
                losses.append(loss)
            if progress:  # the bar shows finished epochs, not dispatched ones
                loss.block_until_ready()
            bar.advance()
    return model, {"params": state.params, "batch_stats": state.batch_stats}, np.asarray(jnp.stack(losses))


def conv_head_predict(model: ConvHead, variables: Any, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Predicted class labels (n,) for maps x (n, h, w, c), in batches split over all devices."""
    out = run_batched(lambda b: {"logits": _head_logits(model, variables, b)}, np.asarray(x, np.float32), batch_size)
    return out["logits"].argmax(-1)


# --- linear probes ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _fit_predict(x: jax.Array, y: jax.Array, fit_weights: jax.Array, val_weights: jax.Array,
                 config: ProbeConfig) -> jax.Array:
    """x (k, n, d): k feature sets of one width -> predicted labels (k, n) of k probes trained at once."""

    def one(xk):
        params, _ = fit_probe(xk, y, fit_weights, val_weights, config)
        return predict(xk @ params["w"] + params["b"], config)

    return jax.vmap(one)(x)


def linear_probe_predictions(features: Mapping[Any, np.ndarray], labels: np.ndarray, fit_rows: np.ndarray,
                             val_rows: np.ndarray, config: ProbeConfig) -> dict[Any, np.ndarray]:
    """{name: predicted labels (n,) for every row} of softmax probes fitted on features[name] (n, d).

    fit_rows, val_rows (n,) bool: rows the probe trains on and early-stops on; others are unseen.
    Feature sets of equal width train together in one vmapped program."""
    by_width: dict[int, list[Any]] = {}
    for name, x in features.items():
        if x.ndim != 2:
            raise InputError(f"linear probes take pooled features (n, d); {name} has shape {x.shape}")
        by_width.setdefault(x.shape[1], []).append(name)
    fit_w, val_w = jnp.asarray(fit_rows, jnp.float32), jnp.asarray(val_rows, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    out = {}
    for names in by_width.values():
        stacked = jnp.asarray(np.stack([features[n] for n in names]), jnp.float32)   # (k, n, d)
        predicted = np.asarray(_fit_predict(stacked, y, fit_w, val_w, config)).astype(int)
        out.update(zip(names, predicted))
    return out


# --- statistics ------------------------------------------------------------------------------------


def wilson_interval(correct: int | np.ndarray, n: int | np.ndarray, level: float = 0.95) -> tuple[Any, Any]:
    """Wilson score interval for a binomial proportion correct / n (well-behaved near 0 and 1,
    unlike the normal approximation, which matters for small test sets and high accuracies)."""
    from scipy.stats import norm

    z = norm.ppf(0.5 + level / 2)
    n = np.asarray(n, float)
    p = np.asarray(correct, float) / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    # exact maths puts p inside; at p = 0 or 1 rounding can leave it a hair outside, which error bars refuse
    return np.clip(np.minimum(centre - half, p), 0.0, 1.0), np.clip(np.maximum(centre + half, p), 0.0, 1.0)


def accuracy_row(site: str, t: int, classifier: str, predicted: np.ndarray, labels: np.ndarray,
                 dataset: ImageDataset) -> dict[str, Any]:
    test = dataset.test_index
    correct = int((predicted[test] == labels[test]).sum())
    low, high = wilson_interval(correct, len(test))
    return {"site": site, "t": t, "classifier": classifier, "accuracy": correct / len(test), "ci_low": float(low),
            "ci_high": float(high), "n_test": len(test), "n_train": len(dataset.train_index),
            "n_classes": len(dataset.classes)}


# --- the whole run ---------------------------------------------------------------------------------


def default_sites(pipe: Any) -> list[str]:
    """Revelio's sites for any denoiser family: its bottleneck (h-space) block and every block after it in
    capture order, the decoder half (SD 1.x/2.x, SDXL: unet.mid_block and unet.up_blocks.*). The family
    declares both (`models.families`: `component`, `bottleneck`); nothing here knows a module name.
    A family whose bottleneck is no block-level site gets all of its blocks."""
    family = pipe.family
    if family is None:
        raise InputError(f"{pipe.source} has no denoiser: the classifiers need a diffusion pipeline's features "
                         "(pass an image encoder as a baseline instead: --baseline clip|dinov2 FOLDER)")
    blocks = [s for s in pipe.sites() if s.startswith(f"{family.component}.")]
    bottleneck = pipe.bottleneck_site
    return blocks[blocks.index(bottleneck):] if bottleneck in blocks else blocks


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(StudyConfig):
    """One classification run. `data`: an image folder (see `jaxprobe.pipeline.images`); `sites`: denoiser site
    patterns (empty: `default_sites`, the family's bottleneck and the blocks after it); `timesteps`: training
    timesteps t the images are noised to; `classifiers`: any of "linear", "conv". `linear`: the probe
    settings (n_classes is set from the data). `out`: tables, figure and report.html (None: none).

    A TOML file sets the fields in [classify] (linear and conv as [classify.linear], [classify.conv]);
    model, dtype in [model] and batch_size, cache, force in [run] also do (there is no sampling: each
    image is noised to t once, so [sampling] takes nothing)."""

    TABLE = "classify"
    sampling = None   # the view of SamplingSettings: none, it samples nothing

    data: str
    model: str = "tiny"
    sites: tuple[str, ...] = ()
    timesteps: tuple[int, ...] = (25,)
    classifiers: tuple[str, ...] = CLASSIFIERS
    prompt: str = ""
    seed: int = 0
    test_fraction: float = 0.25
    val_fraction: float = 0.1
    image_size: int | None = None
    dtype: str = "float32"
    batch_size: int = 16
    linear: ProbeConfig = ProbeConfig()
    conv: ConvHeadConfig = ConvHeadConfig()
    out: str | None = "jaxprobe-runs/classify"
    cache: str = "jaxprobe-runs/cache"
    force: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch_size must be at least 1, not {self.batch_size}")
        unknown = set(self.classifiers) - set(CLASSIFIERS)
        if unknown or not self.classifiers:
            raise InputError(f"classifiers must be among {', '.join(CLASSIFIERS)}; got {list(self.classifiers)}")
        if not self.timesteps:
            raise InputError("give at least one timestep t")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class ClassificationResults:
    table: pd.DataFrame        # one row per (site, t, classifier): COLUMNS
    dataset: ImageDataset
    files: dict[str, Path]     # what was written under config.out


def load_dataset(config: ClassifyConfig, log: Callable[[str], None] = print) -> ImageDataset:
    dataset = load_image_folder(config.data, test_fraction=config.test_fraction, seed=config.seed)
    log(f"{len(dataset)} images of {len(dataset.classes)} classes ({len(dataset.train_index)} train, "
        f"{len(dataset.test_index)} test) from {config.data}")
    return dataset


def fit_and_validation_rows(dataset: ImageDataset, config: ClassifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) (n,) bool: the rows a linear probe trains on and early-stops on. They depend on the
    labels, val_fraction and seed alone, so every model and baseline of a comparison gets the same ones."""
    val = np.zeros(len(dataset), bool)
    val[dataset.train_index] = validation_mask(dataset.labels[dataset.train_index], config.val_fraction, config.seed)
    return ~dataset.is_test & ~val, val


def _linear_rows(pooled: Mapping[tuple[str, Any, str], np.ndarray], dataset: ImageDataset, config: ClassifyConfig,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One accuracy row per feature set {(site, t or None, pooling): (n, d)}, each with the probe's validation
    accuracy (`val_accuracy`: what a comparison may choose by without looking at the test images)."""
    fit, val = fit_and_validation_rows(dataset, config)
    probe = dataclasses.replace(config.linear, loss="logistic", n_classes=len(dataset.classes))
    rows = []
    for (site, t, pooling), predicted in linear_probe_predictions(pooled, dataset.labels, fit, val, probe).items():
        row = {**accuracy_row(site, t, "linear", predicted, dataset.labels, dataset), "pooling": pooling,
               "val_accuracy": float((predicted[val] == dataset.labels[val]).mean()) if val.any() else float("nan")}
        rows.append(row)
        log(f"linear probe {site} {pooling if t is None else f't={t}'}: accuracy {row['accuracy']:.3f}")
    return rows


def denoiser_rows(pipe: Any, dataset: ImageDataset, config: ClassifyConfig, *, progress: bool = True,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Both classifiers on every (site, t) of one pipeline's features: one accuracy row each (COLUMNS, and
    `pooling`: "mean" for the linear probe, "none" for the conv head on the maps; `val_accuracy` for the linear)."""
    sites = pipe.select(config.sites) if config.sites else default_sites(pipe)
    labels, train = dataset.labels, dataset.train_index
    reduce = "none" if "conv" in config.classifiers else "mean"
    pooled: dict[tuple[str, int, str], np.ndarray] = {}
    rows = []
    for t in config.timesteps:
        feats = image_features(pipe, dataset, sites, t, cache=config.cache, reduce=reduce, prompt=config.prompt,
                               seed=config.seed, batch_size=config.batch_size, size=config.image_size,
                               force=config.force, progress=progress)
        for site in sites:
            x = feats[site]
            pooled[site, t, "mean"] = x.mean(axis=(1, 2)) if x.ndim == 4 else x
            if "conv" in config.classifiers:
                model, variables, _ = train_conv_head(x[train], labels[train], len(dataset.classes), config.conv,
                                                      seed=config.seed, progress=progress,
                                                      label=f"conv head {site} t={t}")
                predicted = np.full(len(dataset), -1)
                predicted[dataset.test_index] = conv_head_predict(model, variables, x[dataset.test_index])
                rows.append({**accuracy_row(site, t, "conv", predicted, labels, dataset), "pooling": "none"})
                log(f"conv head   {site} t={t}: accuracy {rows[-1]['accuracy']:.3f}")
    if "linear" in config.classifiers:
        rows += _linear_rows(pooled, dataset, config, log)
    return rows


def run_classification(config: ClassifyConfig, *, pipe: Any = None, progress: bool = True,
                       log: Callable[[str], None] = print) -> ClassificationResults:
    """Features of every image at every (site, t), both classifiers, the accuracy table; with
    config.out, also accuracy.parquet/.csv, accuracy.png and report.html there."""
    dataset = load_dataset(config, log)
    pipe = pipe if pipe is not None else jaxprobe.load(config.model, dtype=config.dtype)
    table = comparison_table(denoiser_rows(pipe, dataset, config, progress=progress, log=log))
    files = {} if config.out is None else write_outputs(table, config, dataset,
                                                        random_weights=is_random_weights(pipe), loaded=pipe.provenance)
    return ClassificationResults(table, dataset, files)


def comparison_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> pd.DataFrame:
    """Rows -> the tidy table, ordered by model (in the order given, when there is a model column),
    classifier (linear first), site (in capture order) and t."""
    table = pd.DataFrame(list(rows), columns=list(columns))
    site_rank = {s: i for i, s in enumerate(dict.fromkeys(table["site"]))}
    ranks = {"_classifier": table["classifier"].map(CLASSIFIERS.index), "_site": table["site"].map(site_rank)}
    if "model" in table:
        ranks = {"_model": table["model"].map({m: i for i, m in enumerate(dict.fromkeys(table["model"]))}), **ranks}
    order = table.assign(**ranks).sort_values([*ranks, "t"], kind="stable")
    return order.drop(columns=list(ranks)).reset_index(drop=True)


# --- outputs ---------------------------------------------------------------------------------------


def accuracy_figure(table: pd.DataFrame, classes: int | None = None, baselines: pd.DataFrame | None = None):
    """Bars of accuracy with 95% CIs: one panel per classifier, sites along x (grouped by model when the table
    has a model column), one bar per t. `classes`: draw chance level 1/classes. `baselines`: rows (model, site,
    pooling, accuracy, ci_low, ci_high) drawn in every panel as a horizontal line with its interval as a band."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    classifiers = list(dict.fromkeys(table["classifier"]))
    by_model = "model" in table
    columns = ["model", "site"] if by_model else ["site"]
    bars = list(dict.fromkeys(table[columns].itertuples(index=False, name=None)))   # x positions, in table order
    steps = sorted(table["t"].unique())
    fig = Figure(figsize=(1.5 + len(classifiers) * max(3.0, 0.4 * len(bars) * len(steps) + 1.0), 3.6 + by_model),
                 layout="constrained")
    axes = fig.subplots(1, len(classifiers), squeeze=False, sharey=True)[0]
    colors = colormaps["viridis"](np.linspace(0.15, 0.85, len(steps)))
    width = 0.8 / len(steps)
    lines = [] if baselines is None else list(baselines.itertuples(index=False))
    line_colors = colormaps["tab10"](np.arange(len(lines)) % 10)
    for ax, classifier in zip(axes, classifiers):
        part = table[table["classifier"] == classifier]
        for j, (t, color) in enumerate(zip(steps, colors)):
            at_t = part[part["t"] == t].set_index(columns).reindex(bars)
            x = np.arange(len(bars)) + (j - (len(steps) - 1) / 2) * width
            err = np.vstack([at_t["accuracy"] - at_t["ci_low"], at_t["ci_high"] - at_t["accuracy"]])
            ax.bar(x, at_t["accuracy"], width, yerr=err, capsize=2, color=color, label=f"t={t}")
        for line, color in zip(lines, line_colors):
            ax.axhspan(line.ci_low, line.ci_high, color=color, alpha=0.12, linewidth=0, zorder=0)  # behind the bars
            ax.axhline(line.accuracy, color=color, linestyle="--", linewidth=1.2, zorder=3,
                       label=f"{line.model}: {short_site(line.site)} {line.pooling} (linear)")
        if classes:
            ax.axhline(1 / classes, color="0.4", linestyle=":", linewidth=1, label="chance")
        names = [f"{bar[0]}: {short_site(bar[1])}" if by_model else short_site(bar[0]) for bar in bars]
        ax.set_xticks(np.arange(len(bars)), names, rotation=30 if not by_model else 45, ha="right", fontsize=7)
        if by_model:   # a rule between models, whose sites need not correspond
            edges = [i for i in range(1, len(bars)) if bars[i][0] != bars[i - 1][0]]
            for edge in edges:
                ax.axvline(edge - 0.5, color="0.75", linewidth=0.8)
        n_test = sorted(part["n_test"].unique())  # the binomial trials behind every bar of the panel
        ax.set(title=f"{classifier} classifier ({'-'.join(str(n) for n in n_test)} test images)", ylim=(0, 1.02))
    axes[0].set_ylabel("test accuracy (95% Wilson CI)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _config_record(config: ClassifyConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def write_outputs(table: pd.DataFrame, config: ClassifyConfig, dataset: ImageDataset, *,
                  random_weights: bool | None = None, loaded: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """accuracy.parquet, accuracy.csv, accuracy.png, config.toml, metadata.json and report.html under config.out,
    each written to a temporary name and renamed. random_weights: whether the features come from a model
    with random weights (the page says so first); None: decided from config.model. loaded: what the pipeline's
    load read (its `provenance`), recorded in metadata.json and the page so that results name the exact weights
    (a config.toml names only the model's path or id)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"parquet": write_atomic(out / f"{TABLE}.parquet", lambda p: table.to_parquet(p, index=False)),
             "csv": write_atomic(out / f"{TABLE}.csv", lambda p: table.to_csv(p, index=False))}
    fig = accuracy_figure(table, classes=len(dataset.classes))
    files["figure"] = write_atomic(out / FIGURE, lambda p: fig.savefig(p, format="png", dpi=110))
    files["config"] = write_atomic(out / "config.toml", lambda p: p.write_text(config.to_toml()))
    random_weights = is_random_weights(config.model) if random_weights is None else random_weights
    metadata = {"model": config.model, "random_weights": random_weights, "loaded": loaded}
    files["metadata"] = write_atomic(out / "metadata.json",
                                     lambda p: p.write_text(json.dumps(metadata, indent=2, default=str)))
    notice = ("The model has random weights: its features carry no learned semantics, so the accuracies below "
              "measure what a randomly initialised UNet keeps of the images (colour, layout), not what a trained "
              "model knows. Run a real checkpoint for findings.") if random_weights else None
    n_test = len(dataset.test_index)
    document = page(f"Classifiers on diffusion features of {dataset.root}", [
        f"<p>{len(dataset)} images, {len(dataset.classes)} classes ({html.escape(', '.join(dataset.classes[:20]))}"
        f"{', ...' if len(dataset.classes) > 20 else ''}); {len(dataset.train_index)} train, "
        f"{n_test} test. Model: {html.escape(config.model)}.</p>",
        f"<p>Every accuracy below is the share of the same {n_test} held-out test images classified correctly, so "
        f"one image moves it by {1 / n_test:.2f}; the 95% Wilson intervals say how far the accuracy on new images "
        "of these classes could be from it. Compare sites by their intervals, not by their bars.</p>",
        figure_html(files["figure"].read_bytes(), "accuracy",
                    f"Test accuracy per site (bars, one colour per noise timestep t) with 95% Wilson score "
                    f"intervals (whiskers) over the {n_test} test images; dotted line: chance, "
                    f"1/{len(dataset.classes)}."),
        table_html(table, "Test accuracy per site, timestep and classifier (95% Wilson score intervals over "
                          "n_test images)"),
        "<h2>Run settings</h2>", settings_html({**_config_record(config), "loaded": loaded or "not recorded"}),
        "<p class='small'>Method: Kim, Thomas &amp; Ghadiyaram, Revelio (ICCV 2025): VAE-encode, noise to t, one "
        "UNet step; a linear probe on mean-pooled features and a small conv head on the feature maps.</p>"],
        notice=notice)
    files["report"] = write_atomic(out / REPORT, lambda p: p.write_text(document, encoding="utf-8"))
    return files



# --- comparing models (Revelio's cross-architecture study) -----------------------------------------

BASELINES = ("clip", "dinov2")
BASELINE_POOLINGS = ("cls", "mean_patch")
COMPARISON, COMPARISON_FIGURE = "comparison", "comparison.png"
COMPARE_COLUMNS = ["model", "kind", "site", "pooling", "t", "classifier", "accuracy", "ci_low", "ci_high", "n_test",
                   "n_train", "n_classes", "val_accuracy"]


def labelled(spec: str, default: str | None = None) -> tuple[str, str]:
    """"LABEL=SOURCE" -> (LABEL, SOURCE); a bare source is labelled `default`, or by its last path part ("tiny"
    -> "tiny", "runs/sd21/" or "stabilityai/stable-diffusion-2-1" -> the last name). A LABEL holds no "/", so
    "runs/a=b" is a path."""
    label, sep, source = spec.partition("=")
    if sep and label and "/" not in label and "\\" not in label:
        if not source:
            raise InputError(f"{spec!r} names a label but no model: write LABEL=PATH")
        return label, source
    return default or Path(spec.rstrip("/\\")).name or spec, spec


def _unique_labels(labels: Sequence[str]) -> None:
    seen = [label for i, label in enumerate(labels) if label in labels[:i]]
    if seen:
        raise InputError(f"two models or baselines are labelled {seen[0]!r}; name them apart with LABEL=PATH "
                         f"(e.g. -m sd21={seen[0]} or --baseline dinov2 small=FOLDER)")


ENCODER_KINDS = {"CLIPVisionModel": "clip", "CLIPVisionModelWithProjection": "clip", "CLIPModel": "clip",
                 "Dinov2Model": "dinov2"}


def check_baseline(kind: str, source: str) -> Path:
    """The folder of a baseline, refused (one line naming the fix) unless it holds the encoder `kind` says: read
    from its config.json before any model loads, so a mistyped folder costs no denoiser features."""
    from jaxprobe.checkpoints.encoders import architecture

    if kind not in BASELINES:
        raise InputError(f"unknown baseline kind {kind!r}: use {' or '.join(BASELINES)} "
                         "(--baseline clip FOLDER, --baseline dinov2 FOLDER)")
    try:
        folder = resolve_source(source)
    except JaxprobeError as err:
        raise InputError(f"--baseline {kind} {source}: {err}") from None
    if not (folder / "config.json").is_file():
        raise InputError(f"--baseline {kind} {source}: no config.json there; point at the encoder's own folder "
                         "(a transformers CLIPVisionModel or Dinov2Model folder, or a pipeline's image_encoder/)")
    arch = architecture(folder)
    found = ENCODER_KINDS.get(arch)
    if found != kind:
        holds = f"a {found} image encoder: write --baseline {found} {source}" if found else arch or "no architecture"
        raise InputError(f"--baseline {kind} {source}: its config.json names {holds}, not "
                         f"{'a CLIP vision tower' if kind == 'clip' else 'a DINOv2 model'}")
    return folder


def baseline_features(pipe: Any, dataset: ImageDataset, config: ClassifyConfig, *, progress: bool = False
                      ) -> dict[tuple[str, None, str], np.ndarray]:
    """{(site, None, pooling): (n_images, dim)}: the class token and the mean patch token of every layer of an
    image encoder, through the feature store (keyed on the encoder, the files and the sites)."""
    sites = [s for s in pipe.sites() if s.startswith("image_encoder.")]
    paths = [str(p) for p in dataset.paths]
    description = {"kind": "image-encoder", "model": model_fingerprint(pipe), "sites": sites,
                   "data": dataset.describe(), "poolings": list(BASELINE_POOLINGS)}

    def extract(part: slice, bar: Any) -> dict[str, np.ndarray]:
        feats = image_encoder_features(pipe, paths[part], sites=sites, reductions=BASELINE_POOLINGS,
                                       batch_size=config.batch_size)
        bar.advance(part.stop - part.start)
        return {f"{how}:{site}": x for how, by_site in feats.items() for site, x in by_site.items()}

    arrays = FeatureStore(config.cache).compute(description, len(paths), extract, force=config.force,
                                                progress=progress, label=f"{pipe.source} image features")
    return {(site, None, how): arrays[f"{how}:{site}"] for site in sites for how in BASELINE_POOLINGS}


def baseline_lines(table: pd.DataFrame) -> pd.DataFrame:
    """The row each baseline is drawn by: its layer and pooling of highest *validation* accuracy (the test images
    choose nothing; ties go to the earlier layer). Without validation images (val_fraction 0), the highest test
    accuracy, which flatters the baseline; `chosen_by` says which."""
    lines = []
    for _, part in table[table["kind"] == "baseline"].groupby("model", sort=False):
        by_val = part["val_accuracy"].notna().any()
        best = part.loc[(part["val_accuracy"] if by_val else part["accuracy"]).idxmax()]
        lines.append({**best.to_dict(), "chosen_by": "validation accuracy" if by_val else "test accuracy"})
    return pd.DataFrame(lines, columns=[*COMPARE_COLUMNS, "chosen_by"])


@dataclasses.dataclass(frozen=True)
class ComparisonResults:
    table: pd.DataFrame        # one row per (model, site, pooling, t, classifier): COMPARE_COLUMNS
    lines: pd.DataFrame        # per baseline, the row its line in the figure shows (baseline_lines)
    dataset: ImageDataset
    files: dict[str, Path]     # what was written under config.out


def compare(config: ClassifyConfig, models: Sequence[str] | Mapping[str, Any],
            baselines: Sequence[tuple[str, str]] = (), *, progress: bool = True,
            log: Callable[[str], None] = print) -> ComparisonResults:
    """The same classifiers, on the same splits with the same seeds, on every model's features and on image-encoder
    baselines; one table, figure and page (comparison.parquet/.csv, comparison.png, report.html, metadata.json).

    models: sources ("tiny", folders, cached ids; "LABEL=SOURCE" names one), or {label: source or Pipeline}.
    Each model's sites are config.sites when given (the same patterns for every model), else its family's
    `default_sites`. baselines: (kind, folder) pairs, kind "clip" (a CLIP vision tower) or "dinov2"; the folder
    may be "LABEL=FOLDER" (default label: the kind). A baseline gets the linear probe on
    the class token and the mean patch token of every layer. config.model is not used."""
    if isinstance(models, str):
        raise InputError("models must be a list of sources, e.g. ['tiny', 'path/to/sd21'], not one string")
    specs = list(models.items()) if isinstance(models, Mapping) else [labelled(m) for m in models]
    bases = []
    for pair in baselines:
        if isinstance(pair, str) or len(pair) != 2:
            raise InputError(f"a baseline is a (kind, folder) pair, such as ('dinov2', 'path/to/dinov2'), not {pair!r}")
        label, source = labelled(str(pair[1]), default=str(pair[0]))
        bases.append((label, str(pair[0]), source))
    if not specs:
        raise InputError("give at least one model to compare (-m MODEL)")
    folders = [check_baseline(kind, source) for _, kind, source in bases]
    _unique_labels([label for label, _ in specs] + [label for label, _, _ in bases])
    dataset = load_dataset(config, log)
    rows, described = [], {}
    for label, source in specs:
        pipe = source if not isinstance(source, (str, Path)) else jaxprobe.load(str(source), dtype=config.dtype)
        log(f"model {label}: {pipe.source} ({pipe.family.name if pipe.family else 'no denoiser'})")
        rows += [{**row, "model": label, "kind": "denoiser"}
                 for row in denoiser_rows(pipe, dataset, config, progress=progress, log=log)]
        described[label] = {"kind": "denoiser", "source": pipe.source, "random_weights": is_random_weights(pipe),
                            "family": pipe.family.name if pipe.family else None, "loaded": pipe.provenance}
    for (label, kind, _), folder in zip(bases, folders):
        pipe = jaxprobe.load(folder, dtype=config.dtype)
        log(f"baseline {label}: {kind} image features of {pipe.source}")
        pooled = baseline_features(pipe, dataset, config, progress=progress)
        rows += [{**row, "model": label, "kind": "baseline"} for row in _linear_rows(pooled, dataset, config, log)]
        described[label] = {"kind": f"baseline ({kind})", "source": pipe.source, "family": None,
                            "random_weights": False, "loaded": pipe.provenance}
    table = comparison_table(rows, COMPARE_COLUMNS)
    table["t"] = table["t"].astype("Int64")   # baselines have no t
    lines = baseline_lines(table)
    files = {} if config.out is None else write_comparison(table, lines, config, dataset, described)
    return ComparisonResults(table, lines, dataset, files)


def write_comparison(table: pd.DataFrame, lines: pd.DataFrame, config: ClassifyConfig, dataset: ImageDataset,
                     models: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    """comparison.parquet, comparison.csv, comparison.png, metadata.json and report.html under config.out, each
    written to a temporary name and renamed. models: {label: kind, source, family, random_weights, loaded}."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"parquet": write_atomic(out / f"{COMPARISON}.parquet", lambda p: table.to_parquet(p, index=False)),
             "csv": write_atomic(out / f"{COMPARISON}.csv", lambda p: table.to_csv(p, index=False))}
    denoisers = table[table["kind"] == "denoiser"]
    fig = accuracy_figure(denoisers, classes=len(dataset.classes), baselines=lines)
    files["figure"] = write_atomic(out / COMPARISON_FIGURE, lambda p: fig.savefig(p, format="png", dpi=110))
    settings = {k: v for k, v in _config_record(config).items() if k != "model"}   # the models are listed apart
    chosen = lines.astype(object).where(lines.notna(), None).to_dict("records")     # JSON null, not "<NA>"
    metadata = {"models": dict(models), "baseline_lines": chosen, "config": settings}
    files["metadata"] = write_atomic(out / "metadata.json",
                                     lambda p: p.write_text(json.dumps(metadata, indent=2, default=str)))
    random = [label for label, m in models.items() if m["random_weights"]]
    notice = (f"{', '.join(random)} {'has' if len(random) == 1 else 'have'} random weights: such features carry no "
              "learned semantics, so their accuracies measure what a random network keeps of the images (colour, "
              "layout), not what a trained model knows.") if random else None
    n_test = len(dataset.test_index)
    listed = "".join(f"<li><b>{html.escape(label)}</b>: {html.escape(m['kind'])}, {html.escape(str(m['source']))}"
                     + (f" ({html.escape(m['family'])})" if m["family"] else "") + "</li>"
                     for label, m in models.items())
    line_text = "; ".join(f"{html.escape(r.model)}: {html.escape(r.site)} {html.escape(r.pooling)} (chosen by "
                          f"{r.chosen_by}; test accuracy {r.accuracy:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}])"
                          for r in lines.itertuples())
    document = page(f"Classifiers on diffusion features of {dataset.root}: {len(models)} models compared", [
        f"<p>{len(dataset)} images, {len(dataset.classes)} classes ({html.escape(', '.join(dataset.classes[:20]))}"
        f"{', ...' if len(dataset.classes) > 20 else ''}); {len(dataset.train_index)} train, {n_test} test, "
        "the same split, validation part and training seed for every model and baseline.</p>",
        f"<ul>{listed}</ul>",
        f"<p>Every accuracy is the share of the same {n_test} held-out test images classified correctly (one image "
        f"moves it by {1 / n_test:.2f}), with a 95% Wilson score interval over those images. Intervals that do not "
        "overlap point to a real difference; overlapping ones do not settle it (the images are shared, so a paired "
        "test on the per-image predictions is the sharper comparison). Sites of different architectures are "
        "different modules: read across models the best site of each, and the profile along its blocks.</p>",
        f"<p>Baselines (image encoders, linear probe on the class token and on the mean patch token of every layer; "
        f"no noise, so no t) are drawn as dashed lines with their interval as a band, each at its layer and pooling "
        f"of highest validation accuracy (of highest test accuracy, which flatters it, only when there are no "
        f"validation images): {line_text or 'none given'}. Every layer is in the table.</p>",
        figure_html(files["figure"].read_bytes(), "accuracy per model",
                    "Test accuracy per model and site (bars, one colour per noise timestep t) with 95% Wilson score "
                    f"intervals over the {n_test} test images; dashed lines and bands: baselines; dotted line: "
                    f"chance, 1/{len(dataset.classes)}."),
        table_html(table, "Test accuracy per model, site, pooling, timestep and classifier (95% Wilson score "
                          "intervals over n_test images; val_accuracy: the linear probe's early-stopping images)"),
        "<h2>Run settings</h2>", settings_html({**settings, "models": dict(models)}),
        "<p class='small'>Method: Kim, Thomas &amp; Ghadiyaram, Revelio (ICCV 2025): VAE-encode, noise to t, one "
        "denoiser step; a linear probe on mean-pooled features and a small conv head on the feature maps; CLIP and "
        "DINOv2 image features as baselines.</p>"],
        notice=notice)
    files["report"] = write_atomic(out / REPORT, lambda p: p.write_text(document, encoding="utf-8"))
    return files
