"""XLA flags for the CPU backend, set before JAX starts it.

XLA reads `XLA_FLAGS` once, when a backend first starts, so a flag acts only if JAX has not run anything
yet. A flag the user already names in `XLA_FLAGS` keeps the user's value; `JAXPROBE_XLA_FLAGS=0` adds
none. Each flag applies only to the jaxlib versions it was measured on: XLA aborts on a flag it does not
know, and an experimental flag may be renamed in any release.

`import jaxprobe` adds CPU_FLAGS. `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions)
runs convolutions and matmuls on XLA's Eigen kernels and one thread pool: a full-size SD-1.5 UNet
evaluation on 2 cores takes 11.2 s instead of 12.9 s, the same float32 numerics to rounding
(BENCHMARKS.md, "CPU speed").

`jaxprobe.load` of half-precision weights adds HALF_PRECISION_CPU_FLAGS when no backend has started.
`--xla_cpu_enable_concurrency_optimized_scheduler=false` schedules for memory. XLA's CPU dots and
convolutions run in float32, so a bfloat16 model gets a float32 copy of each weight; the concurrency
scheduler makes every copy at the start of the program, all live at once: one SDXL UNet evaluation in
bfloat16 needed 10.3 GB of temporaries beside its 5.1 GB of weights (and was killed in 24 GB); with this
flag, 0.17 GB. It is not set for float32 work: this scheduler is XLA's less-travelled path, and with it
on for everything the test suite's thousands of compilations crashed inside XLA's compiler (a segfault
in `backend_compile_and_load`) about once a run, which it has not done without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata

# flag -> (value, jaxlib "major.minor" versions on which it was measured)
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ("", ("0.10",))}
HALF_PRECISION_CPU_FLAGS = {"--xla_cpu_enable_concurrency_optimized_scheduler": ("false", ("0.10",))}


def jaxlib_minor() -> str | None:
    try:
        return ".".join(metadata.version("jaxlib").split(".")[:2])
    except metadata.PackageNotFoundError:
        return None


def add_cpu_flags(environ: dict[str, str] | os._Environ = os.environ, jaxlib: str | None = None,
                  flags: Mapping[str, tuple[str, tuple[str, ...]]] = CPU_FLAGS) -> list[str]:
    """Append the `flags` that apply to this jaxlib and that the user does not set to environ["XLA_FLAGS"];
    returns what was added."""
    if environ.get("JAXPROBE_XLA_FLAGS", "1") == "0":
        return []
    jaxlib = jaxlib or jaxlib_minor()
    current = environ.get("XLA_FLAGS", "")
    added = [f"{flag}={value}" for flag, (value, versions) in flags.items()
             if jaxlib in versions and flag not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def add_half_precision_cpu_flags() -> list[str]:
    """HALF_PRECISION_CPU_FLAGS, if JAX has started no backend yet (afterwards XLA would not read them)."""
    from jax._src import xla_bridge   # no public API says whether a backend has started

    if xla_bridge.backends_are_initialized():
        return []
    return add_cpu_flags(flags=HALF_PRECISION_CPU_FLAGS)
