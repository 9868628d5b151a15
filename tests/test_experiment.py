"""`jaxprobe run` end to end on the tiny model: files, report content, resuming, config files."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from typer.testing import CliRunner

from jaxprobe.cli import app
from jaxprobe.errors import InputError
from jaxprobe.studies.norms_probing.experiment import ExperimentConfig, concept_features, run_experiment
from jaxprobe.features.extract import build_prompts

pytestmark = pytest.mark.xdist_group("experiment")   # one process runs the study the tests share

SMALL = dict(max_concepts=24, num_inference_steps=3, n_permutations=3, n_bootstrap=10, outer_cv=3, inner_cv=3,
             unet_sites=("unet.mid_block", "latents"), templates=("a photo of a {concept}", "a drawing of a {concept}"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config = ExperimentConfig(**SMALL, out=str(root / "out"), cache=str(root / "cache"))
    return config, run_experiment(config, progress=False, log=lambda _: None)


def test_run_writes_tables_figures_and_a_report(finished):
    config, results = finished
    out = config.out
    import pathlib

    out = pathlib.Path(out)
    probes = pd.read_parquet(out / "probes.parquet")
    assert set(probes["target"]) == set(results.targets) and len(results.targets) == 65
    n_steps = 4  # PNDM: 3 steps, 4 UNet evaluations
    text_layers = 6  # embeddings, 4 layers, final layer norm
    assert probes["feature_set"].nunique() == text_layers + 2 * n_steps
    assert {"site", "timestep", "group", "score", "ci_low", "ci_high", "p", "q"} <= set(probes.columns)
    assert (out / "probes.csv").is_file() and (out / "groups.parquet").is_file()
    html = (out / "report.html").read_text()
    assert "random weights" in html.lower() and "permutation" in html.lower()
    assert html.count("data:image/png;base64") >= 4 and "http://" not in html.split("<body", 1)[1].split("cite", 1)[0]
    assert "Binder" in html
    assert ExperimentConfig.from_toml(out / "config.toml") == config


def test_resume_reuses_every_finished_feature(finished, monkeypatch):
    config, _ = finished
    import jaxprobe.pipeline.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("features were recomputed although cached")

    monkeypatch.setattr(jaxprobe.Pipeline, "capture", refuse)
    # other probe settings are another run: into its own folder, the finished one stays (issue 20, item 2)
    run_experiment(dataclasses.replace(config, n_permutations=0, n_bootstrap=0, out=config.out + "-probes-only"),
                   progress=False, log=lambda _: None)
    with pytest.raises(AssertionError, match="recomputed"):
        run_experiment(dataclasses.replace(config, force=True), progress=False, log=lambda _: None)


def test_a_run_with_other_settings_never_replaces_finished_results(finished):
    """Issue 20, item 2: a second run into the same --out with other settings is refused before extraction,
    naming the settings that differ and --force; the finished results are untouched."""
    config, _ = finished
    import pathlib

    report = pathlib.Path(config.out) / "report.html"
    before = report.stat().st_mtime_ns
    with pytest.raises(InputError, match=r"other settings \(num_inference_steps: 3 -> 2\).*--force"):
        run_experiment(dataclasses.replace(config, num_inference_steps=2), progress=False, log=lambda _: None)
    result = CliRunner().invoke(app, ["run", "--out", config.out, "--steps", "2"])
    assert result.exit_code == 2 and "--force" in result.output and "num_inference_steps" in result.output
    assert report.stat().st_mtime_ns == before


def test_config_file_and_cli(tmp_path):
    config_file = tmp_path / "study.toml"
    config_file.write_text('[experiment]\nnorms = "binder"\nmax_concepts = 12\nnum_inference_steps = 2\n'
                           'n_permutations = 0\nn_bootstrap = 0\nouter_cv = 3\ninner_cv = "loo"\n'
                           f'unet_sites = ["unet.mid_block"]\nout = "{tmp_path / "out"}"\ncache = "{tmp_path / "cache"}"\n')
    result = CliRunner().invoke(app, ["run", str(config_file)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.html").is_file()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config_file.write_text("[experiment]\nnum_inference_step = 2\n")
    result = CliRunner().invoke(app, ["run", str(config_file)])
    assert result.exit_code == 2 and "unknown setting" in result.output


def test_prompt_building_and_repeat_averaging():
    prompts = build_prompts(["cat", "dog"], ["a {concept}", "the {concept}"])
    assert prompts.prompts == ("a cat", "the cat", "a dog", "the dog")
    import numpy as np

    feats = {"s": np.arange(8, dtype=np.float32).reshape(4, 2)}
    averaged, rows = concept_features(feats, prompts.concept_index, 2, "average")
    np.testing.assert_allclose(averaged["s"], [[1, 2], [5, 6]])
    kept, rows = concept_features(feats, prompts.concept_index, 2, "keep")
    assert kept["s"].shape == (4, 2) and list(rows) == [0, 0, 1, 1]
    with pytest.raises(InputError, match="placeholder"):
        ExperimentConfig(templates=("a photo",))
