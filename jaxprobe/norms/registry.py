"""Norms by name or path: what `--norms` accepts, and the list the CLI shows."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path

from jaxprobe.errors import InputError
from jaxprobe.norms.base import Norms
from jaxprobe.norms.datasets import load_binder, load_concreteness, load_mcrae, load_things
from jaxprobe.norms.files import load_norms_file

_BUILTIN: dict[str, tuple[Callable[..., Norms], str]] = {
    "binder": (load_binder, "Binder et al. 2016: 65 experiential attributes in 14 domains; concrete nouns by default"),
    "mcrae": (load_mcrae, "McRae et al. 2005: feature production frequencies, grouped by feature type"),
    "things": (load_things, "THINGS: 49-d SPoSE embedding of 1,854 object concepts (Hebart et al. 2020)"),
    "things66": (
        functools.partial(load_things, dims=66),
        "THINGS: 66-d SPoSE embedding with dimension labels (Hebart et al. 2023)",
    ),
    "concreteness": (load_concreteness, "Brysbaert et al. 2014: concreteness (1-5) of 39,954 English lemmas"),
}
NORMS: dict[str, str] = {name: description for name, (_, description) in _BUILTIN.items()}


def load_norms(name_or_path: str | os.PathLike, **options) -> Norms:
    """Shipped norms by name (see `NORMS`), or a CSV/TSV file (`load_norms_file`), with the loader's options."""
    key = str(name_or_path)
    if key in _BUILTIN:
        loader = _BUILTIN[key][0]
    elif Path(key).suffix or os.sep in key or Path(key).exists():
        loader = functools.partial(load_norms_file, key)
    else:
        raise InputError(f"unknown norms {key!r}: give one of {', '.join(NORMS)} or the path of a CSV/TSV file.")
    signature = inspect.signature(loader)
    try:
        signature.bind(**options)
    except TypeError:
        accepted = ", ".join(signature.parameters) or "none"
        raise InputError(f"norms {key!r} take the options {accepted}; got {', '.join(options)}.") from None
    return loader(**options)
