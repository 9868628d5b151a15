"""The denoiser-family seam: everything jaxprobe needs to know about one kind of denoiser.

A family (SD 1.x/2.x UNet today; SDXL, DiT, PixArt, SD3/FLUX MMDiT next) is one `DenoiserFamily`
value in `FAMILIES`. The rest of the package asks the family, never the model class:

    config      `read_config(checkpoint config.json)` -> its frozen Config
    module      `module(config, dtype)` -> the Flax module, named like the checkpoint's torch modules
    weights     `rename_keys(state_dict)`: renames the checkpoint needs before the mechanical
                torch -> Flax mapping (`checkpoints.weights.convert_state_dict`); identity for most
    inputs      `example_inputs(config, batch)` -> zeros for shape tracing (params, sites)
    sites       `block_sites` (regexes that wildcards reach) and `bottleneck(config)`: the h-space site
                the directions study and the classifiers start from (it depends on the depth)
    conditioning `text_encoders` it reads, `lens_towers` (the CLIP towers the Diffusion Lens acts on),
                `context_site` (the first tower's site whose activation is the context: the lens feeds
                layer k into it; "" when the context is the towers' raw penultimate states: the lens reads
                layer k's instead, as diffusers' `clip_skip` does), and `conditioning(activations, extras)`:
                {tower: {site: activation}} and per-run extras (SDXL's time ids, DiT's class labels)
                -> the keyword inputs of one evaluation beyond latents and timestep. `class_conditioned`
                families (DiT) read no text: prompts are class names or labels (`pipeline.labels`)
    evaluation  `apply(module, params, latents, t, conditioning)` -> (prediction, sown intermediates);
                the prediction has the latents' channels (a learned-sigma variance half is dropped)
    latents     `latent_multiple(config)`: what latent sides must divide by (UNet downsamplings, patches)

Adding a family is a model file in models/, a `DenoiserFamily` entry here and, if its prompts need
another encoder, that encoder's model file: the pipeline, programs, loaders and studies stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import CheckpointError
from jaxprobe.models import dit, flux, pixart, sd3, unet
from jaxprobe.models.encoders import ATTENTION_MASK, LENS_OUTPUT, POOLED_OUTPUT


@dataclass(frozen=True)
class DenoiserFamily:
    name: str
    component: str                                  # checkpoint folder and site prefix ("unet", "transformer")
    class_names: tuple[str, ...]                    # the diffusers `_class_name`s it reads
    config_cls: type
    read_config: Callable[[Mapping[str, Any]], Any]
    module: Callable[[Any, Any], Any]               # (config, dtype) -> flax module
    example_inputs: Callable[..., tuple[jax.Array, ...]]
    block_sites: tuple[str, ...]
    bottleneck: Callable[[Any], str]                # config -> its h-space site (no component prefix)
    text_encoders: tuple[str, ...]                  # pipeline components the conditioning reads, in order
    context_site: str                               # the text-encoder site whose activation conditions
    #                                                 ("" when it is several: SDXL's penultimate layers)
    conditioning: Callable[[Mapping[str, Mapping[str, jax.Array]], Mapping[str, jax.Array]], dict[str, jax.Array]]
    apply: Callable[..., tuple[jax.Array, Any]]
    rename_keys: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda state: state
    matches: Callable[[Any], bool] = lambda config: True   # among families sharing a config class
    reads: Callable[[Mapping[str, Any]], bool] = lambda raw: True   # among families sharing a `_class_name`
    latent_multiple: Callable[[Any], int] = lambda config: 2 ** (len(config.block_out_channels) - 1)
    class_conditioned: bool = False                 # conditioned on a class label, not on text
    patch_tokens: bool = False                      # activations are (b, h*w, d) patch tokens (DiT, PixArt)
    latent_channels: Callable[[Any], int] = lambda config: config.in_channels   # FLUX: its packed tokens' / 4
    classifier_free: bool = True                    # guidance_scale > 1 runs CFG; FLUX embeds the scale instead
    unmasked_towers: tuple[str, ...] = ()           # T5 towers its pipeline runs without a padding mask
    # the unshifted flow-matching sigmas its pipeline passes to set_timesteps(sigmas=) for n steps; None: the
    # scheduler's own (its training range, linearly spaced)
    flow_sigmas: Callable[[int], np.ndarray] | None = None
    summary_text_site: str = "text_model.final_layer_norm"   # the first tower's last layer, the text-side
    #                                                 comparison of the studies (CLIP's; T5's for PixArt)
    lens_towers: tuple[str, ...] = ()               # CLIP towers the Diffusion Lens acts on


def _sd_conditioning(acts: Mapping[str, Mapping[str, jax.Array]], extras: Mapping[str, jax.Array]
                     ) -> dict[str, jax.Array]:
    """SD 1.x/2.x condition on the text encoder's last hidden state (b, tokens, d), nothing else."""
    return {"encoder_hidden_states": acts["text_encoder"]["text_model.final_layer_norm"]}


def penultimate_site(acts: Mapping[str, jax.Array]) -> str:
    """The output site of a CLIP tower's second-to-last layer (diffusers' `hidden_states[-2]`)."""
    last = max(int(s.split(".")[3]) for s in acts if s.count(".") == 3 and s.startswith("text_model.encoder.layers."))
    return f"text_model.encoder.layers.{last - 1}"


def context_states(acts: Mapping[str, jax.Array]) -> jax.Array:
    """The states (b, tokens, d) a CLIP tower conditions SDXL and SD3 with: its penultimate layer's, or under
    the Diffusion Lens the chosen layer's."""
    return acts[LENS_OUTPUT] if LENS_OUTPUT in acts else acts[penultimate_site(acts)]


def _sdxl_conditioning(acts: Mapping[str, Mapping[str, jax.Array]], extras: Mapping[str, jax.Array]
                       ) -> dict[str, jax.Array]:
    """SDXL: every tower's penultimate hidden states side by side (b, tokens, sum of widths), the pooled
    projection of text_encoder_2 (b, d), and the micro-conditioning time ids (b, 5 or 6)."""
    context = jnp.concatenate([context_states(a) for a in acts.values()], axis=-1)
    return {"encoder_hidden_states": context, "text_embeds": acts["text_encoder_2"]["text_projection"],
            "time_ids": extras["time_ids"]}


def _sdxl_apply(module: Any, params: Any, latents: jax.Array, t: jax.Array,
                conditioning: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
    out, state = module.apply({"params": params}, latents, t, conditioning["encoder_hidden_states"],
                              conditioning["text_embeds"], conditioning["time_ids"], mutable=["intermediates"])
    return out, state["intermediates"]


def _sd_apply(module: Any, params: Any, latents: jax.Array, t: jax.Array,
              conditioning: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
    out, state = module.apply({"params": params}, latents, t, conditioning["encoder_hidden_states"],
                              mutable=["intermediates"])
    return out, state["intermediates"]


STABLE_DIFFUSION = DenoiserFamily(
    name="stable-diffusion", component="unet", class_names=("UNet2DConditionModel",),
    config_cls=unet.UNetConfig, read_config=unet.UNetConfig.from_dict,
    module=lambda config, dtype: unet.UNet2DConditionModel(config, dtype), example_inputs=unet.example_inputs,
    block_sites=unet.BLOCK_SITES, bottleneck=lambda config: "mid_block", text_encoders=("text_encoder",),
    context_site="text_model.final_layer_norm", lens_towers=("text_encoder",), conditioning=_sd_conditioning,
    apply=_sd_apply)

def _is_sdxl(config: Any) -> bool:
    return getattr(config, "addition_embed_type", None) == "text_time"


# SDXL is the SD UNet with added text-time conditioning and two text towers (a refiner: the second alone).
SDXL = dataclasses.replace(
    STABLE_DIFFUSION, name="stable-diffusion-xl", text_encoders=("text_encoder", "text_encoder_2"),
    context_site="", lens_towers=("text_encoder", "text_encoder_2"), conditioning=_sdxl_conditioning,
    apply=_sdxl_apply, matches=_is_sdxl)
STABLE_DIFFUSION = dataclasses.replace(STABLE_DIFFUSION, matches=lambda config: not _is_sdxl(config))


def _dit_conditioning(acts: Mapping[str, Mapping[str, jax.Array]], extras: Mapping[str, jax.Array]
                      ) -> dict[str, jax.Array]:
    """DiT: the class label of each row (the null class for the unconditional half), no text."""
    return {"class_labels": extras["class_labels"]}


def _dit_apply(module: Any, params: Any, latents: jax.Array, t: jax.Array,
               conditioning: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
    out, state = module.apply({"params": params}, latents, t, conditioning["class_labels"], mutable=["intermediates"])
    # learned sigma: the sampler reads the noise half, as DiTPipeline splits it off
    return out[..., :latents.shape[-1]], state["intermediates"]


def middle_block(config: Any) -> str:
    """A transformer's middle block (`num_layers // 2`): 14 of DiT-XL's and PixArt's 28, 12 of SD3's 24."""
    return f"transformer_blocks.{config.num_layers // 2}"


def _patch_family(name: str, model: Any, module_cls: type, config_cls: type, legacy_norm: str,
                  **fields: Any) -> DenoiserFamily:
    """A patch-token transformer family (DiT, PixArt): its `transformer/` folder names its own class or the
    legacy Transformer2DModel, told apart by `norm_type`; latents divide into patches; the bottleneck is the
    middle block (14 of DiT-XL's and PixArt's 28)."""
    def reads(raw: Mapping[str, Any]) -> bool:
        return raw.get("_class_name") != "Transformer2DModel" or raw.get("norm_type") == legacy_norm

    return DenoiserFamily(
        name=name, component="transformer", class_names=model.CLASS_NAMES, config_cls=config_cls,
        read_config=config_cls.from_dict, module=lambda config, dtype: module_cls(config, dtype),
        example_inputs=model.example_inputs, block_sites=model.BLOCK_SITES, bottleneck=middle_block,
        reads=reads, latent_multiple=lambda config: config.patch_size, patch_tokens=True, **fields)


DIT = _patch_family("dit", dit, dit.DiTTransformer2DModel, dit.DiTConfig, "ada_norm_zero", text_encoders=(),
                    context_site="", conditioning=_dit_conditioning, apply=_dit_apply, class_conditioned=True)


def _pixart_conditioning(acts: Mapping[str, Mapping[str, jax.Array]], extras: Mapping[str, jax.Array]
                         ) -> dict[str, jax.Array]:
    """PixArt: the T5 encoder's final hidden states and their padding mask; PixArt-alpha 1024's resolution and
    aspect-ratio micro-conditions when the run has them."""
    text = acts["text_encoder"]
    cond = {"encoder_hidden_states": text["encoder.final_layer_norm"], "encoder_attention_mask": text[ATTENTION_MASK]}
    return {**cond, **{k: extras[k] for k in ("resolution", "aspect_ratio") if k in extras}}


def _pixart_apply(module: Any, params: Any, latents: jax.Array, t: jax.Array,
                  conditioning: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
    out, state = module.apply({"params": params}, latents, t, conditioning["encoder_hidden_states"],
                              conditioning["encoder_attention_mask"], conditioning.get("resolution"),
                              conditioning.get("aspect_ratio"), mutable=["intermediates"])
    return out[..., :latents.shape[-1]], state["intermediates"]   # learned sigma, as the PixArt pipelines


PIXART = _patch_family("pixart", pixart, pixart.PixArtTransformer2DModel, pixart.PixArtConfig, "ada_norm_single",
                       text_encoders=("text_encoder",), context_site="encoder.final_layer_norm",
                       summary_text_site="encoder.final_layer_norm",
                       conditioning=_pixart_conditioning, apply=_pixart_apply)



def _sd3_conditioning(acts: Mapping[str, Mapping[str, jax.Array]], extras: Mapping[str, jax.Array]
                      ) -> dict[str, jax.Array]:
    """SD3: CLIP-L's and bigG's penultimate states side by side, zero-padded to T5's width, then T5's final states
    after them along the tokens (zeros of extras["t5_context"]'s shape when the folder has no text_encoder_3);
    pooled: both CLIP projections side by side, as StableDiffusion3Pipeline.encode_prompt builds them."""
    clip = jnp.concatenate([context_states(acts[tower]) for tower in ("text_encoder", "text_encoder_2")], axis=-1)
    if "text_encoder_3" in acts:
        t5 = acts["text_encoder_3"]["encoder.final_layer_norm"]
    else:   # the same zeros for every row, however many rows the text passes have (one negative prompt)
        t5 = jnp.broadcast_to(extras["t5_context"][:1], (clip.shape[0], *extras["t5_context"].shape[1:]))
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
    pooled = jnp.concatenate([acts[tower]["text_projection"] for tower in ("text_encoder", "text_encoder_2")], axis=-1)
    return {"encoder_hidden_states": jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1), "pooled_projections": pooled}


def _sd3_apply(module: Any, params: Any, latents: jax.Array, t: jax.Array,
               conditioning: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
    out, state = module.apply({"params": params}, latents, t, conditioning["encoder_hidden_states"],
                              conditioning["pooled_projections"], mutable=["intermediates"])
    return out, state["intermediates"]


SD3 = DenoiserFamily(
    name="stable-diffusion-3", component="transformer", class_names=sd3.CLASS_NAMES, config_cls=sd3.SD3Config,
    read_config=sd3.SD3Config.from_dict, module=lambda config, dtype: sd3.SD3Transformer2DModel(config, dtype),
    example_inputs=sd3.example_inputs, block_sites=sd3.BLOCK_SITES, bottleneck=middle_block,
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"), context_site="",
    lens_towers=("text_encoder", "text_encoder_2"), conditioning=_sd3_conditioning, apply=_sd3_apply,
    rename_keys=sd3.rename_keys,
    latent_multiple=lambda config: config.patch_size, patch_tokens=True, unmasked_towers=("text_encoder_3",))


def _flux_conditioning(acts: Mapping[str, Mapping[str, jax.Array]], extras: Mapping[str, jax.Array]
                       ) -> dict[str, jax.Array]:
    """FLUX, as FluxPipeline.encode_prompt: T5's (text_encoder_2) final states as the context, CLIP-L's pooled
    output (not projected) as pooled_projections; FLUX.1-dev's guidance scale from extras["guidance"] (b,)."""
    cond = {"encoder_hidden_states": acts["text_encoder_2"]["encoder.final_layer_norm"],
            "pooled_projections": acts["text_encoder"][POOLED_OUTPUT]}
    return {**cond, **({"guidance": extras["guidance"]} if "guidance" in extras else {})}


def _flux_apply(module: Any, params: Any, latents: jax.Array, t: jax.Array,
                conditioning: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
    # FluxPipeline hands the transformer timestep / 1000 (the model scales it back)
    out, state = module.apply({"params": params}, latents, t / 1000, conditioning["encoder_hidden_states"],
                              conditioning["pooled_projections"], conditioning.get("guidance"),
                              mutable=["intermediates"])
    return out, state["intermediates"]


# FLUX.1 (schnell; dev with guidance_embeds): packed 2x2 latents, so latent sides divide by 2; no classifier-free
# guidance; the bottleneck is the middle of the double + single blocks (single block 9 of FLUX.1's 19 + 38).
FLUX = DenoiserFamily(
    name="flux", component="transformer", class_names=flux.CLASS_NAMES, config_cls=flux.FluxConfig,
    read_config=flux.FluxConfig.from_dict, module=lambda config, dtype: flux.FluxTransformer2DModel(config, dtype),
    example_inputs=flux.example_inputs, block_sites=flux.BLOCK_SITES, bottleneck=flux.bottleneck,
    text_encoders=("text_encoder", "text_encoder_2"), context_site="", conditioning=_flux_conditioning,
    apply=_flux_apply, latent_multiple=lambda config: flux.PACK, patch_tokens=True,
    latent_channels=lambda config: config.latent_channels, classifier_free=False, unmasked_towers=("text_encoder_2",),
    flow_sigmas=lambda n: np.linspace(1.0, 1 / n, n))   # FluxPipeline's sigmas

FAMILIES: dict[str, DenoiserFamily] = {f.name: f for f in (SDXL, STABLE_DIFFUSION, DIT, PIXART, SD3, FLUX)}


def family_of_config(config: Any) -> DenoiserFamily:
    """The family whose Config type `config` is (and whose `matches` accepts it)."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_cls) and family.matches(config):
            return family
    raise CheckpointError(f"no denoiser family reads a {type(config).__name__}; known: {', '.join(FAMILIES)}")


def family_for_checkpoint(class_name: str | None, component: str,
                          raw: Mapping[str, Any] | None = None) -> DenoiserFamily:
    """The family that reads a diffusers `component/` folder whose config (`raw`) names `class_name`."""
    for family in FAMILIES.values():  # families sharing a config class (SD, SDXL) are told apart by it later
        if family.component == component and (class_name is None or class_name in family.class_names) \
                and family.reads(raw if raw is not None else {"_class_name": class_name}):
            return family
    readable = ", ".join(f"{f.component}/ {'|'.join(f.class_names)} ({f.name})" for f in FAMILIES.values())
    raise CheckpointError(f"{component}/ holds a {class_name}, which no jaxprobe denoiser family reads "
                          f"(it reads {readable}).")
