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
from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError
from jaxprobe.features.extract import image_features
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
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def accuracy_row(site: str, t: int, classifier: str, predicted: np.ndarray, labels: np.ndarray,
                 dataset: ImageDataset) -> dict[str, Any]:
    test = dataset.test_index
    correct = int((predicted[test] == labels[test]).sum())
    low, high = wilson_interval(correct, len(test))
    return {"site": site, "t": t, "classifier": classifier, "accuracy": correct / len(test), "ci_low": float(low),
            "ci_high": float(high), "n_test": len(test), "n_train": len(dataset.train_index),
            "n_classes": len(dataset.classes)}


# --- features --------------------------------------------------------------------------------------


# --- the whole run ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(StudyConfig):
    """One classification run. `data`: an image folder (see `jaxprobe.pipeline.images`); `timesteps`: training
    timesteps t the images are noised to; `classifiers`: any of "linear", "conv". `linear`: the probe
    settings (n_classes is set from the data). `out`: tables, figure and report.html (None: none).

    A TOML file sets the fields in [classify] (linear and conv as [classify.linear], [classify.conv]);
    model, dtype in [model] and batch_size, cache, force in [run] also do (there is no sampling: each
    image is noised to t once, so [sampling] takes nothing)."""

    TABLE = "classify"
    sampling = None   # the view of SamplingSettings: none, it samples nothing

    data: str
    model: str = "tiny"
    sites: tuple[str, ...] = ("unet.mid_block", "unet.up_blocks.*")
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


def run_classification(config: ClassifyConfig, *, pipe: Any = None, progress: bool = True,
                       log: Callable[[str], None] = print) -> ClassificationResults:
    """Features of every image at every (site, t), both classifiers, the accuracy table; with
    config.out, also accuracy.parquet/.csv, accuracy.png and report.html there."""
    dataset = load_image_folder(config.data, test_fraction=config.test_fraction, seed=config.seed)
    train, labels = dataset.train_index, dataset.labels
    log(f"{len(dataset)} images of {len(dataset.classes)} classes ({len(train)} train, "
        f"{len(dataset.test_index)} test) from {config.data}")
    pipe = pipe if pipe is not None else jaxprobe.load(config.model, dtype=config.dtype)
    sites = pipe.select(config.sites)
    reduce = "none" if "conv" in config.classifiers else "mean"
    pooled: dict[tuple[str, int], np.ndarray] = {}
    rows = []
    for t in config.timesteps:
        feats = image_features(pipe, dataset, sites, t, cache=config.cache, reduce=reduce, prompt=config.prompt,
                               seed=config.seed, batch_size=config.batch_size, size=config.image_size,
                               force=config.force, progress=progress)
        for site in sites:
            x = feats[site]
            pooled[site, t] = x.mean(axis=(1, 2)) if x.ndim == 4 else x
            if "conv" in config.classifiers:
                model, variables, _ = train_conv_head(x[train], labels[train], len(dataset.classes), config.conv,
                                                      seed=config.seed, progress=progress,
                                                      label=f"conv head {site} t={t}")
                predicted = np.full(len(dataset), -1)
                predicted[dataset.test_index] = conv_head_predict(model, variables, x[dataset.test_index])
                rows.append(accuracy_row(site, t, "conv", predicted, labels, dataset))
                log(f"conv head   {site} t={t}: accuracy {rows[-1]['accuracy']:.3f}")
    if "linear" in config.classifiers:
        val = np.zeros(len(dataset), bool)
        val[train] = validation_mask(labels[train], config.val_fraction, config.seed)
        fit = ~dataset.is_test & ~val
        probe = dataclasses.replace(config.linear, loss="logistic", n_classes=len(dataset.classes))
        for (site, t), predicted in linear_probe_predictions(pooled, labels, fit, val, probe).items():
            rows.append(accuracy_row(site, t, "linear", predicted, labels, dataset))
            log(f"linear probe {site} t={t}: accuracy {rows[-1]['accuracy']:.3f}")
    table = comparison_table(rows)
    files = {} if config.out is None else write_outputs(table, config, dataset,
                                                        random_weights=is_random_weights(pipe), loaded=pipe.provenance)
    return ClassificationResults(table, dataset, files)


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> the tidy table, ordered by classifier (linear first), site (in capture order) and t."""
    table = pd.DataFrame(list(rows), columns=COLUMNS)
    site_rank = {s: i for i, s in enumerate(dict.fromkeys(table["site"]))}
    ranks = {"_classifier": table["classifier"].map(CLASSIFIERS.index), "_site": table["site"].map(site_rank)}
    order = table.assign(**ranks).sort_values(["_classifier", "_site", "t"], kind="stable")
    return order.drop(columns=list(ranks)).reset_index(drop=True)


# --- outputs ---------------------------------------------------------------------------------------


def accuracy_figure(table: pd.DataFrame, classes: int | None = None):
    """Bars of accuracy with 95% CIs: one panel per classifier, sites along x, one bar per t.
    `classes`: draw chance level 1/classes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    classifiers = list(dict.fromkeys(table["classifier"]))
    sites = list(dict.fromkeys(table["site"]))
    steps = sorted(table["t"].unique())
    fig = Figure(figsize=(1.5 + len(classifiers) * max(3.0, 0.4 * len(sites) * len(steps) + 1.0), 3.6),
                 layout="constrained")
    axes = fig.subplots(1, len(classifiers), squeeze=False, sharey=True)[0]
    colors = colormaps["viridis"](np.linspace(0.15, 0.85, len(steps)))
    width = 0.8 / len(steps)
    for ax, classifier in zip(axes, classifiers):
        part = table[table["classifier"] == classifier]
        for j, (t, color) in enumerate(zip(steps, colors)):
            at_t = part[part["t"] == t].set_index("site").reindex(sites)
            x = np.arange(len(sites)) + (j - (len(steps) - 1) / 2) * width
            err = np.vstack([at_t["accuracy"] - at_t["ci_low"], at_t["ci_high"] - at_t["accuracy"]])
            ax.bar(x, at_t["accuracy"], width, yerr=err, capsize=2, color=color, label=f"t={t}")
        if classes:
            ax.axhline(1 / classes, color="0.4", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(np.arange(len(sites)), [short_site(s) for s in sites], rotation=30, ha="right", fontsize=7)
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

