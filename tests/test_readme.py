"""Every README snippet runs as pasted: the Python blocks execute in order in one namespace, and every
`jaxprobe ...` command line parses against the CLI (its commands and options exist, its values convert).

Only what this machine cannot have is replaced, each replacement checked to still match the README:
checkpoint and data paths become the bundled tiny model and a tiny image folder, and sizes shrink so the
blocks finish in a minute on 2 cores (the same code paths, fewer steps and permutations).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image

import encoder_reference
import sd_reference
import transformer_reference
from jaxprobe.cli import app
from test_single_file import write_lora, write_single_file

README = Path(__file__).resolve().parents[1] / "README.md"

# (README text, what the test runs instead): a placeholder path or a size this machine cannot afford.
REPLACEMENTS = [
    ('"path/to/stable-diffusion-dir"', '"tiny"'),
    ('"runwayml/stable-diffusion-v1-5"', '"tiny"'),
    ('"path/to/sd15"', '"tiny"'),
    ("concepts = list(norms.concepts[:60])", "concepts = list(norms.concepts[:30])"),
    ("num_inference_steps=50", "num_inference_steps=2"),
    ("num_inference_steps=30", "num_inference_steps=2"),
    ("n_permutations=200, n_bootstrap=200", "n_permutations=3, n_bootstrap=5"),
    ("n_permutations=100, n_bootstrap=200", "n_permutations=2, n_bootstrap=5"),
    ("timesteps=(25, 100)", "timesteps=(25,)"),
    ("ConvHeadConfig(width=1024, epochs=30)", "ConvHeadConfig(width=8, epochs=1)"),
    ("SAEConfig(k=32, expansion=64, steps=5000)", "SAEConfig(k=4, expansion=2, steps=60, warmup_steps=10)"),
    # the Interventions section on the tiny model: 2 steps, its widths and its attention blocks
    ("steps=range(20)", "steps=range(1)"),
    ("steps=range(10, 50)", "steps=range(1, 2)"),
    ("steps=[10]", "steps=[1]"),
    ("@10", "@1"),
    ("SAEConfig(k=8, expansion=4, steps=2000)", "SAEConfig(k=4, expansion=2, steps=30, warmup_steps=5)"),
    ("unet.down_blocks.1.attentions.0", "unet.down_blocks.0.attentions.0"),
    ("standard_normal(768)", "standard_normal(64)"),
    ("encoder.layers.10", "encoder.layers.3"),
    ("image_encoder.encoder.layer.11", "image_encoder.encoder.layer.1"),   # the tiny DINOv2 has two layers
    # the comparison's second model: the tiny model again under its own label (tests/test_classify_compare.py
    # compares two families); a tiny SDXL's classify programs would add minutes to this test
    ('"sdxl": "path/to/sdxl-dir"', '"sdxl": "tiny"'),
    ("transformer.transformer_blocks.14", "transformer.transformer_blocks.1"),   # the tiny DiT and PixArt
    ("num_inference_steps=20", "num_inference_steps=2"),
]


def _blocks(*languages: str, sections: tuple[str, str] = ("", "")) -> list[str]:
    """The fenced blocks of the README in one of `languages` ("" for a bare fence), between the `## ` headings
    `sections` (from the first, up to the second; "" for the start and the end)."""
    blocks, language, lines = [], None, []
    first, stop = sections
    inside = not first
    for line in README.read_text().splitlines():
        if language is None and line.startswith("## "):
            if line == first:
                inside = True
            elif line == stop:
                inside = False
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                if language in languages and inside:
                    blocks.append("\n".join(lines) + "\n")
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / label / f"{i}.png")


# Two halves that run side by side in the suite's two workers: the models (the Python API example, whose
# `feats` the variance section reuses, then every family) and the studies (interventions onward, which load
# their own pipeline).
HALVES = {"models": ("", "## Interventions"), "studies": ("## Interventions", "")}


# The model folders the README's examples name, each made (once) only for the half that names it.
FOLDERS = {'"path/to/dit-dir"': ("dit", transformer_reference.save_dit_pipeline),
           '"path/to/pixart-sigma-dir"': ("pixart", lambda path: transformer_reference.save_pixart_pipeline(
               path, "sigma")),
           '"path/to/pixart/text_encoder"': ("t5", encoder_reference.save_t5_encoder),
           '"path/to/pixart/tokenizer"': ("t5", encoder_reference.save_t5_encoder),
           '"path/to/dinov2-base"': ("dinov2", encoder_reference.save_dinov2)}


def test_the_halves_cover_every_python_block():
    halves = [block for sections in HALVES.values() for block in _blocks("python", sections=sections)]
    assert halves == _blocks("python")
    source = "\n".join(halves)
    for readme in [readme for readme, _ in REPLACEMENTS] + ['"path/to/sdxl-dir"', *FOLDERS]:
        assert readme in source, f"the README no longer says {readme!r}: update this test"


@pytest.mark.slow
@pytest.mark.parametrize("half", sorted(HALVES))
def test_python_snippets_run_as_pasted(half, tmp_path, monkeypatch):
    source = "\n".join(_blocks("python", sections=HALVES[half]))
    for readme, instead in REPLACEMENTS:
        source = source.replace(readme, instead)
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "oxford-pets")
    if '"path/to/sdxl-dir"' in source:   # the SDXL section's folder, single file and LoRA
        sdxl = sd_reference.save_sdxl_pipeline(tmp_path / "sdxl")
        write_single_file(sdxl, tmp_path / "sd_xl_base_1.0.safetensors", "sdxl")
        write_lora(sdxl, tmp_path / "sdxl-style.safetensors", "kohya", family="sdxl", ldm=True)
        source = source.replace('"path/to/sdxl-dir"', repr(str(tmp_path / "sdxl")))
    for placeholder, (folder, save) in FOLDERS.items():
        if placeholder in source:
            if not (tmp_path / folder).exists():
                save(tmp_path / folder)
            source = source.replace(placeholder, repr(str(tmp_path / folder)))
    for name in ("cat.png", "dog.png"):   # the DINOv2 example's images
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    if half == "models":
        assert {"feature_set", "target", "unique_b", "q"} <= set(namespace["table"].columns)   # variance
    else:
        assert (tmp_path / "runs" / "sae" / "inspect").is_dir()
        assert (tmp_path / "runs" / "pets" / "report.html").is_file()


def _command_lines() -> list[list[str]]:
    """`jaxprobe ...` lines of the shell blocks, comments and `[optional]` parts dropped, `...` continued."""
    lines = []
    for block in _blocks("bash", ""):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].split("&")[0]
            while re.search(r"\[[^\[\]]*\]", line):  # optional parts, innermost first
                line = re.sub(r"\[[^\[\]]*\]", "", line)
            line = line.strip()
            words = shlex.split(line) if line else []
            while words and words[0] != "jaxprobe" and not words[0].endswith("/jaxprobe"):
                words = words[1:]
            if words:
                lines.append(words[1:])
    return lines


def test_every_readme_command_parses():
    lines = _command_lines()
    assert len(lines) > 10, "the README's command lines were not found"
    root = typer.main.get_command(app)
    def unparsed(ctx) -> list[str]:  # a group's context keeps the sub-command's name apart from its args
        return [*getattr(ctx, "_protected_args", []), *ctx.args]

    for args in lines:
        command, ctx = root, root.make_context("jaxprobe", list(args))
        while hasattr(command, "resolve_command"):  # down the sub-commands: store, sae, directions
            rest = unparsed(ctx)
            assert rest, f"`jaxprobe {' '.join(args)}` names no command"
            _, command, rest = command.resolve_command(ctx, rest)
            ctx = command.make_context(command.name, list(rest), parent=ctx)  # parses and converts every option
