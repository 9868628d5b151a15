"""Memory plans (`jaxprobe.plan`, `jaxprobe info --plan`): exact bytes on the tiny model, no weights drawn for
the full-size random models, errors that name the fix."""

from __future__ import annotations

import dataclasses
import json
import math
import resource

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import jaxprobe
from jaxprobe.cli import app
from jaxprobe.errors import InputError, SiteError
from jaxprobe.pipeline.memory import parse_bytes

SITES = ["text_encoder.*", "unet.mid_block", "unet.up_blocks.*", "unet.mid_block.contribution", "latents"]


@pytest.fixture(scope="module")
def tiny():
    return jaxprobe.load("tiny")


@pytest.fixture(scope="module")
def memory(tiny):
    return jaxprobe.plan(tiny, SITES, batch=2, steps=3, xla=True)


def test_the_plan_counts_exactly_the_bytes_a_capture_holds(tiny, memory):
    captured = tiny.capture(["a photo of a cat", "a dog"], SITES, num_inference_steps=3)
    assert {s.site: s.shape for s in memory.sites} == {s: v.shape for s, v in captured.items()}
    assert {s.site: s.bytes for s in memory.sites} == {s: v.nbytes for s, v in captured.items()}
    assert memory.captured_bytes == sum(v.nbytes for v in captured.values())
    for name, component in tiny.components.items():   # the arrays themselves, drawn by the capture
        leaves = jax.tree.leaves(component.params)
        assert memory.by_component()[name] == {"float32": sum(a.nbytes for a in leaves)}
    assert memory.param_bytes == sum(p.count * 4 for p in memory.params)
    assert memory.temporaries_source == "xla" and memory.temporaries > 0
    assert memory.evaluations == len(captured.steps) and memory.guided and memory.devices == 1
    estimate = jaxprobe.plan(tiny, SITES, batch=2, steps=3, xla=False)
    assert estimate.temporaries_source == "analytic" and estimate.sites == memory.sites
    assert 0.5 < estimate.temporaries / memory.temporaries < 2   # the estimate's scale, not its value
    unreduced = jaxprobe.plan(tiny, "unet.mid_block", batch=3, steps=2, reduce="none", cfg=False, xla=False)
    (site,) = unreduced.sites   # (prompts, steps, h, w, c) in float32, whatever the compute dtype
    assert site.shape[:2] == (3, unreduced.evaluations) and site.bytes == 4 * int(np.prod(site.shape))
    assert not unreduced.guided


def test_sd3_random_plans_without_drawing_its_weights():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pipe = jaxprobe.load("sd3-random", dtype="bfloat16")
    memory = jaxprobe.plan(pipe, ["transformer.transformer_blocks.12", "text_encoder_3.encoder.final_layer_norm"],
                           batch=2, height=256, width=256, steps=2)
    assert not any(c.materialized for c in pipe.components.values())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert memory.param_bytes > 15e9 and grown < memory.param_bytes / 10, grown   # SD3.5-M: 8B parameters
    by_component = memory.by_component()
    assert set(by_component) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"}
    assert by_component["text_encoder_3"] == {"bfloat16": 4_762_310_656 * 2}   # T5-XXL's encoder, kept in bfloat16
    assert memory.family == "stable-diffusion-3" and memory.temporaries_source == "analytic"
    blocks = {s.site: s.shape for s in memory.sites}
    assert blocks == {"transformer.transformer_blocks.12": (2, 2, 1536), "text_encoder_3.encoder.final_layer_norm": (2, 4096)}
    config = pipe.unet.config   # SD3.5 Medium's published transformer config
    assert (config.num_layers, config.num_attention_heads, config.caption_projection_dim, config.pos_embed_max_size,
            config.dual_attention_layers, config.qk_norm) == (24, 24, 1536, 384, tuple(range(13)), "rms_norm")
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor, pipe.scheduler.shift) == (1.5305, 0.0609, 3.0)


def test_bad_plans_name_the_fix(tiny, memory):
    with pytest.raises(SiteError, match="(?s)matches no site.*jaxprobe info --sites"):
        jaxprobe.plan(tiny, "unet.no_such_block")
    with pytest.raises(InputError, match="height 33 px is not a multiple .* pick a multiple of 4 px"):
        jaxprobe.plan(tiny, height=33, width=32)
    with pytest.raises(InputError, match="latent size 17x16 must be divisible by 2"):
        jaxprobe.plan(tiny, height=34, width=32)
    with pytest.raises(InputError, match="device memory '80 gigs'.*80GB"):
        jaxprobe.plan(tiny, device_memory="80 gigs")
    with pytest.raises(InputError, match="dtype='bfloat16' differs"):
        jaxprobe.plan(tiny, dtype="bfloat16")
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("24GiB") == 24 * 2**30 and parse_bytes(1e9) == 10**9
    assert dataclasses.replace(memory, device_memory=parse_bytes("1MB")).devices == math.ceil(memory.total_bytes / 1e6)


def test_info_plan_prints_a_table_and_json():
    runner = CliRunner()
    args = ["info", "--plan", "tiny", "--batch", "2", "--steps", "2", "--site", "unet.mid_block", "--no-xla"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "unet.mid_block" in table.output and "analytic" in table.output and "devices of 80 GB" in table.output
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["batch"] == 2 and plan["sites"][0]["site"] == "unet.mid_block" and plan["devices"] == 1
    bad = runner.invoke(app, ["info", "--plan", "tiny", "--resolution", "big"])
    assert bad.exit_code == 2 and "HEIGHTxWIDTH" in bad.output
