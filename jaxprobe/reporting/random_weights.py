"""Does a model have random weights? The question every report asks before it states a finding.

`checkpoints.random` builds the bundled random models (RANDOM_MODELS, keyed by RANDOM_MODEL_NAMES); the
answer lives down here, a string test, so that every page asks it the same way, sae/ included (which
never imports the model stack).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

RANDOM_MODEL_NAMES = ("tiny", "sd15-random", "sdxl-random", "dit-random", "pixart-random", "sd3-random", "flux-random")


def is_random_weights(source: Any) -> bool:
    """Whether `source` names one of the bundled random-weight models (RANDOM_MODEL_NAMES: "tiny",
    "sd15-random", "sdxl-random", "dit-random", "pixart-random", "sd3-random", "flux-random"), the one test every report asks.
    `source`: a model source as `jaxprobe.load` takes
    it (str or Path), a pipeline (its `.source`), or a run's metadata (its "model"; a True
    "random_weights" flag counts too, so results made elsewhere can say so themselves)."""
    if isinstance(source, Mapping):
        return bool(source.get("random_weights")) or is_random_weights(source.get("model"))
    source = getattr(source, "source", source)
    return isinstance(source, (str, Path)) and str(source) in RANDOM_MODEL_NAMES
