"""Prompts -> fixed-length token ids, with transformers' CLIPTokenizer or T5Tokenizer from the checkpoint."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxprobe.errors import CheckpointError, InputError


@dataclass(frozen=True)
class PromptTokenizer:
    """Pads and truncates to the text encoder's context length, as Stable Diffusion pipelines do (CLIP) or
    PixArt pipelines do (T5, to `max_sequence_length`). Both end a prompt with EOS before the padding, so the
    EOS position is also where a prompt's real tokens end (`attention_mask`)."""

    hf_tokenizer: object
    max_length: int = 77
    lowercase: bool = False     # PixArt pipelines lower-case and strip prompts before tokenizing them

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int | None = None) -> "PromptTokenizer":
        from transformers import CLIPTokenizer

        path = Path(path)
        slow = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        if not slow and not (path / "tokenizer.json").is_file():  # transformers >= 5 writes only tokenizer.json
            raise CheckpointError(f"{path} is not a CLIP tokenizer folder: it needs vocab.json and merges.txt "
                                  "(or a tokenizer.json); copy the checkpoint's tokenizer/ folder completely.")
        hf = CLIPTokenizer.from_pretrained(str(path))
        length = max_length or min(int(getattr(hf, "model_max_length", 77)), 77)
        return cls(hf, length)

    @classmethod
    def t5_from_dir(cls, path: str | Path, max_sequence_length: int, lowercase: bool = False) -> PromptTokenizer:
        from transformers import T5Tokenizer

        path = Path(path)
        if not ((path / "tokenizer.json").is_file() or (path / "spiece.model").is_file()):
            raise CheckpointError(f"{path} is not a T5 tokenizer folder: it needs tokenizer.json or spiece.model; "
                                  "copy the checkpoint's tokenizer/ folder completely.")
        if max_sequence_length < 1:
            raise CheckpointError(f"max_sequence_length must be positive, not {max_sequence_length}")
        return cls(T5Tokenizer.from_pretrained(str(path)), int(max_sequence_length), lowercase)

    def attention_mask(self, ids: np.ndarray) -> np.ndarray:
        """(n, tokens) -> (n, tokens) int32, 1 at each prompt's tokens up to and including EOS (T5's mask)."""
        return (np.arange(ids.shape[1])[None, :] <= self.eos_positions(ids)[:, None]).astype(np.int32)

    @property
    def eos_token_id(self) -> int:
        return int(self.hf_tokenizer.eos_token_id)

    def eos_positions(self, ids: np.ndarray) -> np.ndarray:
        """(n, tokens) -> (n,) position of each prompt's EOS token (the reductions' anchor)."""
        return np.argmax(ids == self.eos_token_id, axis=1).astype(np.int32)

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    def __call__(self, prompts: Sequence[str], allow_empty: bool = False) -> np.ndarray:
        """(n_prompts, max_length) int32 ids. Warns, naming them, for prompts that get truncated.

        allow_empty: admit "" (the unconditional prompt of classifier-free guidance); a user's empty
        prompt is almost always a data error, so it is refused by default.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p).lower().strip() for p in prompts] if self.lowercase else list(prompts)
        empty = [] if allow_empty else [i for i, p in enumerate(prompts) if not str(p).strip()]
        if not prompts or empty:
            raise InputError(f"empty prompt(s) at position(s) {empty or '[no prompts given]'}; "
                             "remove them or give each concept some text")
        full = self.hf_tokenizer(prompts, padding=False, truncation=False)["input_ids"]
        long = [(p, len(ids)) for p, ids in zip(prompts, full) if len(ids) > self.max_length]
        if long:
            shown = "; ".join(f"{p[:40]!r} ({n} tokens)" for p, n in long[:5])
            warnings.warn(f"{len(long)} prompt(s) exceed {self.max_length} tokens and are truncated "
                          f"(the end is dropped, EOS kept): {shown}", stacklevel=2)
        ids = self.hf_tokenizer(prompts, padding="max_length", max_length=self.max_length,
                                truncation=True)["input_ids"]
        return np.asarray(ids, dtype=np.int32)
