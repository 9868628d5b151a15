"""Revelio's cross-architecture comparison: two tiny denoisers and CLIP / DINOv2 baselines through
`jaxprobe classify -m A -m B --baseline KIND FOLDER`, its errors, and the family-declared sites that the
classifiers, the directions and the SAE trainer default to (nothing assumes `unet.`)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import encoder_reference  # noqa: E402
import sd_reference  # noqa: E402
from test_classify import draw_shapes  # noqa: E402

import jaxprobe  # noqa: E402
from jaxprobe.cli import app  # noqa: E402
from jaxprobe.errors import InputError  # noqa: E402
from jaxprobe.models.families import FAMILIES  # noqa: E402
from jaxprobe.studies.decoding_diffusion.directions import DirectionsConfig, hspace_sites  # noqa: E402
from jaxprobe.studies.revelio.classify import (  # noqa: E402
    COMPARE_COLUMNS,
    ClassifyConfig,
    compare,
    default_sites,
    labelled,
)

pytestmark = pytest.mark.xdist_group("classify_compare")   # one process runs the comparison the tests share

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A second tiny denoiser (SD 2.x layout, v-prediction), a tiny DINOv2 and a tiny CLIP vision tower, written by
    diffusers / transformers, and 12 coloured shapes per class (27 train, 3 of them validation, 9 test)."""
    root = tmp_path_factory.mktemp("compare")
    sd_reference.save_pipeline(root / "sd2", "sd2")
    encoder_reference.save_dinov2(root / "dinov2")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)).save_pretrained(root / "clip")
    draw_shapes(root / "shapes", per_class=12)
    return root


def _invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_run(folders):
    """`jaxprobe classify` over the bundled tiny model, the SD 2.x-layout one and both baselines, at two t."""
    out = folders / "cli-out"
    result = _invoke("classify", folders / "shapes", "-m", "tiny", "-m", f"second={folders / 'sd2'}",
                     "--baseline", "clip", folders / "clip", "--baseline", "dinov2", folders / "dinov2",
                     "--t", "10", "--t", "25", "-c", "linear", "-o", out, "--cache", folders / "cache")
    assert result.exit_code == 0, result.output
    return out


def test_cli_compares_two_models_and_two_baselines(folders, cli_run):
    out = cli_run
    table = pd.read_parquet(out / "comparison.parquet")
    assert list(table.columns) == COMPARE_COLUMNS
    assert list(dict.fromkeys(table["model"])) == ["tiny", "second", "clip", "dinov2"]
    assert (table["classifier"] == "linear").all() and (table["n_test"] == 9).all()
    assert ((table["ci_low"] <= table["accuracy"]) & (table["accuracy"] <= table["ci_high"])).all()
    denoisers = table[table["kind"] == "denoiser"]
    for label, source in (("tiny", "tiny"), ("second", folders / "sd2")):
        sites = default_sites(jaxprobe.load(source))
        assert sites == ["unet.mid_block", "unet.up_blocks.0", "unet.up_blocks.1"]
        rows = denoisers[denoisers["model"] == label]
        assert sorted(zip(rows["site"], rows["t"])) == sorted((s, t) for s in sites for t in (10, 25))
        assert (rows["pooling"] == "mean").all()
    baselines = table[table["kind"] == "baseline"]
    assert baselines["t"].isna().all() and set(baselines["pooling"]) == {"cls", "mean_patch"}
    dino = baselines[baselines["model"] == "dinov2"]
    assert set(dino["site"]) == {"image_encoder.embeddings", "image_encoder.encoder.layer.0",
                                 "image_encoder.encoder.layer.1", "image_encoder.layernorm"}
    assert len(dino) == 8 and baselines["val_accuracy"].between(0, 1).all()
    assert len(pd.read_csv(out / "comparison.csv")) == len(table)
    assert (out / "comparison.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "data:image/png;base64" in page and "Wilson" in page and "highest validation accuracy" in page
    assert "Random weights." in page and "tiny" in page   # the bundled model is random
    lines = json.loads((out / "metadata.json").read_text())["baseline_lines"]
    assert [line["model"] for line in lines] == ["clip", "dinov2"]
    assert all(line["chosen_by"] == "validation accuracy" and line["t"] is None for line in lines)


def test_api_compare_takes_pipelines_and_writes_nothing_without_out(folders, cli_run):
    """The Python API takes {label: Pipeline}; with the CLI test's settings every feature comes from the shared
    cache and the accuracies are the CLI's (same split, same seeds); nothing is written without out."""
    config = ClassifyConfig(data=str(folders / "shapes"), timesteps=(25,), classifiers=("linear",), out=None,
                            cache=str(folders / "cache"))
    results = compare(config, {"again": jaxprobe.load("tiny")}, [("dinov2", str(folders / "dinov2"))],
                      progress=False, log=lambda _: None)
    table = results.table
    assert list(dict.fromkeys(table["model"])) == ["again", "dinov2"] and results.files == {}
    assert list(results.lines["model"]) == ["dinov2"] and results.lines["t"].isna().all()
    cli = pd.read_parquet(cli_run / "comparison.parquet")
    for label, model in (("again", "tiny"), ("dinov2", "dinov2")):
        ours = table[table["model"] == label].drop(columns="model").reset_index(drop=True)
        theirs = cli[(cli["model"] == model) & (cli["t"].isna() | (cli["t"] == 25))]
        pd.testing.assert_frame_equal(ours, theirs.drop(columns="model").reset_index(drop=True))


@pytest.mark.parametrize(("args", "message"), [
    (["--baseline", "resnet", "{clip}"], "unknown baseline kind 'resnet': use clip or dinov2"),
    (["--baseline", "dinov2", "{root}/nowhere"], "--baseline dinov2 {root}/nowhere: no checkpoint folder"),
    (["--baseline", "clip", "{dinov2}"], "names a dinov2 image encoder: write --baseline dinov2"),
    (["--baseline", "dinov2", "{root}/shapes"], "no config.json there; point at the encoder's own folder"),
    (["--baseline", "dinov2"], "--baseline takes two values, KIND FOLDER"),
    (["-m", "tiny"], "two models or baselines are labelled 'tiny'"),
    (["--baseline", "dinov2", "tiny={dinov2}"], "labelled 'tiny'"),
], ids=["unknown-kind", "missing-folder", "wrong-kind", "not-an-encoder", "no-folder", "duplicate-model",
        "duplicate-label"])
def test_bad_comparisons_are_one_line_errors(folders, tmp_path, args, message):
    fill = {"clip": folders / "clip", "dinov2": folders / "dinov2", "root": folders}
    args = [a.format(**fill) for a in args]
    result = _invoke("classify", folders / "shapes", "-m", "tiny", *args, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message.format(**fill) in result.output, result.output
    assert not (tmp_path / "out").exists()   # refused before any feature was extracted


def test_labels_come_from_the_path_or_the_user():
    assert labelled("tiny") == ("tiny", "tiny")
    assert labelled("runs/sd21/") == ("sd21", "runs/sd21/")
    assert labelled("stabilityai/stable-diffusion-2-1") == ("stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1")
    assert labelled("sd21=runs/a") == ("sd21", "runs/a")
    assert labelled("runs/a=b") == ("a=b", "runs/a=b")   # a label holds no "/": this is a path
    assert labelled("runs/dino", default="dinov2") == ("dinov2", "runs/dino")
    with pytest.raises(InputError, match="LABEL=PATH"):
        labelled("sd21=")
    with pytest.raises(InputError, match="list of sources"):
        compare(ClassifyConfig(data="x"), "tiny")


# --- the family declares the sites: nothing assumes `unet.` ------------------------------------------------


@dataclasses.dataclass
class _Stub:
    """The two things the site defaults ask of a pipeline: its family and its block sites (in capture order)."""

    family: object
    blocks: list

    source = "stub"

    def sites(self):
        return list(self.blocks)

    @property
    def bottleneck_site(self):
        return None if self.family is None else f"{self.family.component}.{self.family.bottleneck(None)}"

    def select(self, patterns):
        return [s for s in self.blocks if s in patterns]


def test_site_defaults_follow_the_family():
    tiny = jaxprobe.load("tiny")
    assert hspace_sites(DirectionsConfig.example(), tiny) == ["unet.mid_block"]
    assert tiny.summary_text_site == "text_encoder.text_model.final_layer_norm"
    # SD 1.x/2.x and SDXL share the UNet's names; DiT and PixArt (28 blocks) and SD3 (24) their middle block;
    # FLUX the middle of its 19 double- and 38 single-stream blocks, block 28: single block 9
    middle = {"dit": "transformer_blocks.14", "pixart": "transformer_blocks.14",
              "stable-diffusion-3": "transformer_blocks.12", "flux": "single_transformer_blocks.9"}
    for name, family in FAMILIES.items():
        expected = "unet.mid_block" if family.component == "unet" else f"transformer.{middle[name]}"
        # the released depths
        config = SimpleNamespace(num_layers={"stable-diffusion-3": 24, "flux": 19}.get(name, 28), num_single_layers=38)
        assert f"{family.component}.{family.bottleneck(config)}" == expected
    # a transformer family (DiT, PixArt) names its own component and bottleneck
    transformer = dataclasses.replace(FAMILIES["stable-diffusion"], component="transformer",
                                      bottleneck=lambda config: "transformer_blocks.2")
    blocks = ["transformer.pos_embed", *(f"transformer.transformer_blocks.{i}" for i in range(4)),
              "transformer.norm_out", "latents", "pred_original_sample"]
    stub = _Stub(transformer, blocks)
    assert default_sites(stub) == ["transformer.transformer_blocks.2", "transformer.transformer_blocks.3",
                                   "transformer.norm_out"]
    assert hspace_sites(DirectionsConfig.example(), stub) == ["transformer.transformer_blocks.2"]
    assert DirectionsConfig.example().sites == ()   # the bundled example leaves h-space to the family
    with pytest.raises(InputError, match="has no denoiser"):
        default_sites(_Stub(None, []))


def test_sae_train_takes_transformer_sites(tmp_path):
    rng = np.random.default_rng(0)
    features = {f"transformer.transformer_blocks.{i}": rng.standard_normal((64, 2, 8)).astype(np.float32)
                for i in range(2)}
    np.savez(tmp_path / "feats.npz", **features, other=rng.standard_normal((64, 8)).astype(np.float32))
    result = _invoke("sae", "train", "-f", tmp_path / "feats.npz", "-s", "transformer.transformer_blocks.*",
                     "-o", tmp_path / "sae", "--k", "2", "--expansion", "2", "--steps", "3", "--batch-size", "16",
                     "--warmup", "1")
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "sae" / "metrics.csv")
    sets = {f"transformer.transformer_blocks.{i}@{t}" for i in range(2) for t in range(2)}
    assert set(metrics["feature_set"]) == sets
