"""The bundled `tiny` model: Stable Diffusion 1.x's architecture at toy widths, random weights.

Deterministic (fixed PRNG seeds), built in memory in a second, no files beyond the small BPE
vocabulary in assets/. It exists so that `jaxprobe run` and the tests work offline; a randomly
initialised model carries no semantics, so its probes should decode at chance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxprobe.models.clip import CLIPTextConfig, CLIPTextModel
from jaxprobe.tokenizer import PromptTokenizer

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
SEED = 0


def tiny_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          eos_token_id=vocab_size - 1)


def _init(module: Any, seed: int, *example: Any) -> Any:
    return jax.jit(module.init)(jax.random.key(seed), *example)["params"]


def tiny_parts(dtype: Any) -> dict[str, Any]:
    from jaxprobe.pipeline import Component

    tokenizer = PromptTokenizer.from_dir(TOKENIZER_DIR)
    text_cfg = tiny_text_config(tokenizer.vocab_size)
    text = CLIPTextModel(text_cfg, dtype=dtype)
    text_params = _init(text, SEED, jnp.zeros((1, 77), jnp.int32))
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)  # noqa: E731
    return {"tokenizer": tokenizer, "text_encoder": Component("text_encoder", text, cast(text_params), text_cfg)}
