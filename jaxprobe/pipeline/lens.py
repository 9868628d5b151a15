"""The Diffusion Lens (Toker et al. 2024): what each text-encoder layer already "says", shown by
conditioning the denoiser on that layer's hidden state passed through the final layer norm (SD), or read
raw where SDXL and SD3 read their CLIP towers' penultimate states (diffusers' `clip_skip`).

`diffusion_lens` is one `generate(text_layer=k)` per layer (one compiled program each, the same noise
for every layer); `write_lens` adds the prompts x layers image grid and a page (`jaxprobe lens`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError
from jaxprobe.reporting.figures import image_grid, save_figures
from jaxprobe.reporting.html import figure_html, page, png_bytes, settings_html
from jaxprobe.runtime.files import atomic_write_text

if TYPE_CHECKING:
    from jaxprobe.pipeline.pipeline import Pipeline


def diffusion_lens(pipe: "Pipeline", prompts: Sequence[str], layers: Sequence[int], **options: Any) -> np.ndarray:
    """Images (n_prompts, n_layers, H, W, 3) in [0, 1]: prompt i generated from text-encoder hidden state
    layers[j] (0: the token embeddings; the number of layers: the normal run). options: those of
    `Pipeline.generate` (seed, num_inference_steps, guidance_scale, ...)."""
    if not layers:
        raise InputError("pass at least one layer, e.g. layers=[4, 8, 12]")
    if "text_layer" in options or "sites" in options:
        raise InputError("diffusion_lens sets text_layer itself and returns images only (no sites)")
    return np.stack([pipe.generate(list(prompts), text_layer=k, **options) for k in layers], axis=1)


def write_lens(pipe: "Pipeline", prompts: Sequence[str], layers: Sequence[int], out: str | Path,
               **options: Any) -> Path:
    """Run the lens and write OUT/figures/lens.png (prompts x layers), OUT/lens.npy and OUT/lens.html."""
    out = Path(out)
    images = diffusion_lens(pipe, prompts, layers, **options)
    n_layers = pipe.text_encoder.config.num_hidden_layers
    labels = [f"layer {k}" + (" (final)" if k % (n_layers + 1) == n_layers else "") for k in layers]
    figure = image_grid(images, list(prompts), labels)
    save_figures(out, {"lens": figure})
    np.save(out / "lens.npy", images.astype(np.float16))
    notice = "The model has random weights: the images show the plumbing, not what a layer means." \
        if is_random_weights(pipe.source) else None
    body = [
        ("<p>Each row is a prompt, each column the text-encoder hidden state the denoiser was conditioned on "
         f"(through the final layer norm; {n_layers} is the normal run). Same noise in every column.</p>"),
        settings_html({"model": pipe.source, "layers": list(layers), **options}),
        figure_html(png_bytes(figure), "Diffusion Lens grid", "prompts x text-encoder layers"),
        "<h2>Prompts</h2><ol>" + "".join(f"<li>{html.escape(p)}</li>" for p in prompts) + "</ol>",
    ]
    path = out / "lens.html"
    atomic_write_text(path, page("Diffusion Lens", body, notice=notice))
    return path
