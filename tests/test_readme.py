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


def _blocks(*languages: str) -> list[str]:
    """The fenced blocks of the README in one of `languages` ("" for a bare fence)."""
    blocks, language, lines = [], None, []
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                if language in languages:
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


@pytest.mark.slow
def test_python_snippets_run_as_pasted(tmp_path, monkeypatch):
    source = "\n".join(_blocks("python"))
    for readme, instead in REPLACEMENTS:
        assert readme in source, f"the README no longer says {readme!r}: update REPLACEMENTS"
        source = source.replace(readme, instead)
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "oxford-pets")
    sdxl = sd_reference.save_sdxl_pipeline(tmp_path / "sdxl")   # the SDXL section's folder, single file and LoRA
    write_single_file(sdxl, tmp_path / "sd_xl_base_1.0.safetensors", "sdxl")
    write_lora(sdxl, tmp_path / "sdxl-style.safetensors", "kohya", family="sdxl", ldm=True)
    source = source.replace('"path/to/sdxl-dir"', repr(str(tmp_path / "sdxl")))
    transformer_reference.save_dit_pipeline(tmp_path / "dit")   # the DiT and PixArt section's folders
    transformer_reference.save_pixart_pipeline(tmp_path / "pixart", "sigma")
    for placeholder, folder in (('"path/to/dit-dir"', "dit"), ('"path/to/pixart-sigma-dir"', "pixart")):
        assert placeholder in source, f"the README no longer says {placeholder!r}"
        source = source.replace(placeholder, repr(str(tmp_path / folder)))
    encoder_reference.save_t5_encoder(tmp_path / "t5")   # the T5 and DINOv2 section's folders and images
    encoder_reference.save_dinov2(tmp_path / "dinov2")
    for name in ("cat.png", "dog.png"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    for placeholder, folder in (("path/to/pixart/text_encoder", "t5"), ("path/to/pixart/tokenizer", "t5"),
                                ("path/to/dinov2-base", "dinov2")):
        assert placeholder in source, f"the README no longer says {placeholder!r}"
        source = source.replace(f'"{placeholder}"', repr(str(tmp_path / folder)))
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    assert {"feature_set", "target", "unique_b", "q"} <= set(namespace["table"].columns)   # the last table: variance
    assert (tmp_path / "runs" / "sae" / "inspect").is_dir() and (tmp_path / "runs" / "pets" / "report.html").is_file()


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
