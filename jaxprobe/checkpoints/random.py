"""Models built in memory with random weights: `tiny`, `sd15-random`, `sdxl-random`, `dit-random`, `pixart-random`,
`sd3-random`, `flux-random`.

`tiny` is Stable Diffusion 1.x's architecture at toy widths: deterministic (fixed seeds), built in
seconds, no files beyond the small BPE vocabulary in assets/. It exists so that `jaxprobe run` and
the tests work offline; a randomly initialised model carries no semantics, so its probes should
decode at chance. `sd15-random` is SD 1.5 at full size (CLIP ViT-L/14 text, 860M-parameter UNet,
512 px VAE) with random weights, for speed and memory measurements (they do not depend on the
weights' values); it shares the tiny tokenizer (token ids fit any vocabulary). `dit-random` is DiT-XL/2 at
256 px (the 675M-parameter class-conditional transformer and SD's VAE): no text encoder, no class names, so its
"prompts" are integer ImageNet labels. `pixart-random` is PixArt-Sigma 1024 (the 611M-parameter transformer on
128x128 latents, the 4.8B-parameter T5-XXL encoder: 9.5 GB in bfloat16, SDXL's VAE), its prompts tokenized by the
tiny vocabulary padded to Sigma's 300 tokens. `sd3-random` is Stable Diffusion 3.5 Medium (the 2.5B-parameter MMDiT
with qk RMS-norm and dual attention in its first 13 blocks, CLIP-L and OpenCLIP bigG with projections, T5-XXL, the
16-channel VAE, flow matching with shift 3). `flux-random` is FLUX.1-schnell (the 12B-parameter transformer: 19
double- and 38 single-stream blocks, CLIP-L's pooled output and T5-XXL's 512 tokens, its 16-channel VAE, flow
matching without shift; 1-4 steps, no guidance).

Every random model is built lazily: loading traces each component's `init` for its parameter shapes (seconds,
no weights) and draws the values on first use (`Component.params`), so `jaxprobe info --sites/--plan` on a
20 GB model costs what its shapes cost. The T5 encoders' weights are kept in bfloat16 whatever the compute
dtype: T5 v1.1 is shipped and run that way (it overflows in float16), and in float32 it alone would be 19 GB.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints.component import Component, LazyParams
from jaxprobe.checkpoints.tokenizer import PromptTokenizer
from jaxprobe.checkpoints.weights import abstract_params
from jaxprobe.models import clip, dit, flux, pixart, sd3, t5
from jaxprobe.models import unet as unet_model
from jaxprobe.models import vae as vae_model
from jaxprobe.models.clip import CLIPTextConfig, CLIPTextModel
from jaxprobe.models.schedulers import SchedulerConfig
from jaxprobe.models.unet import UNet2DConditionModel, UNetConfig
from jaxprobe.models.vae import AutoencoderKL, VAEConfig
# is_random_weights is re-exported: loading and the studies ask it here
from jaxprobe.reporting.random_weights import RANDOM_MODEL_NAMES, is_random_weights  # noqa: F401
from jaxprobe.runtime.devices import ParamSharding, place_params

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
SEED = 0
TEXT_WIDTH = 64

# SD 1.5's own scheduler_config.json (PNDM, scaled-linear betas, leading spacing, steps_offset 1).
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}


def tiny_configs(vocab_size: int) -> tuple[CLIPTextConfig, UNetConfig, VAEConfig]:
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                          num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act="quick_gelu", eos_token_id=vocab_size - 1)
    unet = UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                      cross_attention_dim=TEXT_WIDTH)
    vae = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return text, unet, vae


def sd15_configs(vocab_size: int) -> tuple[CLIPTextConfig, UNetConfig, VAEConfig]:
    del vocab_size  # the full vocabulary: every tiny-tokenizer id is a valid SD 1.5 id
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    unet = UNetConfig(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
    vae = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return text, unet, vae


def sdxl_configs(vocab_size: int) -> dict[str, Any]:
    """SDXL 1.0 base at full size: CLIP ViT-L (penultimate layer), OpenCLIP bigG with its 1280-wide
    projection, the 2.6B-parameter UNet, the 1024 px VAE."""
    del vocab_size
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    text_2 = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                            hidden_act="gelu", projection_dim=1280)
    unet = UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                      transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)
    vae = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    scaling_factor=0.13025)
    return {"text_encoder": text, "text_encoder_2": text_2, "unet": unet, "vae": vae}


# SDXL 1.0 base's scheduler_config.json (Euler, scaled-linear betas, leading spacing, steps_offset 1).
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                  "timestep_spacing": "leading", "prediction_type": "epsilon", "use_karras_sigmas": False}

# facebook/DiT-XL-2-256's scheduler_config.json (DDIM, linear betas).
DIT_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                 "prediction_type": "epsilon"}


def dit_configs(vocab_size: int) -> dict[str, Any]:
    """DiT-XL/2 256: 28 blocks of width 1152 (16 heads of 72), patch 2 on 32x32 latents, learned sigma, 1000
    classes; SD's 256 px VAE (sd-vae-ft-ema)."""
    del vocab_size
    vae = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return {"transformer": dit.DiTConfig(out_channels=8), "vae": vae}


# PixArt-Sigma-XL-2-1024-MS's scheduler_config.json (DPM-Solver++ 2M, linear betas).
PIXART_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                    "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
                    "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                    "prediction_type": "epsilon", "steps_offset": 0, "thresholding": False,
                    "timestep_spacing": "linspace", "use_karras_sigmas": False, "variance_type": None}
PIXART_SEQUENCE_LENGTH = 300


def pixart_configs(vocab_size: int) -> dict[str, Any]:
    """PixArt-Sigma-XL-2-1024-MS: T5 v1.1 XXL's encoder (4096 wide, 24 layers), the transformer (28 blocks of 1152,
    positions stretched x2, no micro-conditions), SDXL's VAE."""
    del vocab_size
    vae = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    scaling_factor=0.13025)
    transformer = pixart.PixArtConfig(sample_size=128, caption_channels=4096, interpolation_scale=2,
                                      use_additional_conditions=False)
    return {"text_encoder": t5.T5Config(), "transformer": transformer, "vae": vae}


# stabilityai/stable-diffusion-3.5-medium's scheduler_config.json (flow matching, static shift 3).
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def sd3_configs(vocab_size: int) -> dict[str, Any]:
    """Stable Diffusion 3.5 Medium: CLIP-L (projection 768) and OpenCLIP bigG (projection 1280), whose pooled
    projections add up to the transformer's 2048; T5 v1.1 XXL's encoder; the MMDiT (24 blocks of 24 heads of 64,
    per-head RMS-norm of queries and keys, an image-only second attention in blocks 0-12, positions cropped from a
    384-wide table); the 16-channel VAE without quant convs, latents shifted and scaled."""
    del vocab_size
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)
    text_2 = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                            hidden_act="gelu", projection_dim=1280)
    transformer = sd3.SD3Config(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    vae = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, latent_channels=16,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return {"text_encoder": text, "text_encoder_2": text_2, "text_encoder_3": t5.T5Config(),
            "transformer": transformer, "vae": vae}


def flux_configs(vocab_size: int) -> dict[str, Any]:
    """FLUX.1-schnell, from its config.json values (`models.flux`): CLIP-L without projection (its pooled output
    conditions), T5 v1.1 XXL's encoder, the transformer, the 16-channel VAE."""
    del vocab_size
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    return {"text_encoder": text, "text_encoder_2": t5.T5Config(),
            "transformer": flux.FluxConfig.from_dict(flux.FLUX_SCHNELL_TRANSFORMER),
            "vae": VAEConfig.from_dict(flux.FLUX_VAE)}


RANDOM_MODELS = dict(zip(RANDOM_MODEL_NAMES, (tiny_configs, sd15_configs, sdxl_configs, dit_configs, pixart_configs,
                                              sd3_configs, flux_configs)))


def random_params(module: Any, *example: Any, seed: int = SEED, dtype: Any = np.float32, shapes: Any = None) -> Any:
    """Parameters for `module` drawn with numpy, leaf by leaf, from (seed, parameter path).

    Tracing `init` abstractly and filling the shapes on the host avoids compiling the model's
    initialiser (minutes for a UNet on 2 CPU cores) and keeps the weights identical across JAX and
    Flax versions. Kernels and embeddings ~ N(0, 1/fan_in), norm scales 1, biases 0.
    Each leaf is cast to `dtype` as it is drawn, so a full-size model in bfloat16 never holds a float32
    copy of all its weights. shapes: `abstract_params(module, example)` when the caller has it already.
    """
    shapes = abstract_params(module, example) if shapes is None else shapes

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        kind = name.rsplit(".", 1)[-1]
        if kind == "bias":
            return np.zeros(leaf.shape, dtype)
        if kind == "scale":
            return np.ones(leaf.shape, dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if kind == "kernel" else leaf.shape[-1]
        return (rng.standard_normal(leaf.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


_BUILDERS = {"text_encoder": (CLIPTextModel, clip.example_inputs), "text_encoder_2": (CLIPTextModel, clip.example_inputs),
             "unet": (UNet2DConditionModel, unet_model.example_inputs), "vae": (AutoencoderKL, vae_model.example_inputs),
             "transformer": (dit.DiTTransformer2DModel, dit.example_inputs)}
# Components whose model depends on the config's kind, not only on the component.
_BY_CONFIG = {t5.T5Config: (t5.T5EncoderModel, t5.example_inputs),
              pixart.PixArtConfig: (pixart.PixArtTransformer2DModel, pixart.example_inputs),
              sd3.SD3Config: (sd3.SD3Transformer2DModel, sd3.example_inputs),
              flux.FluxConfig: (flux.FluxTransformer2DModel, flux.example_inputs)}
# The pipeline field each component fills: a transformer is the denoiser, named as its checkpoint names it.
_FIELDS = {"transformer": "unet"}
_SCHEDULERS = {pixart.PixArtConfig: PIXART_SCHEDULER, dit.DiTConfig: DIT_SCHEDULER, sd3.SD3Config: SD3_SCHEDULER,
               flux.FluxConfig: flux.FLUX_SCHNELL_SCHEDULER}


def param_dtype(config: Any, dtype: Any) -> Any:
    """The dtype a random component's weights are kept in: bfloat16 for T5 (see the module docstring), else `dtype`."""
    return jnp.bfloat16 if isinstance(config, t5.T5Config) else dtype


def lazy_component(name: str, module: Any, config: Any, example: tuple[Any, ...], dtype: Any,
                   sharding: ParamSharding | None = None) -> Component:
    """A Component whose weights are `random_params`, drawn and placed on the devices (as `sharding` lays them,
    replicated by default) when first read; its shapes come from one abstract trace of `init`, now."""
    traced = abstract_params(module, example)
    shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), traced)
    return Component(name, module, LazyParams(
        shapes, lambda: place_params(random_params(module, dtype=dtype, shapes=traced), dtype, sharding)), config)


def random_parts(name: str, dtype: Any, sharding: ParamSharding | None = None) -> dict[str, Any]:
    """The components of the random model `name` (a key of RANDOM_MODELS), their weights not yet drawn;
    sharding: how they will lie over the devices once drawn."""
    tokenizer = PromptTokenizer.from_dir(TOKENIZER_DIR)
    configs = RANDOM_MODELS[name](tokenizer.vocab_size)
    if isinstance(configs, tuple):
        configs = dict(zip(("text_encoder", "unet", "vae"), configs))
    parts: dict[str, Any] = {"tokenizer": tokenizer} if "text_encoder" in configs else {}
    if isinstance(configs.get("text_encoder"), t5.T5Config):   # PixArt pads and lower-cases its prompts
        parts["tokenizer"] = PromptTokenizer(tokenizer.hf_tokenizer, PIXART_SEQUENCE_LENGTH, lowercase=True)
    for component, config in configs.items():
        module_cls, example = _BY_CONFIG.get(type(config)) or _BUILDERS[component]
        module = module_cls(config, dtype=dtype)
        parts[_FIELDS.get(component, component)] = lazy_component(component, module, config, example(config),
                                                                  param_dtype(config, dtype), sharding)
    denoiser = configs.get("transformer", configs.get("unet"))
    if type(denoiser) in _SCHEDULERS:
        parts["scheduler"] = SchedulerConfig.from_dict(_SCHEDULERS[type(denoiser)])
    elif "text_encoder_2" in configs:  # SDXL: the second tokenizer, its scheduler and pipeline switches
        parts.update(tokenizer_2=tokenizer, scheduler=SchedulerConfig.from_dict(SDXL_SCHEDULER),
                     pipeline_options={"force_zeros_for_empty_prompt": True})
    else:
        parts["scheduler"] = SchedulerConfig.from_dict(SD15_SCHEDULER)
    if isinstance(configs.get("text_encoder_2"), t5.T5Config):   # FLUX: T5's 512 cased tokens beside CLIP
        parts["tokenizer_2"] = PromptTokenizer(tokenizer.hf_tokenizer, flux.T5_SEQUENCE_LENGTH)
    if "text_encoder_3" in configs:   # SD3: CLIP's tokenizer for both towers, T5's 256 cased tokens
        parts.update(tokenizer_2=tokenizer, tokenizer_3=PromptTokenizer(tokenizer.hf_tokenizer, sd3.T5_SEQUENCE_LENGTH))
    return parts
