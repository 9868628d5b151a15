"""Peak host memory while loading a diffusers UNet folder in bfloat16 (issue 17: streaming loads).

With `--write`, FOLDER gets a UNet of random weights (SD-1.x layout, channels scaled by --width) saved with
diffusers' `save_pretrained` as fp32 safetensors; without it, FOLDER is loaded with `load_denoiser(dtype=bfloat16)` and the
peaks of VmRSS (all resident pages, the mapped file's included) and RssAnon (memory the process itself
holds: host copies of tensors) are sampled every 5 ms. Run each load in its own process:

    python scripts/bench_load_memory.py /tmp/unet-bench --write --width 0.6
    PYTHONPATH=<tree> python scripts/bench_load_memory.py /tmp/unet-bench --json out.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def write(folder: Path, width: float) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    channels = tuple(int(round(c * width / 64)) * 64 for c in (320, 640, 1280, 1280))
    unet = UNet2DConditionModel(block_out_channels=channels, cross_attention_dim=768, attention_head_dim=8,
                                sample_size=64)
    unet.save_pretrained(folder, safe_serialization=True)
    size = sum(p.numel() for p in unet.parameters())
    print(f"wrote {folder}: {size / 1e6:.0f}M parameters, {size * 4 / 2**30:.2f} GiB fp32, channels {channels}")


def measure(folder: Path) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from jaxprobe.checkpoints.diffusers import load_denoiser

    peaks = _status()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status().items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.005)

    jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory belongs to the baseline
    base = _status()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    unet = load_denoiser(folder / "unet" if (folder / "unet").is_dir() else folder, dtype=jnp.bfloat16)
    jax.block_until_ready(unet.params)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    placed = sum(leaf.nbytes for leaf in jax.tree.leaves(unet.params))
    after = _status()
    gib = 2**30
    return {"load_s": round(seconds, 2), "placed_params_gib": round(placed / gib, 3),
            "peak_rss_above_start_gib": round((peaks["VmRSS"] - base["VmRSS"]) / gib, 3),
            "peak_anon_above_start_gib": round((peaks["RssAnon"] - base["RssAnon"]) / gib, 3),
            "anon_after_load_gib": round((after["RssAnon"] - base["RssAnon"]) / gib, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--write", action="store_true", help="write the random checkpoint to FOLDER instead")
    parser.add_argument("--width", type=float, default=0.6, help="channels as a fraction of SD-1.x's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.write:
        write(args.folder, args.width)
        return
    result = measure(args.folder)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
