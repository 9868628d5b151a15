"""The command line: a thin layer over the API, with clear errors."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from jaxprobe.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "extract", "probe", "run", "report", "store"):
        assert command in result.output


def test_info_shows_backend_and_sites():
    result = runner.invoke(app, ["info", "--sites", "tiny"])
    assert result.exit_code == 0, result.output
    assert "JAX backend" in result.output and "unet.mid_block" in result.output


def test_extract_writes_one_array_per_site(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na photo of a dog\n")
    out = tmp_path / "feats"
    result = runner.invoke(app, ["extract", "-p", str(prompts), "-o", str(out), "-s", "text_encoder.*",
                                 "--reduce", "eos", "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == ["a photo of a cat", "a photo of a dog"]
    layer = np.load(out / "text_encoder.text_model.encoder.layers.3.npy")
    assert layer.shape == (2, 64)


def test_bad_input_exits_with_a_named_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["extract", "-p", str(empty), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "holds no prompts" in result.output
    result = runner.invoke(app, ["extract", "-p", str(empty.with_name("nope.txt")), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error" in result.output
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = runner.invoke(app, ["extract", "-p", str(prompts), "-o", str(tmp_path / "y"), "-s", "unet.nothing_here",
                                 "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "matches no site" in result.output
    result = runner.invoke(app, ["run", "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 2 and "Hugging Face cache" in result.output
    result = runner.invoke(app, ["--coordinator", "localhost:1", "info"])
    assert result.exit_code == 2 and "--num-processes" in result.output
