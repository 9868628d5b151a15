"""DiT against diffusers: every transformer block of a tiny DiTTransformer2DModel, guided DDIM sampling against
DiTPipeline on the same initial latents, class names through id2label, sites and loading errors."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sd_reference  # noqa: E402
import transformer_reference  # noqa: E402
from transformer_reference import relative_error  # noqa: E402
from jaxprobe.checkpoints.diffusers import load_denoiser  # noqa: E402
from jaxprobe.errors import CheckpointError, InputError, SiteError  # noqa: E402
from jaxprobe.models.families import FAMILIES  # noqa: E402
from jaxprobe.pipeline.labels import class_label_ids  # noqa: E402
from jaxprobe.pipeline.sites import flatten_intermediates  # noqa: E402

RTOL = 1e-4
CLASSES = ["golden retriever", "white shark"]


@pytest.fixture(scope="session")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit")
    reference = transformer_reference.save_dit_pipeline(folder)
    return folder, reference


@pytest.fixture(scope="session")
def dit_pipe(dit_folder):
    import jaxprobe

    return jaxprobe.load(dit_folder[0])


@pytest.fixture(scope="module")
def forward(dit_folder):
    folder, reference = dit_folder
    model = reference.transformer
    component = load_denoiser(folder / "transformer", component="transformer")
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((3, 8, 8, 4), dtype=np.float32)
    timesteps, labels = np.array([10, 500, 999]), np.array([207, 2, 1000])
    apply = functools.partial(component.module.apply, mutable=["intermediates"])
    out, state = sd_reference.run_once(apply, {"params": component.params}, sample, timesteps, labels)
    sites = flatten_intermediates(state["intermediates"])
    names = dict(model.named_modules())
    ref, ref_sites = sd_reference.run_with_hooks(model, [s for s in sites if s in names], lambda: model(
        sd_reference.nchw(sample), torch.as_tensor(timesteps), torch.as_tensor(labels)).sample)
    return dict(model=model, out=np.asarray(out), ref=sd_reference.nhwc(ref), sites=sites, ref_sites=ref_sites)


def test_every_dit_block_matches_diffusers(forward):
    assert forward["out"].shape == (3, 8, 8, 8)   # learned sigma: noise and variance halves
    assert relative_error(forward["out"], forward["ref"]) < RTOL
    expected = {"pos_embed", "norm_out", *(f"transformer_blocks.{i}{part}" for i in range(3)
                                           for part in ("", ".attn1", ".ff"))}
    assert expected <= set(forward["ref_sites"])
    for site, ref in forward["ref_sites"].items():
        assert relative_error(forward["sites"][site], ref) < RTOL, site


def test_legacy_transformer2d_folders_and_fp16_variants_load_as_dit(tmp_path, dit_folder):
    import jax

    folder, reference = dit_folder
    plain = load_denoiser(folder / "transformer", component="transformer")
    transformer_reference.save_dit_pipeline(tmp_path / "legacy", legacy=True)
    legacy = load_denoiser(tmp_path / "legacy" / "transformer", component="transformer")
    assert json.loads((tmp_path / "legacy" / "transformer" / "config.json").read_text())["_class_name"] == \
        "Transformer2DModel"
    assert legacy.config == plain.config
    reference.transformer.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    reference.transformer.to(torch.float32)
    assert any(tmp_path.glob("fp16/*.fp16.safetensors"))
    half = load_denoiser(tmp_path / "fp16", component="transformer", variant="fp16")
    for ours, full in zip(jax.tree.leaves(half.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(full), rtol=1e-3, atol=1e-3)


def test_class_names_resolve_through_id2label():
    id2label = transformer_reference.ID2LABEL
    ids = class_label_ids(["great white shark", "white shark", "tench", 281, "207", ""], id2label, 1000)
    assert ids.tolist() == [2, 2, 0, 281, 207, 1000]        # "" is the null class


@pytest.mark.parametrize(("prompt", "words"), [
    ("golden retreiver", "did you mean 'golden retriever'"),
    ("Goldfish", "did you mean 'goldfish'"),
    ("zebra", "integer labels work too"),
    (1000, "out of range"),
    (-3, "out of range"),
])
def test_unknown_class_names_are_named_errors(prompt, words):
    with pytest.raises(InputError, match=words):
        class_label_ids([prompt], transformer_reference.ID2LABEL, 1000)


def test_without_id2label_only_integer_labels_work():
    with pytest.raises(InputError, match="no id2label"):
        class_label_ids(["tench"], None, 1000)


@pytest.mark.filterwarnings("ignore:reduce='none' keeps full maps")
def test_dit_pipeline_sites_and_reductions(dit_pipe):
    assert dit_pipe.family.name == "dit" and dit_pipe.text_encoder is None
    assert dit_pipe.sites() == ["transformer.pos_embed", *(f"transformer.transformer_blocks.{i}" for i in range(3)),
                                "transformer.norm_out", "latents", "pred_original_sample"]   # call order
    assert "transformer.transformer_blocks.0.attn1" in dit_pipe.sites(all=True)
    feats = dit_pipe.capture(CLASSES, ["transformer.*", "transformer.transformer_blocks.1.contribution",
                                       "transformer.transformer_blocks.1.input"],
                             num_inference_steps=2, guidance_scale=4.0,
                             reduce={"*.input": "none", "*": "mean"})
    assert feats["transformer.transformer_blocks.0"].shape == (2, 2, 16)      # (n, steps, width)
    assert feats["transformer.transformer_blocks.1.input"].shape == (2, 2, 4, 4, 16)   # tokens as (h, w) maps
    mean_input = feats["transformer.transformer_blocks.1.input"].mean(axis=(2, 3))
    np.testing.assert_allclose(feats["transformer.transformer_blocks.1.contribution"],
                               feats["transformer.transformer_blocks.1"] - mean_input, atol=1e-5)
    peak = dit_pipe.capture(CLASSES[:1], ["transformer.norm_out"], num_inference_steps=2, reduce="max")
    assert peak["transformer.norm_out"].shape == (1, 2, 16)


def test_text_sites_of_a_class_conditional_pipeline_are_refused(dit_pipe):
    with pytest.raises(SiteError, match="pattern"):
        dit_pipe.capture(CLASSES, ["text_encoder.*"], num_inference_steps=2)
    with pytest.raises(InputError, match="did you mean 'golden retriever'"):
        dit_pipe.capture(["golden retreiver"], ["transformer.norm_out"], num_inference_steps=2)
    with pytest.raises(InputError, match="has no text encoder"):
        dit_pipe.generate(CLASSES, num_inference_steps=2, text_layer=1)


def _reference_latents(reference, monkeypatch, latents: np.ndarray, hook=None) -> np.ndarray:
    """DiTPipeline's final latents (NHWC) from the given initial latents: it draws its own noise and decodes, so
    the draw is replaced and the decoder's input recorded. hook: a forward hook on transformer_blocks.1."""
    monkeypatch.setattr("diffusers.pipelines.dit.pipeline_dit.randn_tensor",
                        lambda shape, **kw: torch.from_numpy(latents.copy()))
    decoded = []
    decode = reference.vae.decode
    monkeypatch.setattr(reference.vae, "decode", lambda z, *a, **k: decoded.append(z.clone()) or decode(z, *a, **k))
    handle = reference.transformer.transformer_blocks[1].register_forward_hook(hook) if hook else None
    try:
        with sd_reference.single_threaded(), torch.no_grad():
            reference(class_labels=reference.get_label_ids(CLASSES), guidance_scale=4.0, num_inference_steps=4,
                      output_type="np")
    finally:
        if handle is not None:
            handle.remove()
    return (decoded[0].numpy() * reference.vae.config.scaling_factor).transpose(0, 2, 3, 1)


@pytest.mark.filterwarnings("ignore:reduce='none' keeps full maps")
def test_guided_ddim_sampling_matches_dit_pipeline(dit_folder, dit_pipe, monkeypatch):
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    theirs = _reference_latents(dit_folder[1], monkeypatch, latents)
    ours = dit_pipe.capture(CLASSES, ["latents"], num_inference_steps=4, guidance_scale=4.0, latents=latents,
                            timesteps=[-1], reduce="none")["latents"][:, -1]
    assert relative_error(ours, theirs) < 1e-3


@pytest.mark.filterwarnings("ignore:reduce='none' keeps full maps")
def test_steering_a_dit_block_matches_a_diffusers_forward_hook(dit_folder, dit_pipe, monkeypatch):
    """Interventions on patch tokens: Steer on transformer_blocks.1 over two steps, both CFG halves."""
    from jaxprobe.interventions import Steer

    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vector, steps, scale = np.random.default_rng(1).standard_normal(16).astype(np.float32), range(1, 3), 2.0
    calls = []

    def hook(module, args, output):
        calls.append(None)
        return output + torch.from_numpy(scale * vector) if len(calls) - 1 in steps else output

    theirs = _reference_latents(dit_folder[1], monkeypatch, latents, hook)
    steer = Steer("transformer.transformer_blocks.1", vector, scale=scale, steps=steps)
    ours = dit_pipe.capture(CLASSES, ["latents"], num_inference_steps=4, guidance_scale=4.0, latents=latents,
                            timesteps=[-1], reduce="none", interventions=[steer])["latents"][:, -1]
    plain = dit_pipe.capture(CLASSES, ["latents"], num_inference_steps=4, guidance_scale=4.0, latents=latents,
                             timesteps=[-1], reduce="none")["latents"][:, -1]
    assert relative_error(ours, theirs) < 1e-3 and relative_error(plain, theirs) > 1e-2


def test_loading_errors_are_named(tmp_path, dit_folder):
    folder, _ = dit_folder
    config = json.loads((folder / "transformer" / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel",
                                                 "norm_type": "ada_norm_zero", "cross_attention_dim": 32}))
    with pytest.raises(CheckpointError, match="cross_attention_dim=32"):
        load_denoiser(bad, component="transformer")
    (bad / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel",
                                                 "norm_type": "layer_norm"}))
    with pytest.raises(CheckpointError, match="Transformer2DModel, which no jaxprobe denoiser family reads"):
        load_denoiser(bad, component="transformer")
    (bad / "config.json").write_text(json.dumps({**config, "num_layers": 4}))
    for weights in (folder / "transformer").glob("*.safetensors"):
        (bad / weights.name).write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="missing keys"):
        load_denoiser(bad, component="transformer")


def test_dit_random_is_dit_xl_2_at_full_size():
    import jax

    from jaxprobe.checkpoints.random import RANDOM_MODELS
    from jaxprobe.checkpoints.weights import abstract_params
    from jaxprobe.models.dit import DiTTransformer2DModel, example_inputs

    config = RANDOM_MODELS["dit-random"](100)["transformer"]
    shapes = abstract_params(DiTTransformer2DModel(config), example_inputs(config))
    # DiT-XL/2's 675M, plus the timestep and class embeddings every block of diffusers' checkpoint repeats
    assert round(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) / 1e6) == 750
    assert config.width == 1152 and config.num_layers == 28 and config.output_channels == 8
    assert FAMILIES["dit"].bottleneck(config) == "transformer_blocks.14"


def test_real_image_features_are_unconditional_or_of_a_class(dit_pipe):
    images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    null = dit_pipe.capture_images(images, ["transformer.transformer_blocks.1"], t=25)
    shark = dit_pipe.capture_images(images, ["transformer.transformer_blocks.1"], t=25, prompt="white shark")
    assert null["transformer.transformer_blocks.1"].shape == (2, 16)
    assert not np.allclose(null["transformer.transformer_blocks.1"], shark["transformer.transformer_blocks.1"])


def test_classifiers_compare_a_unet_and_a_dit(dit_pipe, tmp_path):
    """Revelio's cross-architecture comparison: the same heads on the bundled tiny UNet and the tiny DiT, each at
    its family's default sites (the DiT: its middle block onward, in call order)."""
    import jaxprobe
    from jaxprobe.studies.revelio.classify import ClassifyConfig, compare, default_sites
    from test_classify import draw_shapes

    draw_shapes(tmp_path / "shapes", per_class=6)
    config = ClassifyConfig(data=str(tmp_path / "shapes"), timesteps=(25,), classifiers=("linear",),
                            out=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    table = compare(config, {"unet": jaxprobe.load("tiny"), "dit": dit_pipe}, progress=False,
                    log=lambda _: None).table
    assert list(dict.fromkeys(table["model"])) == ["unet", "dit"]
    # the tiny DiT's middle block is 1 of its 3 (DiT-XL/2's: 14 of 28): the heads read it and what follows
    blocks = [s for s in dit_pipe.sites() if s.startswith("transformer.")]
    assert dit_pipe.bottleneck_site == "transformer.transformer_blocks.1"
    assert default_sites(dit_pipe) == blocks[blocks.index("transformer.transformer_blocks.1"):]
    assert list(table[table["model"] == "dit"]["site"]) == default_sites(dit_pipe)
    assert table["accuracy"].between(0, 1).all() and (tmp_path / "out" / "report.html").is_file()


def test_directions_in_the_dit_bottleneck_without_a_text_comparison(dit_pipe, tmp_path):
    """`jaxprobe directions` on a class-conditioned transformer: the concepts are class names, h-space is the
    family's middle block, and there is no text tower to compare with."""
    from jaxprobe.studies.decoding_diffusion import directions

    config = directions.DirectionsConfig(
        model="(tiny dit)", templates=("{concept}",), baseline="others", seeds=(0, 1), num_inference_steps=2,
        n_bootstrap=20, n_clusters=2, families={"dogs": ("golden retriever",), "fish": ("goldfish", "tench")},
        associations=(("dogs", "fish"),), out=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    assert dit_pipe.summary_text_site is None and directions.comparison_text_site(config, dit_pipe) is None
    directions.build(config, pipe=dit_pipe)
    saved = directions.read_directions(config.out)
    # 3 concepts x 2 DDIM steps x the tiny DiT's width 16; no text directions
    assert saved["site/transformer.transformer_blocks.1"].shape == (3, 2, 16) and "text" not in saved
    out = directions.score(config, pipe=dit_pipe)
    assoc = pd.read_parquet(out / "associations.parquet")
    assert "clip_score" not in assoc.columns and assoc["score"].notna().all()
