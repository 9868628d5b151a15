"""diffusers model folders (`unet/`, `vae/`: config.json + weights) -> Components of our Flax models.

The Flax modules are named like the torch modules, so conversion is `weights.convert_state_dict`
against the parameter shapes the module expects; only renames diffusers itself applies on load
(the VAE's pre-0.14 attention names) happen here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints.component import Component
from jaxprobe.checkpoints.weights import (
    abstract_params,
    convert_state_dict,
    find_weight_files,
    read_config,
    open_state_dict,
)
from jaxprobe.models import vae
from jaxprobe.models.families import family_for_checkpoint, family_of_config
from jaxprobe.models.vae import AutoencoderKL, VAEConfig
from jaxprobe.runtime.devices import ParamSharding

_DEPRECATED_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def denoiser_state_dict_to_params(state_dict: Mapping[str, Any], config: Any, dtype: Any = jnp.float32,
                                  place: Any = None) -> dict[str, Any]:
    """A diffusers denoiser state dict -> the host `params` of its family's module, cast to dtype (placed
    leaf by leaf with `place`, as `convert_state_dict` does)."""
    family = family_of_config(config)
    expected = abstract_params(family.module(config, dtype), family.example_inputs(config))
    return convert_state_dict(family.rename_keys(state_dict), expected, dtype=dtype, place=place,
                              what=f"{family.component} checkpoint")


unet_state_dict_to_params = denoiser_state_dict_to_params


def load_denoiser(folder: str | Path, *, component: str = "unet", dtype: Any = jnp.float32,
                  variant: str | None = None, state: Mapping[str, Any] | None = None,
                  sharding: ParamSharding | None = None) -> Component:
    """A diffusers denoiser folder (`unet/`, `transformer/`: config.json + weights) -> its Component,
    read by the family that its config's `_class_name` names. state: weights to use instead of the
    folder's (a single file's, a LoRA-merged copy), in diffusers' names. sharding: how the parameters lie
    over the devices (default replicated); they stream there tensor by tensor."""
    raw = read_config(Path(folder) / "config.json", component)
    family = family_for_checkpoint(raw.get("_class_name"), component, raw)
    config = family.read_config(raw)
    state = state if state is not None else open_state_dict(find_weight_files(Path(folder), variant=variant))
    params = denoiser_state_dict_to_params(state, config, dtype, place=(sharding or ParamSharding()).put)
    return Component(component, family.module(config, dtype), params, config)


def load_unet(folder: str | Path, *, dtype: Any = jnp.float32, variant: str | None = None) -> Component:
    return load_denoiser(folder, component="unet", dtype=dtype, variant=variant)


def rename_deprecated_attention_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`...attentions.0.query.weight` -> `...attentions.0.to_q.weight` (key/value/proj_attn alike),
    as diffusers' `_fix_state_dict_keys_on_load` does for VAEs saved before its Attention rewrite."""
    def rename(key: str) -> str:
        match = _DEPRECATED_ATTENTION.match(key)
        return f"{match[1]}.{_RENAMED[match[2]]}.{match[3]}" if match else key

    return {rename(k): v for k, v in state_dict.items()}


def vae_state_dict_to_params(state_dict: Mapping[str, Any], config: VAEConfig,
                             dtype: Any = jnp.float32, place: Any = None) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict (current or deprecated attention names) -> the `params`
    of AutoencoderKL(config), cast to dtype."""
    expected = abstract_params(AutoencoderKL(config), vae.example_inputs(config))
    return convert_state_dict(rename_deprecated_attention_keys(state_dict), expected, dtype=dtype, place=place,
                              what="VAE checkpoint")


def load_vae(folder: str | Path, *, dtype: Any = jnp.float32, variant: str | None = None,
             state: Mapping[str, Any] | None = None, sharding: ParamSharding | None = None) -> Component:
    """A diffusers `vae/` folder (config.json + weights, or `state` instead of its weights) -> Component."""
    config = VAEConfig.from_dict(read_config(Path(folder) / "config.json", "VAE"))
    state = state if state is not None else open_state_dict(find_weight_files(Path(folder), variant=variant))
    params = vae_state_dict_to_params(state, config, dtype, place=(sharding or ParamSharding()).put)
    return Component("vae", AutoencoderKL(config, dtype), params, config)
