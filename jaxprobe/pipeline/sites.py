"""Site names, site selection by glob pattern, and on-device reductions of captured activations.

A *site* is a module path of the checkpoint prefixed with its component (`text_encoder.text_model.
encoder.layers.11`, `unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2`), plus the sampler's
own `latents` and `pred_original_sample`. Models sow `output` at every site; under `jit` XLA drops
whatever a capture does not return, so capturing costs only what is asked for.

Patterns are shell globs in which `*` also crosses dots. So that `unet.up_blocks.*` means the four
up-block outputs rather than hundreds of inner layers, a pattern reaches *block-level* sites only
(each model lists its own, see `BLOCK_SITES`), unless it asks for more: it contains `**`, its literal
prefix already names a path inside a block (`unet.up_blocks.1.attentions.*`), or it ends in a literal
name (`unet.*.attn2`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxprobe.errors import SiteError

SAMPLER_SITES = ("latents", "pred_original_sample")  # the sampler's own sites, beside the models' modules


def flatten_intermediates(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The `intermediates` collection -> {site: array}. `output` leaves name their module's site."""
    sites: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            sites.update(flatten_intermediates(value, f"{prefix}{name}."))
        else:
            site = prefix[:-1] if name == "output" else f"{prefix}{name}"
            sites[site] = value[-1]  # sow appends one entry per call; each site is called once
    return sites


def _literal_prefix(pattern: str) -> str:
    return re.split(r"[*?\[]", pattern, maxsplit=1)[0]


def _pattern_reaches_inside(pattern: str, site: str, blocks: Sequence[str]) -> bool:
    if "**" in pattern or not re.search(r"[*?\[]", pattern.rsplit(".", 1)[-1]):
        return True
    prefix = _literal_prefix(pattern)
    return any(prefix.startswith(b + ".") for b in blocks if site.startswith(b + "."))


def select_sites(patterns: str | Iterable[str], available: Sequence[str], block_sites: Sequence[str]) -> list[str]:
    """Sites matched by any pattern, in the order of `available`.

    block_sites: the subset of `available` that wildcards reach by default.
    Raises SiteError for a pattern that matches nothing, listing what exists.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise SiteError("no sites asked for; pass patterns such as 'text_encoder.*' or 'unet.mid_block'")
    blocks = set(block_sites)
    chosen: set[str] = set()
    for pattern in patterns:
        glob = pattern.replace("**", "*")
        hits = [s for s in available if fnmatch.fnmatchcase(s, glob)
                and (s in blocks or _pattern_reaches_inside(pattern, s, sorted(blocks)))]
        if not hits:
            raise SiteError(f"site pattern {pattern!r} matches no site of this pipeline. "
                            f"Block-level sites:\n  " + "\n  ".join(block_sites)
                            + "\n(`jaxprobe info --sites MODEL` or `pipe.sites(all=True)` lists every site)")
        chosen.update(hits)
    return [s for s in available if s in chosen]


def block_sites_of(available: Iterable[str], component: str, patterns: Sequence[str]) -> list[str]:
    """The sites of one component whose module path fully matches one of the model's BLOCK_SITES."""
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    start = len(component) + 1
    return [s for s in available if s.startswith(component + ".") and regex.fullmatch(s[start:])]


def short_site(site: str) -> str:
    """A site name without the prefixes every site of its component shares, for axis labels."""
    for prefix, label in (("text_encoder.text_model.encoder.", ""), ("text_encoder.text_model.", ""),
                          ("text_encoder.", ""), ("text_encoder_2.text_model.encoder.", "te2 "),
                          ("text_encoder_2.text_model.", "te2 "), ("text_encoder_2.", "te2 "),
                          ("image_encoder.vision_model.", ""), ("image_encoder.", ""), ("unet.", "")):
        if site.startswith(prefix):
            return label + site.removeprefix(prefix)
    return site
