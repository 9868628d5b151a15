"""`jaxprobe steer` / probe_steer (issue 15, item 3): steering along a norms probe's direction, on a tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from sklearn.linear_model import Ridge
from typer.testing import CliRunner

import jaxprobe
from jaxprobe.cli import app
from jaxprobe.errors import InputError, SiteError
from jaxprobe.features.steering import steered_generations
from jaxprobe.studies.norms_probing.experiment import IMAGE_SITE, ExperimentConfig, run_experiment, study_features, study_norms
from jaxprobe.studies.norms_probing.steer import fit_probe, probe_steer, read_study, steering_vector

pytestmark = pytest.mark.xdist_group("probe_steer")   # one process builds the run the tests share
SITE = "unet.mid_block@0"
ATTRIBUTES = ["Happy", "Vision"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smallest run the experiment accepts that has a sampled site at several steps and image embeddings."""
    root = tmp_path_factory.mktemp("steer")
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(vision).save_pretrained(root / "vision")
    config = ExperimentConfig(max_concepts=12, num_inference_steps=2, n_permutations=0, n_bootstrap=20, outer_cv=3,
                              inner_cv=3, unet_sites=("unet.mid_block",), variance=False,
                              text_sites=("text_encoder.text_model.final_layer_norm",),
                              image_encoder=str(root / "vision"), out=str(root / "run"), cache=str(root / "cache"))
    run_experiment(config, progress=False, log=lambda _: None)
    pipe = jaxprobe.load("tiny", image_encoder=root / "vision")
    page = probe_steer(config.out, SITE, ATTRIBUTES, scales=(0, 4), n_prompts=3, pipe=pipe, log=lambda _: None)
    return config, pipe, page


def test_probe_steer_writes_the_dose_response_table_figures_and_page(study):
    config, _, page = study
    folder = page.parent
    assert folder == Path(config.out) / "steer" / SITE / "Happy+Vision"
    table = pd.read_parquet(folder / "steer.parquet")
    assert pd.read_csv(folder / "steer.csv").shape == table.shape
    assert set(table["attribute"]) == set(ATTRIBUTES) and set(table["measure"]) == {"image", "readout"}
    assert set(table["readout"]) == {"unet.mid_block@2", IMAGE_SITE}   # the same site at the run's last step
    assert len(table) == 2 * 2 * 2 and (table["n"] == 3).all()
    base = table[table["scale"] == 0]
    assert (base["change"] == 0).all() and base["ci_low"].notna().all()
    groups = {g for g in table["group"]}
    figures = {p.name for p in (folder / "figures").iterdir()}
    assert {f"dose_response_{g}.png" for g in groups} | {"grid_Happy.png", "grid_Vision.png"} <= figures
    html = page.read_text()
    assert html.count("data:image/png;base64") == len(groups) + 2 and "Random weights" in html


def test_scale_zero_is_the_unsteered_generation_bit_for_bit(study):
    config, pipe, _ = study
    prompts = ["a photo of a cat", "a photo of a dog"]
    options = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale)
    images, feats = pipe.generate(prompts, sites=["unet.mid_block"], seed=0, **options)
    vector = np.random.default_rng(0).standard_normal(feats["unet.mid_block"].shape[-1]).astype(np.float32)
    run, = steered_generations(pipe, prompts, "unet.mid_block", vector, scales=[0.0], steps=[0],
                               sites=["unet.mid_block"], seeds=[0], log=lambda _: None, **options)
    np.testing.assert_array_equal(run.images, images)
    np.testing.assert_array_equal(run.features["unet.mid_block"], feats["unet.mid_block"])


def test_the_direction_is_the_refit_probe_over_the_feature_std(study):
    config, pipe, _ = study
    _, table = read_study(config.out)
    norms = study_norms(config)
    feats, rows = study_features(config, pipe, norms, sampled_sites=["unet.mid_block"], progress=False)
    x = np.asarray(feats["unet.mid_block"][:, 0], np.float64)
    y = norms.to_frame().iloc[rows]["Happy"].to_numpy(float)
    alpha = float(table.query("feature_set == @SITE and target == 'Happy'")["alpha"].iloc[0])
    probe = fit_probe(x, y, alpha, feature_set=SITE, attribute="Happy")
    vector, spread = steering_vector(probe, x)

    std = x.std(0)
    reference = Ridge(alpha=alpha).fit((x - x.mean(0)) / std, y).coef_ / std   # sklearn, standardized features
    np.testing.assert_allclose(probe.std, std, rtol=1e-4)
    np.testing.assert_allclose(probe.coef, reference, rtol=2e-3, atol=1e-6 * np.abs(reference).max())
    np.testing.assert_allclose(vector / spread, reference / np.linalg.norm(reference), atol=1e-4)
    np.testing.assert_allclose(spread, np.std(x @ (reference / np.linalg.norm(reference))), rtol=1e-3)
    # and the same fit as our RidgeCV given only that alpha, on the standardized features
    ours = jaxprobe.RidgeCV(alphas=[alpha], cv=3).fit((x - x.mean(0)) / std, y)
    np.testing.assert_allclose(probe.coef, ours.coef_ / std, rtol=2e-3, atol=1e-6 * np.abs(reference).max())


@pytest.mark.slow
def test_cli_steer_writes_the_table_figure_and_page(study, tmp_path):
    config, _, _ = study
    result = CliRunner().invoke(app, ["steer", "--probe", config.out, "--site", SITE, "-a", "Happy", "--scales",
                                      "0,2", "--n-prompts", "2", "--readout", "unet.mid_block@1", "--out",
                                      str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "steer.parquet").is_file() and (tmp_path / "cli" / "steer.html").is_file()
    assert list((tmp_path / "cli" / "figures").glob("dose_response_*.png"))
    assert set(pd.read_csv(tmp_path / "cli" / "steer.csv")["readout"]) == {"unet.mid_block@1", IMAGE_SITE}


def test_bad_input_gives_named_errors_that_say_how_to_fix_it(study, tmp_path):
    config, _, _ = study
    with pytest.raises(SiteError, match=r"no feature set of this run.*unet.mid_block@"):
        probe_steer(config.out, "unet.middle_block@0", ["Happy"])
    with pytest.raises(InputError, match=r"'Hapy' is not in the run's norms.*Happy"):
        probe_steer(config.out, SITE, ["Hapy"])
    with pytest.raises(InputError, match=r"not a norms-probing results folder.*jaxprobe run"):
        probe_steer(tmp_path, SITE, ["Happy"])
    result = CliRunner().invoke(app, ["steer", "--probe", str(tmp_path), "--site", SITE, "-a", "Happy"])
    assert result.exit_code != 0 and "jaxprobe run" in result.output
