"""Stable Diffusion 3 / 3.5 against diffusers: every joint block of a tiny SD3Transformer2DModel, both streams
(image tokens and text tokens), with SD3.5's qk RMS-norm and dual attention; loading errors."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sd_reference  # noqa: E402
import transformer_reference  # noqa: E402
from transformer_reference import relative_error  # noqa: E402
from jaxprobe.checkpoints.diffusers import load_denoiser  # noqa: E402
from jaxprobe.errors import CheckpointError  # noqa: E402
from jaxprobe.pipeline.sites import flatten_intermediates  # noqa: E402

RTOL = 1e-4


@pytest.fixture(scope="session", params=sorted(transformer_reference.SD3_STYLES))
def sd3_case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"sd3-{request.param}")
    model = transformer_reference.make_sd3(request.param, seed=2)
    model.save_pretrained(folder / "transformer")
    return dict(style=request.param, folder=folder, model=model,
                component=load_denoiser(folder / "transformer", component="transformer"))


def _hooked_streams(model, names):
    """Every named module's output(s) under jaxprobe's site names: a joint block returns (text, image) and its
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


def test_every_sd3_block_matches_diffusers_in_both_streams(sd3_case):
    model, component = sd3_case["model"], sd3_case["component"]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 6, 10, 4), dtype=np.float32)   # 3x5 patches: a cropped, off-centre grid
    context = rng.standard_normal((2, 7, transformer_reference.T5_WIDTH), dtype=np.float32)
    pooled = rng.standard_normal((2, 64), dtype=np.float32)
    timesteps = np.array([12.5, 987.0], np.float32)   # flow matching: fractional sigma x 1000
    apply = functools.partial(component.module.apply, mutable=["intermediates"])
    out, state = sd_reference.run_once(apply, {"params": component.params}, sample, timesteps, context, pooled)
    sites = flatten_intermediates(state["intermediates"])
    names = [n for n in dict(model.named_modules()) if n in sites or n.endswith(("attn", "attn2"))]
    recorded, handles = _hooked_streams(model, names)
    try:
        with sd_reference.single_threaded(), torch.no_grad():
            ref = model(sd_reference.nchw(sample), encoder_hidden_states=torch.from_numpy(context),
                        pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(timesteps)).sample
    finally:
        for handle in handles:
            handle.remove()
    assert relative_error(out, sd_reference.nhwc(ref)) < RTOL
    blocks = [f"transformer_blocks.{i}{part}" for i in range(3) for part in ("", ".attn", ".ff")]
    text = [f"transformer_blocks.{i}{part}" for i in range(2) for part in (".context", ".attn.context", ".ff_context")]
    dual = [f"transformer_blocks.{i}.attn2" for i in range(2)] if sd3_case["style"] == "sd3.5" else []
    expected = {"pos_embed", "context_embedder", "norm_out", "time_text_embed.timestep_embedder",
                "time_text_embed.text_embedder", "transformer_blocks.2.norm1_context", *blocks, *text, *dual}
    assert expected <= set(recorded) and expected <= set(sites)
    assert "transformer_blocks.2.context" not in sites   # the last block updates the image stream only
    for site in sorted(expected):
        assert relative_error(sites[site], recorded[site]) < RTOL, site
    np.testing.assert_array_equal(sites["transformer_blocks.1.context.input"], sites["transformer_blocks.0.context"])


def test_sd3_loading_errors_are_named(tmp_path, sd3_case):
    config = json.loads((sd3_case["folder"] / "transformer" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "qk_norm": "layer_norm"}))
    with pytest.raises(CheckpointError, match="qk_norm 'layer_norm' is not implemented"):
        load_denoiser(tmp_path, component="transformer")
    (tmp_path / "config.json").write_text(json.dumps({**config, "caption_projection_dim": 24}))
    with pytest.raises(CheckpointError, match="caption_projection_dim 24 must equal"):
        load_denoiser(tmp_path, component="transformer")
