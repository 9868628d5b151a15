"""Memory-lean loading and sharded parameters (issue 17).

Streaming: a checkpoint folder reaches the devices one tensor at a time, never as a whole host copy.
Sharding: on 4 simulated CPU devices (a subprocess, as XLA fixes the device count at start-up), FSDP- and
tensor-sharded parameters give the replicated captures, and their large leaves really are split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprobe.checkpoints import weights
from jaxprobe.checkpoints.loading import TEXT_TOWER, load_clip_tower
from jaxprobe.errors import CheckpointError


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A CLIP text tower of ~19 MB in fp32 safetensors, its largest tensor 1 MiB."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                         num_attention_heads=4, max_position_embeddings=77)
    folder = tmp_path_factory.mktemp("clip")
    transformers.CLIPTextModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _traced_peak(load):
    tracemalloc.start()
    try:
        result = load()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loading_holds_one_checkpoint_tensor_at_a_time(clip_folder, monkeypatch):
    files = weights.find_weight_files(clip_folder)
    file_size = sum(p.stat().st_size for p in files)
    load_clip_tower(TEXT_TOWER, clip_folder, dtype=jnp.bfloat16)   # tracing's own allocations out of the peaks
    eager, eager_peak = _traced_peak(lambda: load_clip_tower(
        TEXT_TOWER, clip_folder, dtype=jnp.bfloat16, state=weights.read_state_dict(files)))
    alive, most = set(), [0]
    read = weights.TensorRef.load

    def counted(ref):
        array = read(ref)
        alive.add(id(array))
        most[0] = max(most[0], len(alive))
        weakref.finalize(array, alive.discard, id(array))
        return array

    monkeypatch.setattr(weights.TensorRef, "load", counted)
    streamed, peak = _traced_peak(lambda: load_clip_tower(TEXT_TOWER, clip_folder, dtype=jnp.bfloat16))
    assert most[0] == 1, f"{most[0]} checkpoint tensors were on the host at once"
    # numpy's buffers are traced, the devices' are not: reading the whole state dict first peaks above the
    # checkpoint's size, streaming at a few of its tensors
    assert eager_peak > file_size and peak < file_size / 4, (peak, eager_peak, file_size)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(streamed.params), jax.tree.leaves(eager.params)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_shape_errors_come_before_any_tensor_is_read(clip_folder, monkeypatch):
    state = weights.open_state_dict(weights.find_weight_files(clip_folder))
    key = next(k for k in state if k.endswith("layers.0.mlp.fc1.weight"))  # transformers 5 drops `text_model.`
    state[key] = weights.TensorRef(state[key].path, key, (7, 256))   # a stored shape no model has
    monkeypatch.setattr(weights.TensorRef, "load", lambda ref: pytest.fail(f"read {ref.key}"))
    with pytest.raises(CheckpointError, match=r"fc1.weight: checkpoint \(7, 256\) -> \(256, 7\)"):
        load_clip_tower(TEXT_TOWER, clip_folder, dtype=jnp.float32, state=state)


# On 4 devices, per model: the replicated capture and one sharded mode's (each layout compiles its own program,
# the file's time), and the large denoiser leaves' PartitionSpecs under both modes (loading alone is cheap).
_SHARDED = r"""
import json, sys
import jax, numpy as np
import jaxprobe
from jaxprobe.runtime.devices import ParamSharding

cases, out = json.loads(sys.argv[1]), sys.argv[2]
result = {"devices": jax.device_count()}
for name, case in cases.items():
    for mode in (None, "fsdp", "tensor"):
        pipe = jaxprobe.load(case["source"], shard=ParamSharding(mode, min_elements=case["small"]))
        leaves = jax.tree_util.tree_leaves_with_path(pipe.unet.params)
        result[f"{name}-{mode}"] = {jax.tree_util.keystr(p): [str(x) for x in leaf.sharding.spec]
                                    for p, leaf in leaves if leaf.size >= case["small"]}
        if mode in (None, case["captured"]):
            feats = pipe.capture(case["prompts"], case["sites"], num_inference_steps=1, batch_size=4)
            np.savez(f"{out}-{name}-{mode}.npz", **feats)
json.dump(result, open(out + ".json", "w"))
"""


def test_sharded_captures_equal_the_replicated_ones(tmp_path):
    """Tiny SD (from "tiny": random weights resharded) under FSDP, a tiny DiT folder (streamed onto the mesh)
    under tensor sharding."""
    import transformer_reference

    transformer_reference.save_dit_pipeline(tmp_path / "dit")
    cases = {"sd": dict(source="tiny", prompts=["a cat", "a dog", "a red car"], captured="fsdp", small=1 << 14,
                        sites=["text_encoder.text_model.final_layer_norm", "unet.mid_block", "unet.up_blocks.1"]),
             "dit": dict(source=str(tmp_path / "dit"), prompts=["golden retriever", "white shark"], captured="tensor",
                         small=256, sites=["transformer.transformer_blocks.*", "transformer.norm_out"])}
    out = str(tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", _SHARDED, json.dumps(cases), out], check=True, env=env)
    result = json.loads(open(out + ".json").read())
    assert result["devices"] == 4
    for name, case in cases.items():
        replicated = dict(np.load(f"{out}-{name}-None.npz"))
        sharded = dict(np.load(f"{out}-{name}-{case['captured']}.npz"))
        assert replicated.keys() == sharded.keys() and replicated
        for site, value in replicated.items():
            np.testing.assert_allclose(sharded[site], value, atol=1e-5, rtol=1e-5, err_msg=f"{name} {site}")
        assert all(spec == [] for spec in result[f"{name}-None"].values())
        for mode in ("fsdp", "tensor"):
            specs = result[f"{name}-{mode}"]
            split = [k for k, spec in specs.items() if any(s != "None" for s in spec)]
            # FSDP splits every large leaf (4 divides some dimension of each); the tensor rule most kernels
            assert len(split) >= (len(specs) if mode == "fsdp" else len(specs) // 2) > 0, (name, mode, specs)
