"""Benchmark: CLIP ViT-L/14 text tower, capture of all 12 layers (EOS and mean), jaxprobe vs transformers.

Measures prompts/s for jaxprobe (bfloat16, jitted, every layer sown and reduced on device) and for
transformers' CLIPTextModel (fp16 on GPU / fp32 on CPU, SDPA, output_hidden_states=True, the same
reductions in torch) in the same process, on random weights of the real size (speed does not depend
on the weights' values) and pre-tokenised prompts of realistic lengths.

    python scripts/bench_text.py                      # real size, 4,096 prompts (GPU)
    python scripts/bench_text.py --prompts 64 --layers 2 --width 128   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints.random import random_params
from jaxprobe.models.clip import CLIPTextConfig, CLIPTextModel, example_inputs
from jaxprobe.pipeline.programs import Models, Plan, capture_program
from jaxprobe.runtime.batching import run_batched


def token_ids(n: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(6, 20, size=n)  # "a photo of a {concept}" is 6-10 tokens; some longer
    ids = np.full((n, 77), vocab - 1, np.int32)
    ids[:, 0] = vocab - 2
    for i, length in enumerate(lengths):
        ids[i, 1:length] = rng.integers(0, vocab - 2, size=length - 1)
    return ids, lengths.astype(np.int32)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64))
    ids, eos = token_ids(args.prompts, cfg.vocab_size, np.random.default_rng(0))
    module = CLIPTextModel(cfg, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_params(module, *example_inputs(cfg)))
    sites = tuple(f"text_model.encoder.layers.{i}" for i in range(cfg.num_hidden_layers))
    plans = [Plan(text_sites=sites, text_reductions=(how,) * len(sites)) for how in ("eos", "mean")]
    models, weights = Models(text_encoder=module), {"text_encoder": params}
    index = np.arange(len(ids), dtype=np.int32)

    def ours():
        for plan in plans:  # the capture program with text sites only: what pipe.capture runs for them
            out = run_batched(lambda b: capture_program(models, weights, None, plan, b, 0, 0.0),
                              {"ids": ids, "eos": eos, "prompt_index": index}, args.batch)
        return out

    jax_s = timed(ours, args.repeats)

    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    hf_cfg = transformers.CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, attn_implementation="sdpa",
                                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                         num_attention_heads=cfg.num_attention_heads, eos_token_id=cfg.vocab_size - 1)
    model = transformers.CLIPTextModel(hf_cfg).to(device, dtype).eval()
    ids_t, eos_t = torch.as_tensor(ids, device=device).long(), torch.as_tensor(eos, device=device).long()

    @torch.no_grad()
    def peer():
        for start in range(0, len(ids_t), args.batch):
            batch, last = ids_t[start:start + args.batch], eos_t[start:start + args.batch]
            hidden = model(batch, output_hidden_states=True).hidden_states[1:]
            rows = torch.arange(len(batch), device=device)
            mask = (torch.arange(77, device=device)[None] <= last[:, None]).to(dtype)
            for h in hidden:
                h[rows, last].float().cpu()
                ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).float().cpu()
        if device == "cuda":
            torch.cuda.synchronize()

    torch_s = timed(peer, args.repeats)
    figures = {
        "device": jax.devices()[0].device_kind, "torch_device": device, "prompts": args.prompts,
        "layers": cfg.num_hidden_layers, "width": cfg.hidden_size,
        "jaxprobe_prompts_per_s": args.prompts / jax_s, "transformers_prompts_per_s": args.prompts / torch_s,
        "speedup": torch_s / jax_s, "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
