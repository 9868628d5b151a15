"""Revelio's causal loop: clamp SAE latents of one site at one step while generating, and see what changes.

    sae_steer(pipe, "runs/sae", "unet.mid_block@10", prompts, latents=[3, 17], multiples=(0, 2, 4))

The SAE of feature set `site@step` (trained by `jaxprobe sae train` on a reduce="mean" capture of
every step) gets latent i clamped at that step to `multiple x peak_i`, peak_i being the latent's
largest activation on the unedited run of the prompts (0 switches it off), through `ClampSAE`: the
site keeps the SAE's reconstruction error. For each latent and multiple the page shows the images
beside the unedited ones (and, when `jaxprobe sae inspect` ran, the latent's top inputs) and the
latent's activation at that step and every later one, read by the same SAE from the edited run.
The multiples of one latent share one compiled program (the values are traced inputs).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError
from jaxprobe.interventions import ClampSAE
from jaxprobe.reporting.figures import image_grid, save_figures
from jaxprobe.reporting.html import figure_html, page, png_bytes, settings_html, table_html
from jaxprobe.runtime.files import atomic_write_text, write_atomic
from jaxprobe.sae import load_saes
from jaxprobe.sae.train import SAEs

STEER_PAGE = "sae_steer.html"


def _codes(saes: SAEs, name: str, x: np.ndarray) -> np.ndarray:
    """Raw features (n, d) -> the dense TopK code (n, m)."""
    values, indices = saes.encode(name, x)
    code = np.zeros((len(x), saes.weights(name).W_enc.shape[1]), np.float32)
    np.put_along_axis(code, indices, values, axis=1)
    return code


def _inspected(sae_dir: Path | None, name: str) -> pd.DataFrame | None:
    path = None if sae_dir is None else sae_dir / "inspect" / "latents.parquet"
    if path is None or not path.is_file():
        return None
    table = pd.read_parquet(path)
    return table[table["feature_set"] == name]


def sae_steer(pipe: Any, saes: SAEs | str | Path, feature_set: str, prompts: Sequence[str], out: str | Path, *,
              latents: Sequence[int] | None = None, n_latents: int = 4, multiples: Sequence[float] = (0.0, 2.0, 4.0),
              log: Callable[[str], None] = print, **options: Any) -> Path:
    """Clamp each latent at each multiple of its peak; write OUT/sae_steer.parquet/.csv (latent, multiple,
    step, activation), figures/activation.png and grid.png, OUT/sae_steer.html. Returns the page's path.

    latents: default the `n_latents` most active on the dataset `jaxprobe sae inspect` saw, else on these
    prompts. options: those of `Pipeline.generate` (num_inference_steps, guidance_scale, seed, ...)."""
    sae_dir = None if isinstance(saes, SAEs) else Path(saes)
    saes = load_saes(saes)
    if feature_set not in saes.names:
        raise InputError(f"no SAE for {feature_set!r}; there are: {', '.join(saes.names)}")
    site, sep, step_text = feature_set.rpartition("@")
    if not sep or not step_text.isdigit():
        raise InputError(f"{feature_set!r} names no step: sae steer clamps a latent at one step, so pick an SAE "
                         "trained on a site@step feature set (a capture of every step)")
    step, prompts = int(step_text), list(prompts)
    if not prompts or not multiples:
        raise InputError("give at least one prompt and one multiple")
    base_images, base = pipe.generate(prompts, sites=[site], reduce="mean", **options)
    if step >= base[site].shape[1]:
        raise InputError(f"{feature_set!r}: step {step} is outside this run's {base[site].shape[1]} steps; use the "
                         "num_inference_steps the SAE's features were captured with")
    code = _codes(saes, feature_set, base[site][:, step])                        # (n, m)
    inspected = _inspected(sae_dir, feature_set)
    if latents is None:
        ranking = inspected.sort_values("mean_activation", ascending=False)["latent"].to_numpy() \
            if inspected is not None else np.argsort(-code.mean(axis=0))
        latents = [int(i) for i in ranking[:n_latents]]
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < code.shape[1]]
    if bad:
        raise InputError(f"latents {bad} are outside 0..{code.shape[1] - 1}")
    weights = saes.weights(feature_set)
    rows, grids = [], []
    for latent in latents:
        peak = float(code[:, latent].max()) or float(code.max())   # a latent silent here: the code's scale
        row_images = [base_images[0]]
        for multiple in multiples:
            log(f"sae steer: {feature_set} latent {latent} = {multiple:g} x {peak:.3g}")
            images, feats = pipe.generate(prompts, sites=[site], reduce="mean", **options, interventions=[
                ClampSAE(site, weights, {latent: multiple * peak}, steps=[step])])
            row_images.append(images[0])
            later = feats[site][:, step:]                                          # (n, T - step, d)
            for offset in range(later.shape[1]):
                z = _codes(saes, feature_set, later[:, offset])[:, latent]
                rows.append({"feature_set": feature_set, "latent": latent, "multiple": float(multiple), "peak": peak,
                             "step": step + offset, "activation": float(z.mean())})
        grids.append(row_images)
    table = pd.DataFrame(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".parquet", table.to_parquet), (".csv", table.to_csv)):
        write_atomic(out / f"sae_steer{suffix}", lambda p, w=write: w(p, index=False))
    curve = _activation_figure(table, step)
    labels = [f"latent {i}" for i in latents]
    grid = image_grid(np.stack([np.stack(r) for r in grids]), labels,
                      ["unedited", *(f"{m:g} x peak" for m in multiples)])
    save_figures(out, {"activation": curve, "grid": grid})
    body = [
        (f"<p>Latent i of the SAE of {html.escape(feature_set)} clamped at step {step} to a multiple of its peak "
         f"activation on the unedited run, keeping the SAE's reconstruction error; images of the first prompt "
         f"({html.escape(prompts[0])}), and the latent's mean activation over the {len(prompts)} prompts at that step "
         "and later ones, read by the same SAE.</p>"),
        settings_html({"model": pipe.source, "feature set": feature_set, "latents": latents,
                       "multiples": list(multiples), "prompts": len(prompts), **options}),
        figure_html(png_bytes(grid), "clamped generations", "rows: latents; columns: unedited, then each multiple"),
        figure_html(png_bytes(curve), "latent activation", "downstream activation of the clamped latent"),
    ]
    if inspected is not None:
        tops = inspected[inspected["latent"].isin(latents)][["latent", "mean_activation", "top_labels"]].copy()
        tops["top_labels"] = tops["top_labels"].map(lambda labels: "; ".join(map(str, list(labels)[:5])))
        body.append(table_html(tops, "Top inputs of these latents (jaxprobe sae inspect)"))
    body.append(table_html(table[table["step"] == step], f"Activation at step {step}"))
    notice = "Random weights: the images show the plumbing, not a concept." if is_random_weights(pipe.source) else None
    path = out / STEER_PAGE
    atomic_write_text(path, page(f"SAE steering: {feature_set}", body, notice=notice))
    log(f"sae steer: {path}")
    return path


def _activation_figure(table: pd.DataFrame, step: int) -> Any:
    from matplotlib.figure import Figure

    latents = list(dict.fromkeys(table["latent"]))
    figure = Figure(figsize=(4 * len(latents), 3.2), layout="constrained")
    axes = figure.subplots(1, len(latents), squeeze=False)[0]
    for ax, latent in zip(axes, latents):
        for multiple, rows in table[table["latent"] == latent].groupby("multiple"):
            ax.plot(rows["step"], rows["activation"], marker="o", label=f"{multiple:g} x peak")
        ax.set_title(f"latent {latent} (clamped at step {step})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("activation")
        ax.legend(fontsize=7)
    return figure
