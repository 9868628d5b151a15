"""CLIP text and vision towers: parity with transformers' PyTorch models, loaded from save_pretrained."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxprobe  # noqa: E402
from jaxprobe.errors import CheckpointError, InputError, SiteError  # noqa: E402
from jaxprobe.checkpoints.tokenizer import PromptTokenizer  # noqa: E402
from jaxprobe.checkpoints.random import TOKENIZER_DIR  # noqa: E402

PROMPTS = ["a photo of a airplane", "a photo of a zebra", "a drawing of a banana and a knife", "x"]

TEXT_CASES = {
    # name: (architecture, config overrides, safetensors?)
    "sd1_quick_gelu_legacy_eos": ("CLIPTextModel", dict(hidden_act="quick_gelu", eos_token_id=2), True),
    "sd2_gelu_with_projection": ("CLIPTextModelWithProjection", dict(hidden_act="gelu"), True),
    "bin_checkpoint": ("CLIPTextModel", dict(hidden_act="quick_gelu"), False),
}


def _text_config(vocab: int, **overrides):
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                pad_token_id=vocab - 1)
    return transformers.CLIPTextConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return PromptTokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module", params=sorted(TEXT_CASES))
def text_checkpoint(request, tmp_path_factory, tokenizer):
    arch, overrides, safe = TEXT_CASES[request.param]
    torch.manual_seed(0)
    cfg = _text_config(tokenizer.vocab_size, **overrides)
    model = getattr(transformers, arch)(cfg).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=safe)
    shutil.copytree(TOKENIZER_DIR, path, dirs_exist_ok=True)
    return path, model


def test_text_tower_matches_transformers_every_layer(text_checkpoint, tokenizer):
    path, model = text_checkpoint
    pipe = jaxprobe.load(path)
    ids = tokenizer(PROMPTS)
    with torch.no_grad():
        ref = model(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    feats = pipe.capture(PROMPTS, ["text_encoder.**"], reduce="none")
    hidden = ref.hidden_states  # embeddings, then each layer's output
    np.testing.assert_allclose(feats["text_encoder.text_model.embeddings"], hidden[0].numpy(), atol=1e-5)
    for i in range(len(hidden) - 1):
        np.testing.assert_allclose(feats[f"text_encoder.text_model.encoder.layers.{i}"], hidden[i + 1].numpy(),
                                   atol=1e-5, err_msg=f"layer {i}")
    np.testing.assert_allclose(feats["text_encoder.text_model.final_layer_norm"], ref.last_hidden_state.numpy(), atol=1e-5)
    if hasattr(ref, "text_embeds"):
        np.testing.assert_allclose(feats["text_encoder.text_projection"], ref.text_embeds.numpy(), atol=1e-5)
    eos = pipe.capture(PROMPTS, ["text_encoder.text_model.final_layer_norm"], reduce="eos")
    pooled = model(torch.as_tensor(ids, dtype=torch.long)).pooler_output if not hasattr(ref, "text_embeds") \
        else model.text_model(torch.as_tensor(ids, dtype=torch.long)).pooler_output
    np.testing.assert_allclose(eos["text_encoder.text_model.final_layer_norm"], pooled.detach().numpy(), atol=1e-5)


def test_text_tower_bfloat16_is_close(text_checkpoint, tokenizer):
    path, model = text_checkpoint
    pipe = jaxprobe.load(path, dtype="bfloat16")
    with torch.no_grad():
        ref = model(torch.as_tensor(tokenizer(PROMPTS), dtype=torch.long)).last_hidden_state.numpy()
    got = pipe.capture(PROMPTS, ["text_encoder.text_model.final_layer_norm"], reduce="none")
    np.testing.assert_allclose(got["text_encoder.text_model.final_layer_norm"], ref, atol=2e-2 * np.abs(ref).max())


def test_token_reductions(text_checkpoint, tokenizer):
    path, _ = text_checkpoint
    pipe = jaxprobe.load(path)
    site = "text_encoder.text_model.encoder.layers.1"
    full = pipe.capture(PROMPTS, [site], reduce="none")[site]  # (n, 77, d)
    ids = tokenizer(PROMPTS)
    eos = np.argmax(ids == tokenizer.hf_tokenizer.eos_token_id, axis=1)
    rows = np.arange(len(PROMPTS))
    for how, expected in {
        "eos": full[rows, eos],
        "last_content": full[rows, eos - 1],
        "mean": np.stack([full[i, : eos[i] + 1].mean(0) for i in rows]),
    }.items():
        np.testing.assert_allclose(pipe.capture(PROMPTS, [site], reduce=how)[site], expected, atol=1e-5, err_msg=how)


VISION_CASES = {"vision_with_projection": "CLIPVisionModelWithProjection", "full_clip_model": "CLIPModel"}


@pytest.fixture(scope="module", params=sorted(VISION_CASES))
def vision_checkpoint(request, tmp_path_factory, tokenizer):
    arch = VISION_CASES[request.param]
    torch.manual_seed(1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")
    if arch == "CLIPModel":
        text = _text_config(tokenizer.vocab_size).to_dict()
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    else:
        cfg = transformers.CLIPVisionConfig(**vision)
    model = getattr(transformers, arch)(cfg).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model, arch


def test_vision_tower_matches_transformers(vision_checkpoint):
    path, model, arch = vision_checkpoint
    pipe = jaxprobe.load(path)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)  # already-normalised CLIP pixels
    import jax.numpy as jnp
    from jaxprobe.pipeline.sites import flatten_intermediates

    comp = pipe.image_encoder
    out, state = comp.module.apply({"params": comp.params}, jnp.asarray(pixels), mutable=["intermediates"])
    acts = flatten_intermediates(state["intermediates"])
    with torch.no_grad():
        tower = model.vision_model if arch == "CLIPModel" else model.vision_model
        ref = tower(torch.as_tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        embeds = model.visual_projection(ref.pooler_output)
    for i, h in enumerate(ref.hidden_states[1:]):
        np.testing.assert_allclose(acts[f"vision_model.encoder.layers.{i}"], h.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["pooler_output"], ref.pooler_output.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["image_embeds"], embeds.numpy(), atol=1e-5)
    if arch == "CLIPModel":
        assert pipe.text_encoder is not None and pipe.text_encoder.config.projection_dim == 16


def test_image_preprocessing_close_to_clip_processor():
    from jaxprobe.models.clip import ImagePreprocess, preprocess_images

    y, x = np.mgrid[0:192, 0:256] / 40.0  # a smooth image: resamplers differ only at sharp edges
    image = (np.stack([np.sin(x) * np.cos(y), np.cos(1.3 * x), np.sin(0.7 * y + 0.2 * x)], -1) * 120 + 128).astype(np.uint8)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ref = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(preprocess_images(image[None] / 255.0, ImagePreprocess()))[0]
    assert got.shape == ref.shape == (224, 224, 3)
    assert np.abs(got - ref).mean() < 0.02


# ------------------------------------------------------------------------------ errors


def test_missing_unexpected_and_misshaped_keys_are_named(text_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = text_checkpoint
    if not (path / "model.safetensors").exists():
        pytest.skip("safetensors cases only")
    state = load_file(path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    broken = dict(state)
    key = next(k for k in broken if k.endswith("layers.1.mlp.fc1.weight"))
    del broken[key]
    broken["surprise.weight"] = np.zeros(3, np.float32)
    shape_key = next(k for k in broken if k.endswith("layers.0.self_attn.q_proj.bias"))
    broken[shape_key] = np.zeros(5, np.float32)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        jaxprobe.load(tmp_path)
    message = str(err.value)
    assert "missing keys (1)" in message and "layers.1.mlp.fc1.weight" in message
    assert "unexpected keys (1)" in message and "surprise.weight" in message
    assert "wrong shapes (1)" in message and "q_proj.bias" in message


def test_missing_weights_and_unknown_ids(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"architectures": ["CLIPTextModel"]}')
    with pytest.raises(CheckpointError, match="no weights in"):
        jaxprobe.load(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="local Hugging Face cache"):
        jaxprobe.load("nobody/no-such-model")
    with pytest.raises(CheckpointError, match="neither model_index.json"):
        jaxprobe.load(tmp_path.parent)


def test_model_id_resolves_in_local_hf_cache(text_checkpoint, tmp_path, monkeypatch):
    path, _ = text_checkpoint
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    pipe = jaxprobe.load("someone/tiny-clip")
    assert pipe.text_encoder is not None


def test_bin_without_torch_names_the_fix(text_checkpoint, monkeypatch):
    import builtins

    path, _ = text_checkpoint
    if not (path / "pytorch_model.bin").exists():
        pytest.skip(".bin case only")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(CheckpointError, match="pip install torch"):
        jaxprobe.load(path)


def test_site_patterns(text_checkpoint):
    path, _ = text_checkpoint
    pipe = jaxprobe.load(path)
    blocks = pipe.sites()
    assert "text_encoder.text_model.encoder.layers.2" in blocks
    assert "text_encoder.text_model.encoder.layers.2.mlp" not in blocks
    assert "text_encoder.text_model.encoder.layers.2.mlp" in pipe.sites(all=True)
    assert pipe.select("text_encoder.*") == blocks
    assert pipe.select("text_encoder.*.mlp") == [f"text_encoder.text_model.encoder.layers.{i}.mlp" for i in range(3)]
    with pytest.raises(SiteError, match="matches no site") as err:
        pipe.capture(PROMPTS, ["unet.mid_block"])
    assert "text_encoder.text_model.encoder.layers.0" in str(err.value)


def test_prompt_errors_and_truncation_warning(tokenizer):
    with pytest.raises(InputError, match="empty prompt"):
        tokenizer(["a cat", "  "])
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenizer(["word " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == tokenizer.hf_tokenizer.eos_token_id


def test_sharded_checkpoint_loads_like_a_single_file(text_checkpoint, tmp_path, tokenizer):
    path, model = text_checkpoint
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and list(tmp_path.glob("*.index.json"))
    shutil.copytree(TOKENIZER_DIR, tmp_path, dirs_exist_ok=True)
    site = "text_encoder.text_model.final_layer_norm"
    sharded = jaxprobe.load(tmp_path).capture(PROMPTS, [site], reduce="eos")[site]
    single = jaxprobe.load(path).capture(PROMPTS, [site], reduce="eos")[site]
    np.testing.assert_array_equal(sharded, single)
