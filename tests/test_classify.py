"""Classifiers on diffusion features of real images: image folders, the cached features, both
classifiers on a separable set of coloured shapes through the tiny model, the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import jaxprobe
from jaxprobe.pipeline import sampling
from jaxprobe.studies.revelio.classify import (
    ClassifyConfig,
    ConvHeadConfig,
    run_classification,
    train_conv_head,
    wilson_interval,
)
from jaxprobe.features.extract import image_features
from jaxprobe.cli import app
from jaxprobe.errors import InputError
from jaxprobe.pipeline.images import load_image_folder

pytestmark = pytest.mark.xdist_group("classify")   # one process runs the classification the tests share

SHAPES = {"red_circle": ((220, 40, 40), "circle"), "green_square": ((40, 200, 60), "square"),
          "blue_triangle": ((50, 70, 230), "triangle")}
SITES = ("unet.mid_block", "unet.up_blocks.0")   # equal widths: one vmapped linear fit
STEPS = (10, 25)
CONV = ConvHeadConfig(width=16, dropout=0.0, learning_rate=1e-2, epochs=40)   # batches of 64, as the CLI


def draw_shapes(root: Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """One folder per class: a shape of the class's colour, random size and place, on a grey background."""
    rng = np.random.default_rng(seed)
    for name, (colour, shape) in SHAPES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(115, 141, 3)))
            draw = ImageDraw.Draw(image)
            r = int(rng.integers(11 * size // 32, 15 * size // 32))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
            if shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif shape == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            image.save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    data = draw_shapes(root / "shapes", per_class=32)
    pipe = jaxprobe.load("tiny")
    config = ClassifyConfig(data=str(data), sites=SITES, timesteps=STEPS, conv=CONV, out=str(root / "out"),
                            cache=str(root / "cache"))
    results = run_classification(config, pipe=pipe, progress=False, log=lambda _: None)
    return pipe, config, results


def test_both_classifiers_separate_coloured_shapes(run):
    _, config, results = run
    table = results.table
    assert list(table.columns) == ["site", "t", "classifier", "accuracy", "ci_low", "ci_high", "n_test", "n_train",
                                   "n_classes"]
    assert sorted(zip(table["classifier"], table["site"], table["t"])) == sorted(
        (c, s, t) for c in ("linear", "conv") for s in SITES for t in STEPS)
    assert (table["n_test"] == 24).all() and (table["n_train"] == 72).all()
    accuracy = table.set_index("classifier")["accuracy"]   # chance: 1/3
    assert accuracy["linear"].min() >= 0.9, table
    assert accuracy["conv"].mean() >= 0.85, table
    assert accuracy.min() >= 0.75, table
    assert ((table["ci_low"] <= table["accuracy"]) & (table["accuracy"] <= table["ci_high"])).all()
    out = Path(config.out)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "accuracy.parquet"), table)
    assert len(pd.read_csv(out / "accuracy.csv")) == len(table)
    assert (out / "accuracy.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "data:image/png;base64" in page
    # a random model's accuracies carry the caveat, and say how many test images they rest on
    assert "Random weights." in page and "the same 24 held-out test images" in page


def test_results_record_what_was_loaded(run):
    """The pipeline's provenance (describe_source's record, as the norms experiment keeps it) reaches
    metadata.json and the page."""
    import html
    import json

    pipe, config, results = run
    out = Path(config.out)
    assert pipe.provenance["source"] == "tiny"
    assert json.loads((out / "metadata.json").read_text())["loaded"] == pipe.provenance
    assert results.files["metadata"] == out / "metadata.json"
    assert html.escape(f"source: {pipe.provenance['source']}; dtype: {pipe.provenance['dtype']}") in \
        (out / "report.html").read_text()


def test_features_come_from_the_cache_and_noise_follows_the_image_index(run, monkeypatch):
    pipe, config, results = run
    dataset = results.dataset
    maps = image_features(pipe, dataset, SITES, 25, cache=config.cache, reduce="none")
    assert maps["unet.mid_block"].shape == (96, 8, 8, 64)
    # Image i's noise depends on its index in the dataset, not on the chunk it was extracted in
    # (the store extracted rows 0-63 in one call; 32 rows keep the noise program's compiled shape).
    part = pipe.capture_images([str(p) for p in dataset.paths[32:64]], SITES, t=25, reduce="none", batch_size=16,
                               offset=32)
    for site in SITES:
        np.testing.assert_allclose(part[site], maps[site][32:64], rtol=1e-5, atol=1e-5)

    def no_capture(*args, **kwargs):
        raise AssertionError("features should have been read from the cache")

    with pytest.raises(InputError, match=r"denoiser's \(unet.\*\) sites only"):
        image_features(pipe, dataset, ["unet.mid_block", "text_encoder.*"], 25, cache=config.cache)
    monkeypatch.setattr(sampling, "capture_images", no_capture)
    again = image_features(pipe, dataset, SITES, 25, cache=config.cache, reduce="none")
    np.testing.assert_array_equal(again[SITES[1]], maps[SITES[1]])


def test_cli_classify_writes_the_table_and_reports_errors(run, tmp_path):
    _, config, _ = run
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["classify", config.data, "--out", str(out), "--cache", config.cache, "--conv-width", "16",
            "--epochs", "40", "--conv-lr", "0.01", "--dropout", "0", "-s", SITES[0], "-s", SITES[1], "--t", "10", "--t", "25"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "accuracy.csv")) == 8
    one_class = tmp_path / "one"
    draw_shapes(one_class, per_class=2)
    for extra in ("green_square", "blue_triangle"):
        for f in (one_class / extra).iterdir():
            f.unlink()
        (one_class / extra).rmdir()
    result = runner.invoke(app, ["classify", str(one_class), "--out", str(out)])
    assert result.exit_code == 2 and "error:" in result.output and "single class" in result.output


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    np.testing.assert_allclose([low, high], [0.2366, 0.7634], atol=1e-4)
    low, high = wilson_interval(np.array([0, 10]), 10)
    np.testing.assert_allclose(low, [0.0, 0.7225], atol=1e-4)
    np.testing.assert_allclose(high, [0.2775, 1.0], atol=1e-4)
    n = np.arange(1, 200)
    for p in (0.0, 1.0):   # at 0 and 1 float rounding once put the estimate outside (9 of 9 test images right)
        low, high = wilson_interval(p * n, n)
        assert ((low <= p) & (p <= high)).all()


def test_image_folder_split_is_stratified_deterministic_and_per_class(tmp_path):
    draw_shapes(tmp_path / "a", per_class=12, size=8)
    dataset = load_image_folder(tmp_path / "a", test_fraction=0.25, seed=1)
    assert dataset.classes == ("blue_triangle", "green_square", "red_circle")
    assert np.bincount(dataset.labels[dataset.is_test]).tolist() == [3, 3, 3]
    again = load_image_folder(tmp_path / "a", test_fraction=0.25, seed=1)
    np.testing.assert_array_equal(again.is_test, dataset.is_test)
    assert not np.array_equal(load_image_folder(tmp_path / "a", seed=2).is_test, dataset.is_test)
    # Removing a class leaves the others' splits as they were.
    for f in (tmp_path / "a" / "green_square").iterdir():
        f.unlink()
    (tmp_path / "a" / "green_square").rmdir()
    fewer = load_image_folder(tmp_path / "a", test_fraction=0.25, seed=1)
    kept = [p for p, test in zip(dataset.paths, dataset.is_test) if test and "green" not in p.parent.name]
    assert [p for p, test in zip(fewer.paths, fewer.is_test) if test] == kept


def test_train_and_test_folders_are_kept(tmp_path):
    draw_shapes(tmp_path / "train", per_class=3, size=8)
    draw_shapes(tmp_path / "test", per_class=2, size=8, seed=1)
    dataset = load_image_folder(tmp_path)
    assert len(dataset) == 15 and dataset.is_test.sum() == 6
    assert all(p.parts[-3] == ("test" if t else "train") for p, t in zip(dataset.paths, dataset.is_test))


def _corrupt(root: Path) -> None:
    draw_shapes(root, per_class=2, size=8)
    (root / "red_circle" / "001.png").write_bytes(b"not an image")


def _empty_class(root: Path) -> None:
    draw_shapes(root, per_class=2, size=8)
    (root / "zebra").mkdir()


def _single_class(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    Image.new("RGB", (8, 8)).save(root / "cat" / "b.png")


def _one_image(root: Path) -> None:
    draw_shapes(root, per_class=1, size=8)


def _mismatched(root: Path) -> None:
    draw_shapes(root / "train", per_class=2, size=8)
    draw_shapes(root / "test", per_class=1, size=8)
    (root / "test" / "red_circle" / "000.png").rename(root / "test" / "red_circle" / "keep.png")
    (root / "test" / "red_circle").rename(root / "test" / "purple_star")


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no class subfolders"),
    (_empty_class, "zebra under"),
    (_single_class, "single class"),
    (_one_image, "a single image"),
    (_corrupt, "cannot read image"),
    (_mismatched, "only in test: ['purple_star']"),
])
def test_bad_image_folders_are_clear_errors(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(InputError) as err:
        load_image_folder(root)
    assert message in str(err.value)


def test_bad_settings_are_clear_errors():
    with pytest.raises(InputError, match="classifiers must be among"):
        ClassifyConfig(data="x", classifiers=("svm",))
    with pytest.raises(InputError, match="dropout"):
        dataclasses.replace(CONV, dropout=1.0)
    with pytest.raises(InputError, match="reduce='none'"):
        train_conv_head(np.zeros((4, 8)), np.zeros(4, int), 2, CONV)
