"""Directions in h-space (Decoding Diffusion): planted directions and associations are recovered on synthetic
features, bootstrap intervals cover the truth at about the nominal rate, k-means finds planted clusters;
then build -> score -> report end to end on the tiny model, through the CLI and a config file."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jaxprobe.studies.decoding_diffusion import directions
from jaxprobe.studies.decoding_diffusion import maths
from jaxprobe.studies.decoding_diffusion import report as report_module
from jaxprobe.cli import app
from jaxprobe.errors import InputError
from jaxprobe.probes.stats import percentile_interval

pytestmark = pytest.mark.xdist_group("directions")   # one process builds the study the tests share

T, D = 3, 24


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sample(rng: np.random.Generator, means_ctd: np.ndarray, per: int, noise: float = 1.0):
    labels = np.repeat(np.arange(len(means_ctd)), per)
    return (means_ctd[labels] + noise * rng.normal(size=(len(labels), *means_ctd.shape[1:]))).astype(np.float32), labels


def test_planted_directions_are_recovered():
    rng = np.random.default_rng(0)
    C = 5                                               # 4 concepts + the neutral set (last)
    base = rng.normal(size=(T, D))
    planted = _unit(rng.normal(size=(C - 1, T, D)))     # a different direction per concept and step
    means = np.concatenate([base + 8.0 * planted, base[None]])
    # anisotropic noise (sd 0.3 to 1.5 along random axes): whitening should find Sigma^-1 (mu_c - mu_neutral)
    rotation, _ = np.linalg.qr(rng.normal(size=(D, D)))
    sd = np.linspace(0.3, 1.5, D)
    labels = np.repeat(np.arange(C), 100)
    features = (means[labels] + (rng.normal(size=(len(labels), T, D)) * sd) @ rotation.T).astype(np.float32)
    precision = rotation @ np.diag(sd**-2) @ rotation.T
    averaging = maths.averaging_matrix(labels, C)
    baseline = maths.baseline_matrix(averaging, "neutral", C - 1)
    for metric, truth in ((None, planted), (maths.whitening_metric(maths.pooled_covariance(features, averaging), 0.05),
                                            _unit(planted @ precision))):
        dirs, length = maths.concept_directions(features, averaging, baseline, metric)
        cosine = np.sum(np.asarray(dirs)[: C - 1] * truth, -1)
        assert cosine.min() >= 0.95, cosine
        np.testing.assert_allclose(np.linalg.norm(dirs[: C - 1], axis=-1), 1, atol=1e-5)
        np.testing.assert_allclose(length[: C - 1], 8.0, rtol=0.1)
    # "others": the direction is the concept's mean minus the mean of the other concepts' means
    dirs, _ = maths.concept_directions(features, averaging, maths.baseline_matrix(averaging, "others", C - 1))
    expected = _unit(planted - (planted.sum(0, keepdims=True) - planted) / (C - 2))
    assert np.sum(np.asarray(dirs)[: C - 1] * expected, -1).min() >= 0.95
    # "family": only the other members of the same family form the baseline
    family = maths.baseline_matrix(averaging, "family", C - 1, np.array(["a", "a", "b", "b", "n"]))
    np.testing.assert_allclose(family[0], averaging[1])
    with pytest.raises(InputError, match="no other concept"):
        maths.baseline_matrix(averaging, "family", C - 1, np.array(["a", "b", "b", "b", "n"]))


def _planted_associations(rng: np.random.Generator, beta_tq: np.ndarray):
    """Means of queries q (planted association beta[t, q] with the axis a vs b), a, b and a neutral set."""
    Q = beta_tq.shape[1]
    base = rng.normal(size=(T, D))
    mean_a, mean_b = base + 2 * rng.normal(size=(T, D)), base + 2 * rng.normal(size=(T, D))
    delta, mid = mean_a - mean_b, (mean_a + mean_b) / 2
    queries = []
    for q in range(Q):
        off_axis = rng.normal(size=(T, D))
        off_axis -= np.sum(off_axis * delta, -1, keepdims=True) / np.sum(delta * delta, -1, keepdims=True) * delta
        queries.append(mid + beta_tq[:, q, None] / 2 * delta + off_axis)
    return np.stack([*queries, mean_a, mean_b, base])


def test_association_scores_recover_planted_effects_with_nominal_coverage():
    rng = np.random.default_rng(1)
    beta = np.array([[0.6, -0.4, 0.0, 1.0], [0.3, -0.8, 0.2, 0.5], [0.0, 0.9, -0.5, 0.1]])   # (T, Q)
    Q = beta.shape[1]
    means = _planted_associations(rng, beta)
    C = len(means)
    axes = maths.contrast(C, Q, [Q + 1])[None].astype(np.float32)
    n_datasets, per, level = 120, 16, 0.95
    covered, estimates = [], []
    for _ in range(n_datasets):
        features, labels = _sample(rng, means, per)
        plans = np.concatenate([maths.averaging_matrix(labels, C)[None],
                                maths.bootstrap_averaging(rng, 200, labels, C)]).astype(np.float32)
        scores = np.asarray(maths.association_scores(features, plans, axes))[:, :, 0, :Q]      # (1 + B, T, Q)
        low, high = percentile_interval(scores[1:], level)
        covered.append((low <= beta) & (beta <= high))
        estimates.append(scores[0])
    coverage = np.mean(covered)
    assert 0.88 <= coverage <= 0.99, coverage
    assert np.mean(covered, 0).min() >= 0.75                              # no (step, query) badly off
    strong = np.abs(beta) >= 0.3
    signs_right = np.mean(np.sign(np.array(estimates)) == np.sign(beta), 0)
    assert signs_right[strong].min() >= 0.95
    np.testing.assert_allclose(np.mean(estimates, 0), beta, atol=0.1)

    # a generation's position on the axis averages to its concept's association (with or without whitening)
    features, labels = _sample(rng, means, per)
    averaging = maths.averaging_matrix(labels, C).astype(np.float32)
    metric = maths.whitening_metric(maths.pooled_covariance(features, averaging), 0.2)
    for m in (None, metric):
        per_generation = np.asarray(maths.generation_scores(features, averaging, axes, m))
        concept = np.asarray(maths.association_scores(features, averaging[None], axes, m))[0, :, 0]
        np.testing.assert_allclose(averaging @ per_generation[:, :, 0], concept.T, atol=1e-4)
        np.testing.assert_allclose(concept[:, Q:Q + 2], np.tile([1.0, -1.0], (T, 1)), atol=1e-4)  # the poles


def test_kmeans_finds_planted_clusters_and_labels_them_with_their_directions():
    rng = np.random.default_rng(2)
    planted = _unit(rng.normal(size=(3, D)))
    x = np.concatenate([6 * p + rng.normal(size=(30, D)) for p in planted]).astype(np.float32)
    truth = np.repeat(np.arange(3), 30)
    centroids, labels, inertia = maths.kmeans(x, jax.random.key(0), 3)
    labels = np.asarray(labels)
    pairs = set(zip(truth, labels))
    assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3          # the same partition up to names
    nearest = np.asarray(maths.nearest_directions(centroids, x.mean(0), planted))
    for true_cluster, found in pairs:
        assert np.argmax(nearest[found]) == true_cluster
    assert float(inertia) < 1.3 * 90 * D


def test_config_files_and_bad_input(tmp_path):
    example = directions.DirectionsConfig.example()
    assert [a[2] for a in example.axes] == ["man vs woman", "young person vs old person"]
    path = tmp_path / "study.toml"
    path.write_text(example.to_toml())
    assert directions.DirectionsConfig.from_toml(path) == example
    three = dataclasses.replace(example, families={**example.families, "age": ("child", "adult", "elder")})
    assert [a[2] for a in three.axes][1:] == ["child vs rest", "adult vs rest", "elder vs rest"]
    for bad, message in (({"associations": [["professions", "nope"]]}, "query family and an attribute family"),
                         ({"families": {"a": ["x", "y"], "b": ["y", "z"]}}, "give each concept one family"),
                         ({"families": {"a": ["x", "y"], "b": ["z"]}, "associations": [["a", "b"]]}, "two concepts"),
                         ({"baseline": "everyone"}, "baseline must be"), ({"templates": ["a photo"]}, "placeholder"),
                         ({"whiten": True, "spatial_reduce": "none"}, "spatial maps")):
        with pytest.raises(InputError, match=message):
            directions.DirectionsConfig.from_mapping({"families": example.families, **bad})
    path.write_text("[directions]\nbasline = 'others'\n")
    with pytest.raises(InputError, match="unknown setting"):
        directions.DirectionsConfig.from_toml(path)
    result = CliRunner().invoke(app, ["directions", "build", str(path)])
    assert result.exit_code == 2 and "unknown setting" in result.output
    assert all(c in CliRunner().invoke(app, ["directions", "--help"]).output for c in ("build", "score", "report"))


# --- end to end on the tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small study written as a TOML file and run through `jaxprobe directions build` and `score`."""
    from PIL import Image

    root = tmp_path_factory.mktemp("directions")
    rng = np.random.default_rng(0)
    # six prompts, six images, six extra prompts: one initial-noise program serves them all
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    pd.DataFrame({"image": [f"im{i}.png" for i in range(6)],
                  "caption": ["a red car", "a blue car", "a car", "a small dog", "a black dog", "a dog"],
                  "concept": ["car"] * 3 + ["dog"] * 3}).to_csv(root / "captions.csv", index=False)
    (root / "nurse.txt").write_text("a photo of a nurse\na nurse at work\n")
    (root / "study.toml").write_text(f"""
[directions]
templates = ["a photo of a {{concept}}"]
neutral_prompts = ["a photo of a person"]
seeds = [0, 1]
num_inference_steps = 3
batch_size = 8
n_bootstrap = 50
n_clusters = 2
associations = [["professions", "gender"]]
images = "captions.csv"
out = "{root / 'out'}"
cache = "{root / 'cache'}"
[directions.families]
professions = ["doctor", "nurse"]
gender = ["man", "woman"]
[directions.prompt_files]
nurse = "nurse.txt"
""")
    (root / "extra.txt").write_text("".join(f"a photo of a {job}\n" for job in
                                            ("pilot", "cook", "judge", "farmer", "baker", "singer")))
    runner = CliRunner()
    pipe = directions.load_pipeline(directions.DirectionsConfig.from_toml(root / "study.toml"))
    with pytest.MonkeyPatch.context() as patch:  # one tiny pipeline for every command (loading takes seconds)
        patch.setattr(directions, "load_pipeline", lambda config: pipe)
        for command in (["build", str(root / "study.toml")],
                        ["score", str(root / "study.toml"), "--prompts", str(root / "extra.txt")]):
            result = runner.invoke(app, ["directions", *command])
            assert result.exit_code == 0, result.output
    return root, directions.DirectionsConfig.from_toml(root / "study.toml"), pipe


def test_build_and_score_write_directions_associations_and_clusters(study):
    root, config, pipe = study
    out = root / "out"
    saved = directions.read_directions(out)
    concepts = [str(c) for c in saved["concepts"]]
    assert concepts == ["doctor", "nurse", "man", "woman", directions.NEUTRAL]
    dirs = saved["site/unet.mid_block"]
    assert dirs.shape == (5, 4, 64)                          # PNDM: 3 steps, 4 UNet evaluations
    np.testing.assert_allclose(np.linalg.norm(dirs[:-1], axis=-1), 1, atol=1e-5)
    assert not dirs[-1].any()                                # the neutral set is its own baseline
    assert saved["text"].shape == (5, 64) and saved["images/unet.mid_block"].shape == (2, 64)
    prompts = pd.read_parquet(out / "prompts.parquet")
    assert (prompts["concept"] == "nurse").sum() == 4        # the prompt file's two lines x two seeds
    assoc = pd.read_parquet(out / "associations.parquet")
    assert len(assoc) == 4 * 2 and set(assoc["query"]) == {"doctor", "nurse"} and set(assoc["axis"]) == {"man vs woman"}
    assert (assoc["ci_low"] <= assoc["ci_high"]).all() and assoc[["score", "clip_score", "delta"]].notna().all().all()
    np.testing.assert_allclose(assoc["delta"], assoc["score"] - assoc["clip_score"], atol=1e-5)
    assert set(assoc.groupby(["step"])["rank"].apply(frozenset)) == {frozenset({1, 2})}
    gens = pd.read_parquet(out / "generations.parquet")
    assert len(gens) == 12 * 4 and {"cluster", "pc1", "dir:man", "axis:man vs woman"} <= set(gens.columns)
    # the mean position of a query's generations on the axis is its association score
    step0 = gens[(gens["step"] == 0) & (gens["concept"] == "doctor")]["axis:man vs woman"].mean()
    assert step0 == pytest.approx(assoc[(assoc["step"] == 0) & (assoc["query"] == "doctor")]["score"].item(), abs=1e-4)
    clusters = pd.read_parquet(out / "clusters.parquet")
    assert clusters.groupby("step")["size"].sum().eq(12).all()
    image = pd.read_parquet(out / "image_directions.parquet")
    assert len(image) == 2 * 4 and image["cos_image_caption"].between(-1, 1).all()
    extra = pd.read_parquet(out / "prompt_projections.parquet")
    assert len(extra) == 6 * 2 * 4 and extra["prompt"].str.startswith("a photo of a ").all()
    assert {"dir:man", "dir:woman"} <= set(extra.columns)


def test_report_and_resume_from_the_feature_cache(study, monkeypatch):
    root, config, pipe = study
    out = root / "out"
    result = CliRunner().invoke(app, ["directions", "report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64") >= 4 and "Random weights" in page and "CLIP text space" in page
    # the --prompts queries of `score` are on the page (a figure and a table), not only in a CSV
    assert (out / "figures" / "query_projections.png").is_file() and "a photo of a pilot" in page
    # captions name only what is drawn: the dashed image-caption line only where there are image directions
    assert "image and caption directions" in page  # this study has images: the dashed line is drawn
    tables, meta = report_module.read_tables(out)
    no_images = {k: v for k, v in tables.items() if k != "image_directions"}
    assert "image" not in report_module.FIGURES["direction_stability"][1](no_images, meta)
    effects = pd.Series(["no clear change"] * 12 + ["amplifies"] * 3)
    sentence = report_module._unet_effect_sentence(effects)
    assert "no clear change 12" not in sentence and sentence.endswith("the UNet amplifies the association in 3.")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["axes"] == ["man vs woman"]
    # what was loaded (the pipeline's provenance, as the norms experiment records it), in the settings too
    assert meta["loaded"] == pipe.provenance and pipe.provenance["source"] == pipe.source
    assert f"source: {pipe.provenance['source']}; dtype: {pipe.provenance['dtype']}" in page

    import jaxprobe.pipeline.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("features were recomputed although cached")

    monkeypatch.setattr(jaxprobe.Pipeline, "capture", refuse)
    directions.score(dataclasses.replace(config, n_bootstrap=20), pipe=pipe, log=lambda _: None)
    result = CliRunner().invoke(app, ["directions", "score", str(root / "study.toml"), "--out", str(root / "none")])
    assert result.exit_code == 2 and "directions build" in result.output
