"""Where along the pipeline are attributes decodable: the probe table summarised per feature set.

The probe table (`jaxprobe.probes.probe_sweep`) has one row per (feature set, target). Here every
feature set gets its *stage* (which part of the pipeline it comes from) and one row of averages over
targets: the mean score with the mean of the per-target bootstrap bounds as its band, the mean
permutation null when the table has one, and how many targets pass the FDR threshold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from jaxprobe.errors import InputError
from jaxprobe.pipeline.sites import SAMPLER_SITES, short_site  # noqa: F401 - re-exported for report, summary

STAGES = ("text", "unet", "latent", "image")  # pipeline order
_STAGE_PREFIXES = (("text_encoder.", "text"), ("text_encoder_2.", "text"), ("text_encoder_3.", "text"), ("unet.", "unet"),
                   ("image_encoder.", "image"))

FEATURE_SET_COLUMNS = ["feature_set", "stage", "site", "timestep"]
_REQUIRED = ("feature_set", "site", "timestep", "target", "score")


def stage_of(site: str) -> str:
    """"text", "unet", "latent" (the sampler's `latents`, `pred_original_sample`) or "image"."""
    if site in SAMPLER_SITES:
        return "latent"
    for prefix, stage in _STAGE_PREFIXES:
        if site.startswith(prefix):
            return stage
    raise InputError(
        f"cannot tell which pipeline stage site {site!r} belongs to: sites start with 'text_encoder.', "
        f"'unet.' or 'image_encoder.', or are one of {list(SAMPLER_SITES)}."
    )


def text_towers(sites: Iterable[str]) -> list[str]:
    """The text encoders ("text_encoder", SDXL's "text_encoder_2") that text sites come from, in order of appearance."""
    return list(dict.fromkeys(site.split(".", 1)[0] for site in sites if stage_of(site) == "text"))


def site_order(sites: Iterable[str]) -> list[str]:
    """Distinct sites in pipeline order.

    Natural order (digit runs compared as numbers) is the models' own order: CLIP's `embeddings` <
    `encoder.layers.0` < ... < `encoder.layers.11` < `final_layer_norm`, and the UNet's `down_blocks.*`
    < `mid_block` < `up_blocks.*`; stages come in `STAGES` order.
    """
    def key(site: str) -> tuple:
        natural = tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", site))
        return STAGES.index(stage_of(site)), natural

    return sorted(set(sites), key=key)


def check_table(table: pd.DataFrame) -> pd.DataFrame:
    """The probe table with a `stage` column (derived from `site` where absent); raises InputError
    naming the missing columns."""
    missing = [c for c in _REQUIRED if c not in table]
    if missing:
        raise InputError(
            f"the probe table lacks columns {missing}; it must have one row per (feature set, target) "
            "as `jaxprobe.probes.probe_sweep` writes it."
        )
    if "stage" in table:
        return table
    return table.assign(stage=[stage_of(s) for s in table["site"]])


def feature_set_index(table: pd.DataFrame) -> pd.DataFrame:
    """One row per feature set, in table order: feature_set, stage, site, timestep."""
    table = check_table(table)
    return table[FEATURE_SET_COLUMNS].drop_duplicates("feature_set").reset_index(drop=True)


def decoding_profile(table: pd.DataFrame, *, level: float = 0.05) -> pd.DataFrame:
    """Per feature set, averages over its targets (NaN scores ignored).

    Columns: feature_set, stage, site, timestep; score (mean over targets), ci_low and ci_high (means
    of the per-target bootstrap bounds: a band for the typical target, not an interval for the mean),
    null_mean and null_high (means of the permutation null's mean and 95th percentile; only when the
    table has them), n_targets, n_significant (targets with q < level; NaN without permutations).
    """
    table = check_table(table)
    averaged = [c for c in ("score", "ci_low", "ci_high", "null_mean", "null_high") if c in table]
    by = table.groupby("feature_set", sort=False)
    profile = feature_set_index(table).set_index("feature_set")
    profile = profile.join(by[averaged].mean())
    profile["n_targets"] = by["score"].count()
    if "q" in table:
        significant = (table["q"] < level).where(table["q"].notna())
        profile["n_significant"] = significant.groupby(table["feature_set"], sort=False).sum(min_count=1)
    else:
        profile["n_significant"] = np.nan
    return profile.reset_index()


def best(profile: pd.DataFrame, stage: str | Iterable[str], value: str = "score") -> pd.Series | None:
    """The row of `profile` with the highest `value` among the given stage(s); None when there is none."""
    stages = [stage] if isinstance(stage, str) else list(stage)
    rows = profile[profile["stage"].isin(stages) & profile[value].notna()]
    return None if rows.empty else rows.loc[rows[value].idxmax()]
