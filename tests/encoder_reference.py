"""Tiny transformers encoders beyond CLIP (T5, DINOv2) saved as ordinary folders, offline, for parity tests and the
README: a T5EncoderModel with a T5 tokenizer beside it, and a Dinov2Model with its BitImageProcessor settings.

Weights that initialise to constants (RMS/layer norms, layer scales, position embeddings) are perturbed, so a
missing scale or a mis-mapped key cannot pass a parity test unnoticed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from jaxprobe.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD

T5_CORPUS = ["a photo of a airplane", "a photo of a zebra", "a drawing of a banana and a knife beside a dog",
             "the quick brown fox jumps over the lazy dog", "a painting of a cat on a mat"]


def save_t5_tokenizer(path: str | Path) -> None:
    """A T5-style tokenizer (Metaspace pre-tokenizer, Unigram model, `</s>` appended, `<pad>` = 0) trained on a few
    sentences, saved as T5Tokenizer saves a real one (tokenizer.json + tokenizer_config.json). sentencepiece is
    not needed: the `tokenizers` library trains it."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(T5_CORPUS * 10, trainers.UnigramTrainer(vocab_size=80, unk_token="<unk>",
                                                                    special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                 extra_ids=0).save_pretrained(path)


def t5_config(**overrides: Any) -> transformers.T5Config:
    base = {"vocab_size": 96, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_kv": 8, "d_ff": 64,
            "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
            "feed_forward_proj": "gated-gelu"}
    return transformers.T5Config(**{**base, **overrides})


def save_t5_encoder(path: str | Path, seed: int = 0, **overrides: Any) -> transformers.T5EncoderModel:
    """A tiny T5EncoderModel (gated-GELU unless overridden) and its tokenizer in one folder."""
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(t5_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    save_t5_tokenizer(path)
    return model


def save_dinov2(path: str | Path, seed: int = 0, *, image_size: int = 28, patch_size: int = 7, layers: int = 2,
                resize: int = 32, **overrides: Any) -> transformers.Dinov2Model:
    """A tiny Dinov2Model and a preprocessor_config.json (shortest side to `resize`, centre crop to image_size,
    ImageNet mean and std, as facebook/dinov2-* have it at 256/224)."""
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                       image_size=image_size, patch_size=patch_size, layerscale_value=0.5,
                                       **overrides)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    transformers.BitImageProcessor(size={"shortest_edge": resize}, crop_size={"height": image_size, "width": image_size},
                                   image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(path)
    return model
