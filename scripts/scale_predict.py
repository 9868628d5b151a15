"""Predict a full real-SD sweep from measured rates (`jaxprobe.probes.costs`).

The sweep: THINGS' 1,854 concepts x 4 templates x 50 steps (PNDM: 51 UNet evaluations) x every SD 1.5
block output (spatial mean) and every text layer, probed against 66 THINGS dimensions with 5x5 nested
CV and 100 permutations. Rates come from `scale_extract.py` / `scale_probes.py` JSON files measured on
the target device; `--peers` instead projects from the peers' H100 figures in BENCHMARKS.md (diffusers
fp16 UNet, himalaya ridge), an upper bound for our own code until it is measured there.

    python scripts/scale_predict.py --extract scale/gpu/scale_extract.json --probes scale/gpu/scale_probes.json
    python scripts/scale_predict.py --peers --probes scale/cpu/scale_probes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxprobe.probes.costs import Rates, Sweep, predict, probe_ms_per_set

THINGS_SWEEP = Sweep(n_concepts=1854, n_templates=4, steps=50, n_targets=66, n_permutations=100)
# BENCHMARKS.md, peers on the H100: diffusers UNet fp16 eager, batch 16 with CFG, 53.8 ms per step;
# himalaya torch_cuda, n=535, d=768, 65 targets, 20 alphas, 5x5 folds, no permutations: 427 ms per set.
PEER_UNET_MS_PER_PROMPT_EVAL = 53.8 / 16
PEER_PROBE_POINT = dict(n=535, d=768, n_targets=65, outer=5, inner=5, permutations=0)
PEER_PROBE_MS = 427.0


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extract", type=Path, help="scale_extract.json measured on the target device")
    parser.add_argument("--probes", type=Path, required=True, help="scale_probes.json (its fit gives the shape)")
    parser.add_argument("--peers", action="store_true", help="project from the peers' H100 figures instead")
    args = parser.parse_args()
    probes = json.loads(args.probes.read_text())
    fit = probes["fit"]
    if args.peers:
        shape = Rates("shape", 0.0, **fit)
        factor = PEER_PROBE_MS / probe_ms_per_set(shape, **PEER_PROBE_POINT)
        rates = Rates("H100, projected from peers", PEER_UNET_MS_PER_PROMPT_EVAL,
                      **{k: v * factor for k, v in fit.items()})
    else:
        extract = json.loads(args.extract.read_text())
        rates = Rates(extract["device"], extract["unet_ms_per_prompt_evaluation"], **fit)
    sweep = THINGS_SWEEP
    print(f"sweep: {sweep.n_prompts:,} prompts x {sweep.evaluations} UNet evaluations, "
          f"{len(sweep.feature_sets)} feature sets x {sweep.n_targets} targets, {sweep.n_permutations} permutations")
    print(f"rates: {rates}")
    print("\n| devices | extraction | probing | total | features on disk |\n|---|---|---|---|---|")
    for devices in (1, 8):
        p = predict(sweep, rates, devices)
        print(f"| {devices} x {rates.device} | {hours(p.extraction_s)} | {hours(p.probing_s)} | {hours(p.total_s)} "
              f"| {p.feature_bytes / 2**30:.1f} GiB |")


if __name__ == "__main__":
    main()
