"""Tiny diffusers patch-token denoisers (DiT) and their pipelines, for parity tests (offline, built in a second).

The transformer has toy widths but DiT's layout: patch 2, learned sigma (8 output channels) and 1000 classes,
since DiTPipeline hard-codes 1000 as the null class. Every 1-D parameter is perturbed away from its constant
initialisation (`sd_reference._perturbed`) and the zero-initialised adaLN modulations are drawn at random, so
a swapped shift/scale or an ignored gate cannot pass a parity test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sd_reference

# A few ImageNet classes with their synonyms, as facebook/DiT-XL-2-256's model_index.json spells them.
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark, white shark",
            207: "golden retriever", 281: "tabby, tabby cat"}

DIT_KWARGS: dict[str, Any] = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)


def relative_error(ours: Any, theirs: Any) -> float:
    """max |ours - theirs| over max |theirs|: the parity tests' measure."""
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def hooked_streams(model, names):
    """({site: recorded output}, hook handles): every named module's output(s) under jaxprobe's site names. An
    MMDiT block (SD3's joint, FLUX's double or single: names ending in an index) returns (text, image) and a joint
    attention (image, text); the text half is the `.context` site."""
    recorded = {}

    def keep(name):
        def hook(module, args, output):
            if not isinstance(output, tuple):
                recorded[name] = output.numpy()
                return
            image, text = output[::-1] if name.rsplit(".", 1)[-1].isdigit() else output
            recorded[name] = image.numpy()
            if text is not None:
                recorded[f"{name}.context"] = text.numpy()
        return hook

    return recorded, [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]


def steering_hook(vector: np.ndarray, scale: float, steps: range, text: bool) -> Any:
    """A forward hook on a diffusers MMDiT block (SD3's joint, FLUX's double or single block, which return (text,
    image)) adding scale * vector to one stream (`text`, else image) on the calls of `steps`, one call a step:
    what jaxprobe's Steer on the block's site (`.context` for the text) does."""
    calls = []

    def hook(module, args, output):
        calls.append(None)
        if len(calls) - 1 not in steps:
            return output
        context, image = output
        shift = torch.from_numpy(scale * vector)
        return (context + shift, image) if text else (context, image + shift)

    return hook


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not p.abs().sum():   # adaLN-Zero's zero-initialised modulation and output layers
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return sd_reference._perturbed(model, seed)


def make_dit(seed: int = 0, **overrides: Any) -> Any:
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _randomised(diffusers.DiTTransformer2DModel(**{**DIT_KWARGS, **overrides}), seed)


def save_dit_pipeline(path: str | Path, *, legacy: bool = False, scheduler: dict | None = None) -> Any:
    """A tiny DiTPipeline written with save_pretrained, `id2label` added to model_index.json as the hub folders
    have it (DiTPipeline.save_pretrained leaves it out); legacy=True names the transformer `Transformer2DModel`,
    as facebook/DiT-XL-2-256 still does. Returns the pipeline."""
    import diffusers

    from jaxprobe.checkpoints.random import DIT_SCHEDULER

    config = scheduler or DIT_SCHEDULER
    pipe = diffusers.DiTPipeline(transformer=make_dit(seed=2), vae=sd_reference.make_vae(seed=1),
                                 scheduler=getattr(diffusers, config["_class_name"]).from_config(config),
                                 id2label=ID2LABEL)
    pipe.save_pretrained(path)
    index_file = Path(path) / "model_index.json"
    index = json.loads(index_file.read_text())
    index["id2label"] = {str(k): v for k, v in ID2LABEL.items()}
    index_file.write_text(json.dumps(index, indent=2))
    if legacy:
        config_file = Path(path) / "transformer" / "config.json"
        cfg = json.loads(config_file.read_text())
        cfg.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None,
                   only_cross_attention=False, use_linear_projection=False)
        config_file.write_text(json.dumps(cfg, indent=2))
    return pipe


T5_WIDTH = 32
# width 24 = 3 heads of 8: PixArt-alpha's micro-conditions split the width in thirds
PIXART_KWARGS: dict[str, Any] = dict(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=24, caption_channels=T5_WIDTH, sample_size=8,
                                     patch_size=2)
PIPELINES = {"sigma": "PixArtSigmaPipeline", "alpha": "PixArtAlphaPipeline"}


def make_pixart(seed: int = 0, **overrides: Any) -> Any:
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _randomised(diffusers.PixArtTransformer2DModel(**{**PIXART_KWARGS, **overrides}), seed)


def save_pixart_pipeline(path: str | Path, kind: str = "sigma", *, legacy: bool = False) -> Any:
    """A tiny PixArtSigmaPipeline ("sigma") or PixArtAlphaPipeline ("alpha", with the resolution and aspect-ratio
    micro-conditions of the 1024 px model) with a tiny T5 encoder and tokenizer, written with save_pretrained;
    legacy=True names the transformer `Transformer2DModel`, as PixArt-alpha's folders do. Returns the pipeline."""
    import diffusers
    import transformers

    import encoder_reference

    path = Path(path)
    encoder_reference.save_t5_encoder(path / "t5", d_model=T5_WIDTH)
    text_encoder = transformers.T5EncoderModel.from_pretrained(path / "t5").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "t5")
    transformer = make_pixart(seed=2, use_additional_conditions=kind == "alpha")
    from jaxprobe.checkpoints.random import PIXART_SCHEDULER

    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(PIXART_SCHEDULER)
    pipe = getattr(diffusers, PIPELINES[kind])(tokenizer=tokenizer, text_encoder=text_encoder,
                                                vae=sd_reference.make_vae(seed=1), transformer=transformer,
                                                scheduler=scheduler)
    pipe.save_pretrained(path)
    if legacy:
        config_file = path / "transformer" / "config.json"
        cfg = json.loads(config_file.read_text())
        cfg.update(_class_name="Transformer2DModel", norm_type="ada_norm_single")
        config_file.write_text(json.dumps(cfg, indent=2))
    return pipe


# SD3's layout at toy widths: 3 joint blocks (the last context_pre_only), patch 2, a 12x12 position table
# that latents of other sizes are cropped from; "sd3.5" adds qk RMS-norm and dual attention in blocks 0-1.
SD3_KWARGS: dict[str, Any] = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                                  pooled_projection_dim=64, out_channels=4, pos_embed_max_size=12)
SD3_STYLES: dict[str, dict[str, Any]] = {"sd3": {}, "sd3.5": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))}


def make_sd3(style: str = "sd3", seed: int = 0) -> Any:
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _randomised(diffusers.SD3Transformer2DModel(**SD3_KWARGS, **SD3_STYLES[style]), seed).eval()


def save_sd3_pipeline(path: str | Path, style: str = "sd3", *, t5: bool = True) -> Any:
    """A tiny StableDiffusion3Pipeline written with save_pretrained: CLIP-L- and bigG-style towers 16 wide with
    32-wide projections (pooled: 64), a tiny T5 as wide as joint_attention_dim (t5=False: none, as the
    T5-less SD3 folders), SD3's flow-matching scheduler (shift 3). Returns the pipeline."""
    import diffusers
    import transformers

    import encoder_reference
    from jaxprobe.checkpoints.random import TOKENIZER_DIR

    path = Path(path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    common = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=77, eos_token_id=2, bos_token_id=len(tokenizer) - 2,
                  pad_token_id=len(tokenizer) - 1, projection_dim=32)
    torch.manual_seed(0)
    clips = [sd_reference._perturbed(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**common)),
                                     seed).eval() for seed in (4, 3)]
    parts: dict[str, Any] = dict(text_encoder_3=None, tokenizer_3=None)
    if t5:
        encoder_reference.save_t5_encoder(path / "t5", d_model=T5_WIDTH)
        parts = dict(text_encoder_3=transformers.T5EncoderModel.from_pretrained(path / "t5").eval(),
                     tokenizer_3=transformers.AutoTokenizer.from_pretrained(path / "t5"))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=make_sd3(style, seed=2), scheduler=scheduler,
        vae=sd_reference.make_vae(seed=1, scaling_factor=1.5305, shift_factor=0.0609),   # SD3's VAE constants
        text_encoder=clips[0], tokenizer=tokenizer, text_encoder_2=clips[1], tokenizer_2=tokenizer, **parts)
    pipe.save_pretrained(path)
    return pipe


# FLUX's layout at toy widths: 2 double-stream and 2 single-stream blocks, 2 heads of 8 split (2, 2, 4) over the
# three rotary axes, 2x2-packed 4-channel latents (16-wide tokens); "dev" embeds the guidance scale.
FLUX_KWARGS: dict[str, Any] = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
FLUX_STYLES: dict[str, dict[str, Any]] = {"schnell": dict(guidance_embeds=False), "dev": dict(guidance_embeds=True)}
# FLUX.1-dev's scheduler (resolution-dependent shift); schnell's shifts by 1, i.e. not at all
FLUX_SCHEDULERS: dict[str, dict[str, Any]] = {
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
    "dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096)}


def make_flux(style: str = "schnell", seed: int = 0) -> Any:
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _randomised(diffusers.FluxTransformer2DModel(**FLUX_KWARGS, **FLUX_STYLES[style]), seed).eval()


def save_flux_pipeline(path: str | Path, style: str = "schnell") -> Any:
    """A tiny FluxPipeline written with save_pretrained: a CLIPTextModel 16 wide (its pooled output is
    pooled_projections), a tiny T5 as wide as joint_attention_dim, a 4-channel VAE with FLUX's scaling and shift
    constants, the style's flow-matching scheduler. Returns the pipeline."""
    import diffusers
    import transformers

    import encoder_reference
    from jaxprobe.checkpoints.random import TOKENIZER_DIR

    path = Path(path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                         eos_token_id=2, bos_token_id=len(tokenizer) - 2,
                                         pad_token_id=len(tokenizer) - 1)
    torch.manual_seed(0)
    clip = sd_reference._perturbed(transformers.CLIPTextModel(config), 4).eval()
    encoder_reference.save_t5_encoder(path / "t5", d_model=T5_WIDTH)
    pipe = diffusers.FluxPipeline(
        transformer=make_flux(style, seed=2),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[style]),
        vae=sd_reference.make_vae(seed=1, scaling_factor=0.3611, shift_factor=0.1159),   # FLUX's VAE constants
        text_encoder=clip, tokenizer=tokenizer,
        text_encoder_2=transformers.T5EncoderModel.from_pretrained(path / "t5").eval(),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(path / "t5"))
    pipe.save_pretrained(path)
    return pipe


def check_every_intervention_kind(pipe: Any, blocks: tuple[str, str, str], **sampling: Any) -> None:
    """Steer, Patch, Ablate, Scale and ClampSAE together in one run of a joint-attention transformer, on both of
    its streams (`blocks`: three block sites in call order; `.context` is each block's text stream). Exact where
    the captured site shows nothing upstream could change: at the single step, the first block's image stream
    is scaled from its own input, an ablated or patched site is what it was set to; the steered and clamped
    sites change the prediction."""
    from jaxprobe.interventions import Ablate, ClampSAE, Patch, SAEWeights, Scale, Steer

    first, second, third = blocks
    sites = [first, f"{first}.context", second, f"{second}.context", third, "pred_original_sample"]
    options = dict(sites=sites, reduce="none", num_inference_steps=1, **sampling)
    prompts = ["a red cube", "a blue sphere"]
    base = pipe.capture(prompts, **options)
    rng = np.random.default_rng(0)
    source = rng.standard_normal(base[second].shape).astype(np.float32)
    d = base[third].shape[-1]
    sae = SAEWeights(W_enc=rng.standard_normal((d, 8)).astype(np.float32), b_enc=np.zeros(8, np.float32),
                     W_dec=rng.standard_normal((8, d)).astype(np.float32), b_dec=np.zeros(d, np.float32), k=2)
    intervened = pipe.capture(prompts, interventions=[
        Scale(first, 2.0), Ablate(f"{first}.context"), Patch(second, source),
        Steer(f"{second}.context", np.ones(base[f"{second}.context"].shape[-1], np.float32), scale=3.0),
        ClampSAE(third, sae, {0: 5.0})], **options)
    np.testing.assert_allclose(intervened[first], 2.0 * base[first], rtol=1e-5, atol=1e-5)
    assert not intervened[f"{first}.context"].any()
    np.testing.assert_array_equal(intervened[second], source)
    assert not np.allclose(intervened[third], base[third], atol=1e-3)
    assert np.isfinite(intervened["pred_original_sample"]).all()
    assert not np.allclose(intervened["pred_original_sample"], base["pred_original_sample"], atol=1e-4)
