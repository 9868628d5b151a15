"""DINOv2 image encoder: parity with transformers' Dinov2Model (at the configured image size and, with resized
position embeddings, at another), its preprocessing, and its use as a pipeline's image encoder."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import encoder_reference
import jax
import jax.numpy as jnp

import jaxprobe
from jaxprobe.checkpoints.encoders import dinov2_preprocess, load_dinov2
from jaxprobe.errors import CheckpointError
from jaxprobe.features.extract import image_encoder_features
from jaxprobe.models.clip import ImagePreprocess, preprocess_images
from jaxprobe.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, torch_bicubic_matrix
from jaxprobe.pipeline.sites import flatten_intermediates

SIZE, PATCH, LAYERS = 28, 7, 2
CASES = {"mlp": False, "swiglu": True}


@pytest.fixture(scope="module", params=sorted(CASES))
def dinov2_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"dinov2_{request.param}")
    model = encoder_reference.save_dinov2(path, image_size=SIZE, patch_size=PATCH, layers=LAYERS,
                                          use_swiglu_ffn=CASES[request.param])
    return path, model


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (42, 35)], ids=["config_size", "resized_positions"])
def test_dinov2_matches_transformers_every_layer(dinov2_checkpoint, shape):
    path, model = dinov2_checkpoint
    encoder = load_dinov2(path)
    pixels = np.random.default_rng(0).normal(size=(2, *shape, 3)).astype(np.float32)  # already normalised

    @jax.jit
    def run(params, pixels):
        out, state = encoder.module.apply({"params": params}, pixels, mutable=["intermediates"])
        return out, flatten_intermediates(state["intermediates"])

    out, acts = run(encoder.params, jnp.asarray(pixels))
    with torch.no_grad():
        ref = model(torch.as_tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    assert list(acts) == ["embeddings", *(f"encoder.layer.{i}" for i in range(LAYERS)), "layernorm"]
    np.testing.assert_allclose(acts["embeddings"], ref.hidden_states[0].numpy(), atol=1e-5)
    for i in range(LAYERS):
        np.testing.assert_allclose(acts[f"encoder.layer.{i}"], ref.hidden_states[i + 1].numpy(), atol=1e-5,
                                   err_msg=f"layer {i}")
    np.testing.assert_allclose(out["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["pooler_output"], ref.pooler_output.numpy(), atol=1e-5)


@pytest.mark.parametrize(("n_in", "n_out"), [(4, 6), (16, 37), (37, 16), (5, 5)])
def test_bicubic_matrix_is_torch_interpolate(n_in, n_out):
    x = np.random.default_rng(1).normal(size=(n_in, n_in)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.as_tensor(x)[None, None], size=(n_out, n_out), mode="bicubic",
                                          align_corners=False)[0, 0].numpy()
    w = torch_bicubic_matrix(n_in, n_out)
    np.testing.assert_allclose(w @ x @ w.T, ref, atol=1e-5)


def test_preprocessing_reads_the_folder_and_is_close_to_bit_image_processor(dinov2_checkpoint, tmp_path):
    path, _ = dinov2_checkpoint
    spec = dinov2_preprocess(path)
    assert spec == ImagePreprocess(size=32, crop_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert dinov2_preprocess(tmp_path) == ImagePreprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)  # no config file
    y, x = np.mgrid[0:192, 0:256] / 40.0  # a smooth image: resamplers differ only at sharp edges
    image = (np.stack([np.sin(x) * np.cos(y), np.cos(1.3 * x), np.sin(0.7 * y + 0.2 * x)], -1) * 120 + 128).astype(np.uint8)
    # facebook/dinov2-*'s processor settings (BitImageProcessor's own defaults are CLIP's)
    processor = transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                               image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(preprocess_images(image[None] / 255.0, dinov2_preprocess(tmp_path)))[0]
    assert got.shape == ref.shape == (224, 224, 3)
    assert np.abs(got - ref).mean() < 0.02


def test_image_encoder_features_per_layer(dinov2_checkpoint):
    """The baseline API: CLS and mean-patch features of every layer, from the folder, as transformers computes them
    on the same preprocessed pixels; the same encoder also sits beside a diffusion pipeline as `image_encoder`."""
    path, model = dinov2_checkpoint
    images = np.random.default_rng(2).uniform(size=(3, 40, 48, 3)).astype(np.float32)
    feats = image_encoder_features(path, images, sites="image_encoder.encoder.layer.*", batch_size=2)
    pixels = np.array(preprocess_images(jnp.asarray(images), dinov2_preprocess(path)))
    with torch.no_grad():
        hidden = model(torch.as_tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
    assert sorted(feats) == ["cls", "mean_patch"]
    for i in range(LAYERS):
        site = f"image_encoder.encoder.layer.{i}"
        np.testing.assert_allclose(feats["cls"][site], hidden[i + 1][:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(feats["mean_patch"][site], hidden[i + 1][:, 1:].mean(1).numpy(), atol=1e-5)

    pipe = jaxprobe.load("tiny", image_encoder=path)
    assert {"image_encoder.embeddings", "image_encoder.encoder.layer.1", "image_encoder.layernorm"} <= set(pipe.sites())
    beside = pipe.embed_images(images, "image_encoder.encoder.layer.1", reduce="mean_patch")
    np.testing.assert_allclose(beside["image_encoder.encoder.layer.1"],
                               feats["mean_patch"]["image_encoder.encoder.layer.1"], atol=1e-6)


def test_dinov2_errors_name_the_fix(tmp_path):
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a DINOv2 model"):
        load_dinov2(tmp_path)
    with pytest.raises(jaxprobe.InputError, match="reductions must be a list"):
        image_encoder_features(tmp_path, np.zeros((1, 16, 16, 3)), reductions="cls")
