"""Derived sites: `X.input` (what module X was given) and `X.contribution` (its output minus its input),
against PyTorch forward hooks on the diffusers pipeline, with their selection and errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jaxprobe  # noqa: E402
from jaxprobe.errors import SiteError  # noqa: E402
from jaxprobe.pipeline.sites import select_sites, split_derived  # noqa: E402

from sd_reference import nhwc, save_pipeline, single_threaded  # noqa: E402

PROMPTS = ["a photo of a zebra", "a drawing of a banana"]
UNET_MODULES = ["mid_block", "up_blocks.1.attentions.0"]
TEXT_LAYER = "text_model.encoder.layers.1"


def test_split_and_select():
    assert split_derived("unet.mid_block.contribution") == ("unet.mid_block", "contribution")
    assert split_derived("unet.mid_block") == ("unet.mid_block", None)
    available = ["unet.down_blocks.0", "unet.down_blocks.0.attentions.0", "unet.mid_block", "latents"]
    blocks = ["unet.down_blocks.0", "unet.mid_block", "latents"]
    assert select_sites(["unet.*.contribution", "unet.mid_block"], available, blocks) == [
        "unet.down_blocks.0.contribution", "unet.mid_block", "unet.mid_block.contribution"]
    assert select_sites("unet.down_blocks.0.attentions.*.input", available, blocks) == [
        "unet.down_blocks.0.attentions.0.input"]
    with pytest.raises(SiteError, match="not modules"):
        select_sites("latents.input", available, blocks)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("derived_sites")
    return save_pipeline(path), jaxprobe.load(path)


def _hooked_run(reference, latents, steps):
    """diffusers' run with hooks keeping (input, output) of every call of the modules above."""
    calls: dict[str, list] = {name: [] for name in [*UNET_MODULES, TEXT_LAYER]}

    def keep(name):
        def hook(module, args, kwargs, output):
            given = args[0] if args else kwargs["hidden_states"]
            calls[name].append((given, output[0] if isinstance(output, tuple) else output))
        return hook

    handles = [reference.unet.get_submodule(n).register_forward_hook(keep(n), with_kwargs=True) for n in UNET_MODULES]
    # transformers 5 flattened CLIPTextModel (no text_model level); our paths keep the checkpoint keys' level
    text_layer = reference.text_encoder.get_submodule(TEXT_LAYER.removeprefix("text_model."))
    handles.append(text_layer.register_forward_hook(keep(TEXT_LAYER), with_kwargs=True))
    try:
        with single_threaded(), torch.no_grad():
            reference(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(latents),
                      output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    return calls


def test_input_and_contribution_equal_forward_hooks_on_diffusers(sd):
    reference, pipe = sd
    side, steps, n = pipe.unet.config.sample_size, 2, len(PROMPTS)
    latents = np.random.default_rng(0).standard_normal((n, 4, side, side)).astype(np.float32)
    sites = [f"unet.{m}.{kind}" for m in UNET_MODULES for kind in ("input", "contribution")]
    sites += [f"unet.{UNET_MODULES[0]}", f"text_encoder.{TEXT_LAYER}.contribution"]
    with pytest.warns(UserWarning, match="reduce='none'"):
        feats = pipe.capture(PROMPTS, sites, num_inference_steps=steps, guidance_scale=7.5, latents=latents,
                             reduce="none")
    calls = _hooked_run(reference, latents, steps)
    # PNDM's first step evaluates the UNet twice; both runs keep every evaluation, the cond half of the CFG pair.
    for module in UNET_MODULES:
        assert len(calls[module]) == feats[f"unet.{module}.input"].shape[1]
        given = np.stack([nhwc(x[n:]) if x.ndim == 4 else x[n:].numpy() for x, _ in calls[module]], axis=1)
        change = np.stack([nhwc(y[n:] - x[n:]) if x.ndim == 4 else (y[n:] - x[n:]).numpy()
                           for x, y in calls[module]], axis=1)
        np.testing.assert_allclose(feats[f"unet.{module}.input"], given, atol=1e-4, rtol=1e-4, err_msg=module)
        np.testing.assert_allclose(feats[f"unet.{module}.contribution"], change, atol=1e-4, rtol=1e-4, err_msg=module)
    np.testing.assert_allclose(feats["unet.mid_block.contribution"],
                               feats["unet.mid_block"] - feats["unet.mid_block.input"], atol=1e-6)
    prompt_pass = calls[TEXT_LAYER][0]   # the prompts' pass; the negative prompt's comes second
    np.testing.assert_allclose(feats[f"text_encoder.{TEXT_LAYER}.contribution"],
                               (prompt_pass[1] - prompt_pass[0]).numpy(), atol=1e-5)


def test_a_block_that_changes_shape_has_no_contribution(sd):
    _, pipe = sd
    with pytest.raises(SiteError, match="output minus input is undefined"):
        pipe.capture(PROMPTS[:1], ["unet.down_blocks.0.contribution"], num_inference_steps=1)
    feats = pipe.capture(PROMPTS[:1], ["unet.down_blocks.0.input"], num_inference_steps=1)
    assert feats["unet.down_blocks.0.input"].shape[-1] == pipe.unet.config.block_out_channels[0]
