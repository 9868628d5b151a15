"""jaxprobe: where do human-meaningful semantics live inside text-to-image diffusion pipelines?

    pipe = jaxprobe.load("tiny")                      # or a diffusers folder / HF-cache model id
    feats = pipe.capture(prompts, sites=["text_encoder.*", "unet.mid_block"], reduce="mean")
    images = pipe.generate(prompts, interventions=[jaxprobe.Steer("unet.mid_block", direction, scale=4.0)])
    memory = jaxprobe.plan("sd3-random", height=1024, width=1024, batch=2, steps=28)   # bytes, no weights drawn
    table = jaxprobe.probe_sweep(feats, norms.to_frame())

Importing jaxprobe loads no JAX: each public name is imported from its layer on first use.
"""

from jaxprobe.errors import CheckpointError, InputError, InterventionError, JaxprobeError, SiteError
from jaxprobe.runtime.xla_flags import add_cpu_flags

add_cpu_flags()   # before JAX starts its CPU backend; see jaxprobe/runtime/xla_flags.py

__version__ = "0.1.0"

_LAZY = {
    "load": "jaxprobe.pipeline.load",
    "plan": "jaxprobe.pipeline.memory",
    "MemoryPlan": "jaxprobe.pipeline.memory",
    "Pipeline": "jaxprobe.pipeline.pipeline",
    "Captures": "jaxprobe.captures",
    "Component": "jaxprobe.checkpoints.component",
    "RidgeCV": "jaxprobe.probes",
    "BandedRidgeCV": "jaxprobe.probes",
    "probe_sweep": "jaxprobe.probes",
    "variance_partition": "jaxprobe.probes",
    **{name: "jaxprobe.interventions" for name in ("Steer", "Patch", "Ablate", "Scale", "ClampSAE", "SAEWeights")},
}

__all__ = ["load", "plan", "MemoryPlan", "Pipeline", "Captures", "Component", "RidgeCV", "BandedRidgeCV", "probe_sweep",
           "variance_partition", "Steer", "Patch", "Ablate", "Scale", "ClampSAE", "SAEWeights", "JaxprobeError",
           "CheckpointError", "InputError", "InterventionError", "SiteError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
