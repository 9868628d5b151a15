"""Build the bundled tiny CLIP BPE tokenizer (jaxprobe/checkpoints/assets/tiny_tokenizer).

The real CLIP vocabulary (49,408 entries) cannot be fetched offline, so the `tiny` model ships a small
vocabulary in CLIP's own format (vocab.json + merges.txt, byte-level, `</w>` word ends), learned with
plain byte-pair encoding on the concept words of the bundled norms and the prompt templates. It loads
with transformers' CLIPTokenizer like any real checkpoint's tokenizer folder.

    python scripts/make_tiny_tokenizer.py          # rewrites the files deterministically
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "jaxprobe" / "norms" / "data"
OUT = ROOT / "jaxprobe" / "checkpoints" / "assets" / "tiny_tokenizer"
NUM_MERGES = 1500
TEMPLATE_TEXT = ("a photo of a an the picture image drawing painting rendering close-up of one two "
                 "man woman person doctor nurse engineer teacher young old child")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (GPT-2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def corpus_words() -> collections.Counter:
    words: list[str] = TEMPLATE_TEXT.split()
    binder = pd.read_excel(DATA / "binder2016" / "WordSet1_Ratings.xlsx", usecols=[1])
    words += binder.iloc[:, 0].astype(str).tolist()
    words += pd.read_csv(DATA / "things" / "words.csv").iloc[:, 0].astype(str).tolist()
    mcrae = pd.read_csv(DATA / "mcrae2005" / "CONCS_brm.txt", sep="\t", usecols=[0])
    words += mcrae.iloc[:, 0].astype(str).str.replace(r"_\(.*\)", "", regex=True).tolist()
    tokens = re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", " ".join(words).lower().replace("_", " "))
    return collections.Counter(tokens)


def learn_merges(counts: collections.Counter, num_merges: int, byte_map: dict[int, str]) -> list[tuple[str, str]]:
    def symbols(word: str) -> tuple[str, ...]:
        chars = [byte_map[b] for b in word.encode("utf-8")]
        return (*chars[:-1], chars[-1] + "</w>")

    vocab = {symbols(w): c for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for word, c in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # ties broken alphabetically: deterministic
        merges.append(best)
        merged = {}
        for word, c in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = c
        vocab = merged
    return merges


def main() -> None:
    byte_map = bytes_to_unicode()
    base = list(byte_map.values())
    merges = learn_merges(corpus_words(), NUM_MERGES, byte_map)
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=2))
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {OUT}")


if __name__ == "__main__":
    main()
