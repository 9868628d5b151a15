"""Flax UNet2DConditionModel against diffusers: every capture site, three configs, float32 and bfloat16."""

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
from jaxprobe.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from jaxprobe.checkpoints.diffusers import load_unet  # noqa: E402
from jaxprobe.checkpoints.weights import torch_key  # noqa: E402

# Options SD 1.x/2.x leave at their defaults, changed at once: only_cross_attention, per-block
# layer and transformer-layer counts, time embedding options, asymmetric downsample padding, 1x1
# in/out convs, odd latent sizes (the up path then upsamples to the skip's size).
OPTIONS = dict(
    sample_size=9, block_out_channels=(16, 32), layers_per_block=(1, 2), norm_num_groups=4, norm_eps=1e-6,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, only_cross_attention=(True, False), transformer_layers_per_block=(2, 1),
    cross_attention_dim=sd_reference.CROSS_ATTENTION_DIM, center_input_sample=True, flip_sin_to_cos=False,
    freq_shift=1, time_embedding_dim=48, mid_block_scale_factor=1.5, downsample_padding=0,
    conv_in_kernel=1, conv_out_kernel=1,
)
CASES = {  # name: (diffusers kwargs, latent (h, w), timesteps)
    "sd1": (sd_reference.UNET_STYLES["sd1"], (16, 16), np.array([10, 999])),
    "sd2": (sd_reference.UNET_STYLES["sd2"], (16, 16), np.array([0.5, 500.25], np.float32)),
    "options": (OPTIONS, (9, 7), 321),
}
ATOL = RTOL = 1e-4


def _inputs(hw: tuple[int, int], tokens: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, *hw, 4), dtype=np.float32)
    context = rng.standard_normal((2, tokens, sd_reference.CROSS_ATTENTION_DIM), dtype=np.float32)
    return sample, context


def _run(component, sample, timesteps, context):
    """One jitted forward pass that keeps every sown site."""
    apply = functools.partial(component.module.apply, mutable=["intermediates"])
    out, state = sd_reference.run_once(apply, {"params": component.params}, sample, timesteps, context)
    return np.asarray(out, np.float32), flatten_intermediates(state["intermediates"])


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """The diffusers model, its Flax twin loaded from save_pretrained, inputs, and both sides' sites."""
    kwargs, hw, timesteps = CASES[request.param]
    model = sd_reference.make_unet(kwargs)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    unet = load_unet(folder)
    sample, context = _inputs(hw)
    out, sites = _run(unet, sample, timesteps, context)

    probes = [s.removesuffix(".probs") for s in sites if s.endswith(".probs")]
    hooked = [s for s in sites if not s.endswith(".probs")] + [f"{p}.{n}" for p in probes for n in ("to_q", "to_k")]
    t = torch.as_tensor(timesteps) if isinstance(timesteps, np.ndarray) else timesteps
    ref, ref_sites = sd_reference.run_with_hooks(
        model, hooked, lambda: model(sd_reference.nchw(sample), t, torch.from_numpy(context)).sample)
    return dict(name=request.param, model=model, folder=folder, unet=unet, inputs=(sample, timesteps, context),
                out=out, sites=sites, ref=sd_reference.nhwc(ref), ref_sites=ref_sites)


def test_output_matches_diffusers(case):
    assert case["out"].shape == case["ref"].shape
    np.testing.assert_allclose(case["out"], case["ref"], atol=ATOL, rtol=RTOL)


def test_every_site_matches_its_diffusers_module(case):
    sites = case["sites"]
    for required in ("conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
                     "up_blocks.1", "conv_out", "down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
                     "mid_block.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn2"):
        assert required in sites, required
    compared = [s for s in sites if not s.endswith(".probs")]
    for site in compared:
        ours, ref = np.asarray(sites[site], np.float32), case["ref_sites"][site]
        assert ours.shape == ref.shape, site
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=RTOL, err_msg=site)
    # each resnet, transformer, block and attention of the checkpoint is a site
    expected = {n for n, m in case["model"].named_modules()
                if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "Attention",
                                        "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                                        "CrossAttnUpBlock2D", "UpBlock2D")}
    assert expected <= set(compared)


def test_cross_attention_probs(case):
    """attn2 (and attn1 under only_cross_attention) sow head-averaged softmax maps over the tokens."""
    sample, _, context = case["inputs"]
    probs = {s: np.asarray(v) for s, v in case["sites"].items() if s.endswith(".probs")}
    assert any(s.endswith("attn2.probs") for s in probs)
    assert any(s.endswith("attn1.probs") for s in probs) == (case["name"] == "options")
    for site, ours in probs.items():
        attn = site.removesuffix(".probs")
        heads = case["model"].get_submodule(attn).heads
        q, k = (case["ref_sites"][f"{attn}.{n}"] for n in ("to_q", "to_k"))
        b, n, _ = q.shape
        qh, kh = q.reshape(b, n, heads, -1), k.reshape(b, k.shape[1], heads, -1)
        logits = np.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(qh.shape[-1])
        ref = np.exp(logits - logits.max(-1, keepdims=True))
        ref = (ref / ref.sum(-1, keepdims=True)).mean(axis=1)
        assert ours.shape == (b, n, context.shape[1])
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=site)


def test_bfloat16_runs_close_to_float32(case):
    """The plain forward pass the sampler jits (no capture), in bfloat16 with bfloat16 parameters."""
    if case["name"] != "sd2":
        pytest.skip("one bfloat16 compile suffices; sd2 also exercises upcast attention")
    unet = load_unet(case["folder"], dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(unet.params)} == {jnp.dtype(jnp.bfloat16)}
    out = np.asarray(sd_reference.run_once(unet.module.apply, {"params": unet.params}, *case["inputs"]))
    assert out.dtype == np.float32  # returned in the dtype of `sample`
    assert np.linalg.norm(out - case["ref"]) / np.linalg.norm(case["ref"]) < 5e-2


# ---------------------------------------------------------------------------------------------
# Configs

SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = {**SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
        "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
        "resnet_time_scale_shift": "default", "sample_size": 96, "upcast_attention": True,
        "use_linear_projection": True}


@pytest.mark.parametrize("cfg", [SD15, SD21], ids=["sd15", "sd21"])
def test_full_size_configs_have_diffusers_parameters(cfg):
    """At full size, without computing anything: the Flax tree names every diffusers tensor, same sizes."""
    config = UNetConfig.from_dict(cfg)
    example = (jnp.zeros((1, 8, 8, 4)), jnp.zeros(()), jnp.zeros((1, 1, config.cross_attention_dim)))
    params = jax.eval_shape(UNet2DConditionModel(config).init, jax.random.key(0), *example)["params"]
    ours = {torch_key(tuple(k.key for k in path)): int(np.prod(leaf.shape))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel.from_config(cfg)
    theirs = {k: v.numel() for k, v in model.state_dict().items()}
    assert ours == theirs
    assert sum(ours.values()) == (859_520_964 if cfg is SD15 else 865_910_724)


def test_per_block_heads_and_num_attention_heads():
    sd21 = UNetConfig.from_dict(SD21)
    assert sd21.heads == (5, 10, 20, 20) and sd21.layers_per_block == (2, 2, 2, 2)
    assert UNetConfig(attention_head_dim=64, num_attention_heads=(5, 10, 20, 20)).heads == (5, 10, 20, 20)


@pytest.mark.parametrize("change, named", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(addition_embed_type="text_time", addition_time_embed_dim=256), "addition_embed_type"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 4), "SimpleCrossAttnDownBlock2D"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "UNetMidBlock2DSimpleCrossAttn"),
    (dict(attention_head_dim=[5, 10, 20]), "attention_head_dim"),
    (dict(cross_attention_dim=[768, 768, 1024, 1024]), "cross_attention_dim"),
])
def test_unsupported_configs_are_refused_by_name(change, named):
    with pytest.raises(CheckpointError, match=named):
        UNetConfig.from_dict({**SD15, **change})
