"""The attention implementations agree: the CPU's blocked tiles, XLA's whole-matrix path, and the
backend default (what every model calls)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprobe.models import layers
from jaxprobe.models.layers import ATTENTION_IMPLEMENTATIONS, attention_implementation, multi_head_attention
from jaxprobe.runtime.xla_flags import HALF_PRECISION_CPU_FLAGS, jaxlib_minor


def qkv(batch: int, lq: int, lk: int, width: int, dtype=jnp.float32):
    rng = np.random.default_rng(lq * 1000 + lk)
    make = lambda n: jnp.asarray(rng.standard_normal((batch, n, width)), dtype)  # noqa: E731
    return make(lq), make(lk), make(lk)


@pytest.mark.parametrize("lq,lk,masking", [(40, 40, "none"), (77, 7, "none"), (33, 90, "none"), (77, 7, "key_mask"),
                                           (33, 90, "key_mask"), (40, 40, "causal"), (77, 77, "causal")])
@pytest.mark.parametrize("tile", [16, 200], ids=["query-chunks", "head-groups"])
def test_blocked_equals_xla(monkeypatch, lq, lk, masking, tile):
    monkeypatch.setattr(layers, "_SCORE_TILE", tile * lk)   # several tiles: query chunks (padded) or head groups
    q, k, v = qkv(2, lq, lk, 24)
    key_mask = jnp.arange(lk)[None, :] < jnp.array([[lk], [lk // 2]]) if masking == "key_mask" else None
    kwargs = dict(num_heads=3, is_causal=masking == "causal", key_mask=key_mask)
    blocked = multi_head_attention(q, k, v, implementation="blocked", **kwargs)
    whole = multi_head_attention(q, k, v, implementation="xla", **kwargs)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=2e-6)


def test_blocked_half_precision_and_upcast():
    q, k, v = qkv(1, 64, 64, 32, jnp.bfloat16)
    for upcast in (False, True):
        blocked = multi_head_attention(q, k, v, num_heads=2, upcast=upcast, implementation="blocked")
        whole = multi_head_attention(q, k, v, num_heads=2, upcast=upcast, implementation="xla")
        assert blocked.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(blocked, np.float32), np.asarray(whole, np.float32), atol=2e-2)


def test_backend_default_and_override(monkeypatch):
    monkeypatch.delenv("JAXPROBE_ATTENTION", raising=False)
    assert attention_implementation("cpu") == "blocked"
    assert attention_implementation("gpu") == "fused"
    assert attention_implementation("tpu") == "xla"
    monkeypatch.setenv("JAXPROBE_ATTENTION", "xla")
    assert attention_implementation("cpu") == "xla"
    monkeypatch.setenv("JAXPROBE_ATTENTION", "flash")
    with pytest.raises(ValueError, match="one of " + ", ".join(ATTENTION_IMPLEMENTATIONS)):
        attention_implementation()


def test_blocked_under_jit_and_vmap():
    q, k, v = qkv(2, 50, 50, 16)
    fn = jax.jit(jax.vmap(lambda q, k, v: multi_head_attention(q[None], k[None], v[None], num_heads=2,
                                                               implementation="blocked")[0]))
    whole = multi_head_attention(q, k, v, num_heads=2, implementation="xla")
    np.testing.assert_allclose(np.asarray(fn(q, k, v)), np.asarray(whole), rtol=1e-5, atol=2e-6)


def test_cpu_xla_flags_respect_the_user_and_the_jaxlib_version():
    from jaxprobe.runtime.xla_flags import HALF_PRECISION_CPU_FLAGS, add_cpu_flags

    env = {}
    ours = ["--xla_cpu_experimental_ynn_fusion_type="]
    assert add_cpu_flags(env, jaxlib="0.10") == ours
    assert env["XLA_FLAGS"] == " ".join(ours)
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_force_host_platform_device_count=4"}
    assert add_cpu_flags(mine, jaxlib="0.10") == [] and mine["XLA_FLAGS"].startswith("--xla_cpu_experimental_ynn_fusion_type=dot")
    assert add_cpu_flags({}, jaxlib="0.6") == []              # not measured there: XLA aborts on unknown flags
    assert add_cpu_flags({"JAXPROBE_XLA_FLAGS": "0"}, jaxlib="0.10") == []
    other = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert add_cpu_flags(other, jaxlib="0.10", flags=HALF_PRECISION_CPU_FLAGS) == [
        "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    assert other["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=4 --xla_cpu_enable_concurrency")
    # this process has started JAX: a half-precision load can no longer change the scheduler, and does not try
    from jaxprobe.runtime.xla_flags import add_half_precision_cpu_flags
    jax.devices()
    assert add_half_precision_cpu_flags() == []


def test_bfloat16_weights_are_not_all_copied_to_float32_at_once():
    """On CPU every bf16 dot runs on float32 copies of its operands; once `jaxprobe.load` has loaded half-precision
    weights (here the first thing the process does), each copy lives only around its dot, so temporaries stay far
    below the weights (without the flag it sets: twice the weights)."""
    script = (
        "import jaxprobe, jax, jax.numpy as jnp\n"
        "jaxprobe.load('tiny', dtype='bfloat16')\n"
        "ws = [jnp.ones((1024, 1024), jnp.bfloat16) for _ in range(16)]\n"
        "def chain(ws, x):\n"
        "    for w in ws:\n"
        "        x = jnp.tanh(x @ w)\n"
        "    return x\n"
        "m = jax.jit(chain).lower(ws, jnp.ones((8, 1024), jnp.bfloat16)).compile().memory_analysis()\n"
        "print(m.temp_size_in_bytes / m.argument_size_in_bytes)\n")
    if jaxlib_minor() not in HALF_PRECISION_CPU_FLAGS["--xla_cpu_enable_concurrency_optimized_scheduler"][1]:
        pytest.skip(f"the scheduler flag is not set on jaxlib {jaxlib_minor()}")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXPROBE_XLA_FLAGS")}
    ratio = float(subprocess.run([sys.executable, "-c", script], env={**env, "JAX_PLATFORMS": "cpu"},
                                 capture_output=True, text=True, check=True).stdout.split()[-1])
    assert ratio < 0.5
