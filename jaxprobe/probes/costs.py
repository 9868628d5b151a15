"""How long a sweep takes and how much it stores, before running it.

A sweep's cost is two terms that measurements fix (`scripts/scale_extract.py`, `scripts/scale_probes.py`
measure them on the device at hand and write the rates as JSON):

  extraction  n_prompts x UNet evaluations x (ms per prompt-evaluation at the batch used), split over
              devices (prompts are data-parallel), plus the text encoder per prompt;
  probing     per feature set, (outer folds x (1 + inner folds)) ridge fits, each an eigendecomposition
              of an (n x d) design, ~ n d min(n, d) flops, plus predictions for every target and every
              permutation, ~ n min(n, d) t (1 + P); feature sets are split over devices.

Storage is exact: every captured value is a float32 after the on-device reductions.
"""

from __future__ import annotations

from dataclasses import dataclass

# SD 1.5 block outputs after the spatial mean: down_blocks.0-3, mid_block, up_blocks.0-3.
SD15_BLOCK_DIMS = (320, 640, 1280, 1280, 1280, 1280, 1280, 640, 320)
SD15_TEXT_DIMS = (768,) * 14  # embeddings, 12 layers, final_layer_norm


@dataclass(frozen=True)
class Sweep:
    """What is extracted and probed."""

    n_concepts: int
    n_templates: int = 1
    n_seeds: int = 1
    steps: int = 50
    unet_evaluations: int | None = None     # per prompt; PNDM makes steps + 1, others steps
    site_dims: tuple[int, ...] = SD15_BLOCK_DIMS
    text_dims: tuple[int, ...] = SD15_TEXT_DIMS
    n_targets: int = 65
    outer_cv: int = 5
    inner_cv: int = 5
    n_permutations: int = 100
    average_repeats: bool = True            # probe one row per concept (templates x seeds averaged)

    @property
    def n_prompts(self) -> int:
        return self.n_concepts * self.n_templates * self.n_seeds

    @property
    def evaluations(self) -> int:
        return self.unet_evaluations if self.unet_evaluations is not None else self.steps + 1

    @property
    def feature_sets(self) -> list[int]:
        """The width of every feature set (site x captured step, and text sites)."""
        return [d for d in self.site_dims for _ in range(self.evaluations)] + list(self.text_dims)

    @property
    def feature_bytes(self) -> int:
        per_prompt = self.evaluations * sum(self.site_dims) + sum(self.text_dims)
        return 4 * self.n_prompts * per_prompt

    @property
    def probe_rows(self) -> int:
        return self.n_concepts if self.average_repeats else self.n_prompts


@dataclass(frozen=True)
class Rates:
    """Measured on one device (see the module docstring for what each coefficient multiplies)."""

    device: str
    unet_ms_per_prompt_evaluation: float     # one prompt, one UNet evaluation with CFG, at the batch used
    text_ms_per_prompt: float = 0.0
    probe_ns_per_decomposition_flop: float = 0.0   # x outer (1 + inner) n d min(n, d)
    probe_ns_per_prediction_flop: float = 0.0      # x outer (1 + inner) n min(n, d) t (1 + P)
    probe_ms_per_set_overhead: float = 0.0


def probe_ms_per_set(rates: Rates, n: int, d: int, n_targets: int, outer: int, inner: int, permutations: int) -> float:
    fits = outer * (1 + inner)
    k = min(n, d)
    flops_decomposition = fits * n * d * k
    flops_prediction = fits * n * k * n_targets * (1 + permutations)
    return (rates.probe_ms_per_set_overhead + 1e-6 * rates.probe_ns_per_decomposition_flop * flops_decomposition
            + 1e-6 * rates.probe_ns_per_prediction_flop * flops_prediction)


@dataclass(frozen=True)
class Prediction:
    extraction_s: float
    probing_s: float
    feature_bytes: int
    n_feature_sets: int

    @property
    def total_s(self) -> float:
        return self.extraction_s + self.probing_s


def predict(sweep: Sweep, rates: Rates, n_devices: int = 1) -> Prediction:
    """Wall time on `n_devices` devices like the one `rates` was measured on (perfect data parallelism:
    prompts and feature sets are independent; the measured scaling in BENCHMARKS.md says how close)."""
    extraction_ms = sweep.n_prompts * (sweep.evaluations * rates.unet_ms_per_prompt_evaluation
                                       + rates.text_ms_per_prompt)
    probing_ms = sum(probe_ms_per_set(rates, sweep.probe_rows, d, sweep.n_targets, sweep.outer_cv, sweep.inner_cv,
                                      sweep.n_permutations) for d in sweep.feature_sets)
    return Prediction(extraction_s=extraction_ms / 1e3 / n_devices, probing_s=probing_ms / 1e3 / n_devices,
                      feature_bytes=sweep.feature_bytes, n_feature_sets=len(sweep.feature_sets))
