"""A loaded model: the Flax module, its parameter pytree and its config, under a site-name prefix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Component:
    """One Flax model with its parameters: `name` is the prefix of its site names."""

    name: str
    module: Any
    params: Any
    config: Any
