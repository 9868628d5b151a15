"""Checkpoints as users have them: original-layout single files and LoRA adapters (issue 18).

A converter here writes a tiny diffusers pipeline back into the original single-file layout (SD 1.x with
transformers-style CLIP keys, SD 2.x with OpenCLIP's fused attention and one layer more); diffusers'
`from_single_file(config=...)` reads it back to the same weights, which checks the converter, and
jaxprobe's loader must then give exactly the parameters of the diffusers folder. LoRA files in the
kohya and PEFT layouts are merged and compared with diffusers' `load_lora_weights` + `fuse_lora`.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

import jax  # noqa: E402

import jaxprobe  # noqa: E402
import sd_reference  # noqa: E402
from jaxprobe.checkpoints.weights import torch_key  # noqa: E402
from jaxprobe.errors import CheckpointError  # noqa: E402

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_to_original(state: dict, config: dict) -> dict:
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    rules = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    k = 1
    for b in range(n):
        for i in range(layers):
            rules[f"down_blocks.{b}.resnets.{i}"], rules[f"down_blocks.{b}.attentions.{i}"] = \
                f"input_blocks.{k}.0", f"input_blocks.{k}.1"
            k += 1
        if b < n - 1:
            rules[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    for u, kind in enumerate(config["up_block_types"]):
        for i in range(layers + 1):
            k = u * (layers + 1) + i
            rules[f"up_blocks.{u}.resnets.{i}"], rules[f"up_blocks.{u}.attentions.{i}"] = \
                f"output_blocks.{k}.0", f"output_blocks.{k}.1"
            rules[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if 'CrossAttn' in kind else 1}.conv"
    out = {}
    for key, value in state.items():
        prefix = max((r for r in rules if key.startswith(r + ".")), key=len)
        rest = key[len(prefix) + 1:]
        if ".resnets." in prefix:
            head, _, leaf = rest.partition(".")
            rest = f"{_RESNET[head]}.{leaf}"
        out[f"model.diffusion_model.{rules[prefix]}.{rest}"] = value
    return out


def _vae_to_original(state: dict, n: int) -> dict:
    out = {}
    for key, value in state.items():
        new = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        new = new.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
        new = new.replace("conv_shortcut", "nin_shortcut")
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{n - 1 - i}.upsample")
        if ".attn_1." in new:
            for ours, theirs in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                                 ("to_out.0", "proj_out")):
                new = new.replace(f".attn_1.{ours}.", f".attn_1.{theirs}.")
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[f"first_stage_model.{new}"] = value
    return out


def _open_clip(state: dict, n_layers: int, rng: np.random.Generator, prefix: str = "cond_stage_model.model.",
               extra_layer: bool = True) -> dict:
    """transformers CLIP text keys -> OpenCLIP's under `prefix`; extra_layer: plus one final layer (SD 2.x's file
    has it; the diffusers text_encoder, conditioned on the penultimate layer, does not); a text_projection
    (SDXL's bigG) as OpenCLIP's (width, projection) matrix."""
    t = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"token_embedding.weight": t["embeddings.token_embedding.weight"],
           "positional_embedding": t["embeddings.position_embedding.weight"],
           "ln_final.weight": t["final_layer_norm.weight"], "ln_final.bias": t["final_layer_norm.bias"]}
    if "text_projection.weight" in t:
        out["text_projection"] = t["text_projection.weight"].T
    for i in range(n_layers + extra_layer):
        src = f"encoder.layers.{min(i, n_layers - 1)}."
        extra = i == n_layers  # random, so that using it would show
        draw = (lambda v: torch.from_numpy(rng.standard_normal(v.shape).astype(np.float32))) if extra else (lambda v: v)
        dst = f"transformer.resblocks.{i}."
        out[dst + "attn.in_proj_weight"] = draw(torch.cat([t[src + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        out[dst + "attn.in_proj_bias"] = draw(torch.cat([t[src + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
        for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for leaf in ("weight", "bias"):
                out[f"{dst}{theirs}.{leaf}"] = draw(t[f"{src}{ours}.{leaf}"])
    return {f"{prefix}{k}": v for k, v in out.items()}


def _text_keys(model) -> dict:
    """A text tower's state dict with the text_model. level every released single file has (transformers >= 5
    leaves it out of CLIPTextModel)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in model.state_dict().items() if "position_ids" not in k}


def write_single_file(pipe, path, style: str, ema: bool = False) -> None:
    """The pipeline in the original layout of `style`: "sd1", "sd2", "sdxl" (base) or "sdxl-refiner"."""
    unet = _unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config))
    state = {**unet, **_vae_to_original(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))}
    rng = np.random.default_rng(0)
    if style == "sd2":
        state.update(_open_clip(_text_keys(pipe.text_encoder), pipe.text_encoder.config.num_hidden_layers, rng))
    elif style == "sd1":
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in _text_keys(pipe.text_encoder).items()})
    else:  # SDXL: ViT-L in transformers' names as embedder 0 (base only), bigG in OpenCLIP's after it
        if style == "sdxl":
            state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in _text_keys(pipe.text_encoder).items()})
        state.update(_open_clip(_text_keys(pipe.text_encoder_2), pipe.text_encoder_2.config.num_hidden_layers, rng,
                                f"conditioner.embedders.{1 if style == 'sdxl' else 0}.model.", extra_layer=False))
    if ema:  # the training copy is perturbed: the EMA copy (the pipeline's own weights) must win
        ema_copy = {"model_ema." + k.removeprefix("model.").replace(".", ""): v for k, v in unet.items()}
        state.update({k: v + 0.5 for k, v in unet.items()})
        state.update(ema_copy)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _leaves(pipe) -> dict:
    return {name: [np.asarray(x) for x in jax.tree.leaves(getattr(pipe, name).params)]
            for name in ("unet", "vae", "text_encoder")}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def original(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"pipeline_{request.param}")
    pipe = sd_reference.save_pipeline(folder, request.param)
    path = folder.parent / f"{request.param}-single.safetensors"
    write_single_file(pipe, path, request.param)
    write_single_file(pipe, path.with_suffix(".ema.safetensors"), request.param, ema=True)
    return request.param, folder, path, pipe


def test_diffusers_reads_the_converted_file_back_to_the_same_weights(original):
    style, folder, path, pipe = original
    if style == "sd2":
        pytest.skip("diffusers' single-file loader asks the Hub for OpenCLIP text configs; jaxprobe's side is tested")
    loaded = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                               safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        for key, value in ours.items():
            if "position_ids" not in key:
                torch.testing.assert_close(theirs[key], value, msg=f"{name}.{key}")


def test_single_file_loads_exactly_the_folder_parameters(original):
    style, folder, path, _ = original
    direct = _leaves(jaxprobe.load(folder))
    for file in (path, path.with_suffix(".ema.safetensors")):  # the EMA copy wins over the perturbed training one
        single = jaxprobe.load(file, config=folder)
        for name, leaves in _leaves(single).items():
            for ours, expected in zip(leaves, direct[name], strict=True):
                np.testing.assert_array_equal(ours, expected, err_msg=f"{style} {name} {file.name}")
    assert single.scheduler == jaxprobe.load(folder).scheduler
    v_pred = jaxprobe.load(path, config=folder, prediction_type="v_prediction")
    assert v_pred.scheduler.prediction_type == "v_prediction"


def test_bad_single_files_get_named_errors(original, tmp_path):
    style, folder, path, _ = original
    with pytest.raises(CheckpointError, match="Pass config="):
        jaxprobe.load(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        jaxprobe.load(truncated, config=folder)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(unknown))
    with pytest.raises(CheckpointError, match=r"no Stable Diffusion layout in this file: it holds 'encoder.weight' "
                                              r"\(1 key\)"):
        jaxprobe.load(unknown, config=folder)
    sd3 = tmp_path / "sd3.safetensors"   # an MMDiT under the UNet's prefix: named, not read as an SD 1.x UNet
    save_file({f"model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight": torch.zeros(2) for i in range(3)},
              str(sd3))
    with pytest.raises(CheckpointError, match=r"holds 'model.diffusion_model' \(3 keys\) \(these look like SD3"):
        jaxprobe.load(sd3, config=folder)


# --- SDXL ------------------------------------------------------------------------------------------------

# Unequal text widths, as in SDXL itself (768 + 1280): diffusers' single-file loader picks the tower for each
# text encoder by comparing widths, and with equal ones loads ViT-L's keys into text_encoder_2.
SDXL_WIDTHS = (24, 40)


@pytest.fixture(scope="module", params=["sdxl", "sdxl-refiner"])
def sdxl_original(request, tmp_path_factory):
    """A tiny SDXL base or refiner (the "sdxl3" UNet: no attention in the first block, transformer depths 1-2-3,
    two layers per block), its folder and the same weights in the original single-file layout."""
    style = request.param
    folder = tmp_path_factory.mktemp(style)
    pipe = sd_reference.save_sdxl_pipeline(folder, "sdxl3", refiner=style == "sdxl-refiner", widths=SDXL_WIDTHS)
    path = folder.parent / f"{style}-single.safetensors"
    write_single_file(pipe, path, style)
    return style, folder, path, pipe


def _named_leaves(component) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(component.params)[0]
    return {torch_key(tuple(str(getattr(k, "key", k)) for k in path)): np.asarray(leaf) for path, leaf in flat}


def test_sdxl_single_files_load_like_diffusers_from_single_file(sdxl_original):
    """diffusers' own key mapping reads the converted file back to the pipeline's weights (which checks the
    converter), and jaxprobe's loader gives exactly the folder's parameters, block by block and layer by layer."""
    style, folder, path, pipe = sdxl_original
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if style == "sdxl-refiner" else diffusers.StableDiffusionXLPipeline
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    components = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if style == "sdxl" else [])
    for name in components:
        theirs = getattr(loaded, name).state_dict()
        for key, value in getattr(pipe, name).state_dict().items():
            if "position_ids" not in key:
                torch.testing.assert_close(theirs[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    single, direct = jaxprobe.load(path, config=folder), jaxprobe.load(folder)
    assert list(single.text_encoders) == list(direct.text_encoders)
    assert single.provenance["sha256"] and single.pipeline_options == direct.pipeline_options
    for name in components:
        ours, expected = _named_leaves(getattr(single, name)), _named_leaves(getattr(direct, name))
        assert ours.keys() == expected.keys()
        for key, leaf in expected.items():
            np.testing.assert_array_equal(ours[key], leaf, err_msg=f"{style} {name}.{key}")
    assert {"add_embedding.linear_1.weight", "down_blocks.2.attentions.1.transformer_blocks.2.attn2.to_k.weight",
            "up_blocks.0.attentions.2.transformer_blocks.2.ff.net.2.weight"} <= set(_named_leaves(single.unet))


def test_sdxl_single_file_sampling_matches_diffusers_at_every_block_and_layer(sdxl_original):
    """A short sampling run of the single file, jaxprobe against the diffusers pipeline loaded from the same
    file: the final latents, every UNet block at every step and every layer of both text encoders."""
    style, folder, path, _ = sdxl_original
    if style == "sdxl-refiner":
        pytest.skip("diffusers runs a refiner only as img2img; its weights are compared above")
    reference = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder),
                                                                     local_files_only=True)
    pipe = jaxprobe.load(path, config=folder)
    prompts, steps = ["a photo of a zebra", "a drawing of a banana"], 3
    latents = np.random.default_rng(5).standard_normal((2, 4, 16, 16)).astype(np.float32)
    blocks = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1",
              "up_blocks.2")
    texts = [f"{c}.text_model.encoder.layers.{i}" for c in ("text_encoder", "text_encoder_2") for i in range(3)]
    # guidance 1: one UNet pass per step in both, so each hooked call is the captured one
    feats = pipe.capture(prompts, ["latents", *(f"unet.{b}" for b in blocks), *texts], num_inference_steps=steps,
                         guidance_scale=1.0, latents=latents, reduce={"text_encoder*": "none", "latents": "none", "*": "mean"})
    calls = {b: [] for b in blocks}

    def keep(name):
        def hook(module, args, output):
            calls[name].append((output[0] if isinstance(output, tuple) else output).mean(dim=(2, 3)).numpy())
        return hook

    handles = [reference.unet.get_submodule(b).register_forward_hook(keep(b)) for b in blocks]
    try:
        with sd_reference.single_threaded(), torch.no_grad():
            theirs = reference(prompts, num_inference_steps=steps, guidance_scale=1.0,
                               latents=torch.from_numpy(latents), output_type="latent").images.numpy()
            hidden = {}
            for c, tok in (("text_encoder", reference.tokenizer), ("text_encoder_2", reference.tokenizer_2)):
                ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                hidden[c] = getattr(reference, c)(ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()

    def close(ours, expected, what, rel=1e-3):  # test_sdxl's sampling parity: relative to the largest value
        err = np.abs(np.asarray(ours, np.float32) - expected).max()
        assert err <= rel * np.abs(expected).max(), f"{what}: {err}"

    close(feats["latents"][:, -1], theirs.transpose(0, 2, 3, 1), "final latents")
    for b in blocks:
        assert len(calls[b]) == steps
        close(feats[f"unet.{b}"], np.stack(calls[b], axis=1), f"unet.{b}")
    for site in texts:
        c, _, layer = site.partition(".text_model.encoder.layers.")
        np.testing.assert_allclose(feats[site], hidden[c][int(layer) + 1].numpy(), atol=1e-5, err_msg=site)


def test_a_unet_only_sdxl_file_takes_the_rest_from_config(sdxl_original, tmp_path):
    """Without text towers a file cannot tell base from refiner: its UNet loads with either's config=."""
    from safetensors.torch import load_file

    style, folder, path, _ = sdxl_original
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}, str(unet_only))
    single, direct = jaxprobe.load(unet_only, config=folder), jaxprobe.load(folder)
    for name in ("unet", "text_encoder_2"):
        ours = _named_leaves(getattr(single, name))
        for key, leaf in _named_leaves(getattr(direct, name)).items():
            np.testing.assert_array_equal(ours[key], leaf, err_msg=f"{style} {name}.{key}")


def test_sdxl_files_with_configs_of_another_family_are_refused(sdxl_original, tmp_path):
    style, _, path, _ = sdxl_original
    sd_reference.save_pipeline(tmp_path / "sd1", "sd1")
    with pytest.raises(CheckpointError, match=f"{style.upper()} single file but config= is an SD 1.x/2.x"):
        jaxprobe.load(path, config=tmp_path / "sd1")
    other = "sdxl" if style == "sdxl-refiner" else "sdxl-refiner"
    sd_reference.save_sdxl_pipeline(tmp_path / other, refiner=other == "sdxl-refiner", widths=SDXL_WIDTHS)
    with pytest.raises(CheckpointError, match="pass config= an SDXL"):
        jaxprobe.load(path, config=tmp_path / other)


# --- LoRA -------------------------------------------------------------------------------------------------

# {component: modules} a test LoRA adapts: attention projections, a conv, text layers
_TARGETS = {"unet": ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", "down_blocks.0.resnets.0.conv1"),
            "text_encoder": ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1")}
# SDXL ("sdxl2" UNet): deeper transformers, the mid block, a resnet of an up block; both text towers
_SDXL_TARGETS = {"unet": ("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
                          "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
                          "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2", "down_blocks.1.attentions.0.proj_in",
                          "up_blocks.0.resnets.1.conv1"),
                 "text_encoder": ("text_model.encoder.layers.0.self_attn.q_proj",),
                 "text_encoder_2": ("text_model.encoder.layers.1.self_attn.out_proj", "text_model.encoder.layers.2.mlp.fc2")}
_KOHYA = {"sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
          "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def _lora_pair(weight: torch.Tensor, rank: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out, fan_in = weight.shape[0], int(np.prod(weight.shape[1:]))
    down = (rng.standard_normal((rank, *weight.shape[1:])) / np.sqrt(fan_in)).astype(np.float32)
    up = (rng.standard_normal((out, rank) + ((1, 1) if weight.ndim == 4 else ())) * 0.1).astype(np.float32)
    return torch.from_numpy(down), torch.from_numpy(up)


def _ldm_module(module: str, config: dict) -> str:
    """A diffusers UNet module path in the original LDM names (the single-file converter's inverse mapping)."""
    (key,) = _unet_to_original({f"{module}.weight": None}, config)
    return key.removeprefix("model.diffusion_model.").removesuffix(".weight")


def _kohya_name(pipe, family: str, component: str, module: str, ldm: bool) -> str:
    written = _ldm_module(module, dict(pipe.unet.config)) if ldm and component == "unet" else module
    return f"{_KOHYA[family][component]}_{written.replace('.', '_')}"


def write_lora(pipe, path, layout: str, rank: int = 2, alpha: float = 1.0, family: str = "sd",
               ldm: bool = False) -> None:
    """A LoRA of the modules `family` targets, in the "kohya" or "peft" layout; ldm: kohya UNet modules in the
    original LDM names (`lora_unet_input_blocks_1_1_...`), as sd-scripts writes SDXL LoRAs and A1111 exports."""
    rng = np.random.default_rng(3)
    state = {}
    for component, modules in (_SDXL_TARGETS if family == "sdxl" else _TARGETS).items():
        weights = getattr(pipe, component).state_dict()
        for module in modules:  # transformers >= 5 names CLIPTextModel's modules without text_model.
            weight = weights.get(f"{module}.weight", weights.get(f"{module.removeprefix('text_model.')}.weight"))
            down, up = _lora_pair(weight, rank, rng)
            if layout == "kohya":
                name = _kohya_name(pipe, family, component, module, ldm)
                state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                              f"{name}.alpha": torch.tensor(alpha)})
            else:
                state.update({f"{component}.{module}.lora_A.weight": down, f"{component}.{module}.lora_B.weight": up})
    save_file(state, str(path))


def _apply_by_hand(pipe, component: str, lora, scale: float, family: str) -> None:
    """W += scale * alpha / rank * up @ down for the kohya entries of one text encoder of `lora`."""
    from safetensors.torch import load_file

    adapters, model = load_file(str(lora)), getattr(pipe, component)
    state = model.state_dict()
    for module in (_SDXL_TARGETS if family == "sdxl" else _TARGETS)[component]:
        name = _kohya_name(pipe, family, component, module, ldm=False)
        down, up = adapters[f"{name}.lora_down.weight"], adapters[f"{name}.lora_up.weight"]
        key = next(k for k in (f"{module}.weight", f"{module.removeprefix('text_model.')}.weight") if k in state)
        state[key] = state[key] + scale * float(adapters[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    model.load_state_dict(state)


def _kernels(component) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(component.params)[0]
    return {torch_key(tuple(str(getattr(k, "key", k)) for k in path)): leaf for path, leaf in flat}


def _flax_weight(model, module: str) -> np.ndarray:
    """A torch module's weight (or PEFT's base_layer weight once fused) in Flax's kernel layout."""
    state, local = model.state_dict(), module.removeprefix("text_model.")
    weight = state[next(k for k in state if k.endswith((f"{local}.weight", f"{local}.base_layer.weight")))].numpy()
    return weight.T if weight.ndim == 2 else weight.transpose(2, 3, 1, 0)


def _assert_merged_like(reference, ours, targets: dict, plain, atol: float = 1e-5) -> None:
    """Every adapted weight of `ours` (jaxprobe) equals the fused one of `reference` (a diffusers pipeline), and
    differs from the unadapted one of `plain` (so a LoRA that neither side applied cannot pass)."""
    for component, modules in targets.items():
        kernels = _kernels(getattr(ours, component))
        for module in modules:
            expected = _flax_weight(getattr(reference, component), module)
            np.testing.assert_allclose(np.asarray(kernels[f"{module}.weight"]), expected, atol=atol,
                                       err_msg=f"{component}.{module}")
            assert np.abs(expected - _flax_weight(getattr(plain, component), module)).max() > 1e-3, module


@pytest.mark.parametrize("layout", ["kohya", "kohya-ldm", "peft"])
def test_lora_merge_equals_diffusers_fuse_lora(layout, tmp_path_factory):
    """kohya-ldm: an A1111-style file whose UNet modules use the original LDM names. diffusers 0.42 renames
    those blocks for SD 1.x without the block arithmetic (input_blocks_1_1 -> down_blocks.1.1) and finds no
    module, so its reference is the same adapters written in diffusers' names."""
    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp(f"lora_{layout}")
    pipe = sd_reference.save_pipeline(folder / "pipe", "sd1")
    lora, theirs = folder / "adapter.safetensors", folder / "adapter-diffusers-names.safetensors"
    write_lora(pipe, lora, layout.partition("-")[0], ldm=layout == "kohya-ldm")
    write_lora(pipe, theirs, layout.partition("-")[0])   # the same matrices: the same seed draws them
    scale = 0.7
    plain, unadapted = (sd_reference.save_pipeline(folder / f"unused{i}", "sd1") for i in range(2))
    pipe.load_lora_weights(str(theirs))
    pipe.fuse_lora(lora_scale=scale)
    ours = jaxprobe.load(folder / "pipe", lora=[f"{lora}:{scale}"])
    if layout.startswith("kohya"):
        # diffusers 0.42 maps kohya's lora_te_text_model_* onto text_model.*, which transformers >= 5 no
        # longer has, and skips them silently; the reference for the text tower is then the formula itself
        _apply_by_hand(plain, "text_encoder", lora, scale, "sd")
        pipe.text_encoder = plain.text_encoder
    _assert_merged_like(pipe, ours, _TARGETS, unadapted)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_sdxl_lora_merge_equals_diffusers_fuse_lora(layout, tmp_path_factory):
    """SDXL LoRAs: kohya (sd-scripts: lora_te1_/lora_te2_, UNet modules in the LDM names) and PEFT
    (text_encoder_2.), on both text towers and a UNet with transformer depth 2."""
    from safetensors.torch import load_file

    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp(f"sdxl_lora_{layout}")
    pipe = sd_reference.save_sdxl_pipeline(folder / "pipe")
    lora = folder / "adapter.safetensors"
    write_lora(pipe, lora, layout, family="sdxl", ldm=layout == "kohya")
    scale = 0.7
    theirs = lora
    if layout == "kohya":
        # diffusers 0.42 with transformers >= 5 raises "Could not automatically infer state dict type" on
        # kohya text-encoder keys: it gets the UNet's part (whose LDM names it maps itself), and the text
        # towers' reference is W += scale * alpha / rank * up @ down
        theirs = folder / "adapter-unet.safetensors"
        save_file({k: v for k, v in load_file(str(lora)).items() if k.startswith("lora_unet_")}, str(theirs))
    plain, unadapted = (sd_reference.save_sdxl_pipeline(folder / f"unused{i}") for i in range(2))
    pipe.load_lora_weights(str(theirs))
    pipe.fuse_lora(lora_scale=scale)
    ours = jaxprobe.load(folder / "pipe", lora=[(lora, scale)])
    if layout == "kohya":
        for component in ("text_encoder", "text_encoder_2"):
            _apply_by_hand(plain, component, lora, scale, "sdxl")
            setattr(pipe, component, getattr(plain, component))
    _assert_merged_like(pipe, ours, _SDXL_TARGETS, unadapted)


def test_a_lora_for_another_model_is_refused(tmp_path):
    folder = tmp_path / "pipe"
    pipe = sd_reference.save_pipeline(folder, "sd1")
    lora = tmp_path / "other.safetensors"
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)}, str(lora))
    with pytest.raises(CheckpointError, match="match no weight of this model"):
        jaxprobe.load(folder, lora=[lora])
    del pipe


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_an_sdxl_lora_on_sd1_lists_what_does_not_fit(layout, tmp_path):
    sd_reference.save_pipeline(tmp_path / "sd1", "sd1")
    lora = tmp_path / "sdxl-lora.safetensors"
    write_lora(sd_reference.save_sdxl_pipeline(tmp_path / "sdxl"), lora, layout, family="sdxl", ldm=layout == "kohya")
    with pytest.raises(CheckpointError, match="match no weight of this model") as refused:
        jaxprobe.load(tmp_path / "sd1", lora=[lora])
    message = str(refused.value)
    assert "This model has no text_encoder_2: an SDXL LoRA on an SD 1.x/2.x model?" in message
    assert "Nothing was merged" in message
    unmatched = ("unet:input_blocks_3_1_transformer_blocks_1_attn1_to_q" if layout == "kohya" else
                 "unet:down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q")
    assert unmatched in message


def test_what_was_loaded_keys_the_store_and_is_recorded(original, tmp_path):
    """Provenance: a single file's and a LoRA's SHA-256 and the scale reach the store key and the manifests."""
    import hashlib
    import json

    from typer.testing import CliRunner

    from jaxprobe.cli import app
    from jaxprobe.features.extract import model_fingerprint

    style, folder, path, pipe = original
    single = jaxprobe.load(path, config=folder)
    assert single.provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert single.provenance["config"] == str(folder)
    lora = tmp_path / "adapter.safetensors"
    write_lora(pipe, lora, "peft")
    merged = jaxprobe.load(folder, lora=[(lora, 0.5)])
    assert merged.provenance["loras"] == [{"file": str(lora), "scale": 0.5,
                                           "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}]
    plain = jaxprobe.load(folder)
    assert "weight_files" in plain.provenance
    assert model_fingerprint(plain) != model_fingerprint(merged) != model_fingerprint(jaxprobe.load(
        folder, lora=[(lora, 0.25)]))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = CliRunner().invoke(app, ["extract", "-m", str(folder), "-p", str(prompts), "-o", str(tmp_path / "f"),
                                      "--lora", f"{lora}:0.5", "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["loaded"]["loras"][0]["scale"] == 0.5


def test_ckpt_files_load_through_the_weights_only_reader(original, tmp_path):
    """A .ckpt (a torch pickle, {"state_dict": ...} as the original releases) loads like the .safetensors;
    a pickle holding anything but tensors is refused, never unpickled."""
    from safetensors.torch import load_file

    style, folder, path, _ = original
    if style == "sd2":
        pytest.skip("one layout suffices for the pickle reader")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 10}, ckpt)
    expected = _leaves(jaxprobe.load(path, config=folder))
    for name, leaves in _leaves(jaxprobe.load(ckpt, config=folder)).items():
        for ours, theirs in zip(leaves, expected[name], strict=True):
            np.testing.assert_array_equal(ours, theirs)

    class Payload:
        def __reduce__(self):
            return (print, ("never run",))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, unsafe)
    with pytest.raises(CheckpointError, match="weights-only"):
        jaxprobe.load(unsafe, config=folder)
