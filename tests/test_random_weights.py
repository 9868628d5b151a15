"""One answer to "does this model have random weights?" (`checkpoints.random.is_random_weights`) for
every report: the bundled random builds by any name the code gives them, and old metadata that said otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from jaxprobe.checkpoints.random import RANDOM_MODELS, is_random_weights
from jaxprobe.studies.decoding_diffusion import report as directions_report
from jaxprobe.studies.norms_probing.summary import ExperimentResults


def test_is_random_weights_knows_the_bundled_random_models_in_every_form():
    for name in RANDOM_MODELS:
        assert is_random_weights(name) and is_random_weights(Path(name))
        assert is_random_weights(SimpleNamespace(source=name))          # a pipeline, by its source
        assert is_random_weights({"model": name, "random_weights": False})  # metadata written before the fix
    for other in ("runwayml/stable-diffusion-v1-5", "checkpoints/sd15", "", None):
        assert not is_random_weights(other) and not is_random_weights(SimpleNamespace(source=other))
    assert is_random_weights({"model": "synthetic", "random_weights": True})
    assert not is_random_weights({"model": "synthetic"})


def test_an_sd15_random_directions_run_is_reported_as_random_weights(tmp_path, monkeypatch):
    meta = {"model": "sd15-random", "random_weights": is_random_weights(SimpleNamespace(source="sd15-random")),
            "sites": ["unet.mid_block"], "focus_step": -1, "level": 0.95}
    assert meta["random_weights"] is True
    lines = directions_report.summarize({"clusters": pd.DataFrame()}, meta)
    assert "random weights" in lines[0] and "sd15-random" in lines[0]
    # the page from saved tables alone (no model; the figures are not what this is about)
    monkeypatch.setattr(directions_report, "make_figures", lambda out, dpi: {})
    for name in ("generations", "clusters", "directions"):
        pd.DataFrame({"site": [], "step": []}).to_parquet(tmp_path / f"{name}.parquet")
    (tmp_path / "metadata.json").write_text(json.dumps({**meta, "random_weights": False}))  # an old run's metadata
    page = directions_report.report(tmp_path).read_text()
    assert "Random weights." in page and page.index("Random weights.") < page.index("What the numbers show")
    (tmp_path / "metadata.json").write_text(json.dumps({**meta, "model": "my/checkpoint", "random_weights": False}))
    assert "Random weights." not in directions_report.report(tmp_path).read_text()


def test_the_experiment_report_asks_the_same_question():
    random_weights = ExperimentResults.random_weights.fget   # the property reads only the metadata
    assert random_weights(SimpleNamespace(metadata={"model": "sd15-random"}))
    assert random_weights(SimpleNamespace(metadata={"model": "tiny", "random_weights": False}))
    assert not random_weights(SimpleNamespace(metadata={"model": "my/checkpoint"}))


def test_the_classify_page_says_random_weights_first(tmp_path):
    import numpy as np

    from jaxprobe.pipeline.images import ImageDataset
    from jaxprobe.studies.revelio.classify import ClassifyConfig, comparison_table, write_outputs

    dataset = ImageDataset(root=tmp_path, classes=("a", "b"), paths=(tmp_path / "1.png", tmp_path / "2.png"),
                           labels=np.array([0, 1]), is_test=np.array([False, True]))
    table = comparison_table([{"site": "unet.mid_block", "t": 25, "classifier": "linear", "accuracy": 1.0,
                               "ci_low": 0.2, "ci_high": 1.0, "n_test": 1, "n_train": 1, "n_classes": 2}])
    for model, expected in (("sd15-random", True), ("my/checkpoint", False)):
        config = ClassifyConfig(data=str(tmp_path), model=model, out=str(tmp_path / model.replace("/", "_")))
        page = write_outputs(table, config, dataset)["report"].read_text()
        assert ("Random weights." in page) is expected
        assert ClassifyConfig.from_toml(Path(config.out) / "config.toml") == config
