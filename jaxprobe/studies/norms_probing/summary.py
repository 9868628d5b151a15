"""`ExperimentResults`, everything the report shows, and the plain-language findings read off its numbers.

`ExperimentResults.build` gathers the probe table and the analyses of one run and derives what they
share: the per-feature-set decoding profile, the pipeline stage of every feature set, and the
attribute correlation matrices behind the heatmaps. `summarize` turns the numbers into sentences:
where decoding peaks, which attribute groups stand out, how entanglement evolves along the reverse
diffusion, and, for a model with random weights, how the scores compare with chance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from jaxprobe.errors import InputError
from jaxprobe.errors import preview
from jaxprobe.norms.base import dropped_frame
from jaxprobe.studies.norms_probing import decoding, disentanglement

SAMPLED_STAGES = ("unet", "latent")  # feature sets with a denoising step
PAPER = ("Braunstein, Toneva & Ilg (2025). CLIP is All You Need for Human-like Semantic Representations "
         "in Stable Diffusion. arXiv:2511.08075.")
_TREND_RHO = 0.5  # |Spearman rho| with the step above which a curve is said to rise or fall
_TREND_MIN_CHANGE = 0.02  # a curve whose values span less than this is level, whatever its rho
_FOLD_MEANS = ("a probe that learns nothing predicts the training folds' means, which co-vary across attributes "
               "as the ratings do, so this similarity is not evidence of human-like structure")


@dataclasses.dataclass(frozen=True, eq=False)
class ExperimentResults:
    """One run's tables, matrices and settings: what `report` renders and writes.

    Every per-feature-set table carries feature_set, stage, site and timestep (-1 for text sites).
    metadata: run settings shown in the report as given. Keys it reads: "model", "random_weights"
        (True, or a model that `checkpoints.random.is_random_weights` knows, for a model with random
        weights), "citation" (str or list of the norms' citations).
    """

    table: pd.DataFrame                # the probe sweep, one row per (feature set, target)
    profile: pd.DataFrame              # `decoding.decoding_profile`
    groups: pd.DataFrame               # `groups.group_decoding`
    similarity: pd.DataFrame           # `disentanglement.correlation_similarity`
    confusability: pd.DataFrame        # summary of `disentanglement.confusability`
    feature_sets: tuple[str, ...]      # order of the matrices' first axis
    targets: tuple[str, ...]           # order of the matrices' attribute axes
    target_groups: dict[str, str]
    human_correlation: np.ndarray      # (t, t)
    predicted_correlation: np.ndarray  # (F, t, t)
    confusion: np.ndarray              # (F, t, t), C of `disentanglement.confusability`
    metadata: dict[str, Any]
    dropped: pd.DataFrame              # (concept, reason) left out of the run

    @classmethod
    def build(
        cls, *, table: pd.DataFrame, predictions: np.ndarray, Y: np.ndarray, feature_sets: Sequence[str],
        targets: Sequence[str], target_groups: Mapping[str, str], group_table: pd.DataFrame,
        similarity: pd.DataFrame, confusability: tuple[pd.DataFrame, np.ndarray],
        metadata: Mapping[str, Any] | None = None, level: float = 0.05,
    ) -> ExperimentResults:
        """Gather one run. predictions: (F, n, t) in the order of `feature_sets`; Y: (n, t) ratings in
        the order of `targets`; `confusability` as `disentanglement.confusability` returns it;
        metadata["dropped"], when given, becomes `dropped`."""
        table = decoding.check_table(table)
        feature_sets, targets = tuple(feature_sets), tuple(targets)
        in_table = list(dict.fromkeys(table["feature_set"]))
        if sorted(in_table) != sorted(feature_sets):
            raise InputError(f"the predictions' feature sets ({preview(feature_sets)}) are not the table's "
                             f"({preview(in_table)}).")
        unknown = sorted(set(table["target"]) - set(targets))
        if unknown:
            raise InputError(f"table targets {preview(unknown)} are not among the prediction targets.")
        index = decoding.feature_set_index(table)

        def per_feature_set(frame: pd.DataFrame) -> pd.DataFrame:
            return index.merge(frame, on="feature_set", how="inner")

        summary, confusion = confusability
        human, predicted = disentanglement.correlation_matrices(predictions, Y)
        metadata = dict(metadata or {})
        dropped = metadata.pop("dropped", None)
        return cls(
            table=table, profile=decoding.decoding_profile(table, level=level), groups=group_table,
            similarity=per_feature_set(similarity), confusability=per_feature_set(summary),
            feature_sets=feature_sets, targets=targets, target_groups={t: target_groups[t] for t in targets},
            human_correlation=human, predicted_correlation=predicted, confusion=confusion, metadata=metadata,
            dropped=dropped_frame() if dropped is None else pd.DataFrame(dropped),
        )

    @property
    def random_weights(self) -> bool:
        from jaxprobe.checkpoints.random import is_random_weights

        return is_random_weights(self.metadata)

    def matrix_index(self, feature_set: str) -> int:
        return self.feature_sets.index(feature_set)

    def focus_site(self, site: str | None = None) -> str | None:
        """The sampled site the report follows along the diffusion: `site`, or the UNet (else latent)
        site holding the best-decoding feature set."""
        if site is not None:
            if site not in set(self.profile["site"]):
                raise InputError(f"site {site!r} is not in the results; choose from "
                                 f"{preview(decoding.site_order(self.profile['site']))}.")
            return site
        row = decoding.best(self.profile, "unet")
        row = row if row is not None else decoding.best(self.profile, "latent")
        return None if row is None else row["site"]


def along_steps(frame: pd.DataFrame, site: str, value: str) -> pd.DataFrame:
    """`value` of one site's feature sets, ordered by denoising step, NaN values left out."""
    rows = frame[(frame["site"] == site) & (frame["timestep"] >= 0) & frame[value].notna()]
    return rows.sort_values("timestep")[["timestep", value]]


def _trend(curve: pd.DataFrame, value: str) -> tuple[str, float] | None:
    """How `value` evolves over steps, in words ('rises, from 0.10 at step 0 to 0.40 at step 9 (Spearman
    rho with the step = 0.95)'), and the rho behind the verb (0 when the curve barely moves); None for
    fewer than 3 points. A curve whose range is under _TREND_MIN_CHANGE is level whatever its rho, and one
    that ends within it of where it started (or moves against its rho) has no trend."""
    if len(curve) < 3:
        return None
    rho = spearmanr(curve["timestep"], curve[value]).statistic
    first, last = curve.iloc[0], curve.iloc[-1]
    span = f"{first[value]:.2f} at step {first['timestep']:.0f} to {last[value]:.2f} at step {last['timestep']:.0f}"
    low, high, change = curve[value].min(), curve[value].max(), last[value] - first[value]
    if high - low < _TREND_MIN_CHANGE:
        return f"stays level (within {_TREND_MIN_CHANGE:g}: {span})", 0.0
    if abs(change) < _TREND_MIN_CHANGE or (rho >= _TREND_RHO) != (change > 0):
        return (f"moves between {low:.2f} and {high:.2f} but shows no monotonic trend ({span}; Spearman rho "
                f"with the step = {rho:.2f})"), 0.0
    verb = "rises" if rho >= _TREND_RHO else "falls" if rho <= -_TREND_RHO else "shows no monotonic trend"
    return f"{verb}, from {span} (Spearman rho with the step = {rho:.2f})", rho


def _where(row: pd.Series) -> str:
    label = decoding.short_site(row["site"])
    return label if row["timestep"] < 0 else f"{label} at denoising step {row['timestep']:.0f}"


def _significance(results: ExperimentResults, level: float) -> list[str]:
    table = results.table
    lines = []
    if results.random_weights:
        lines.append(RANDOM_WEIGHTS_CAVEAT.format(model=results.metadata.get("model", "unnamed")))
    if "q" not in table or table["q"].isna().all():
        return [*lines, "No permutation test was run, so no score can be compared with chance."]
    n, k = int(table["q"].notna().sum()), int((table["q"] < level).sum())
    line = (f"{k} of {n} probes (feature set x attribute) decode above chance (permutation test, "
            f"Benjamini-Hochberg q < {level:g}); the mean score over all probes is {table['score'].mean():.3f}")
    if "null_mean" in table and table["null_mean"].notna().any():
        line += (f", against a permutation null with mean {table['null_mean'].mean():.3f} and 95th percentile "
                 f"{table['null_high'].mean():.3f}")
    lines.append(line + ".")
    permutations = results.metadata.get("n_permutations")
    if permutations:
        lines.append(_reachability(int(permutations), n, level))
    return lines


# What a model with random weights shows, said so that the figures do not contradict it: its text layers
# are deterministic functions of the tokens, and surface form predicts some ratings.
RANDOM_WEIGHTS_CAVEAT = (
    "This run used a model with random weights ({model}). Its numbers are a baseline, not findings. A random "
    "network is not a chance feature generator for words: it still maps each prompt's tokens to fixed vectors, "
    "so its text layers encode surface form (which subword pieces a word is made of, how many tokens it takes) "
    "and surface form predicts some human ratings (long and rare words are rated differently from short, common "
    "ones). Scores above the permutation null at the text layers are therefore expected; a trained model's "
    "findings are what it decodes beyond a random model's.")


def _reachability(permutations: int, n_tests: int, level: float) -> str:
    """Whether the permutation test can pass the FDR threshold at all: with P permutations the smallest p is
    1/(P+1), and Benjamini-Hochberg reaches q < level only when enough probes sit at that smallest p."""
    p_min = 1.0 / (permutations + 1)
    if p_min >= level:
        return (f"With {permutations} permutations the smallest possible p-value is 1/{permutations + 1} = "
                f"{p_min:.3f}, so no probe can pass q < {level:g} whatever it decodes: this count checks the "
                "pipeline; for inference use n_permutations of a few hundred (ExperimentConfig's default is 200).")
    needed = int(np.ceil(n_tests * p_min / level))
    return (f"With {permutations} permutations the smallest possible p-value is {p_min:.4f}: q < {level:g} needs "
            f"at least {needed} of the {n_tests} probes ({needed / n_tests:.0%}) at that smallest p, so weaker effects "
            "need more permutations.")


def _none_significant(row: pd.Series) -> str:
    """A warning for a peak where no attribute passes the FDR threshold: the peak is noise."""
    return "; no attribute there passes the FDR threshold" if row["n_significant"] == 0 else ""


def _over(row: pd.Series, results: ExperimentResults) -> str:
    """'over 201 attributes', saying why when some attributes of the norms got no score."""
    scored, total = int(row["n_targets"]), len(results.targets)
    if scored >= total:
        return f"over {scored} attributes"
    return (f"over the {scored} of {total} attributes with a score; the other {total - scored} have none, as a "
            "correlation needs ratings and predictions that vary within each test fold")


def _peaks(results: ExperimentResults, site: str | None) -> list[str]:
    lines = []
    text = decoding.best(results.profile, "text")
    if text is not None:
        lines.append(f"Among the text-encoder layers, decoding peaks at {_where(text)} (mean r = {text['score']:.3f} "
                     f"{_over(text, results)}{_none_significant(text)}).")
    lines += _tower_peaks(results)
    sampled = decoding.best(results.profile, SAMPLED_STAGES)
    if sampled is not None:
        line = f"After the text encoder, decoding peaks at {_where(sampled)} (mean r = {sampled['score']:.3f}"
        if text is not None:
            gap = sampled["score"] - text["score"]
            line += f", {abs(gap):.3f} {'above' if gap > 0 else 'below'} the best text layer"
        lines.append(line + f"{_none_significant(sampled)}).")
    if site is not None:
        trend = _trend(along_steps(results.profile, site, "score"), "score")
        if trend:
            lines.append(f"Along the reverse diffusion, mean decoding at {decoding.short_site(site)} {trend[0]}.")
    return lines


def _tower_peaks(results: ExperimentResults) -> list[str]:
    """With two text towers (SDXL's CLIP ViT-L and OpenCLIP bigG), each one's peak: which tower carries the
    attributes is a finding of its own, and the overall best layer names only one of them."""
    text = results.profile[results.profile["stage"] == "text"]
    towers = decoding.text_towers(text["site"])
    if len(towers) < 2:
        return []
    peaks = [decoding.best(text[text["site"].str.startswith(f"{tower}.")], "text") for tower in towers]
    return ["Per text encoder, decoding peaks at " + "; ".join(
        f"{tower}: {_where(row)} (mean r = {row['score']:.3f})" for tower, row in zip(towers, peaks)
        if row is not None) + "."]


def _listed(rows: pd.DataFrame) -> str:
    return ", ".join(f"{group} ({difference:+.2f})" for group, difference in rows[["group", "difference"]].values)


def _standouts(results: ExperimentResults, level: float) -> list[str]:
    lines = []
    test = f"group-label permutation test, q < {level:g}"
    for stage in ("text", SAMPLED_STAGES):
        row = decoding.best(results.profile, stage)
        if row is None:
            continue
        groups = results.groups[results.groups["feature_set"] == row["feature_set"]]
        significant = groups[groups["q"] < level].sort_values("difference", ascending=False)
        if significant.empty:
            lines.append(f"At {_where(row)}, no attribute group differs significantly from the average ({test}).")
            continue
        better, worse = significant[significant["difference"] > 0], significant[significant["difference"] < 0]
        parts = ([f"{_listed(better)} are decoded better than the average attribute"] if len(better) else []) + \
                ([f"{_listed(worse)} worse"] if len(worse) else [])
        lines.append(f"At {_where(row)}, {' and '.join(parts)} (difference in mean r; {test}).")
    return lines


def _entanglement(results: ExperimentResults, site: str | None) -> list[str]:
    lines = []
    text = decoding.best(results.profile, "text")
    if text is not None:
        similarity = results.similarity.set_index("feature_set")["similarity"].get(text["feature_set"])
        if similarity is not None and np.isfinite(similarity):
            line = (f"At the best text layer, the predicted attributes correlate like the human ratings do to "
                    f"Spearman rho = {similarity:.2f} (1 = the same structure)")
            if text["n_significant"] == 0:
                line += f", but no attribute is decoded there: {_FOLD_MEANS}"
            lines.append(line + ".")
    if site is None:
        return lines
    label = decoding.short_site(site)
    similarity = _trend(along_steps(results.similarity, site, "similarity"), "similarity")
    if similarity:
        lines.append(f"Along the reverse diffusion at {label}, the similarity to the human correlations "
                     f"{similarity[0]}.")
    trend = _trend(along_steps(results.confusability, site, "entanglement"), "entanglement")
    if trend is None:
        lines.append(f"No entanglement trend at {label}: fewer than 3 steps have an attribute whose own probe "
                     "decodes it well enough for the confusability ratio to mean anything.")
        return lines
    words, rho = trend
    meaning = ("attributes become harder to tell apart as denoising proceeds" if rho >= _TREND_RHO else
               "attributes become easier to tell apart as denoising proceeds" if rho <= -_TREND_RHO else
               "no consistent change in how well attributes can be told apart")
    human = disentanglement.entanglement_index(results.human_correlation)
    lines.append(f"The entanglement index (mean off-diagonal confusability) at {label} {words}: {meaning}. "
                 f"A probe that reproduced the human ratings exactly would score {human:.2f}.")
    return lines


def summarize(results: ExperimentResults, level: float = 0.05, focus_site: str | None = None) -> list[str]:
    """Plain-language sentences on what the numbers show, most important first.

    level: the FDR level called significant; focus_site: the sampled site whose steps the trends
    follow (default: `ExperimentResults.focus_site`)."""
    site = results.focus_site(focus_site)
    return [*_significance(results, level), *_peaks(results, site), *_standouts(results, level),
            *_entanglement(results, site)]
