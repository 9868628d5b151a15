"""Analyses on synthetic probe results with planted structure: the planted effect must be found, and
nothing else.

`synthetic_run` builds a whole small experiment (text layers, UNet sites x steps, a group decoded
better than the rest, entanglement rising along the steps); test_report.py renders it.
"""

from __future__ import annotations

import dataclasses
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from jaxprobe.studies.norms_probing import decoding, disentanglement, groups, summary
from jaxprobe.studies.norms_probing.summary import ExperimentResults, summarize
from jaxprobe.errors import InputError
from jaxprobe.probes.stats import fdr_bh

TEXT = "text_encoder.text_model."
GROUPS = {f"{g.lower()}{i}": g for g in ("Vision", "Audition", "Social") for i in range(4)}


def _table(scores: np.ndarray, feature_sets: list[str], sites: list[str], steps: list[int],
           target_groups: dict[str, str]) -> pd.DataFrame:
    """A probe table around scores (F, t), in probe_sweep's layout."""
    F, t = scores.shape
    targets = list(target_groups)
    return pd.DataFrame({
        "feature_set": np.repeat(feature_sets, t), "site": np.repeat(sites, t), "timestep": np.repeat(steps, t),
        "target": np.tile(targets, F), "group": np.tile([target_groups[a] for a in targets], F),
        "alpha": 1.0, "score": scores.ravel(),
    })


def _ratings(rng: np.random.Generator, n: int, t: int, missing: float = 0.05) -> np.ndarray:
    """(n, t) correlated ratings (3 latent factors), a few missing."""
    Y = rng.normal(size=(n, 3)) @ rng.normal(size=(3, t)) + rng.normal(size=(n, t))
    Y[rng.random((n, t)) < missing] = np.nan
    return Y


def synthetic_run(*, random_weights: bool = False, seed: int = 0) -> ExperimentResults:
    """A small experiment: 5 text sites (decoding rising to `final_layer_norm`), mid_block, up_blocks.1 and
    latents over 5 steps (decoding rising with the step, best at mid_block; entanglement rising at
    up_blocks.1); Vision decoded better than the other groups everywhere."""
    rng = np.random.default_rng(seed)
    n, targets = 150, list(GROUPS)
    t = len(targets)
    Y = _ratings(rng, n, t)
    z = (Y - np.nanmean(Y, 0)) / np.nanstd(Y, 0)
    sites = [f"{TEXT}embeddings", *(f"{TEXT}encoder.layers.{i}" for i in range(3)), f"{TEXT}final_layer_norm"]
    # (feature set, site, step, noise sd, weight of a blend of all attributes that every probe picks up)
    rows = [(s, s, -1, 2.0 - 0.3 * i, 0.0) for i, s in enumerate(sites)]
    for site, noise, drop, blending in (("unet.mid_block", 2.0, 0.45, 0.0), ("unet.up_blocks.1", 2.5, 0.3, 0.4),
                                        ("latents", 3.0, 0.45, 0.0)):
        rows += [(f"{site}@{k}", site, k, noise - drop * k, blending * k) for k in range(5)]
    feature_sets, site_of, steps, noise, mixing = map(list, zip(*rows))

    vision = np.array([GROUPS[a] == "Vision" for a in targets])
    noise = np.array(noise)[:, None, None] * np.where(vision, 0.4, 1.0)  # (F, 1, t)
    z = np.nan_to_num(z)
    blend = z.mean(1, keepdims=True) / z.mean(1).std()
    P = z + np.array(mixing)[:, None, None] * blend + noise * rng.normal(size=(len(rows), n, t))
    P = np.where(np.isnan(Y), np.nan, P)  # probe_sweep leaves missing targets unpredicted

    scores = np.diagonal(disentanglement.pairwise_pearson(P, Y), axis1=-2, axis2=-1)
    table = _table(scores, feature_sets, site_of, steps, GROUPS)
    table["r2"] = table["score"] ** 2
    table["ci_low"], table["ci_high"] = table["score"] - 0.1, table["score"] + 0.1
    table["p"] = np.where(table["score"] > 0.25, 0.001, rng.uniform(size=len(table)))
    table["q"] = fdr_bh(table["p"].to_numpy())
    table["null_mean"], table["null_high"] = -0.01, 0.18
    dropped = pd.DataFrame({"concept": ["mink (coat)"], "reason": ["not among the prompted concepts"]})
    return ExperimentResults.build(
        table=table, predictions=P, Y=Y, feature_sets=feature_sets, targets=targets, target_groups=GROUPS,
        group_table=groups.group_decoding(table, n_permutations=2000, seed=seed),
        similarity=disentanglement.correlation_similarity(P, Y, feature_sets),
        confusability=disentanglement.confusability(P, Y, feature_sets),
        metadata={"model": "tiny" if random_weights else "synthetic", "random_weights": random_weights,
                  "norms": "synthetic", "citation": "Doe (2024). Synthetic norms.", "n_concepts": n,
                  "templates": ["a photo of a {concept}"], "seeds": [0], "timings_s": {"probe": 1.5},
                  "dropped": dropped})


@pytest.fixture(scope="module")
def run() -> ExperimentResults:
    return synthetic_run()


# --- decoding profile and sites ------------------------------------------------------------------------


def test_stages_and_pipeline_order():
    sites = ["unet.up_blocks.0", "latents", f"{TEXT}final_layer_norm", "unet.mid_block", f"{TEXT}encoder.layers.10",
             "image_encoder.visual_projection", f"{TEXT}encoder.layers.2", "unet.down_blocks.1", f"{TEXT}embeddings"]
    assert decoding.site_order(sites) == [
        f"{TEXT}embeddings", f"{TEXT}encoder.layers.2", f"{TEXT}encoder.layers.10", f"{TEXT}final_layer_norm",
        "unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0", "latents", "image_encoder.visual_projection"]
    assert [decoding.stage_of(s) for s in ("pred_original_sample", "unet.mid_block", f"{TEXT}embeddings")] == \
        ["latent", "unet", "text"]
    with pytest.raises(InputError, match="text_encoder"):
        decoding.stage_of("vae.decoder")


def test_profile_averages_over_targets_ignoring_missing_scores():
    scores = np.array([[0.1, 0.3, np.nan], [0.5, 0.7, 0.9]])
    table = _table(scores, ["unet.mid_block@0", "unet.mid_block@1"], ["unet.mid_block"] * 2, [0, 1],
                   {"a": "G", "b": "G", "c": "H"})
    table["ci_low"], table["ci_high"], table["q"] = table["score"] - 0.1, table["score"] + 0.2, [0.01, 0.2, 0.01] * 2
    profile = decoding.decoding_profile(table)
    np.testing.assert_allclose(profile["score"], [0.2, 0.7])
    np.testing.assert_allclose(profile["ci_high"], [0.4, 0.9])
    assert profile["n_targets"].tolist() == [2, 3]
    assert profile["n_significant"].tolist() == [2, 2]
    assert profile["stage"].tolist() == ["unet", "unet"]
    assert "null_mean" not in profile  # only when the table has a null


# --- groups ----------------------------------------------------------------------------------------------


def _group_table(rng, planted: float, n_sets: int = 3) -> pd.DataFrame:
    target_groups = {f"{g}{i}": g for g in "ABCD" for i in range(8)}
    scores = rng.normal(0.3, 0.05, size=(n_sets, len(target_groups)))
    scores[:, [g == "B" for g in target_groups.values()]] += planted
    names = [f"unet.mid_block@{k}" for k in range(n_sets)]
    return _table(scores, names, ["unet.mid_block"] * n_sets, list(range(n_sets)), target_groups)


def test_planted_group_is_flagged_and_only_it():
    out = groups.group_decoding(_group_table(np.random.default_rng(0), planted=0.25), n_permutations=2000)
    flagged = out[out["q"] < 0.05]
    assert set(flagged.loc[flagged["difference"] > 0, "group"]) == {"B"}
    b = out[out["group"] == "B"]
    assert len(b) == 3 and (b["q"] < 0.01).all() and (b["difference"] > 0.15).all()
    assert (out["n_targets"] == 8).all()


def test_no_planted_group_flags_nothing():
    out = groups.group_decoding(_group_table(np.random.default_rng(1), planted=0.0), n_permutations=2000)
    assert (out["q"] >= 0.05).all()


def test_group_means_and_difference_ignore_missing_scores():
    table = _group_table(np.random.default_rng(2), planted=0.1)
    table.loc[[0, 9, 40], "score"] = np.nan
    out = groups.group_decoding(table, n_permutations=10).set_index(["feature_set", "group"])
    expected = table.groupby(["feature_set", "group"])["score"].mean()
    overall = table.groupby("feature_set")["score"].mean()
    np.testing.assert_allclose(out["group_score"], expected.loc[out.index])
    np.testing.assert_allclose(out["mean_score"], overall.loc[out.index.get_level_values(0)])
    np.testing.assert_allclose(out["difference"], out["group_score"] - out["mean_score"])
    assert out.loc[("unet.mid_block@0", "A"), "n_targets"] == 7


def test_permutation_p_matches_exact_enumeration():
    """Six targets in three pairs: the exact null is the 15 pairs of targets."""
    scores = np.array([[0.9, 0.8, 0.2, 0.1, 0.5, 0.45]])
    table = _table(scores, ["x"], ["unet.mid_block"], [0], {"a": "G", "b": "G", "c": "H", "d": "H", "e": "I", "f": "I"})
    out = groups.group_decoding(table, n_permutations=20_000, seed=3)
    mean = scores.mean()
    pair_diffs = np.array([abs(scores[0, list(pair)].mean() - mean) for pair in combinations(range(6), 2)])
    for group, observed in zip("GHI", (scores[0, :2], scores[0, 2:4], scores[0, 4:])):
        exact = (pair_diffs >= abs(observed.mean() - mean) - 1e-12).mean()
        assert out.set_index("group").loc[group, "p"] == pytest.approx(exact, abs=0.015)


def test_group_decoding_needs_groups():
    table = _group_table(np.random.default_rng(0), planted=0.0).assign(group=None)
    with pytest.raises(InputError, match="target_groups"):
        groups.group_decoding(table)


# --- correlation similarity ------------------------------------------------------------------------------


def test_human_correlation_is_pairwise_complete():
    Y = _ratings(np.random.default_rng(0), 50, 6, missing=0.2)
    human, _ = disentanglement.correlation_matrices(Y[None], Y)
    np.testing.assert_allclose(human, pd.DataFrame(Y).corr().to_numpy(), atol=1e-5)


def test_similarity_is_one_for_the_human_structure_and_falls_with_noise():
    rng = np.random.default_rng(0)
    Y = _ratings(rng, 120, 10)
    scale = rng.uniform(0.5, 2.0, size=10)
    noise = rng.normal(size=(120, 10))
    P = np.stack([3.0 + scale * Y, Y + 0.5 * noise, Y + 2.0 * noise, rng.normal(size=Y.shape)])
    human, predicted = disentanglement.correlation_matrices(P, Y)
    np.testing.assert_allclose(predicted[0], human, atol=1e-5)
    sim = disentanglement.correlation_similarity(P, Y, ["same", "noisy", "noisier", "unrelated"])
    assert sim["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert sim["similarity"].iloc[0] > sim["similarity"].iloc[1] > sim["similarity"].iloc[2]
    assert abs(sim["similarity"].iloc[3]) < 0.3
    assert (sim["n_pairs"] == 45).all()


# --- confusability ---------------------------------------------------------------------------------------


def test_exact_probes_give_the_human_correlations():
    Y = _ratings(np.random.default_rng(0), 100, 8)
    summary_table, C = disentanglement.confusability(Y[None], Y, ["exact"])
    human, _ = disentanglement.correlation_matrices(Y[None], Y)
    np.testing.assert_allclose(C[0], human, atol=1e-5)
    assert summary_table["entanglement"].iloc[0] == pytest.approx(disentanglement.entanglement_index(human), abs=1e-5)
    assert summary_table["n_reliable"].iloc[0] == 8


def test_a_probe_that_predicts_b_better_than_a_is_confused():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(400, 5))  # independent attributes
    P = Y + 0.3 * rng.normal(size=Y.shape)
    P[:, 0] = Y[:, 0] + 1.5 * Y[:, 1]  # attribute 0's probe has learnt mostly attribute 1
    summary_table, C = disentanglement.confusability(P[None], Y, ["f"])
    assert C[0, 0, 1] == pytest.approx(1.5, abs=0.2)
    assert np.abs(C[0, 2:, :][~np.eye(5, dtype=bool)[2:]]).max() < 0.2  # clean probes stay clean
    assert summary_table["frac_confused"].iloc[0] == pytest.approx(1 / 5)


def test_entanglement_rises_with_a_growing_shared_blend():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(200, 6))
    blend = Y.mean(1, keepdims=True)
    P = np.stack([Y + w * blend + 0.3 * rng.normal(size=Y.shape) for w in (0.0, 1.0, 2.0, 4.0)])
    summary_table, _ = disentanglement.confusability(P, Y, list("abcd"))
    assert np.all(np.diff(summary_table["entanglement"]) > 0)


def test_attributes_not_decoded_get_no_confusability():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(200, 4))
    P = Y.copy()
    P[:, 2] = rng.normal(size=200)  # attribute 2's probe decodes nothing
    summary_table, C = disentanglement.confusability(P[None], Y, ["f"], min_score=0.2)
    assert np.isnan(C[0, 2]).all() and np.isfinite(C[0, [0, 1, 3]]).all()
    assert summary_table["n_reliable"].iloc[0] == 3


def test_shapes_are_checked():
    with pytest.raises(InputError, match="same concepts"):
        disentanglement.confusability(np.zeros((2, 5, 3)), np.zeros((6, 3)), ["a", "b"])
    with pytest.raises(InputError, match="names"):
        disentanglement.correlation_similarity(np.zeros((2, 5, 3)), np.zeros((5, 3)), ["a"])


# --- the whole run in words ------------------------------------------------------------------------------


def test_results_carry_stages_and_matrices(run: ExperimentResults):
    F, t = len(run.feature_sets), len(run.targets)
    assert run.predicted_correlation.shape == run.confusion.shape == (F, t, t)
    for frame in (run.profile, run.similarity, run.confusability):
        assert len(frame) == F and {"stage", "site", "timestep"} <= set(frame)
    assert set(run.profile["stage"]) == {"text", "unet", "latent"}
    assert "dropped" not in run.metadata and run.dropped["concept"].tolist() == ["mink (coat)"]


def test_summary_says_what_was_planted(run: ExperimentResults):
    text = " ".join(summarize(run))
    assert "peaks at final_layer_norm" in text
    assert "peaks at mid_block at denoising step 4" in text
    assert "mean decoding at mid_block rises" in text
    assert "Vision (+" in text and "decoded better than the average attribute" in text
    assert "random weights" not in text
    followed = " ".join(summarize(run, focus_site="unet.up_blocks.1"))
    assert "index (mean off-diagonal confusability) at up_blocks.1 rises" in followed
    assert "harder to tell apart" in followed


def test_summary_of_a_random_model_says_so_first():
    lines = summarize(synthetic_run(random_weights=True))
    # what a random model really shows: text layers encode surface form, so scores above the null are expected
    assert "random weights" in lines[0] and "surface form" in lines[0] and "baseline" in lines[0]
    assert "null with mean -0.010 and 95th percentile 0.180" in lines[1]


def test_summary_says_when_the_permutation_test_cannot_reach_the_threshold(run: ExperimentResults):
    def said(permutations: int) -> str:
        return " ".join(summarize(dataclasses.replace(run, metadata={**run.metadata, "n_permutations": permutations})))

    assert "smallest possible p-value is 1/11 = 0.091, so no probe can pass q < 0.05" in said(10)
    n = len(run.table)
    assert f"q < 0.05 needs at least {int(np.ceil(n / 21 / 0.05))} of the {n} probes (95%)" in said(20)
    assert f"q < 0.05 needs at least {int(np.ceil(n / 201 / 0.05))} of the {n} probes" in said(200)


def test_a_curve_that_barely_moves_is_level_whatever_its_rank_correlation():
    curve = pd.DataFrame({"timestep": range(11), "entanglement": 0.49 - 0.0005 * np.arange(11)})
    words, rho = summary._trend(curve, "entanglement")
    assert words.startswith("stays level") and rho == 0.0
    hump = pd.DataFrame({"timestep": range(11), "entanglement": [0.49, 0.55, 0.54, 0.52, *[0.495] * 6, 0.488]})
    words, rho = summary._trend(hump, "entanglement")  # rank-correlated with the step, yet back where it began
    assert "no monotonic trend" in words and "0.49 at step 0 to 0.49 at step 10" in words and rho == 0.0


def test_summary_warns_when_nothing_is_decoded_at_the_peaks(run: ExperimentResults):
    table = run.table.assign(q=1.0)
    text = " ".join(summarize(dataclasses.replace(run, table=table, profile=decoding.decoding_profile(table))))
    assert f"0 of {len(table)} probes" in text
    assert text.count("no attribute there passes the FDR threshold") == 2  # the text and the UNet peak
    assert "not evidence of human-like structure" in text


def test_build_rejects_mismatched_feature_sets(run: ExperimentResults):
    with pytest.raises(InputError, match="feature sets"):
        ExperimentResults.build(
            table=run.table, predictions=np.zeros((1, 2, 3)), Y=np.zeros((2, 3)), feature_sets=["other"],
            targets=list(run.targets), target_groups=run.target_groups, group_table=run.groups,
            similarity=run.similarity, confusability=(run.confusability, run.confusion))


def test_focus_site_defaults_to_the_best_unet_site(run: ExperimentResults):
    assert run.focus_site() == "unet.mid_block"
    assert summary.along_steps(run.profile, "latents", "score")["timestep"].tolist() == list(range(5))
    with pytest.raises(InputError, match="not in the results"):
        run.focus_site("unet.nowhere")
