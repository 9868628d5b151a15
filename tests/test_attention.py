"""The attention implementations agree: the CPU's blocked tiles, XLA's whole-matrix path, and the
backend default (what every model calls)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprobe.models import layers
from jaxprobe.models.layers import ATTENTION_IMPLEMENTATIONS, attention_implementation, multi_head_attention


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
    from jaxprobe.runtime.xla_flags import add_cpu_flags

    env = {}
    assert add_cpu_flags(env, jaxlib="0.10") == ["--xla_cpu_experimental_ynn_fusion_type="]
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_force_host_platform_device_count=4"}
    assert add_cpu_flags(mine, jaxlib="0.10") == [] and mine["XLA_FLAGS"].startswith("--xla_cpu_experimental_ynn_fusion_type=dot")
    assert add_cpu_flags({}, jaxlib="0.6") == []              # not measured there: XLA aborts on unknown flags
    assert add_cpu_flags({"JAXPROBE_XLA_FLAGS": "0"}, jaxlib="0.10") == []
    other = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    add_cpu_flags(other, jaxlib="0.10")
    assert other["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type="
