"""Interventions: steer, patch, ablate, scale or clamp SAE latents at any site, step and CFG half,
compiled into the same program as capture.

    pipe.capture(prompts, sites, interventions=[Steer("unet.mid_block", v, scale=4.0, steps=range(10))])

Each intervention rewrites the output of one module (a capture site whose module sows `output`).
Inside the jitted program a Flax method interceptor (`nn.intercept_methods`) matches the module's
path, transforms what its `__call__` returns and rewrites the sown `output` too, so captures of that
site and everything downstream see the intervened value. Denoiser sites act inside the `lax.scan`
on the step index `i` (one entry of the capture's step axis per UNet evaluation); text-encoder sites
act on the conditioning, once, before sampling.

Structure (kind, site, steps, branch, channels, latent indices, which values are per prompt) is the
static, hashable `Spec` in the program's `Plan`; values (vectors, scales, factors, sources, SAE
weights) are traced arrays in the program's inputs, so a new scale or vector compiles nothing.
Per-prompt values carry the prompt axis first and are batched with the prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import InputError, InterventionError, SiteError

Steps = range | Sequence[int] | None
BRANCHES = ("cond", "uncond", "both")
ABLATIONS = ("zero", "mean")


# ---------------------------------------------------------------------------------------------- public API

@dataclass(frozen=True)
class Steer:
    """Add `scale * vector` to the site's output. vector: (c,) for every position, a (h, w, c) or
    (tokens, c) map, (n_prompts, c) or (n_prompts, h, w, c) per prompt."""

    site: str
    vector: Any
    scale: float = 1.0
    steps: Steps = None
    branch: str = "both"


@dataclass(frozen=True)
class Patch:
    """Replace the site's output with activations captured earlier: a `reduce="none"` capture of the same
    site, (n_prompts, n_steps, ...) for denoiser sites (all steps of the run, or one entry per step in
    `steps`) and (n_prompts, tokens, d) for text-encoder sites. The same source goes into each CFG half
    `branch` selects."""

    site: str
    source: Any
    steps: Steps = None
    branch: str = "both"


@dataclass(frozen=True)
class Ablate:
    """Set the site's output (or only `channels`) to zero, or to its mean over positions ("mean": the
    spatial / token mean of this evaluation, per channel: what is left is no layout)."""

    site: str
    how: str = "zero"
    steps: Steps = None
    channels: Sequence[int] | None = None
    branch: str = "both"


@dataclass(frozen=True)
class Scale:
    """Multiply the site's output (or only `channels`) by `factor`."""

    site: str
    factor: float
    steps: Steps = None
    channels: Sequence[int] | None = None
    branch: str = "both"


@dataclass(frozen=True)
class SAEWeights:
    """A TopK SAE's arrays, as `jaxprobe.sae` trains them (`SAEs.weights(name)`): inputs x (d,) are divided
    by `scale`, pre = (x / scale - b_dec) W_enc + b_enc (m,), the code keeps the k largest after ReLU."""

    W_enc: Any   # (d, m)
    b_enc: Any   # (m,)
    W_dec: Any   # (m, d)
    b_dec: Any   # (d,)
    k: int
    scale: float = 1.0


@dataclass(frozen=True)
class ClampSAE:
    """Set SAE latents to values while keeping the SAE's reconstruction error:
    x + scale * sum_i W_dec[i] (value_i - z_i(x)). `sae`: `SAEWeights` (or anything with those fields).
    `latents`: {latent index: value}, a value being a number, (n_prompts,) or (n_prompts, n_steps).
    pooled: the SAE reads the site's mean over positions (what a `reduce="mean"` capture trains on) and
    the change is added at every position; False: it reads each position."""

    site: str
    sae: Any
    latents: Mapping[int, Any]
    steps: Steps = None
    branch: str = "both"
    pooled: bool = True


Intervention = Steer | Patch | Ablate | Scale | ClampSAE
KINDS = (Steer, Patch, Ablate, Scale, ClampSAE)


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Spec:
    """The static part of one intervention (hashable: it is part of the compiled program's key)."""

    kind: str                                # "steer" | "patch" | "ablate" | "scale" | "clamp_sae"
    component: str                           # "text" | "denoiser"
    site: str                                # module path inside the component
    branch: str
    active: tuple[bool, ...] | None = None   # per step of the run; None: every step
    source_rows: tuple[int, ...] | None = None   # patch: row of the source's step axis for each step
    per_prompt: tuple[str, ...] = ()         # names of the values that carry the prompt axis
    per_step: bool = False                   # clamp_sae: values (n, n_steps, L)
    channels: tuple[int, ...] | None = None
    how: str = ""
    latents: tuple[int, ...] = ()
    k: int = 0
    pooled: bool = True


def step_indices(steps: Sequence[int], n_steps: int, what: str = "step indices",
                 error: type[Exception] = InputError) -> tuple[int, ...]:
    """Indices on the step axis (negative ones counted from the end), checked against the run's length."""
    idx = np.asarray(list(steps), dtype=int).reshape(-1)
    bad = idx[(idx < -n_steps) | (idx >= n_steps)]
    if bad.size:
        raise error(f"{what} {bad.tolist()} are outside 0..{n_steps - 1} "
                    f"(this sampler makes {n_steps} UNet evaluations)")
    return tuple(int(i) for i in idx % n_steps)


def describe(iv: Intervention) -> str:
    """A short, array-free description for a capture's options."""
    steps = "all" if iv.steps is None else list(iv.steps)
    extra = {Steer: lambda: f", scale={iv.scale}", Scale: lambda: f", factor={iv.factor}",
             Ablate: lambda: f", how={iv.how}", ClampSAE: lambda: f", latents={sorted(iv.latents)}"}
    return f"{type(iv).__name__}({iv.site}, steps={steps}, branch={iv.branch}{extra.get(type(iv), str)()})"


def _err(iv: Intervention, message: str) -> InterventionError:
    return InterventionError(f"{type(iv).__name__} on {iv.site!r}: {message}")


def plan_interventions(interventions: Sequence[Intervention], shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                       *, n_prompts: int, n_steps: int, guided: bool, examples: Sequence[str] = ()
                       ) -> tuple[tuple[Spec, ...], dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """Validate the interventions against the run and split them into static specs and values.

    shapes: {"text": {path: per-sample shape}, "denoiser": {path: per-sample shape}} of the module
    outputs that can be intervened on, with the component's site prefix ("text_encoder.", "unet.")
    under the key "prefix:text" / "prefix:denoiser". n_steps: 0 when the run does not sample.
    examples: site names an unknown-site error suggests (the block-level ones). Returns (specs, per-prompt values {str(j): {name: (n_prompts, ...)}}, shared values {str(j): ...})."""
    specs, batched, shared = [], {}, {}
    for j, iv in enumerate(interventions):
        if not isinstance(iv, KINDS):
            raise InterventionError(f"interventions[{j}] is a {type(iv).__name__}; pass Steer, Patch, Ablate, "
                                    "Scale or ClampSAE from jaxprobe.interventions")
        component, path, shape = _locate(iv, shapes, n_steps, examples)
        if iv.branch not in BRANCHES:
            raise _err(iv, f"branch must be one of {', '.join(BRANCHES)}, not {iv.branch!r}")
        if iv.branch == "uncond" and not guided:
            raise _err(iv, "branch='uncond' needs classifier-free guidance (guidance_scale > 1); without it "
                           "there is only the conditional pass: use branch='cond' or 'both'")
        active = None
        if iv.steps is not None:
            if component == "text":
                raise _err(iv, "text-encoder sites act once, on the conditioning, before sampling: steps "
                               "do not apply (leave steps=None)")
            chosen = step_indices(iv.steps, n_steps, f"{type(iv).__name__} on {iv.site!r}: steps", InterventionError)
            if not chosen:
                raise _err(iv, "steps is empty; pass None for every step")
            active = tuple(i in chosen for i in range(n_steps))
        spec, per, common = _values(iv, component, shape, n_prompts, n_steps if component == "denoiser" else 0,
                                    active)
        specs.append(Spec(component=component, site=path, branch=iv.branch, active=active, **spec))
        if per:
            batched[str(j)] = per
        if common:
            shared[str(j)] = common
    return tuple(specs), batched, shared


def _locate(iv: Intervention, shapes: Mapping[str, Any], n_steps: int, examples: Sequence[str]
            ) -> tuple[str, str, tuple[int, ...]]:
    for component in ("text", "denoiser"):
        prefix = shapes.get(f"prefix:{component}")
        if prefix and iv.site.startswith(prefix) and iv.site.removeprefix(prefix) in shapes[component]:
            if component == "denoiser" and not n_steps:
                raise _err(iv, "this run does not sample (it captures text-encoder sites only), so a denoiser "
                               "intervention would change nothing it returns; capture a denoiser site or generate")
            path = iv.site.removeprefix(prefix)
            return component, path, tuple(shapes[component][path])
    known = {f"{shapes[f'prefix:{c}']}{p}" for c in ("text", "denoiser") if shapes.get(f"prefix:{c}")
             for p in shapes[c]}
    raise SiteError(f"{type(iv).__name__}: {iv.site!r} is not a site that can be intervened on. Interventions "
                    "take the exact name of a module output or input (`X.input`; no patterns; not `latents`, "
                    "`...probs` or `...mlp`), "
                    "e.g.:\n  " + "\n  ".join(s for s in examples if s in known)
                    + "\n(`pipe.sites(all=True)` lists every site)")


def _width_error(iv: Intervention, what: str, got: tuple[int, ...], shape: tuple[int, ...], n: int) -> Exception:
    c = shape[-1]
    maps = f", {shape} or (n_prompts={n}, {', '.join(map(str, shape))})" if len(shape) > 1 else ""
    return _err(iv, f"{what} has shape {got}; the site's output is {shape} per prompt, so pass ({c},), "
                    f"(n_prompts={n}, {c}){maps}")


def _as_tokens(v: np.ndarray, shape: tuple[int, ...], lead: int) -> np.ndarray:
    """A patch-token site's (tokens, c) output given as the (h, w, c) map a reduce='none' capture returns
    (after `lead` leading axes) -> the tokens, in the patch order the map was made in."""
    if len(shape) == 2 and v.ndim == lead + 3 and v.shape[lead] * v.shape[lead + 1] == shape[0] \
            and v.shape[-1] == shape[1]:
        return v.reshape(*v.shape[:lead], *shape)
    return v


def _site_values(iv: Intervention, value: Any, what: str, shape: tuple[int, ...], n: int
                 ) -> tuple[np.ndarray, bool]:
    """A steering vector -> (array broadcastable against one batch row or the batch, per prompt?)."""
    v = np.asarray(value, np.float32)
    v = _as_tokens(_as_tokens(v, shape, 0), shape, 1)
    if v.ndim == 0 or v.shape[-1] != shape[-1]:
        raise _width_error(iv, what, v.shape, shape, n)
    if v.ndim == 1:
        return v, False
    if v.shape == shape:              # a map; for token sites a (tokens, c) map wins over (n_prompts, c)
        return v, False
    if v.shape == (n, shape[-1]):
        return v.reshape(n, *(1,) * (len(shape) - 1), shape[-1]), True
    if v.shape == (n, *shape):
        return v, True
    raise _width_error(iv, what, v.shape, shape, n)


def _channels(iv: Intervention, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if iv.channels is None:
        return None
    idx = np.asarray(list(iv.channels), dtype=int).reshape(-1)
    if idx.size == 0 or (idx < 0).any() or (idx >= shape[-1]).any():
        raise _err(iv, f"channels must be indices in 0..{shape[-1] - 1}, got {idx.tolist()}")
    return tuple(sorted({int(i) for i in idx}))


def _scalar(iv: Intervention, value: Any, name: str) -> np.ndarray:
    v = np.asarray(value, np.float32)
    if v.ndim:
        raise _err(iv, f"{name} must be a number (use a per-prompt Steer vector for per-prompt changes)")
    return v


def _values(iv: Intervention, component: str, shape: tuple[int, ...], n: int, n_steps: int,
            active: tuple[bool, ...] | None) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(static Spec fields, per-prompt values, shared values) of one intervention."""
    if isinstance(iv, Steer):
        vector, per_prompt = _site_values(iv, iv.vector, "vector", shape, n)
        scale = {"scale": _scalar(iv, iv.scale, "scale")}
        if per_prompt:
            return dict(kind="steer", per_prompt=("vector",)), {"vector": vector}, scale
        return dict(kind="steer"), {}, {**scale, "vector": vector}
    if isinstance(iv, Patch):
        source = np.asarray(iv.source, np.float32)
        if component == "text":
            if source.shape != (n, *shape):
                raise _err(iv, f"source has shape {source.shape}; patching a text-encoder site needs its "
                               f"reduce='none' capture, (n_prompts={n}, {', '.join(map(str, shape))})")
            return dict(kind="patch", per_prompt=("source",)), {"source": source}, {}
        kept = [i for i in range(n_steps) if active is None or active[i]]
        source = _as_tokens(source, shape, 2)
        if source.ndim != len(shape) + 2 or source.shape[0] != n or source.shape[2:] != shape \
                or source.shape[1] not in (n_steps, len(kept)):
            raise _err(iv, f"source has shape {source.shape}; it must be a reduce='none' capture of the site, "
                           f"(n_prompts={n}, steps, {', '.join(map(str, shape))}) with steps = {n_steps} (the "
                           f"whole run) or {len(kept)} (one per step in `steps`)")
        rows = tuple(range(n_steps)) if source.shape[1] == n_steps else \
            tuple(kept.index(i) if i in kept else 0 for i in range(n_steps))
        return dict(kind="patch", per_prompt=("source",), source_rows=rows), {"source": source}, {}
    if isinstance(iv, Ablate):
        if iv.how not in ABLATIONS:
            raise _err(iv, f"how must be 'zero' or 'mean', not {iv.how!r}")
        if iv.how == "mean" and len(shape) < 2:
            raise _err(iv, f"how='mean' averages over positions, and this site's output {shape} has none")
        return dict(kind="ablate", how=iv.how, channels=_channels(iv, shape)), {}, {}
    if isinstance(iv, Scale):
        return dict(kind="scale", channels=_channels(iv, shape)), {}, {"factor": _scalar(iv, iv.factor, "factor")}
    return _clamp_values(iv, shape, n, n_steps)


def _clamp_values(iv: ClampSAE, shape: tuple[int, ...], n: int, n_steps: int
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    sae = iv.sae
    try:
        w_enc, b_enc, w_dec, b_dec = (np.asarray(getattr(sae, f), np.float32) for f in ("W_enc", "b_enc", "W_dec",
                                                                                         "b_dec"))
        k, scale = int(sae.k), float(getattr(sae, "scale", 1.0))
    except AttributeError as err:
        raise _err(iv, "sae needs W_enc, b_enc, W_dec, b_dec and k (pass SAEs.weights(name) or SAEWeights)") from err
    d = shape[-1]
    if w_enc.ndim != 2 or w_enc.shape[0] != d or w_dec.shape != w_enc.shape[::-1] or b_dec.shape != (d,) \
            or b_enc.shape != (w_enc.shape[1],):
        raise _err(iv, f"the SAE reads width {w_enc.shape[0] if w_enc.ndim == 2 else w_enc.shape} but the site's "
                       f"output has {d} channels: train the SAE on this site")
    m = w_enc.shape[1]
    if not 0 < k <= m:
        raise _err(iv, f"k={k} must be in 1..{m}")
    if not iv.latents:
        raise _err(iv, "latents is empty; pass {latent index: value}")
    idx = [int(i) for i in iv.latents]
    if any(not 0 <= i < m for i in idx):
        raise _err(iv, f"latent indices {idx} must be in 0..{m - 1}")
    values = [np.asarray(v, np.float32) for v in iv.latents.values()]
    shapes_ = {v.shape for v in values}
    allowed = ((), (n,), (n, n_steps)) if n_steps else ((), (n,))    # a text-encoder site acts once
    if len(shapes_) != 1 or next(iter(shapes_)) not in allowed:
        per_step = f" or (n_prompts={n}, n_steps={n_steps})" if n_steps else ""
        raise _err(iv, f"latent values must all be numbers or (n_prompts={n},){per_step}; got shapes {sorted(shapes_)}")
    value = np.stack(values, axis=-1)                                  # (L,), (n, L) or (n, T, L)
    weights = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec[idx], "b_dec": b_dec, "scale": np.float32(scale)}
    spec = dict(kind="clamp_sae", latents=tuple(idx), k=k, pooled=iv.pooled, per_step=value.ndim == 3,
                per_prompt=("values",) if value.ndim > 1 else ())
    return (spec, {"values": value}, weights) if value.ndim > 1 else (spec, {}, {**weights, "values": value})


# ---------------------------------------------------------------------------------------------- in the program

def _transform(spec: Spec, v: Mapping[str, jax.Array], y: jax.Array, step: jax.Array | None) -> jax.Array:
    """The intervened output of rows y (r, *S); per-prompt values already match the r rows."""
    positions = tuple(range(1, y.ndim - 1))
    channel_mask = None
    if spec.channels is not None:
        channel_mask = jnp.zeros(y.shape[-1], bool).at[jnp.asarray(spec.channels)].set(True)
    if spec.kind == "steer":
        new = y + v["scale"] * v["vector"]
    elif spec.kind == "patch":
        source = v["source"]
        new = source if spec.source_rows is None else source[:, jnp.asarray(spec.source_rows)[step]]
        new = jnp.broadcast_to(new, y.shape)
    elif spec.kind == "ablate":
        new = jnp.zeros_like(y) if spec.how == "zero" else jnp.broadcast_to(y.mean(axis=positions, keepdims=True),
                                                                            y.shape)
    elif spec.kind == "scale":
        new = y * v["factor"]
    else:
        new = _clamp(spec, v, y, step, positions)
    if channel_mask is not None:
        new = jnp.where(channel_mask, new, y)
    return new.astype(y.dtype)


def _clamp(spec: Spec, v: Mapping[str, jax.Array], y: jax.Array, step: jax.Array | None,
           positions: tuple[int, ...]) -> jax.Array:
    x = y.astype(jnp.float32)
    x = x.mean(axis=positions) if spec.pooled else x                 # (r, d) or (r, *S)
    pre = (x / v["scale"] - v["b_dec"]) @ v["W_enc"] + v["b_enc"]     # (..., m)
    kth = jax.lax.top_k(pre, spec.k)[0][..., -1:]                    # the k-th largest: TopK's threshold
    idx = jnp.asarray(spec.latents)
    z = jnp.where(pre[..., idx] >= kth, jax.nn.relu(pre[..., idx]), 0.0)   # (..., L) the current code
    target = v["values"][:, step] if spec.per_step else v["values"]          # (L,) or (r, L)
    if target.ndim == 2 and not spec.pooled:
        target = target.reshape(target.shape[0], *(1,) * len(positions), target.shape[-1])
    delta = ((target - z) @ v["W_dec"]) * v["scale"]                 # (..., d)
    if spec.pooled:
        delta = delta.reshape(delta.shape[0], *(1,) * len(positions), delta.shape[-1])
    return y.astype(jnp.float32) + delta


def _rows_for(spec: Spec, v: Mapping[str, jax.Array], y: jax.Array, half: int | None, step: jax.Array | None
              ) -> jax.Array:
    """Apply one intervention to the rows of y its branch selects. half: rows per CFG half when y is the
    [uncond; cond] batch of a guided denoiser evaluation, else None (every row is the one pass)."""
    if half is None:
        new = _transform(spec, v, y, step)
    elif spec.branch == "both":
        doubled = {name: jnp.concatenate([a, a]) if name in spec.per_prompt else a for name, a in v.items()}
        new = _transform(spec, doubled, y, step)
    else:
        lo = half if spec.branch == "cond" else 0
        part = _transform(spec, v, y[lo:lo + half], step)
        new = jax.lax.dynamic_update_slice_in_dim(y, part, lo, axis=0)
    if spec.active is not None:
        new = jnp.where(jnp.asarray(spec.active)[step], new, y)
    return new


# The sow name of the second output of modules that return two token streams, (image, text): SD3's joint blocks
# and their attentions. An intervention on `path.context` acts on that output as `path` acts on the first.
SECOND_STREAM = "context"


@contextlib.contextmanager
def intervening(specs: Sequence[tuple[Spec, Mapping[str, jax.Array]]], *, half: int | None = None,
                step: jax.Array | None = None, feed: Mapping[str, str] | None = None) -> Iterator[None]:
    """While tracing inside this context, the modules named by the specs return (and sow) intervened outputs.

    specs: (spec, its values) in list order, for one component. half: see `_rows_for`. step: the traced
    step index. feed: {module path: source module path}: the source's output replaces the module's
    input (the Diffusion Lens feeds a text-encoder layer into the final layer norm)."""
    by_site: dict[str, list] = {}
    for spec, values in specs:
        by_site.setdefault(spec.site, []).append((spec, values))
    feed = dict(feed or {})
    if not by_site and not feed:
        yield
        return
    fed: dict[str, Any] = {}   # outputs of feed sources, traced earlier in the same pass

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        site = ".".join(context.module.path)
        if site in feed:
            args = (fed[feed[site]], *args[1:])
        for spec, values in by_site.get(f"{site}.input", ()):   # interventions on what the module is given
            args = (_rows_for(spec, values, args[0], half, step), *args[1:])
        for spec, values in by_site.get(f"{site}.{SECOND_STREAM}.input", ()):   # the second stream, given second
            args = (args[0], _rows_for(spec, values, args[1], half, step), *args[2:])
        out = next_fun(*args, **kwargs)
        todo = by_site.get(site, ())
        if todo:
            # Down blocks return (output, skips); as a forward hook on diffusers' output[0], only the output changes.
            y = out[0] if isinstance(out, tuple) else out
            for spec, values in todo:
                y = _rows_for(spec, values, y, half, step)
            module = context.module
            if module.has_variable("intermediates", "output"):
                sown = module.get_variable("intermediates", "output")
                module.put_variable("intermediates", "output", (*sown[:-1], y))
            out = (y, *out[1:]) if isinstance(out, tuple) else y
        second = by_site.get(f"{site}.{SECOND_STREAM}", ())
        if second and isinstance(out, tuple) and out[1] is not None:   # MMDiT blocks return (image, text)
            y = out[1]
            for spec, values in second:
                y = _rows_for(spec, values, y, half, step)
            module = context.module
            if module.has_variable("intermediates", SECOND_STREAM):
                sown = module.get_variable("intermediates", SECOND_STREAM)
                module.put_variable("intermediates", SECOND_STREAM, (*sown[:-1], y))
            out = (out[0], y, *out[2:])
        if site in feed.values():
            fed[site] = out
        return out

    with nn.intercept_methods(interceptor):
        yield


def with_values(specs: Sequence[Spec], component: str, inputs: Mapping[str, Any]
                ) -> list[tuple[Spec, dict[str, jax.Array]]]:
    """The specs of one component paired with their values from the program inputs
    ("interventions": per-prompt, batched; "intervention_values": shared)."""
    batched, shared = inputs.get("interventions", {}), inputs.get("intervention_values", {})
    return [(spec, {**shared.get(str(j), {}), **batched.get(str(j), {})})
            for j, spec in enumerate(specs) if spec.component == component]


def module_outputs(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The `output` leaves of an (abstract) intermediates tree: {module path: last sown value}, and the
    second streams modules return beside it (`path.context`: an MMDiT block's text tokens)."""
    found: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            found.update(module_outputs(value, f"{prefix}{name}."))
        elif name == "output":
            found[prefix[:-1]] = value[-1]
        elif name == SECOND_STREAM:
            found[f"{prefix}{name}"] = value[-1]
    return found
