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

Two sites derive from any module site X: `X.input`, what the module was given (its first argument),
and `X.contribution`, its output minus its input - what a residual block writes into the stream it
reads (the quantity sparse autoencoders on SDXL-Turbo's transformer blocks are trained on). Patterns
take the suffix too: `unet.up_blocks.0.attentions.*.contribution`. The module sows its input only when
a capture asks for one (`sowing_inputs`), so other programs do not change.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from jaxprobe.errors import SiteError

SAMPLER_SITES = ("latents", "pred_original_sample")  # the sampler's own sites, beside the models' modules
DERIVED = ("input", "contribution")                   # X.input, X.contribution of any module site X
# Every text tower's block-level sites: `text_encoder.*` and, in SDXL, `text_encoder_2.*` (a refiner has only
# the second). One pattern (`*` crosses the "_2"), so one default fits every pipeline: a default naming the
# towers apart would be an error wherever one of them is missing.
TEXT_TOWER_SITES = "text_encoder*.*"


def split_derived(site: str) -> tuple[str, str | None]:
    """`unet.mid_block.contribution` -> ("unet.mid_block", "contribution"); a plain site -> (site, None)."""
    base, _, last = site.rpartition(".")
    return (base, last) if base and last in DERIVED else (site, None)


@contextlib.contextmanager
def sowing_inputs(sites: Iterable[str], prefix: str = "", every: bool = False) -> Iterator[None]:
    """While tracing inside this context, the modules of the derived sites among `sites` (paths after
    `prefix`) also sow their first argument as `input`; with `every`, each module given an array does."""
    paths = {base.removeprefix(prefix) for base, kind in map(split_derived, sites) if kind}
    if not paths and not every:
        yield
        return
    import flax.linen as nn   # here, not at the top: the light entry points read site names without JAX

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if every and args and hasattr(args[0], "shape"):
            context.module.sow("intermediates", "input", args[0])
        elif ".".join(context.module.path) in paths:
            if not args or not hasattr(args[0], "shape"):
                raise SiteError(f"{'.'.join(context.module.path)} is called without an array input, so it has no "
                                "input or contribution site")
            context.module.sow("intermediates", "input", args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def with_contributions(acts: Mapping[str, Any], sites: Iterable[str], prefix: str = "") -> dict[str, Any]:
    """`acts` (flattened, paths after `prefix`) with `X.contribution` = X - X.input for the sites asking for one."""
    out = dict(acts)
    for site in sites:
        base, kind = split_derived(site.removeprefix(prefix))
        if kind != "contribution":
            continue
        output, given = acts[base], acts[f"{base}.input"]
        if output.shape != given.shape:
            raise SiteError(f"{prefix}{base} turns its input {tuple(given.shape[1:])} into {tuple(output.shape[1:])}, "
                            f"so output minus input is undefined: capture {prefix}{base}.input and {prefix}{base} "
                            "apart, or the contribution of a block inside it")
        out[f"{base}.contribution"] = output - given
    return out


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
        base_pattern, kind = split_derived(pattern)
        glob = base_pattern.replace("**", "*")
        hits = [s for s in available if fnmatch.fnmatchcase(s, glob)
                and (s in blocks or _pattern_reaches_inside(base_pattern, s, sorted(blocks)))]
        if not hits:
            raise SiteError(f"site pattern {pattern!r} matches no site of this pipeline. "
                            f"Block-level sites:\n  " + "\n  ".join(block_sites)
                            + "\n(`jaxprobe info --sites MODEL` or `pipe.sites(all=True)` lists every site)")
        if kind:
            modules = [s for s in hits if s not in SAMPLER_SITES and split_derived(s)[1] is None
                       and not s.endswith(".probs")]
            if not modules:
                raise SiteError(f"{pattern!r}: {', '.join(hits[:3])} are not modules, so they have no {kind}; "
                                f"{kind} sites derive from module sites such as 'unet.mid_block.{kind}'")
            hits = [f"{s}.{kind}" for s in modules]
        chosen.update(hits)
    return [s for site in available for s in (site, *(f"{site}.{kind}" for kind in DERIVED)) if s in chosen]


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
                          ("text_encoder_3.encoder.", "te3 "), ("text_encoder_3.", "te3 "),
                          ("image_encoder.vision_model.", ""), ("image_encoder.", ""), ("unet.", ""),
                          ("transformer.", "")):
        if site.startswith(prefix):
            return label + site.removeprefix(prefix)
    return site
