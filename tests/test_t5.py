"""The T5 encoder (PixArt's text encoder): parity with transformers' T5EncoderModel, loaded from save_pretrained,
with a tiny T5 tokenizer built offline (a `tokenizers` Unigram model; sentencepiece is not needed)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import encoder_reference
import jax
import jax.numpy as jnp

import jaxprobe
from jaxprobe.checkpoints.encoders import load_t5_encoder, load_t5_tokenizer
from jaxprobe.errors import CheckpointError
from jaxprobe.models.t5 import attention_mask_from_eos, relative_position_buckets
from jaxprobe.pipeline.reductions import reduce_tokens
from jaxprobe.pipeline.sites import flatten_intermediates

PROMPTS = [*encoder_reference.T5_CORPUS[:3], "x"]
LENGTH = 12   # max_sequence_length: pads the short prompts, truncates the long one
CASES = {"gated_gelu": {"feed_forward_proj": "gated-gelu"}, "relu": {"feed_forward_proj": "relu"}}


@pytest.fixture(scope="module", params=sorted(CASES))
def t5_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"t5_{request.param}")
    return path, encoder_reference.save_t5_encoder(path, **CASES[request.param])


def _reference_blocks(model, ids: np.ndarray, mask: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    outputs: dict[int, np.ndarray] = {}
    hooks = [block.register_forward_hook(lambda _m, _i, out, k=k: outputs.__setitem__(
        k, (out[0] if isinstance(out, tuple) else out).numpy())) for k, block in enumerate(model.encoder.block)]
    try:
        with torch.no_grad():
            last = model(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return [outputs[k] for k in range(len(outputs))], last.numpy()


def test_t5_encoder_matches_transformers_every_block(t5_checkpoint):
    path, model = t5_checkpoint
    encoder, tokenizer = load_t5_encoder(path), load_t5_tokenizer(path, LENGTH)
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenizer(PROMPTS)
    mask = tokenizer.attention_mask(ids)
    assert ids.shape == (len(PROMPTS), LENGTH) and 0 < mask.sum(1).min() < LENGTH  # padding in the batch
    blocks, last = _reference_blocks(model, ids, mask)

    @jax.jit
    def run(params, ids, mask):
        out, state = encoder.module.apply({"params": params}, ids, mask, mutable=["intermediates"])
        return out, flatten_intermediates(state["intermediates"])

    out, acts = run(encoder.params, jnp.asarray(ids), jnp.asarray(mask))
    assert list(acts) == [f"encoder.block.{i}" for i in range(len(blocks))] + ["encoder.final_layer_norm"]
    for i, ref in enumerate(blocks):
        np.testing.assert_allclose(acts[f"encoder.block.{i}"], ref, atol=1e-5, err_msg=f"block {i}")
    np.testing.assert_allclose(acts["encoder.final_layer_norm"], last, atol=1e-5)
    np.testing.assert_allclose(out["last_hidden_state"], last, atol=1e-5)


def test_t5_tokenizer_pads_truncates_and_masks_like_transformers(t5_checkpoint):
    path, _ = t5_checkpoint
    tokenizer = load_t5_tokenizer(path, LENGTH)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ref = hf(PROMPTS, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="np")
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenizer(PROMPTS)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(tokenizer.attention_mask(ids), ref["attention_mask"])
    # The device-side mask from EOS positions (what a pipeline program holds) is the same mask.
    np.testing.assert_array_equal(attention_mask_from_eos(jnp.asarray(tokenizer.eos_positions(ids)), LENGTH),
                                  ref["attention_mask"])


def test_token_mean_is_over_the_real_tokens(t5_checkpoint):
    """A pipeline's `mean` token reduction (up to EOS) is the mean over T5's attention mask."""
    path, _ = t5_checkpoint
    encoder, tokenizer = load_t5_encoder(path), load_t5_tokenizer(path, 32)
    ids = tokenizer(PROMPTS[:2] + PROMPTS[3:])
    mask = tokenizer.attention_mask(ids)
    x = np.asarray(encoder.module.apply({"params": encoder.params}, ids, mask)["last_hidden_state"])
    expected = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(reduce_tokens(jnp.asarray(x), jnp.asarray(tokenizer.eos_positions(ids)), "mean"),
                               expected, atol=1e-6)


@pytest.mark.parametrize(("buckets", "distance"), [(32, 128), (8, 16)])
def test_relative_position_buckets_match_transformers(buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 600  # past max_distance: the logarithmic buckets and the clamp
    relative = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=buckets,
                                                max_distance=distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, n, buckets, distance), ref)


def test_fp16_variant_and_tied_embedding_key(tmp_path):
    torch.manual_seed(1)
    model = transformers.T5EncoderModel(encoder_reference.t5_config()).eval()
    model.half().save_pretrained(tmp_path, variant="fp16")
    encoder = load_t5_encoder(tmp_path, variant="fp16")
    shared = model.shared.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(encoder.params["shared"]["embedding"]), shared)

    from safetensors.numpy import (  # a checkpoint that kept only the tied copy
        load_file,
        save_file,
    )

    state = load_file(tmp_path / "model.fp16.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(load_t5_encoder(tmp_path).params["shared"]["embedding"]), shared)


def test_t5_folder_errors_name_the_fix(t5_checkpoint, tmp_path):
    path, _ = t5_checkpoint
    with pytest.raises(CheckpointError, match="load_t5_encoder"):
        jaxprobe.load(path)
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8)).save_pretrained(clip)
    with pytest.raises(CheckpointError, match="not a T5 encoder"):
        load_t5_encoder(clip)
    with pytest.raises(CheckpointError, match="tokenizer.json or spiece.model"):
        load_t5_tokenizer(clip)
