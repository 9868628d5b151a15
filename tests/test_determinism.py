"""Determinism: one seed gives the same features whatever the run, batch size or device count.

The tolerances here are the ones README.md (Determinism) promises: bit-identical across runs and
processes of one program; within 1e-6 across batch sizes (the padded batch changes XLA's reduction
order only in the last bit); within 1e-5 across device counts. Probe results across chunkings and
device counts are checked in test_probes_sweep.py, across processes in test_distributed.py, and a
killed-and-resumed extraction is bit-identical to a clean one (test_faults.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import jaxprobe

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a car", "a photo of a cup", "a photo of a hat"]
SITES = ["text_encoder.*", "unet.mid_block", "latents"]


@pytest.fixture(scope="module")
def pipe():
    return jaxprobe.load("tiny")


def test_same_seed_same_features_across_runs_and_batch_sizes(pipe):
    first = pipe.capture(PROMPTS, SITES, num_inference_steps=3, seed=3, batch_size=4)
    again = pipe.capture(PROMPTS, SITES, num_inference_steps=3, seed=3, batch_size=4)
    single = pipe.capture(PROMPTS, SITES, num_inference_steps=3, seed=3, batch_size=1)
    other_seed = pipe.capture(PROMPTS, ["latents"], num_inference_steps=3, seed=4, batch_size=4)
    for site in first:
        np.testing.assert_array_equal(first[site], again[site], err_msg=site)
        np.testing.assert_allclose(first[site], single[site], rtol=1e-5, atol=1e-5, err_msg=site)
    assert np.abs(first["latents"] - other_seed["latents"]).max() > 0.1


def test_same_features_on_one_and_four_devices():
    """Four simulated CPU devices (prompts sharded over them) give the one-device features."""
    code = (
        "import numpy as np, jaxprobe, jax, sys;"
        "p = jaxprobe.load('tiny');"
        f"f = p.capture({PROMPTS!r}, ['text_encoder.*', 'unet.mid_block'], num_inference_steps=3, batch_size=4);"
        "np.savez(sys.argv[1], n=jax.device_count(), **f)"
    )
    results = []
    for devices in (1, 4):
        out = os.path.join(tempfile.mkdtemp(), "f.npz")
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        subprocess.run([sys.executable, "-c", code, out], check=True, env=env)
        results.append(dict(np.load(out)))
    assert int(results[0]["n"]) == 1 and int(results[1]["n"]) == 4
    for key in results[0]:
        if key != "n":
            np.testing.assert_allclose(results[0][key], results[1][key], atol=1e-5, err_msg=key)
