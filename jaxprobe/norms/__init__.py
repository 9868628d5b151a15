"""Human semantic norms: the probe targets, shipped (Binder, McRae, THINGS, Brysbaert) or a user's file.

    norms = load_norms("binder")                      # 275 concrete nouns x 65 attributes, 14 domains
    norms = align(norms, prompted_concepts)           # same order as the prompts; the rest in .dropped
"""

from jaxprobe.norms.base import Norms, align
from jaxprobe.norms.datasets import load_binder, load_concreteness, load_mcrae, load_things
from jaxprobe.norms.files import load_norms_file
from jaxprobe.norms.registry import NORMS, load_norms

__all__ = [
    "NORMS",
    "Norms",
    "align",
    "load_binder",
    "load_concreteness",
    "load_mcrae",
    "load_norms",
    "load_norms_file",
    "load_things",
]
