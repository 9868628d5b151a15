"""Every study on tiny SDXL pipelines, end to end through the CLI: norms probing over both text encoders,
Revelio's classifiers on real images (their one UNet pass checked against diffusers' SDXL UNet), SAEs on the
SDXL-Turbo hook points' contributions, and h-space directions with Turbo's guidance 0."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import sd_reference  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import jaxprobe  # noqa: E402
from jaxprobe.cli import app  # noqa: E402

runner = CliRunner()
# The four transformer blocks SDXL-Turbo SAEs are trained on; the "sdxl3" layout has all four names.
TURBO_HOOK_POINTS = ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                     "up_blocks.0.attentions.1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(folder, the diffusers reference pipeline, jaxprobe's pipeline) of one tiny SDXL base, for every test."""
    path = tmp_path_factory.mktemp("sdxl_studies") / "sdxl"
    reference = sd_reference.save_sdxl_pipeline(path)
    return path, reference, jaxprobe.load(path)


def _invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_norms_run_probes_both_text_encoders(sdxl, tmp_path):
    path, _, pipe = sdxl
    config = tmp_path / "study.toml"
    config.write_text('[experiment]\nmax_concepts = 12\nnum_inference_steps = 2\nguidance_scale = 5.0\n'
                      'n_permutations = 3\nn_bootstrap = 5\nouter_cv = 3\ninner_cv = 3\nvariance_permutations = 0\n'
                      f'unet_sites = ["unet.mid_block"]\nout = "{tmp_path / "out"}"\ncache = "{tmp_path / "cache"}"\n')
    _invoke("run", config, "--model", path)
    profile = pd.read_parquet(tmp_path / "out" / "decoding.parquet")
    text = profile.loc[profile["stage"] == "text", "site"]
    assert set(text) == {s for s in pipe.sites() if s.startswith(("text_encoder.", "text_encoder_2."))}
    assert text.str.startswith("text_encoder_2.").sum() == 6     # embeddings, 3 layers, final norm, projection
    assert set(profile.loc[profile["stage"] == "unet", "timestep"]) == {0, 1}
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Per text encoder, decoding peaks at text_encoder: " in html and "; text_encoder_2: " in html
    assert "te2 " in html and "Among the text-encoder layers" in html and "After the text encoder" in html
    variance = pd.read_parquet(tmp_path / "out" / "variance.parquet")
    assert set(variance["site"]) == {"unet.mid_block"}


@pytest.mark.slow
def test_classify_real_images_on_sdxl_with_pooled_text_and_time_ids(sdxl, tmp_path):
    """Revelio's setting on SDXL: the one UNet pass gets the prompt's pooled embedding and the time ids, as
    diffusers conditions it; then `jaxprobe classify` end to end."""
    from diffusers import DDPMScheduler
    from test_classify import draw_shapes

    from jaxprobe.pipeline.programs import initial_noise

    path, reference, pipe = sdxl
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    t, prompt = 25, "a red shape"
    ours = pipe.capture_images(images, ["unet.mid_block"], t=t, prompt=prompt, seed=1, reduce="none")
    seen = {}
    handle = reference.unet.mid_block.register_forward_hook(lambda m, a, out: seen.update(h=out))
    try:
        with torch.no_grad():
            x0 = reference.vae.encode(sd_reference.nchw(images * 2 - 1)).latent_dist.mean
            x0 = x0 * reference.vae.config.scaling_factor
            noise = np.asarray(initial_noise(np.int32(1), np.arange(2, dtype=np.int32), (16, 16, 4)))
            noisy = DDPMScheduler.from_config(reference.scheduler.config).add_noise(
                x0, sd_reference.nchw(noise), torch.tensor([t]))
            embeds, _, pooled, _ = reference.encode_prompt(prompt, do_classifier_free_guidance=False)
            time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])   # image size, crop (0, 0), target size
            reference.unet(noisy, t, embeds.expand(2, -1, -1),
                           added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": time_ids.expand(2, -1)})
    finally:
        handle.remove()
    np.testing.assert_allclose(ours["unet.mid_block"], sd_reference.nhwc(seen["h"]), atol=1e-4, rtol=1e-4)

    data = draw_shapes(tmp_path / "shapes", per_class=6)
    _invoke("classify", data, "-m", path, "-s", "unet.mid_block", "-s", "unet.up_blocks.0", "--t", "25",
            "-c", "linear", "--prompt", prompt, "-o", tmp_path / "out", "--cache", tmp_path / "cache")
    accuracy = pd.read_parquet(tmp_path / "out" / "accuracy.parquet")
    assert set(accuracy["site"]) == {"unet.mid_block", "unet.up_blocks.0"} and accuracy["accuracy"].between(0, 1).all()


@pytest.mark.slow
def test_sae_trains_on_the_turbo_hook_point_contributions(tmp_path):
    """`jaxprobe extract` of the four hook points' contributions at Turbo's one step without guidance, then
    `jaxprobe sae train` on them, chosen by a pattern over the derived-site names."""
    sd_reference.save_sdxl_pipeline(tmp_path / "sdxl3", "sdxl3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of a {thing}\n" for thing in
                               ("cat", "dog", "car", "tree", "house", "boat", "lamp", "chair")))
    sites = [f"unet.{m}.contribution" for m in TURBO_HOOK_POINTS]
    _invoke("extract", "-m", tmp_path / "sdxl3", "-p", prompts, "-o", tmp_path / "feats",
            *[arg for s in sites for arg in ("-s", s)], "--steps", "1", "--guidance-scale", "0",
            "--cache", tmp_path / "cache")
    shapes = json.loads((tmp_path / "feats" / "manifest.json").read_text())["sites"]
    assert sorted(shapes) == sorted(sites) and all(shape[:2] == [8, 1] for shape in shapes.values())
    _invoke("sae", "train", "-f", tmp_path / "feats", "-s", "unet.*.contribution", "-o", tmp_path / "sae",
            "--k", "4", "--expansion", "2", "--steps", "4", "--batch-size", "8", "--warmup", "1")
    metrics = pd.read_csv(tmp_path / "sae" / "metrics.csv")
    assert set(metrics["feature_set"]) == {f"{s}@0" for s in sites}


@pytest.mark.slow
def test_directions_in_the_sdxl_bottleneck_at_turbo_settings(sdxl, tmp_path):
    from jaxprobe.studies.decoding_diffusion.directions import DirectionsConfig

    path, _, pipe = sdxl
    assert pipe.bottleneck_site == "unet.mid_block"   # h-space: the directions' default site
    config = tmp_path / "study.toml"   # the CLI reads a TOML file: the config's own writer makes it
    config.write_text(DirectionsConfig(
        model=str(path), neutral_prompts=("a photo of a person",), seeds=(0, 1), num_inference_steps=2,
        guidance_scale=0.0, n_bootstrap=20, n_clusters=2, associations=(("professions", "gender"),),
        families={"professions": ("doctor", "nurse"), "gender": ("man", "woman")}, out=str(tmp_path / "out"),
        cache=str(tmp_path / "cache")).to_toml())
    for command in ("build", "score"):
        _invoke("directions", command, config)
    _invoke("directions", "report", tmp_path / "out")
    saved = np.load(tmp_path / "out" / "directions.npz")
    assert saved["site/unet.mid_block"].shape == (5, 2, pipe.unet.config.block_out_channels[-1])
    assert saved["text"].shape == (5, pipe.text_encoder.config.hidden_size)
    assoc = pd.read_parquet(tmp_path / "out" / "associations.parquet")
    assert set(assoc["query"]) == {"doctor", "nurse"} and assoc["score"].notna().all()
    assert (tmp_path / "out" / "report.html").is_file()
