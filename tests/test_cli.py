"""The command line: a thin layer over the API, with clear errors."""

from __future__ import annotations

import json
import stat

import numpy as np
import pandas as pd
import typer
from typer.testing import CliRunner

from jaxprobe.cli import app
from jaxprobe.runtime import files

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "extract", "probe", "run", "report", "store"):
        assert command in result.output


def _command_paths(command, path=()):
    """Every command and sub-command of the CLI, as the words that name it."""
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_every_help_reads_without_placeholders():
    paths = list(_command_paths(typer.main.get_command(app)))
    assert ["store", "ls"] in paths and ["directions", "build"] in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], terminal_width=100)
        assert result.exit_code == 0, (path, result.output)
        # no Typer placeholders (a flag's "<bool>", a required argument's "{name}"), no failure message
        assert "<bool>" not in result.output and "{" not in result.output, (path, result.output)
        assert "list[" not in result.output, (path, result.output)
        # a command's one-line help is wrapped, never cut off with "..." (only the usage line's ARGS...)
        cut = [line for line in result.output.splitlines() if line.endswith("...") and "[ARGS]..." not in line]
        assert not cut, (path, cut)
        assert "error:" not in result.output, (path, result.output)
    model_help = runner.invoke(app, ["directions", "build", "--help"], terminal_width=100).output
    assert "cached model id" in model_help


def test_info_shows_backend_and_sites():
    result = runner.invoke(app, ["info", "--sites", "tiny"])
    assert result.exit_code == 0, result.output
    assert "JAX backend" in result.output and "unet.mid_block" in result.output


def test_extract_writes_one_array_per_site(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_UMASK", 0o022)  # the umask the module read at import, as under a usual login
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na photo of a dog\n")
    out = tmp_path / "feats"
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("cat\ndog\n")
    args = ["extract", "-p", str(prompts), "-o", str(out), "-s", "text_encoder.*", "--reduce", "eos",
            "--cache", str(tmp_path / "cache")]
    result = runner.invoke(app, [*args, "--concepts", str(concepts)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == ["a photo of a cat", "a photo of a dog"] and manifest["random_weights"] is True
    assert manifest["concepts"] == ["cat", "dog"] and (out / "concepts.txt").read_text() == "cat\ndog\n"
    layer = np.load(out / "text_encoder.text_model.encoder.layers.3.npy")
    assert layer.shape == (2, 64)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes  # not mkstemp's 0600: results are shared like any file
    # again without concepts (from the cache): the earlier concepts.txt must not name these rows
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (out / "concepts.txt").exists() and json.loads((out / "manifest.json").read_text())["concepts"] is None


def test_bad_input_exits_with_a_named_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["extract", "-p", str(empty), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "is empty" in result.output
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


def _extracted(folder, prompts, rng):
    """A folder laid out as `jaxprobe extract` writes it: one site and the manifest's prompts."""
    folder.mkdir()
    np.save(folder / "text_encoder.text_model.final_layer_norm.npy", rng.normal(size=(len(prompts), 6)))
    (folder / "manifest.json").write_text(json.dumps({"model": "tiny", "prompts": prompts}))
    return folder


def test_probe_matches_ratings_by_concept_not_by_position(tmp_path):
    rng = np.random.default_rng(0)
    concepts = [f"concept{i}" for i in range(24)]
    feats = _extracted(tmp_path / "feats", concepts, rng)
    ratings = pd.DataFrame({"concept": concepts, "size": rng.normal(size=24), "colour": rng.normal(size=24)})
    ratings.to_csv(tmp_path / "sorted.csv", index=False)
    ratings.sample(frac=1, random_state=1).to_csv(tmp_path / "shuffled.csv", index=False)

    def probe(features, targets, out, *more):
        return runner.invoke(app, ["probe", "-f", str(features), "-t", str(tmp_path / targets), "-o",
                                   str(tmp_path / out), "--outer-cv", "3", "--inner-cv", "2", *more])

    for name in ("sorted", "shuffled"):
        result = probe(feats, f"{name}.csv", f"probes-{name}")
        assert result.exit_code == 0, result.output
        assert "matched 24 feature rows to targets rows by prompt" in result.output
    ordered = pd.read_parquet(tmp_path / "probes-sorted.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "probes-shuffled.parquet"), ordered, check_exact=True)
    # templated prompts match no concept by their exact text; --concepts names the rows
    templated = _extracted(tmp_path / "templated", [f"a photo of a {c}" for c in concepts], rng)
    result = probe(templated, "shuffled.csv", "t")
    assert result.exit_code == 2 and "'a photo of a concept0'" in result.output and "--concepts" in result.output
    (tmp_path / "concepts.txt").write_text("\n".join(concepts) + "\n")
    result = probe(templated, "shuffled.csv", "t", "--concepts", str(tmp_path / "concepts.txt"))
    assert result.exit_code == 0, result.output
    assert "matched 24 feature rows to targets rows by concept" in result.output
    # a repeated concept, unmatched rows, unnamed rows: exit code 2 and the reason
    pd.concat([ratings, ratings.iloc[[3]]]).to_csv(tmp_path / "twice.csv", index=False)
    result = probe(feats, "twice.csv", "x")
    assert result.exit_code == 2 and "'concept3' appear more than once" in result.output
    ratings.iloc[2:].to_csv(tmp_path / "fewer.csv", index=False)
    result = probe(feats, "fewer.csv", "x")
    assert result.exit_code == 2 and "2 of 24 feature rows have no row" in result.output
    assert "'concept0', 'concept1'" in result.output
    (feats / "manifest.json").unlink()
    result = probe(feats, "shuffled.csv", "x")
    assert result.exit_code == 2 and "--assume-same-order" in result.output
    result = probe(feats, "sorted.csv", "x", "--assume-same-order")
    assert result.exit_code == 0 and "paired 24 feature rows with the targets rows by position" in result.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "x.parquet"), ordered, check_exact=True)


def test_everyday_mistakes_get_one_line_that_names_the_fix(tmp_path):
    """Issue 20, item 9: no traceback, a message that says what to do, before the model loads."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    ok = tmp_path / "ok.txt"
    ok.write_text("a cat\n")
    cases = [
        (["extract", "-p", str(latin1), "-o", str(tmp_path / "x")], "not UTF-8 text"),
        (["extract", "-p", str(ok), "-o", str(tmp_path / "x"), "--batch-size", "0"], "batch_size must be at least 1"),
        (["extract", "-p", str(ok), "-o", str(tmp_path / "x"), "--steps", "0"], "num_inference_steps must be"),
        (["extract", "-p", str(ok), "-o", str(tmp_path / "x"), "--guidance-scale", "-1"], "guidance_scale must be >= 0"),
        (["run", "--steps", "0", "--out", str(tmp_path / "r")], "num_inference_steps must be"),
        (["run", "--model", "/data/sd15"], "check the path"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output and "hf download" not in result.output
    (tmp_path / "empty-pipeline").mkdir()
    (tmp_path / "empty-pipeline" / "model_index.json").write_text("{}")
    result = runner.invoke(app, ["info", "--sites", str(tmp_path / "empty-pipeline")])
    assert result.exit_code == 2 and "lists no text_encoder, unet or transformer" in result.output


def test_ratings_files_of_the_wrong_shape_are_named(tmp_path):
    rng = np.random.default_rng(0)
    concepts = [f"concept{i}" for i in range(12)]
    feats = _extracted(tmp_path / "feats", concepts, rng)
    base = ["probe", "-f", str(feats), "-o", str(tmp_path / "out.parquet")]
    semicolon = tmp_path / "semicolon.csv"
    semicolon.write_text("word;size\n" + "".join(f"{c};{v:.3f}\n" for c, v in zip(concepts, rng.normal(size=12))))
    result = runner.invoke(app, [*base, "-t", str(semicolon)])  # sniffed; the one text column names the concepts
    assert result.exit_code == 0, result.output
    assert "matched 12 feature rows" in result.output
    labelled = tmp_path / "labelled.csv"
    pd.DataFrame({"concept": concepts, "kind": ["animal", "tool", "food", "toy", "car", "hat"] * 2,
                  "size": rng.normal(size=12)}).to_csv(
        labelled, index=False)
    result = runner.invoke(app, [*base, "-t", str(labelled)])
    assert result.exit_code == 2 and "--group-column" in result.output and "'animal'" in result.output
    result = runner.invoke(app, [*base, "-t", str(labelled), "--group-column", "kind", "--outer-cv", "3",
                                 "--inner-cv", "2"])
    assert result.exit_code == 0, result.output
    two_text = tmp_path / "two.csv"
    pd.DataFrame({"word": concepts, "note": ["x"] * 12, "size": rng.normal(size=12)}).to_csv(two_text, index=False)
    result = runner.invoke(app, [*base, "-t", str(two_text)])
    assert result.exit_code == 2 and "--concept-column" in result.output


def test_unexpected_failures_point_to_debug(tmp_path, monkeypatch):
    import jaxprobe.runtime.files as files

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(files, "read_lines", broken)
    args = ["extract", "-p", str(tmp_path / "p.txt"), "-o", str(tmp_path / "x")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "unexpected ZeroDivisionError: boom" in result.output
    assert "--debug" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["--debug", *args])
    assert isinstance(result.exception, ZeroDivisionError)  # --debug lets the traceback through
