"""Report files from a synthetic run: figures, tables that read back unchanged, one self-contained HTML page."""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analyses import synthetic_run

from jaxprobe.studies.norms_probing import report
from jaxprobe.studies.norms_probing.summary import ExperimentResults, summarize
from jaxprobe.errors import InputError

FAST = report.ReportConfig(dpi=30, top_rows=5)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run() -> ExperimentResults:
    return synthetic_run()


@pytest.fixture(scope="module")
def out(run: ExperimentResults, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    report.write_tables(run, folder)
    report.write_report(run, folder, FAST)
    return folder


@pytest.fixture(scope="module")
def page(out: Path) -> str:
    return (out / report.REPORT).read_text(encoding="utf-8")


def _text_only(run: ExperimentResults) -> ExperimentResults:
    keep = [i for i, f in enumerate(run.feature_sets) if f.startswith("text_encoder.")]
    names = [run.feature_sets[i] for i in keep]

    def only(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["feature_set"].isin(names)].reset_index(drop=True)

    return dataclasses.replace(
        run, table=only(run.table), profile=only(run.profile), groups=only(run.groups),
        similarity=only(run.similarity), confusability=only(run.confusability), feature_sets=tuple(names),
        predicted_correlation=run.predicted_correlation[keep], confusion=run.confusion[keep])


def test_every_figure_is_a_png(out: Path):
    figures = sorted(p.name for p in (out / "figures").iterdir())
    # 12 attributes: the page's correlation figure shows every pair, so there is no separate matrices file
    assert figures == sorted(f"{name}.png" for name in report.FIGURES if name != "correlation_matrices")
    assert all((out / "figures" / f).read_bytes().startswith(PNG) for f in figures)


def test_report_is_self_contained(page: str):
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "<link" not in page and "<script" not in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(set(report.FIGURES) - set(report.LINKED_FIGURES))
    assert all(base64.b64decode(image).startswith(PNG) for image in images)


def test_report_says_what_the_numbers_show(run: ExperimentResults, page: str):
    for sentence in summarize(run, FAST.level):
        assert html.escape(sentence) in page
    assert "Random weights." not in page
    assert "Doe (2024). Synthetic norms." in page and "arXiv:2511.08075" in page  # the norms' and the method's
    assert "a photo of a {concept}" in page and "probe: 1.5" in page  # settings, timings
    assert "mink (coat)" in page  # concepts left out
    assert page.count("<table") == 5  # decoding, groups, disentanglement, settings, dropped


def test_a_random_model_report_says_so_before_anything_else(tmp_path: Path):
    results = synthetic_run(random_weights=True)
    page = report.write_report(results, tmp_path, FAST).read_text(encoding="utf-8")
    notice = page.index("Random weights.")
    assert notice < page.index("What the numbers show")
    assert "surface form" in page and "permutation null" in page


def test_tables_round_trip(run: ExperimentResults, out: Path):
    frames = {"probes": run.table, "decoding": run.profile, "groups": run.groups, "similarity": run.similarity,
              "confusability": run.confusability, "dropped": run.dropped}
    for name, frame in frames.items():
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), frame.reset_index(drop=True))
        pd.testing.assert_frame_equal(pd.read_csv(out / f"{name}.csv"), frame.reset_index(drop=True),
                                      check_dtype=False)
    back = report.read_results(out)
    assert back.feature_sets == run.feature_sets and back.targets == run.targets
    assert back.target_groups == run.target_groups
    np.testing.assert_array_equal(back.predicted_correlation, run.predicted_correlation)
    np.testing.assert_array_equal(back.confusion, run.confusion)
    np.testing.assert_array_equal(back.human_correlation, run.human_correlation)
    assert back.metadata == {**run.metadata, "seeds": [0], "templates": ["a photo of a {concept}"]}
    assert not [p.name for p in out.rglob(".*")]  # no temporary file left behind


def test_rerender_rebuilds_the_report_from_the_files(run: ExperimentResults, out: Path, tmp_path: Path):
    for f in out.glob("*.*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = report.rerender(tmp_path, FAST)
    page = path.read_text(encoding="utf-8")
    assert path == tmp_path / report.REPORT and (tmp_path / "figures" / "correlations.png").exists()
    assert all(html.escape(sentence) in page for sentence in summarize(run, FAST.level))


def test_a_text_only_run_leaves_out_the_diffusion_figures(run: ExperimentResults, tmp_path: Path):
    text = _text_only(run)
    assert set(report.make_figures(text, tmp_path, FAST)) == {"decoding_text", "groups", "correlations", "pvalues"}
    page = report.write_report(text, tmp_path, FAST).read_text(encoding="utf-8")
    assert "peaks at final_layer_norm" in page and "denoising step" not in " ".join(summarize(text))


def test_reading_a_folder_without_results_names_what_is_missing(tmp_path: Path):
    with pytest.raises(InputError, match="probes.parquet"):
        report.read_results(tmp_path)


def test_many_attributes_show_group_means_and_the_full_matrices_beside_the_page(tmp_path: Path):
    """Issue 20, item 10: beyond 30 attributes the page's correlation figure is group by group, and every
    pair goes to figures/correlation_matrices.png, linked from the caption rather than embedded."""
    from jaxprobe.studies.norms_probing.report import group_correlations

    matrix = np.array([[1.0, 0.5, 0.1, 0.2], [0.5, 1.0, 0.3, 0.4], [0.1, 0.3, 1.0, 0.9], [0.2, 0.4, 0.9, 1.0]])
    means, names = group_correlations(matrix, ["a", "a", "b", "b"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(means, [[0.5, 0.25], [0.25, 0.9]])   # the diagonal leaves out self-correlations
    assert "correlation_matrices" in report.LINKED_FIGURES
    assert "figures/correlation_matrices.png" in report.FIGURES["correlations"][1]
