"""Models built in memory with random weights: `tiny`, `sd15-random`, `sdxl-random`, `dit-random`, `pixart-random`.

`tiny` is Stable Diffusion 1.x's architecture at toy widths: deterministic (fixed seeds), built in
seconds, no files beyond the small BPE vocabulary in assets/. It exists so that `jaxprobe run` and
the tests work offline; a randomly initialised model carries no semantics, so its probes should
decode at chance. `sd15-random` is SD 1.5 at full size (CLIP ViT-L/14 text, 860M-parameter UNet,
512 px VAE) with random weights, for speed and memory measurements (they do not depend on the
weights' values); it shares the tiny tokenizer (token ids fit any vocabulary). `dit-random` is DiT-XL/2 at
256 px (the 675M-parameter class-conditional transformer and SD's VAE): no text encoder, no class names, so its
"prompts" are integer ImageNet labels. `pixart-random` is PixArt-Sigma 1024 (the 611M-parameter transformer on
128x128 latents, the 4.8B-parameter T5-XXL encoder: 9.5 GB in bfloat16, SDXL's VAE), its prompts tokenized by the
tiny vocabulary padded to Sigma's 300 tokens.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxprobe.checkpoints.component import Component
from jaxprobe.checkpoints.tokenizer import PromptTokenizer
from jaxprobe.checkpoints.weights import abstract_params
from jaxprobe.models import clip, dit, pixart, t5
from jaxprobe.models import unet as unet_model
from jaxprobe.models import vae as vae_model
from jaxprobe.models.clip import CLIPTextConfig, CLIPTextModel
from jaxprobe.models.schedulers import SchedulerConfig
from jaxprobe.models.unet import UNet2DConditionModel, UNetConfig
from jaxprobe.models.vae import AutoencoderKL, VAEConfig
# is_random_weights is re-exported: loading and the studies ask it here
from jaxprobe.reporting.random_weights import RANDOM_MODEL_NAMES, is_random_weights  # noqa: F401
from jaxprobe.runtime.devices import place_params

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


RANDOM_MODELS = dict(zip(RANDOM_MODEL_NAMES, (tiny_configs, sd15_configs, sdxl_configs, dit_configs, pixart_configs)))


def random_params(module: Any, *example: Any, seed: int = SEED, dtype: Any = np.float32) -> Any:
    """Parameters for `module` drawn with numpy, leaf by leaf, from (seed, parameter path).

    Tracing `init` abstractly and filling the shapes on the host avoids compiling the model's
    initialiser (minutes for a UNet on 2 CPU cores) and keeps the weights identical across JAX and
    Flax versions. Kernels and embeddings ~ N(0, 1/fan_in), norm scales 1, biases 0.
    Each leaf is cast to `dtype` as it is drawn, so a full-size model in bfloat16 never holds a float32
    copy of all its weights.
    """
    shapes = abstract_params(module, example)

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
              pixart.PixArtConfig: (pixart.PixArtTransformer2DModel, pixart.example_inputs)}
# The pipeline field each component fills: a transformer is the denoiser, named as its checkpoint names it.
_FIELDS = {"transformer": "unet"}


def random_parts(name: str, dtype: Any) -> dict[str, Any]:
    """The components of the random model `name` (a key of RANDOM_MODELS)."""
    tokenizer = PromptTokenizer.from_dir(TOKENIZER_DIR)
    configs = RANDOM_MODELS[name](tokenizer.vocab_size)
    if isinstance(configs, tuple):
        configs = dict(zip(("text_encoder", "unet", "vae"), configs))
    if isinstance(configs.get("text_encoder"), t5.T5Config):   # PixArt pads and lower-cases its prompts
        tokenizer = PromptTokenizer(tokenizer.hf_tokenizer, PIXART_SEQUENCE_LENGTH, lowercase=True)
    parts: dict[str, Any] = {"tokenizer": tokenizer} if "text_encoder" in configs else {}
    for component, config in configs.items():
        module_cls, example = _BY_CONFIG.get(type(config)) or _BUILDERS[component]
        module = module_cls(config, dtype=dtype)
        params = place_params(random_params(module, *example(config), dtype=dtype), dtype)
        parts[_FIELDS.get(component, component)] = Component(component, module, params, config)
    if isinstance(configs.get("transformer"), pixart.PixArtConfig):
        parts["scheduler"] = SchedulerConfig.from_dict(PIXART_SCHEDULER)
    elif "transformer" in configs:
        parts["scheduler"] = SchedulerConfig.from_dict(DIT_SCHEDULER)
    elif "text_encoder_2" in configs:  # SDXL: the second tokenizer, its scheduler and pipeline switches
        parts.update(tokenizer_2=tokenizer, scheduler=SchedulerConfig.from_dict(SDXL_SCHEDULER),
                     pipeline_options={"force_zeros_for_empty_prompt": True})
    else:
        parts["scheduler"] = SchedulerConfig.from_dict(SD15_SCHEDULER)
    return parts
