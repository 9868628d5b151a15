"""Interventions (jaxprobe.interventions) on the tiny SD pipeline: identities, patching between prompts,
parity with diffusers runs under PyTorch forward hooks, ClampSAE, the Diffusion Lens, named errors.

Each distinct intervention structure compiles one program, so the tests share one pipeline, one
prompt batch and one step count, and a run is reused wherever two tests need the same one."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jaxprobe  # noqa: E402
from jaxprobe.errors import InterventionError, SiteError  # noqa: E402
from jaxprobe.interventions import Ablate, ClampSAE, Patch, SAEWeights, Scale, Steer  # noqa: E402

from sd_reference import count_compiles, save_pipeline, single_threaded  # noqa: E402

PROMPTS = ["a photo of a airplane", "a photo of a zebra"]
STEPS = 3            # PNDM: 4 UNet evaluations
GUIDANCE = 7.5
SITES = ["unet.mid_block", "latents"]
MID = "unet.mid_block"


@pytest.fixture(scope="session")
def sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("interventions_pipeline")
    reference = save_pipeline(path)
    pipe = jaxprobe.load(path)
    return reference, pipe


@pytest.fixture(scope="session")
def noise(sd):
    side = sd[1].unet.config.sample_size
    return np.random.default_rng(0).standard_normal((len(PROMPTS), 4, side, side)).astype(np.float32)


def _capture(pipe, noise, interventions=(), **options):
    with pytest.warns(UserWarning, match="reduce='none'"):
        return pipe.capture(PROMPTS, SITES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise,
                            reduce="none", interventions=interventions, **options)


@pytest.fixture(scope="session")
def base(sd, noise):
    return _capture(sd[1], noise)


def _width(pipe, site=MID):
    return pipe.output_shapes("unet")[site.removeprefix("unet.")][-1]


def test_zero_steer_unit_scale_and_self_patch_are_bit_identical(sd, noise, base):
    _, pipe = sd
    c = _width(pipe)
    runs = {
        "zero steer": [Steer(MID, np.zeros(c, np.float32))],
        "scale 1": [Scale(MID, 1.0)],
        # the capture is the conditional half, so the patch goes there
        "self patch": [Patch(MID, base[MID], branch="cond")],
    }
    for name, interventions in runs.items():
        out = _capture(pipe, noise, interventions)
        for site in SITES:
            np.testing.assert_array_equal(out[site], base[site], err_msg=f"{name}: {site}")
        assert out.options["interventions"]


def test_a_new_scale_or_vector_compiles_nothing(sd, noise, base):
    _, pipe = sd
    c = _width(pipe)
    steer = lambda v, s: [Steer(MID, v, scale=s, steps=range(1, 3))]  # noqa: E731
    first = _capture(pipe, noise, steer(np.ones(c, np.float32), 2.0))
    seen, stop = count_compiles()
    try:
        second = _capture(pipe, noise, steer(np.full(c, 0.5, np.float32), -1.0))
    finally:
        stop()
    assert not seen
    # captures show the intervened site: + scale * vector from the first steered step (later steps also
    # see the steered latents)
    np.testing.assert_array_equal(first[MID][:, 0], base[MID][:, 0])
    np.testing.assert_allclose(first[MID][:, 1] - base[MID][:, 1], 2.0, atol=1e-5)
    np.testing.assert_allclose(second[MID][:, 1] - base[MID][:, 1], -0.5, atol=1e-5)


def test_patching_b_into_a_gives_a_with_bs_mid_block(sd, noise, base):
    _, pipe = sd
    swapped = base[MID][::-1]       # prompt 0 gets prompt 1's mid block and the reverse
    # one prompt per batch: each batch must receive its own prompts' rows of the source
    out = _capture(pipe, noise, [Patch(MID, swapped)], batch_size=1)
    np.testing.assert_array_equal(out[MID], swapped)
    assert not np.allclose(out["latents"][:, -1], base["latents"][:, -1], atol=1e-3)


def _relative(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _diffusers_latents(reference, noise, module, hook):
    calls = []

    def counted(mod, args, output):
        step = len(calls)
        calls.append(step)
        return hook(step, output)

    handle = reference.unet.get_submodule(module).register_forward_hook(counted)
    try:
        with single_threaded(), torch.no_grad():
            latents = reference(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                latents=torch.from_numpy(noise), output_type="latent").images.numpy()
    finally:
        handle.remove()
    return latents.transpose(0, 2, 3, 1), len(calls)


def test_steer_over_a_step_range_matches_a_diffusers_forward_hook(sd, noise, base):
    reference, pipe = sd
    c = _width(pipe)
    vector = np.random.default_rng(1).standard_normal(c).astype(np.float32)
    steps, scale = range(1, 3), 3.0
    ours = _capture(pipe, noise, [Steer(MID, vector, scale=scale, steps=steps)])["latents"][:, -1]
    add = torch.from_numpy(scale * vector)[None, :, None, None]
    ref, n_calls = _diffusers_latents(reference, noise, "mid_block",
                                      lambda step, out: out + add if step in steps else out)
    assert n_calls == base["latents"].shape[1]          # one capture step per UNet evaluation
    assert _relative(ours, ref) < 1e-3
    assert _relative(base["latents"][:, -1], ref) > 1e-2  # the steer mattered


def test_steering_a_block_input_matches_a_diffusers_forward_pre_hook(sd, noise):
    """`X.input` sites take interventions too: the vector is added to what X is given, before it runs."""
    reference, pipe = sd
    module = "up_blocks.1.attentions.0"
    c = pipe.output_shapes("unet")[f"{module}.input"][-1]
    vector = np.random.default_rng(3).standard_normal(c).astype(np.float32)
    with pytest.warns(UserWarning, match="reduce='none'"):
        ours = pipe.capture(PROMPTS, ["latents", f"unet.{module}.input"], num_inference_steps=STEPS,
                            guidance_scale=GUIDANCE, latents=noise, reduce="none",
                            interventions=[Steer(f"unet.{module}.input", vector, scale=2.0)])
    add = torch.from_numpy(2.0 * vector)[None, :, None, None]
    given = []

    def pre(mod, args, kwargs):
        given.append(args[0] + add)
        return (args[0] + add, *args[1:]), kwargs

    handle = reference.unet.get_submodule(module).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with single_threaded(), torch.no_grad():
            ref = reference(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                            latents=torch.from_numpy(noise), output_type="latent").images.numpy()
    finally:
        handle.remove()
    assert _relative(ours["latents"][:, -1], ref.transpose(0, 2, 3, 1)) < 1e-3
    cond = np.stack([g[len(PROMPTS):].permute(0, 2, 3, 1).numpy() for g in given], axis=1)
    assert _relative(ours[f"unet.{module}.input"], cond) < 1e-3   # the capture shows the steered input


def test_ablating_a_block_matches_a_diffusers_forward_hook(sd, noise):
    reference, pipe = sd
    ours = _capture(pipe, noise, [Ablate("unet.up_blocks.0")])["latents"][:, -1]
    ref, _ = _diffusers_latents(reference, noise, "up_blocks.0", lambda step, out: torch.zeros_like(out))
    assert _relative(ours, ref) < 1e-3


def test_clamp_sae_at_the_current_values_is_the_identity(sd, noise, base):
    from jaxprobe.sae.model import pre_activations, top_k

    _, pipe = sd
    c, m, k = _width(pipe), 96, 8
    rng = np.random.default_rng(2)
    w_dec = rng.standard_normal((m, c)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    pooled = base[MID].mean(axis=(2, 3))                             # (n, T, c): what a "mean" capture trains on
    scale = float(np.sqrt(np.square(pooled - pooled.mean((0, 1))).sum(-1).mean()))
    sae = SAEWeights(W_enc=w_dec.T.copy(), b_enc=np.zeros(m, np.float32), W_dec=w_dec,
                     b_dec=pooled.mean((0, 1)) / scale, k=k, scale=scale)
    params = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    flat = pooled.reshape(-1, c) / scale
    pre = np.asarray(pre_activations(params, flat))
    values, indices = (np.asarray(a) for a in top_k(pre, k))
    code = np.zeros_like(pre)
    np.put_along_axis(code, indices, values, axis=1)
    kth = np.sort(pre, axis=1)[:, -k][:, None]
    clear = np.abs(pre - kth).min(axis=0) > 1e-2                   # far from the TopK threshold in every row
    chosen = [int(i) for i in np.flatnonzero(clear & (code > 0).any(axis=0))[:2]]
    assert chosen
    current = {i: code[:, i].reshape(pooled.shape[:2]) for i in chosen}   # (n, T) per latent
    out = _capture(pipe, noise, [ClampSAE(MID, sae, current, branch="cond")])
    for site in SITES:
        np.testing.assert_allclose(out[site], base[site], rtol=1e-4, atol=1e-4)


def test_text_encoder_interventions_act_on_the_conditioning(sd):
    _, pipe = sd
    layer0 = "text_encoder.text_model.encoder.layers.0"
    sites = [layer0, "text_encoder.text_model.encoder.layers.1"]
    d = pipe.text_encoder.config.hidden_size
    vector = np.random.default_rng(3).standard_normal(d).astype(np.float32)
    before = pipe.capture(PROMPTS, sites, reduce="none")
    after = pipe.capture(PROMPTS, sites, reduce="none", interventions=[Steer(layer0, vector)])
    np.testing.assert_allclose(after[layer0], before[layer0] + vector, atol=1e-5)
    assert not np.allclose(after[sites[1]], before[sites[1]], atol=1e-3)


def test_text_layer_lens_at_the_last_layer_equals_the_normal_run(sd, noise, base):
    _, pipe = sd
    last = _capture(pipe, noise, text_layer=pipe.text_encoder.config.num_hidden_layers)
    for site in SITES:
        np.testing.assert_array_equal(last[site], base[site])
    first = _capture(pipe, noise, text_layer=1)
    assert not np.allclose(first["latents"][:, -1], base["latents"][:, -1], atol=1e-3)


@pytest.mark.slow
def test_generate_takes_interventions_and_the_lens(sd, noise):
    _, pipe = sd
    kw = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise)
    normal = pipe.generate(PROMPTS, **kw)
    lens = pipe.generate(PROMPTS, text_layer=0, interventions=[Scale(MID, 1.0)], **kw)
    assert lens.shape == normal.shape and not np.allclose(lens, normal, atol=1e-3)


@pytest.mark.slow
def test_lens_command_writes_a_grid_and_a_page(sd, tmp_path):
    from typer.testing import CliRunner

    from jaxprobe.cli import app

    _, pipe = sd
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "lens"
    result = CliRunner().invoke(app, ["lens", "--model", pipe.source, "--prompts", str(prompts), "--layers", "0", "2",
                                      "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = np.load(out / "lens.npy")
    assert images.shape[:2] == (len(PROMPTS), 2)
    assert (out / "figures" / "lens.png").is_file()
    assert "Diffusion Lens" in (out / "lens.html").read_text()


@pytest.mark.slow
def test_directions_edit_writes_a_dose_response_page(tmp_path):
    """`jaxprobe directions edit` on the tiny model with a tiny CLIP vision tower and a saved direction."""
    import pandas as pd
    import transformers
    from typer.testing import CliRunner

    from jaxprobe.cli import app

    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(vision).save_pretrained(tmp_path / "vision")
    out = tmp_path / "out"
    out.mkdir()
    width = jaxprobe.load("tiny").unet.config.block_out_channels[-1]
    concepts = np.array(["doctor", "nurse", "man", "woman"])
    dirs = np.random.default_rng(0).standard_normal((len(concepts), 3, width)).astype(np.float32)
    np.savez(out / "directions.npz", concepts=concepts, **{"site/unet.mid_block": dirs})
    (tmp_path / "study.toml").write_text(f"""
[directions]
templates = ["a photo of a {{concept}}"]
seeds = [0]
num_inference_steps = 2
n_bootstrap = 20
associations = [["professions", "gender"]]
out = "{out}"
cache = "{tmp_path / 'cache'}"
[directions.families]
professions = ["doctor", "nurse"]
gender = ["man", "woman"]
""")
    result = CliRunner().invoke(app, ["directions", "edit", str(tmp_path / "study.toml"), "--direction", "woman",
                                      "--scales", "0,50", "--steps", "0:2", "--image-encoder", str(tmp_path / "vision")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "edit" / "woman" / "edit.csv")
    assert list(table["scale"]) == [0.0, 50.0] and table["change"].iloc[0] == 0.0
    assert table["change"].iloc[1] != 0.0
    assert (table["ci_low"] <= table["association"]).all() and (table["association"] <= table["ci_high"]).all()
    for name in ("dose_response", "grid"):
        assert (out / "edit" / "woman" / "figures" / f"{name}.png").is_file()
    assert "Dose-response" in (out / "edit" / "woman" / "edit.html").read_text()


@pytest.mark.slow
def test_sae_steer_clamps_latents_and_writes_a_page(tmp_path):
    """`jaxprobe sae steer` with an SAE trained on the tiny model's mid block at every step."""
    import pandas as pd
    from typer.testing import CliRunner

    from jaxprobe.cli import app
    from jaxprobe.sae import SAEConfig, train_saes

    prompts = ["a photo of a cat", "a photo of a dog", "a red car", "a tall tree"]
    pipe = jaxprobe.load("tiny")
    feats = pipe.capture(prompts, "unet.mid_block", num_inference_steps=2)
    train_saes(feats, SAEConfig(k=4, expansion=2, batch_size=4, steps=5, warmup_steps=1, checkpoint_every=0),
               tmp_path / "sae")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n")
    result = CliRunner().invoke(app, ["sae", "steer", str(tmp_path / "sae"), "-f", "unet.mid_block@1", "-p",
                                      str(tmp_path / "prompts.txt"), "--steps", "2", "--latents", "0",
                                      "--multiples", "0,3"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "sae" / "steer" / "sae_steer.csv")
    assert set(table["multiple"]) == {0.0, 3.0} and set(table["step"]) == {1, 2}
    at_step = table[table["step"] == 1].set_index("multiple")["activation"]
    assert at_step[0.0] < at_step[3.0]            # the clamped latent reads back higher when clamped higher
    for name in ("activation", "grid"):
        assert (tmp_path / "sae" / "steer" / "figures" / f"{name}.png").is_file()


def test_bad_interventions_are_named_errors_before_anything_runs(sd, noise, base):
    _, pipe = sd
    c = _width(pipe)
    kw = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise)
    with pytest.raises(SiteError, match="not a site that can be intervened on"):
        pipe.capture(PROMPTS, SITES, interventions=[Steer("unet.middle_block", np.zeros(c))], **kw)
    with pytest.raises(SiteError, match="not a site"):
        pipe.capture(PROMPTS, SITES, interventions=[Steer("unet.mid_block.attentions.0.transformer_blocks.0"
                                                          ".attn2.probs", np.zeros(c))], **kw)
    with pytest.raises(InterventionError, match=rf"vector has shape \({c + 1},\).*pass \({c},\)"):
        pipe.capture(PROMPTS, SITES, interventions=[Steer(MID, np.zeros(c + 1))], **kw)
    with pytest.raises(InterventionError, match=r"steps \[7\] are outside 0\.\.3"):
        pipe.capture(PROMPTS, SITES, interventions=[Scale(MID, 2.0, steps=[0, 7])], **kw)
    with pytest.raises(InterventionError, match="source has shape"):
        pipe.capture(PROMPTS, SITES, interventions=[Patch(MID, base[MID][:, :, :-1])], **kw)
    with pytest.raises(InterventionError, match="needs classifier-free guidance"):
        pipe.capture(PROMPTS, SITES, interventions=[Scale(MID, 2.0, branch="uncond")],
                     **{**kw, "guidance_scale": 1.0})
    with pytest.raises(InterventionError, match="steps do not apply"):
        pipe.capture(PROMPTS, SITES, interventions=[Scale("text_encoder.text_model.encoder.layers.0", 2.0, steps=[0])],
                     **kw)
    with pytest.raises(InterventionError, match="how must be"):
        pipe.capture(PROMPTS, SITES, interventions=[Ablate(MID, how="median")], **kw)
    with pytest.raises(InterventionError, match="pass Steer, Patch"):
        pipe.capture(PROMPTS, SITES, interventions=[("steer", MID)], **kw)
