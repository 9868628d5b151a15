"""jaxprobe: where do human-meaningful semantics live inside text-to-image diffusion pipelines?

    pipe = jaxprobe.load("tiny")                      # or a diffusers folder / HF-cache model id
    feats = pipe.capture(prompts, sites=["text_encoder.*", "unet.mid_block"], reduce="mean")
    table = jaxprobe.probe_sweep(feats, norms.to_frame())
"""

from jaxprobe.errors import CheckpointError, InputError, JaxprobeError, SiteError
from jaxprobe.loading import load
from jaxprobe.pipeline import Component, Pipeline

__version__ = "0.1.0"

__all__ = ["load", "Pipeline", "Component", "JaxprobeError", "CheckpointError", "InputError", "SiteError",
           "__version__"]


def __getattr__(name: str):
    # The probe engine pulls in optax and pandas; import it only when asked for.
    if name in ("RidgeCV", "probe_sweep"):
        from jaxprobe import probes

        return getattr(probes, name)
    raise AttributeError(f"module 'jaxprobe' has no attribute {name!r}")
