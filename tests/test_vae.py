"""Flax AutoencoderKL against diffusers: encode (mean, logvar), decode, every capture site, old key names."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sd_reference  # noqa: E402
from jaxprobe.pipeline.sites import flatten_intermediates  # noqa: E402
from jaxprobe.errors import CheckpointError  # noqa: E402
from jaxprobe.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from jaxprobe.checkpoints.diffusers import load_vae, vae_state_dict_to_params  # noqa: E402
from jaxprobe.checkpoints.weights import torch_key  # noqa: E402

ATOL = RTOL = 1e-4


def _run(component, method: str, x: np.ndarray):
    """One jitted call of `method` that keeps every sown site."""
    apply = functools.partial(component.module.apply, method=method, mutable=["intermediates"])
    out, state = sd_reference.run_once(apply, {"params": component.params}, x)
    return out, flatten_intermediates(state["intermediates"])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = sd_reference.make_vae()
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    vae = load_vae(folder)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)

    (mean, logvar), enc_sites = _run(vae, "encode", images)
    decoded, dec_sites = _run(vae, "decode", latents)
    sites = {**enc_sites, **dec_sites}
    posterior, ref_enc = sd_reference.run_with_hooks(
        model, list(enc_sites), lambda: model.encode(sd_reference.nchw(images)).latent_dist)
    ref_decoded, ref_dec = sd_reference.run_with_hooks(
        model, list(dec_sites), lambda: model.decode(sd_reference.nchw(latents)).sample)
    return dict(model=model, folder=folder, vae=vae, images=images, latents=latents,
                ours=dict(mean=mean, logvar=logvar, decoded=decoded), sites=sites,
                ref=dict(mean=sd_reference.nhwc(posterior.mean), logvar=sd_reference.nhwc(posterior.logvar),
                         decoded=sd_reference.nhwc(ref_decoded)),
                ref_sites={**ref_enc, **ref_dec})


@pytest.mark.parametrize("what", ["mean", "logvar", "decoded"])
def test_encode_and_decode_match_diffusers(case, what):
    ours, ref = np.asarray(case["ours"][what]), case["ref"][what]
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=RTOL)


def test_every_site_matches_its_diffusers_module(case):
    sites = case["sites"]
    for required in ("encoder.down_blocks.0", "encoder.down_blocks.1", "encoder.mid_block",
                     "encoder.mid_block.attentions.0", "decoder.mid_block", "decoder.up_blocks.0",
                     "decoder.up_blocks.1", "decoder.up_blocks.1.resnets.1"):
        assert required in sites, required
    for site, ours in sites.items():
        ours, ref = np.asarray(ours), case["ref_sites"][site]
        # the mid-block attention works on (b, h*w, c) tokens; diffusers returns (b, c, h, w)
        np.testing.assert_allclose(ours, ref.reshape(ours.shape), atol=ATOL, rtol=RTOL, err_msg=site)


def test_bfloat16_decode_close_to_float32(case):
    vae = load_vae(case["folder"], dtype=jnp.bfloat16)
    decoded, sites = _run(vae, "decode", case["latents"])
    assert decoded.dtype == np.float32  # returned in the dtype of the latents
    pairs = [(decoded, case["ref"]["decoded"]), (sites["decoder.mid_block"], case["ref_sites"]["decoder.mid_block"])]
    for ours, ref in pairs:
        ours = np.asarray(ours, np.float32)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 5e-2


def test_deprecated_attention_names_and_conv_kernels_load(case):
    """Old VAEs name the mid-block attention query/key/value/proj_attn, some with 1x1-conv kernels."""
    state = {k: v.numpy() for k, v in case["model"].state_dict().items()}
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            if ".attentions.0." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        renamed[key] = value
    assert any(".query.weight" in k for k in renamed) and not any(".to_q." in k for k in renamed)
    loaded = vae_state_dict_to_params(renamed, case["vae"].config)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, case["vae"].params))


# ---------------------------------------------------------------------------------------------
# Configs

SD_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.mark.parametrize("change", [{}, dict(use_quant_conv=False, use_post_quant_conv=False),
                                    dict(mid_block_add_attention=False)], ids=["sd", "no_quant_conv", "no_attention"])
def test_full_size_configs_have_diffusers_parameters(change):
    """At full size, without computing anything: the Flax tree names every diffusers tensor, same sizes."""
    cfg = {**SD_VAE, **change}
    config = VAEConfig.from_dict(cfg)
    params = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    ours = {torch_key(tuple(k.key for k in path)): int(np.prod(leaf.shape))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    with torch.device("meta"):
        model = diffusers.AutoencoderKL.from_config(cfg)
    assert ours == {k: v.numel() for k, v in model.state_dict().items()}
    if not change:
        assert sum(ours.values()) == 83_653_863


def test_config_reads_scaling_factor_and_refuses_unknown_blocks():
    assert VAEConfig.from_dict(SD_VAE).scaling_factor == 0.18215
    assert VAEConfig.from_dict({**SD_VAE, "scaling_factor": 0.13025}).scaling_factor == 0.13025
    with pytest.raises(CheckpointError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_dict({**SD_VAE, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(CheckpointError, match="latents_mean"):
        VAEConfig.from_dict({**SD_VAE, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
