"""Train one TopK SAE per feature set (site, or site@timestep), many at once, resumably.

    saes = train_saes(features, SAEConfig(k=32, steps=5000), out="runs/sae")   # features: see `as_source`
    saes.encode("unet.mid_block@3", x)          # (values (n, k), latent indices (n, k))
    saes = load_saes("runs/sae")                # what a finished (or interrupted) training left

Feature sets of equal width form one stack, trained by one jitted, vmapped step; every stack sees the
same rows in the same order. Rows stream chunk by chunk (a FeatureStore entry's chunks, or slices of
arrays, memory-mapped .npy files included): each epoch visits the chunks in a random order and shuffles
rows within windows of about `shuffle_rows` rows, so the order of step s is a function of (seed, s) alone.

Inputs are normalised per SAE: x / scale, scale = sqrt(mean |x - mean|^2) over a sample of up to
`STATS_ROWS` rows, so the centred inputs have unit mean squared norm; b_dec starts at the (scaled) mean.

With `out`, an orbax checkpoint (params, Adam state, dead-latent clocks, step, metric history) is
committed every `checkpoint_every` steps and at the end; training with the same `out` resumes from the
latest one, and the data order is a function of the step, so a resumed run takes exactly the steps an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxprobe.captures import feature_sets as split_feature_sets
from jaxprobe.errors import InputError
from jaxprobe.features.store import FeatureEntry
from jaxprobe.interventions import SAEWeights
from jaxprobe.reporting.random_weights import is_random_weights
from jaxprobe.runtime.files import write_atomic
from jaxprobe.runtime.progress import progress as progress_bar
from jaxprobe.sae.curves import training_curves, training_curves_per_sae
from jaxprobe.sae.model import (
    LatentStats,
    SAEConfig,
    TrainState,
    accumulate_stats,
    encode,
    init_stack,
    init_stats,
    make_train_step,
    reconstruct,
)

STATS_ROWS = 65_536
HISTORY, METRICS, CURVES, ALL_CURVES = "history.csv", "metrics.csv", "loss_curves.png", "loss_curves_per_sae.png"
# A resumed run may change these; any other setting must match the checkpoint's.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every")


# --- feature sources -----------------------------------------------------------------------------------


class FeatureSource:
    """Rows of named (n, d) feature sets, read chunk by chunk: `read(i)` -> {name: (rows of chunk i, d)}."""

    names: list[str]
    dims: dict[str, int]
    n: int
    chunks: list[slice]

    def read(self, i: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


def feature_sets(features: Mapping[str, Any], sites: Sequence[str] | None) -> dict[str, np.ndarray]:
    """A Captures or {site: (n, d) or (n, T, d)} -> {"site" or "site@t": (n, d)} (views), keeping sites
    matching a glob: `jaxprobe.captures.feature_sets`, keyed by name."""
    return {s.name: s.array for s in split_feature_sets(features, sites)}


class ArraySource(FeatureSource):
    """In-memory or memory-mapped arrays {site: (n, d) | (n, T, d)}, read in slices of `chunk_rows`."""

    def __init__(self, features: Mapping[str, Any], sites: Sequence[str] | None = None, chunk_rows: int = 65_536):
        self.arrays = feature_sets(features, sites)
        lengths = {len(a) for a in self.arrays.values()}
        if len(lengths) != 1:
            raise InputError(f"every feature set must have one row per input, got row counts {sorted(lengths)}")
        self.names = list(self.arrays)
        self.dims = {name: a.shape[-1] for name, a in self.arrays.items()}
        self.n = lengths.pop()
        self.chunks = [slice(s, min(s + chunk_rows, self.n)) for s in range(0, self.n, chunk_rows)]

    def read(self, i: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(a[self.chunks[i]], np.float32) for name, a in self.arrays.items()}


class StoreSource(FeatureSource):
    """The chunks of a `FeatureStore` entry (every chunk must be finished)."""

    def __init__(self, entry: FeatureEntry, sites: Sequence[str] | None = None):
        self.entry, self.sites, self.chunks, self.n = entry, sites, entry.chunk_slices(), entry.n_prompts
        first = self.read(0)
        self.names = list(first)
        self.dims = {name: a.shape[-1] for name, a in first.items()}

    def read(self, i: int) -> dict[str, np.ndarray]:
        arrays = self.entry.read_chunk(self.chunks[i])
        if arrays is None:
            part = self.chunks[i]
            raise InputError(f"feature store chunk {part.start}-{part.stop} of {self.entry.root} is missing or "
                             "unfinished: run the extraction to completion first (it resumes)")
        return {name: np.asarray(a, np.float32) for name, a in feature_sets(arrays, self.sites).items()}


def as_source(features: Any, sites: Sequence[str] | None = None) -> FeatureSource:
    """A FeatureSource from: one; a Captures or {site: array}; a FeatureEntry; a folder written by `jaxprobe extract`
    (one <site>.npy each, memory-mapped) or a FeatureStore entry folder (manifest.json + chunks/); a .npz/.npy."""
    if isinstance(features, FeatureSource):
        return features
    if isinstance(features, FeatureEntry):
        return StoreSource(features, sites)
    if isinstance(features, Mapping):
        return ArraySource(features, sites)
    path = Path(features)
    manifest = path / "manifest.json"
    if (path / "chunks").is_dir() and manifest.is_file():
        meta = json.loads(manifest.read_text())
        return StoreSource(FeatureEntry(path, meta["description"], meta["n_prompts"], meta["chunk_size"]), sites)
    if path.exists():
        from jaxprobe.probes.sweep import load_features

        return ArraySource(load_features(path)[0], sites)
    raise InputError(f"features not found: {path} (give a folder of <site>.npy, a .npz/.npy, or a store entry)")


def features_provenance(features: Any) -> dict[str, Any]:
    """{"model": source or None, "random_weights": bool, "loaded": the load's record or None} of the model that
    computed `features`, where they record it: a `jaxprobe extract` folder's manifest.json ("model",
    "random_weights", "loaded": the pipeline's `provenance`, `checkpoints.provenance.describe_source`) or a
    feature-store entry's description ("model" -> "source" and "provenance"); model None for bare arrays."""
    if isinstance(features, StoreSource):
        features = features.entry
    if isinstance(features, FeatureEntry):
        description = features.description
    elif isinstance(features, (str, Path)) and (Path(features) / "manifest.json").is_file():
        meta = json.loads((Path(features) / "manifest.json").read_text())
        description = meta.get("description", meta)  # a store entry's manifest nests it
    else:
        description = {}
    model = description.get("model")
    loaded = description.get("loaded") or (model.get("provenance") if isinstance(model, Mapping) else None)
    model = str(model.get("source")) if isinstance(model, Mapping) else (str(model) if model else None)
    return {"model": model, "random_weights": is_random_weights({**description, "model": model}), "loaded": loaded}


# --- data order ----------------------------------------------------------------------------------------


class BatchReader:
    """Batch `s` of a training run: (batch_size, d) arrays per feature set, a function of (seed, s) only."""

    def __init__(self, source: FeatureSource, batch_size: int, seed: int, shuffle_rows: int = 262_144):
        self.source, self.batch_size, self.seed, self.shuffle_rows = source, batch_size, seed, shuffle_rows
        self.batches_per_epoch = source.n // batch_size
        self.starts = np.array([c.start for c in source.chunks])
        self._order: tuple[int, np.ndarray] | None = None
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row numbers (n,): chunks in random order, rows shuffled within windows of ~shuffle_rows."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            windows, window, size = [], [], 0
            for c in rng.permutation(len(self.source.chunks)):
                part = self.source.chunks[c]
                window.append(np.arange(part.start, part.stop))
                size += part.stop - part.start
                if size >= self.shuffle_rows:
                    windows.append(rng.permutation(np.concatenate(window)))
                    window, size = [], 0
            if window:
                windows.append(rng.permutation(np.concatenate(window)))
            self._order = (epoch, np.concatenate(windows))
        return self._order[1]

    def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """{name: (len(rows), d)} for these row numbers, reading the chunks that hold them."""
        chunk_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = {name: np.empty((len(rows), d), np.float32) for name, d in self.source.dims.items()}
        for c in np.unique(chunk_of):
            if c not in self._cache:
                self._cache[c] = self.source.read(int(c))
                if len(self._cache) > 64:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(c)
            hit = chunk_of == c
            for name, values in self._cache[c].items():
                out[name][hit] = values[rows[hit] - self.starts[c]]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.batches_per_epoch)
        return self.rows(self.epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size])


def input_stats(reader: BatchReader) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per feature set: the mean (d,) and scale sqrt(mean |x - mean|^2), from up to STATS_ROWS rows."""
    sample = reader.rows(np.sort(reader.epoch_order(0)[:STATS_ROWS]))
    means = {name: x.astype(np.float64).mean(0) for name, x in sample.items()}
    scales = {name: float(np.sqrt(np.square(x - means[name]).sum(1).mean())) or 1.0 for name, x in sample.items()}
    return means, scales


# --- the trained SAEs ----------------------------------------------------------------------------------


def dead_window(config: SAEConfig, n_rows: int | None) -> int:
    """Training rows a latent must stay silent for to count as dead: dead_tokens, at most one pass over
    the data. A window longer than the data would leave every latent alive by that count (the training
    curve flat at 0 while a pass over the data finds most of them silent) and AuxK never switched on."""
    return min(config.dead_tokens, n_rows or config.dead_tokens)


_encode = jax.jit(encode, static_argnums=2)
_reconstruct = jax.jit(reconstruct, static_argnums=2)


@dataclasses.dataclass(frozen=True)
class SAEs:
    """Trained SAEs: `stacks[width]` holds the stacked TrainState of the feature sets `groups[width]`."""

    config: SAEConfig
    groups: dict[int, list[str]]
    stacks: dict[int, TrainState]
    history: pd.DataFrame      # step, feature_set, loss, fvu, explained_variance, aux_loss, l0, dead_fraction
    step: int
    model: str | None = None   # the model the training features came from (None: they did not say)
    random_weights: bool = False  # whether that model has random weights (`features_provenance`)
    n_rows: int | None = None  # training rows
    loaded: dict[str, Any] | None = None  # what that model's load read: source, SHA-256s, LoRAs (`features_provenance`)

    @property
    def dead_window(self) -> int:
        return dead_window(self.config, self.n_rows)

    @property
    def names(self) -> list[str]:
        return [name for names in self.groups.values() for name in names]

    def _where(self, name: str) -> tuple[int, int]:
        for width, names in self.groups.items():
            if name in names:
                return width, names.index(name)
        raise InputError(f"no SAE for {name!r}; there are: {', '.join(self.names)}")

    def state(self, name: str) -> TrainState:
        """One SAE's state (params W_enc (d, m), b_enc, W_dec (m, d), b_dec, and its input scale)."""
        width, i = self._where(name)
        return jax.tree.map(lambda leaf: leaf[i], self.stacks[width])

    def weights(self, name: str) -> SAEWeights:
        """One SAE's arrays and k, as `jaxprobe.interventions.ClampSAE` takes them (`name`: its feature set)."""
        state = self.state(name)
        return SAEWeights(**{k: np.asarray(v) for k, v in state.params.items()}, k=self.config.k,
                          scale=float(state.scale))

    def encode(self, name: str, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Raw features (n, d) -> TopK code: activations (n, k) and latent indices (n, k)."""
        state = self.state(name)
        values, indices = _encode(state.params, jnp.asarray(x, jnp.float32) / state.scale, self.config.k)
        return np.asarray(values), np.asarray(indices)

    def reconstruct(self, name: str, x: Any) -> np.ndarray:
        """Raw features (n, d) -> their reconstruction, in raw units."""
        state = self.state(name)
        xn = jnp.asarray(x, jnp.float32) / state.scale
        return np.asarray(_reconstruct(state.params, xn, self.config.k) * state.scale)


# --- checkpoints ---------------------------------------------------------------------------------------


def _manager(out: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        out.absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))


def _save(manager, step: int, stacks: dict[int, TrainState], meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({str(w): s for w, s in stacks.items()}),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def _restore(manager) -> tuple[dict[int, TrainState], dict[str, Any]] | None:
    """The latest checkpoint's stacks and metadata (its own config gives the shapes), or None."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    config = SAEConfig(**meta["config"])
    init = functools.partial(init_stack, config=config)
    abstract = {str(w): jax.eval_shape(init, jax.random.key(0), jnp.zeros((len(names), int(w))), jnp.ones(len(names)))
                for w, names in meta["groups"].items()}
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return {int(w): s for w, s in state.items()}, meta


def load_saes(out: str | Path | SAEs) -> SAEs:
    """The SAEs of the latest checkpoint under `out` (written by `train_saes`)."""
    if isinstance(out, SAEs):
        return out
    out = Path(out)
    manager = _manager(out) if (out / "checkpoints").is_dir() else None
    restored = _restore(manager) if manager else None
    if restored is None:
        raise InputError(f"no SAE checkpoint under {out}: train first (`jaxprobe sae train ... --out {out}`)")
    stacks, meta = restored
    return SAEs(SAEConfig(**meta["config"]), {int(w): n for w, n in meta["groups"].items()}, stacks,
                pd.DataFrame(meta["history"]), meta["step"], meta.get("model"), is_random_weights(meta),
                meta.get("n_rows"), meta.get("loaded"))


# --- training ------------------------------------------------------------------------------------------


def _metric_rows(step: int, names: list[str], metrics: Any) -> list[dict[str, Any]]:
    values = {field: np.asarray(v) for field, v in metrics._asdict().items()}
    return [{"step": step, "feature_set": name, **{f: float(v[i]) for f, v in values.items()},
             "explained_variance": 1.0 - float(values["fvu"][i])} for i, name in enumerate(names)]


def train_saes(features: Any, config: SAEConfig = SAEConfig(), out: str | Path | None = None, *,
               sites: Sequence[str] | None = None, resume: bool = True, progress: bool = False,
               stop_after: int | None = None, log: Callable[[str], None] | None = None) -> SAEs:
    """Train one SAE per feature set (see module docstring); `features` as `as_source` takes them.

    out: checkpoints, history.csv, metrics.csv and loss_curves.png go there (None: nothing written).
    resume=False starts afresh even when `out` holds a checkpoint. stop_after: return after this step
    (checkpointed), as an interrupted run would stop. Returns the SAEs.
    """
    if config.steps <= 2 * config.warmup_steps:
        warnings.warn(f"steps={config.steps} is at most twice the {config.warmup_steps}-step learning-rate warm-up: "
                      "the SAEs will be undertrained (explained variance can even be negative). Train for many "
                      "times the warm-up, or shorten it (--warmup / SAEConfig.warmup_steps).", UserWarning, stacklevel=2)
    source = as_source(features, sites)
    batch_size = min(config.batch_size, source.n)
    if batch_size < config.batch_size and log:
        log(f"only {source.n} rows: batches of {batch_size} instead of {config.batch_size}")
    reader = BatchReader(source, batch_size, config.seed)
    groups: dict[int, list[str]] = {}
    for name in source.names:
        groups.setdefault(source.dims[name], []).append(name)
    for d in groups:
        config.n_latents(d)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    if out is not None and not resume:
        shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
    manager = _manager(Path(out)) if out is not None else None
    restored = _restore(manager) if manager is not None else None
    if restored is not None:
        stacks, meta = restored
        saved = {k: v for k, v in meta["config"].items() if k not in RESUMABLE_CHANGES}
        if (saved != settings or meta["groups"] != {str(d): names for d, names in groups.items()}
                or meta["n_rows"] != source.n):
            raise InputError(f"{out} holds SAEs trained with other settings, feature sets or rows ({saved}, "
                             f"{meta['n_rows']} rows); use another --out, or start afresh (resume=False / --force)")
        step, history = meta["step"], meta["history"]
        if log:
            log(f"resuming from the checkpoint at step {step} of {config.steps} in {out}")
    else:
        means, scales = input_stats(reader)
        key = jax.random.key(config.seed)
        stacks = {d: init_stack(jax.random.fold_in(key, d), jnp.asarray(np.stack([means[n] for n in names])),
                                jnp.asarray([scales[n] for n in names]), config)
                  for d, names in groups.items()}
        step, history = 0, []
    # Committed to the device as restored arrays are, so a resumed run reuses the compiled step.
    stacks = jax.device_put(stacks, jax.devices()[0])
    provenance = features_provenance(features)
    train_step = make_train_step(dataclasses.replace(config, dead_tokens=dead_window(config, source.n)))
    last = config.steps if stop_after is None else min(stop_after, config.steps)

    def checkpoint() -> None:
        if manager is not None and manager.latest_step() != step:
            meta = {"config": dataclasses.asdict(config), "groups": {str(d): n for d, n in groups.items()},
                    "step": step, "history": history, "n_rows": source.n, **provenance}
            _save(manager, step, stacks, meta)

    with progress_bar("SAEs", last - step, progress) as bar:
        while step < last:
            batch = reader.batch(step)
            pending = {d: train_step(stacks[d], jnp.asarray(np.stack([batch[n] for n in names])))
                       for d, names in groups.items()}
            stacks = {d: state for d, (state, _) in pending.items()}
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                rows = [row for d, (_, metrics) in pending.items() for row in _metric_rows(step, groups[d], metrics)]
                history.extend(rows)
                bar.describe(_summary(rows))
            bar.advance()
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint()
    checkpoint()
    saes = SAEs(config, groups, stacks, pd.DataFrame(history), step, n_rows=source.n, **provenance)
    if out is not None and step == config.steps:
        write_training_outputs(saes, source, Path(out))
    return saes


def _summary(rows: list[dict[str, Any]]) -> str:
    ev = np.mean([r["explained_variance"] for r in rows])
    dead = np.mean([r["dead_fraction"] for r in rows])
    return f"SAEs: EV {ev:.3f}, dead {dead:.1%}"


# --- evaluation ----------------------------------------------------------------------------------------


_accumulate = jax.jit(jax.vmap(accumulate_stats, in_axes=(0, 0, 0, None, None, None)), static_argnums=5)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _init_stats(n_saes: int, m: int, d: int, top_n: int, n_attributes: int) -> LatentStats:
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (n_saes, *leaf.shape)),
                        init_stats(m, d, top_n, n_attributes))


def latent_statistics(saes: SAEs, features: Any, *, top_n: int = 16, targets: np.ndarray | None = None,
                      batch_size: int = 1024, sites: Sequence[str] | None = None) -> dict[str, LatentStats]:
    """One pass over every row: per feature set, host-side `LatentStats` (see model.py).

    targets: (n, A) attribute values per row (NaN where not rated), for the norms correlations."""
    source = as_source(features, sites)
    missing = [name for name in source.names if name not in saes.names]
    if missing:
        raise InputError(f"no SAE was trained for {missing[:5]}; trained: {saes.names[:5]}")
    targets = np.zeros((source.n, 0), np.float32) if targets is None else np.asarray(targets, np.float32)
    if targets.shape[0] != source.n:
        raise InputError(f"targets have {targets.shape[0]} rows, the features {source.n}")
    groups = {d: [n for n in names if n in source.dims] for d, names in saes.groups.items()}
    groups = {d: names for d, names in groups.items() if names}
    wrong = [n for d, names in groups.items() for n in names if source.dims[n] != d]
    if wrong:
        raise InputError(f"{wrong[:5]}: the features' width differs from their SAE's; pass the features it was "
                         "trained on")
    # The stacks of the SAEs of these feature sets only (the inputs may hold a subset of them)
    stacks = {d: jax.tree.map(lambda a, d=d: a[np.array([saes.groups[d].index(n) for n in names])], saes.stacks[d])
              for d, names in groups.items()}
    reader = BatchReader(source, batch_size, 0)
    stats = {d: _init_stats(len(names), stacks[d].params["W_dec"].shape[1], d, top_n, targets.shape[1])
             for d, names in groups.items()}
    for start in range(0, source.n, batch_size):
        rows = np.full(batch_size, -1, np.int64)
        rows[:min(batch_size, source.n - start)] = np.arange(start, min(start + batch_size, source.n))
        batch = reader.rows(np.maximum(rows, 0))
        y = targets[np.maximum(rows, 0)]
        for d, names in groups.items():
            stats[d] = _accumulate(stats[d], stacks[d], jnp.asarray(np.stack([batch[n] for n in names])),
                                   jnp.asarray(rows, jnp.int32), jnp.asarray(y), saes.config.k)
    host = {d: jax.tree.map(np.asarray, s) for d, s in stats.items()}
    return {name: jax.tree.map(lambda leaf, i=i: leaf[i], host[d])
            for d, names in groups.items() for i, name in enumerate(names)}


def reconstruction_metrics(stats: dict[str, LatentStats]) -> pd.DataFrame:
    """Per feature set: explained variance, L0 and the fraction of latents that never fired, over the pass."""
    rows = []
    for name, s in stats.items():
        total = s.x_square_sum - np.square(s.x_sum).sum() / s.n_rows
        rows.append({"feature_set": name, "explained_variance": 1.0 - float(s.sse / max(total, 1e-12)),
                     "l0": float(s.l0_sum / s.n_rows), "dead_fraction": float((s.fire_count == 0).mean()),
                     "n_latents": len(s.fire_count), "n_inputs": int(s.n_rows)})
    return pd.DataFrame(rows)


def evaluate(saes: SAEs, features: Any, **options) -> pd.DataFrame:
    """`reconstruction_metrics` over every row of `features`."""
    return reconstruction_metrics(latent_statistics(saes, features, top_n=1, **options))


def write_training_outputs(saes: SAEs, features: Any, out: Path) -> None:
    """out/history.csv (the logged metrics), out/metrics.csv (`evaluate` on every row), out/loss_curves.png
    (median and range over each site's SAEs) and out/loss_curves_per_sae.png (every SAE's own curves)."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / HISTORY, lambda p: saes.history.to_csv(p, index=False))
    metrics = evaluate(saes, features)
    write_atomic(out / METRICS, lambda p: metrics.to_csv(p, index=False))
    for name, figure in ((CURVES, training_curves(saes.history, saes.dead_window)),
                         (ALL_CURVES, training_curves_per_sae(saes.history, saes.dead_window))):
        write_atomic(out / name, lambda p, f=figure: f.savefig(p, format="png", dpi=110))
