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

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints.component import Component
from jaxprobe.checkpoints.weights import convert_state_dict, find_weight_files, read_config, read_state_dict
from jaxprobe.models.unet import UNet2DConditionModel, UNetConfig
from jaxprobe.models.vae import AutoencoderKL, VAEConfig

_DEPRECATED_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet_state_dict_to_params(state_dict: Mapping[str, np.ndarray], config: UNetConfig,
                              dtype: Any = jnp.float32) -> dict[str, Any]:
    """A diffusers UNet state dict -> the `params` of UNet2DConditionModel(config), cast to dtype."""
    side = 2 ** (len(config.block_out_channels) - 1)  # smallest latent every downsampler accepts
    example = (jnp.zeros((1, side, side, config.in_channels)), jnp.zeros(()),
               jnp.zeros((1, 1, config.cross_attention_dim)))
    expected = jax.eval_shape(UNet2DConditionModel(config).init, jax.random.key(0), *example)["params"]
    return convert_state_dict(state_dict, expected, dtype=dtype, what="UNet checkpoint")


def load_unet(folder: str | Path, *, dtype: Any = jnp.float32, variant: str | None = None) -> Component:
    """A diffusers `unet/` folder (config.json + weights) -> Component("unet", module, params, config)."""
    config = UNetConfig.from_dict(read_config(Path(folder) / "config.json", "UNet"))
    params = unet_state_dict_to_params(read_state_dict(find_weight_files(Path(folder), variant=variant)), config, dtype)
    return Component("unet", UNet2DConditionModel(config, dtype), jax.tree.map(jnp.asarray, params), config)


def rename_deprecated_attention_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`...attentions.0.query.weight` -> `...attentions.0.to_q.weight` (key/value/proj_attn alike),
    as diffusers' `_fix_state_dict_keys_on_load` does for VAEs saved before its Attention rewrite."""
    def rename(key: str) -> str:
        match = _DEPRECATED_ATTENTION.match(key)
        return f"{match[1]}.{_RENAMED[match[2]]}.{match[3]}" if match else key

    return {rename(k): v for k, v in state_dict.items()}


def vae_state_dict_to_params(state_dict: Mapping[str, np.ndarray], config: VAEConfig,
                             dtype: Any = jnp.float32) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict (current or deprecated attention names) -> the `params`
    of AutoencoderKL(config), cast to dtype."""
    side = 2 ** (len(config.block_out_channels) - 1)
    example = jnp.zeros((1, side, side, config.in_channels))
    expected = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), example)["params"]
    return convert_state_dict(rename_deprecated_attention_keys(state_dict), expected, dtype=dtype,
                              what="VAE checkpoint")


def load_vae(folder: str | Path, *, dtype: Any = jnp.float32, variant: str | None = None) -> Component:
    """A diffusers `vae/` folder (config.json + weights) -> Component("vae", module, params, config)."""
    config = VAEConfig.from_dict(read_config(Path(folder) / "config.json", "VAE"))
    params = vae_state_dict_to_params(read_state_dict(find_weight_files(Path(folder), variant=variant)), config, dtype)
    return Component("vae", AutoencoderKL(config, dtype), jax.tree.map(jnp.asarray, params), config)
