"""Tiny diffusers reference models for parity and pipeline tests (offline, built in well under a second).

Two UNet styles at toy width, both with cross_attention_dim 32:
- "sd1": SD 1.x layout: conv proj_in/proj_out, attention_head_dim 8 for every block.
- "sd2": SD 2.x layout: linear projections, per-block head counts, upcast attention, and
  v-prediction for pipelines (`PREDICTION_TYPE`).
Every 1-D parameter (norm scales and shifts, biases) is perturbed away from its constant
initialisation, so a swapped scale/bias or an ignored norm cannot pass a parity test unnoticed.

`save_unet` / `save_vae` write ordinary diffusers folders (config.json + safetensors);
`run_with_hooks` records what named submodules return, converted to jaxprobe's NHWC layout;
`run_once` jits and runs a JAX function compiled for one call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

CROSS_ATTENTION_DIM = 32

UNET_STYLES: dict[str, dict[str, Any]] = {
    "sd1": dict(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=CROSS_ATTENTION_DIM,
    ),
    "sd2": dict(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=CROSS_ATTENTION_DIM,
        use_linear_projection=True, upcast_attention=True,
    ),
}
PREDICTION_TYPE = {"sd1": "epsilon", "sd2": "v_prediction"}

# SDXL layouts at toy width: the context is two text encoders' hidden states side by side (32 + 32), the
# added conditioning a pooled embedding of POOLED_DIM plus 6 time ids of TIME_ID_DIM sinusoids each.
SDXL_CONTEXT_DIM, POOLED_DIM, TIME_ID_DIM = 64, 32, 8
_SDXL_COMMON = dict(
    sample_size=16, norm_num_groups=8, use_linear_projection=True, cross_attention_dim=SDXL_CONTEXT_DIM,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_DIM,
    projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_ID_DIM,
)
SDXL_STYLES: dict[str, dict[str, Any]] = {
    # SDXL's own layout: no attention in the first block, deeper transformers further down
    "sdxl3": dict(_SDXL_COMMON, block_out_channels=(16, 32, 64), layers_per_block=2, attention_head_dim=(2, 2, 4),
                  transformer_layers_per_block=(1, 2, 3),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    "sdxl2": dict(_SDXL_COMMON, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                  transformer_layers_per_block=(1, 2),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}
UNET_STYLES.update(SDXL_STYLES)

VAE_KWARGS: dict[str, Any] = dict(
    sample_size=32, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def make_unet(style: str | dict[str, Any] = "sd1", seed: int = 0) -> UNet2DConditionModel:
    """A tiny diffusers UNet of a named style (or from explicit UNet2DConditionModel kwargs)."""
    kwargs = UNET_STYLES[style] if isinstance(style, str) else style
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _perturbed(UNet2DConditionModel(**kwargs), seed)


def make_vae(seed: int = 0, **overrides: Any) -> AutoencoderKL:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _perturbed(AutoencoderKL(**{**VAE_KWARGS, **overrides}), seed)


def save_unet(directory: str | Path, style: str | dict[str, Any] = "sd1", seed: int = 0) -> Path:
    """Write a tiny UNet folder (config.json, diffusion_pytorch_model.safetensors); returns it."""
    make_unet(style, seed).save_pretrained(directory)
    return Path(directory)


def save_vae(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    make_vae(seed, **overrides).save_pretrained(directory)
    return Path(directory)


def nchw(x: np.ndarray) -> torch.Tensor:
    """jaxprobe's (b, h, w, c) -> a torch (b, c, h, w) float tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A torch output -> numpy in jaxprobe's layout ((b, c, h, w) becomes (b, h, w, c))."""
    x = t.detach().float().numpy()
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread: on toy shapes its thread pool only adds overhead, and on a machine
    whose cores are shared, spinning worker threads make a tiny forward pass take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_with_hooks(model: torch.nn.Module, names: Iterable[str], fn: Callable[[], Any]) -> tuple[Any, dict]:
    """Run `fn()` (single-threaded, no_grad), recording what each named submodule returns (first
    element of tuples, NHWC numpy). Returns (fn's result, {name: array})."""
    recorded: dict[str, np.ndarray] = {}

    def keep(name: str) -> Callable:
        def hook(module, args, output):
            recorded[name] = nhwc(output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with single_threaded(), torch.no_grad():
            result = fn()
    finally:
        for handle in handles:
            handle.remove()
    return result, recorded


def run_once(fn: Callable, *args: Any) -> Any:
    """jit `fn` and call it on `args`. A test runs each program once, so XLA's backend optimisations
    would cost more compile time than they save."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def save_pipeline(path: str | Path, style: str = "sd1", scheduler: dict | None = None) -> Any:
    """A tiny StableDiffusionPipeline of a UNet style, written with save_pretrained; returns the pipeline.
    scheduler: a diffusers scheduler config with its `_class_name` (default: PNDM, the style's prediction type)."""
    import diffusers
    import transformers

    from jaxprobe.checkpoints.random import SD15_SCHEDULER, TOKENIZER_DIR

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    text_cfg = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CROSS_ATTENTION_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, eos_token_id=2, bos_token_id=len(tokenizer) - 2,
        pad_token_id=len(tokenizer) - 1)
    if scheduler is None:
        scheduler = diffusers.PNDMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": PREDICTION_TYPE[style]})
    else:
        scheduler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipe = diffusers.StableDiffusionPipeline(
        vae=make_vae(seed=1), text_encoder=transformers.CLIPTextModel(text_cfg).eval(), tokenizer=tokenizer,
        unet=make_unet(style, seed=2), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                  "timestep_spacing": "leading", "prediction_type": "epsilon", "use_karras_sigmas": False}


def save_sdxl_pipeline(path: str | Path, style: str = "sdxl2", *, force_zeros: bool = True, refiner: bool = False,
                       scheduler: dict | None = None, widths: tuple[int, int] = (32, 32)) -> Any:
    """A tiny StableDiffusionXLPipeline (two CLIP text encoders, `widths` wide, adding up to SDXL_CONTEXT_DIM,
    the second with a 32-wide projection), written with save_pretrained; refiner=True: text_encoder_2 only,
    aesthetic-score time ids. Unequal widths, as in the real model (768, 1280), let diffusers' single-file loader
    tell the two towers apart: it goes by width."""
    import diffusers
    import transformers

    from jaxprobe.checkpoints.random import TOKENIZER_DIR

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=77, eos_token_id=2, bos_token_id=len(tokenizer) - 2,
                  pad_token_id=len(tokenizer) - 1)
    assert sum(widths) == SDXL_CONTEXT_DIM, widths
    torch.manual_seed(0)
    text_2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**common, hidden_size=widths[1], projection_dim=POOLED_DIM))
    unet_kwargs = dict(UNET_STYLES[style])
    if refiner:  # conditioned on text_encoder_2 alone, with 5 time ids (sizes, crop, aesthetic score)
        unet_kwargs.update(cross_attention_dim=widths[1],
                           projection_class_embeddings_input_dim=POOLED_DIM + 5 * TIME_ID_DIM)
    config = scheduler or SDXL_SCHEDULER
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    parts = dict(vae=make_vae(seed=1), text_encoder_2=_perturbed(text_2, 3), tokenizer_2=tokenizer,
                 unet=make_unet(unet_kwargs, seed=2), scheduler=scheduler)
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=force_zeros, **parts)
    else:
        text_1 = _perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**common, hidden_size=widths[0])), 4)
        pipe = diffusers.StableDiffusionXLPipeline(text_encoder=text_1, tokenizer=tokenizer,
                                                   force_zeros_for_empty_prompt=force_zeros, **parts)
    pipe.save_pretrained(path)
    return pipe


def count_compiles() -> tuple[list, Callable[[], None]]:
    """(a list that grows by one per XLA backend compile from now on, a function that stops counting). A program
    the persistent compilation cache holds (tests/conftest.py) counts too: XLA would have compiled it."""
    from jax._src import dispatch, monitoring

    seen: list = []

    def listener(event, duration, **kwargs):
        if event in (dispatch.BACKEND_COMPILE_EVENT, "/jax/compilation_cache/cache_retrieval_time_sec"):
            seen.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    return seen, lambda: monitoring.unregister_event_duration_listener(listener)
