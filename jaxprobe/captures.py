"""Captures that describe themselves: {site: array} plus how it was captured, and its feature sets.

    feats = pipe.capture(prompts, ["text_encoder.*", "unet.mid_block"], num_inference_steps=25)
    feats["unet.mid_block"]            # (n, n_steps, dim): a Captures is a read-only Mapping[str, ndarray]
    feats.timesteps, feats.steps       # the training timestep and sampler step of each step-axis entry
    feats.reductions, feats.prompts, feats.seed, feats.options
    for fs in feats.feature_sets():    # FeatureSet("unet.mid_block@3", site, step=3, timestep=..., array (n, d))
        ...
    feats.subset(sites=["unet.*"], steps=[0, 10])

`feature_sets(features)` is the one place that splits features into feature sets, for a `Captures`
or a plain mapping alike: the probe sweep, the SAE trainer and the directions study all go through
it. A site with a step axis gives one set per entry on it, named "site@i" where i is the entry's
position on the axis (0 = the first step kept), with `step=i`; a site without one gives one set named
by the site, with `step=-1` (the probe table's `timestep` column holds `step`).

Which sites have a step axis: in a plain mapping, every 3-D array (n, steps, d) (the rule the sweep
always used); in a Captures, the sampled sites (anything but `text_encoder.*` and `image_encoder.*`)
whose axis 1 has one entry per kept step, unless the constructor was told (`stepped=`). So a text
site captured with reduce="none", (n, tokens, d), is one unreduced site in a Captures, not 77 steps.

Imports only numpy and jaxprobe.errors, so the libraries (probes/, sae/) may use it.
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxprobe.errors import InputError, SiteError

__all__ = ["Captures", "FeatureSet", "feature_sets", "UNSTEPPED_PREFIXES"]

# Sites captured once per prompt, never per denoising step (the text encoder before sampling, the
# image encoder on the decoded images).
UNSTEPPED_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "image_encoder.")


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """One (n, d) feature set: a site, or one step of a site with a step axis.

    name: "site" or "site@step"; step: the position on the site's step axis (-1 without one);
    timestep: the training timestep of that entry (a numpy scalar of the schedule's dtype), None when
    unknown or without a step axis; sampler_step: its index into the sampler's evaluations, None when
    unknown or without a step axis; array: (n, d), a view of the captured array."""

    name: str
    site: str
    step: int
    timestep: Any
    array: np.ndarray
    sampler_step: int | None = None

    def __repr__(self) -> str:
        return (f"FeatureSet({self.name!r}, site={self.site!r}, step={self.step}, timestep={_scalar(self.timestep)}, "
                f"array={tuple(self.array.shape)} {self.array.dtype})")


class Captures(Mapping[str, np.ndarray]):
    """{site: np.ndarray} that knows how it was captured (see the module docstring). Immutable in
    spirit: no mutation API (no item or attribute assignment; the description is read-only);
    `subset` and `replace` return new Captures. The arrays are those given, not copies, so
    `dict(captures)` holds the very arrays and compares equal to the mapping they came from.

    timesteps: (n_steps,) training timestep of each entry on the step axis, or None (text only, or
        unknown); steps: (n_steps,) the sampler evaluations kept (indices into the schedule), or None;
    reductions: {site: reduction}; prompts: one per row, or () when not given; seed, prompt_offset:
        the noise of row i is that of (seed, prompt_offset + i); options: the other capture options;
    stepped: the sites whose axis 1 is the step axis.

    Equality: with a plain mapping, same sites and equal arrays; with another Captures, the
    description must match too.
    """

    __slots__ = ("_arrays", "_stepped", "_timesteps", "_steps", "_reductions", "_prompts", "_seed",
                 "_prompt_offset", "_options")

    def __init__(self, arrays: Mapping[str, Any], *, timesteps: Any = None, steps: Any = None,
                 reductions: str | Mapping[str, str] | None = None, prompts: Iterable[str] = (),
                 seed: int | None = None, prompt_offset: int = 0, options: Mapping[str, Any] | None = None,
                 stepped: Iterable[str] | None = None):
        if not isinstance(arrays, Mapping):
            raise InputError(f"captures are {{site: array}}, got {type(arrays).__name__}")
        values = {str(site): np.asarray(a) for site, a in arrays.items()}
        rows = {site: a.shape[0] if a.ndim else None for site, a in values.items()}
        if None in rows.values() or len(set(rows.values())) > 1:
            raise InputError(f"every captured site needs one row per prompt; got rows {rows}")
        timesteps = None if timesteps is None else _readonly(np.asarray(timesteps).reshape(-1))
        steps = None if steps is None else _readonly(np.asarray(steps, dtype=np.int64).reshape(-1))
        if timesteps is not None and steps is not None and len(timesteps) != len(steps):
            raise InputError(f"{len(timesteps)} timesteps for {len(steps)} steps: give one training timestep per "
                             "kept step")
        n_steps = len(steps) if steps is not None else len(timesteps) if timesteps is not None else None
        if stepped is None:
            stepped = [site for site, a in values.items()
                       if not site.startswith(UNSTEPPED_PREFIXES) and a.ndim >= 3
                       and (n_steps is None or a.shape[1] == n_steps)]
        named = set(stepped)
        stepped = tuple(site for site in values if site in named)
        flat = {s: values[s].shape for s in stepped if values[s].ndim < 2}
        if flat:
            raise InputError(f"sites {flat} cannot have a step axis: they have no axis 1")
        if n_steps is not None:
            wrong = {s: values[s].shape for s in stepped if values[s].shape[1] != n_steps}
            if wrong:
                raise InputError(f"sites {wrong} do not have one entry per kept step ({n_steps}) on axis 1")
        prompts = tuple(str(p) for p in prompts)
        n = next(iter(rows.values()), None)
        if prompts and n is not None and len(prompts) != n:
            raise InputError(f"{len(prompts)} prompts for {n} captured rows: give one prompt per row, or none")
        set_ = object.__setattr__
        set_(self, "_arrays", values)
        set_(self, "_stepped", stepped)
        set_(self, "_timesteps", timesteps)
        set_(self, "_steps", steps)
        set_(self, "_reductions", types.MappingProxyType(_per_site(reductions, values)))
        set_(self, "_prompts", prompts)
        set_(self, "_seed", None if seed is None else int(seed))
        set_(self, "_prompt_offset", int(prompt_offset))
        set_(self, "_options", types.MappingProxyType(dict(options or {})))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, timesteps: Any = None, steps: Any = None,
                    reductions: str | Mapping[str, str] | None = None, prompts: Iterable[str] = (),
                    seed: int | None = None, prompt_offset: int = 0, options: Mapping[str, Any] | None = None,
                    stepped: Iterable[str] | None = None) -> "Captures":
        """Captures of `arrays` {site: (n, ...)} (kept as they are, not copied).

        timesteps, steps: one entry per kept step (see the class docstring). reductions: one name for
        every site, or {site or glob: name} (first match wins, as `pipe.capture`'s `reduce`); sites it
        does not cover get none. stepped: the sites with a step axis, when the default rule (module
        docstring) would guess wrong, e.g. `()` for single-timestep UNet maps (n, h, w, c).
        """
        return cls(arrays, timesteps=timesteps, steps=steps, reductions=reductions, prompts=prompts, seed=seed,
                   prompt_offset=prompt_offset, options=options, stepped=stepped)

    # ---------------------------------------------------------------- Mapping

    def __getitem__(self, site: str) -> np.ndarray:
        try:
            return self._arrays[site]
        except KeyError:
            raise SiteError(f"no site {site!r} in these captures; they hold {', '.join(self._arrays) or 'none'}") \
                from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __contains__(self, site: object) -> bool:
        return site in self._arrays

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if set(self) != set(other) or not all(_same(self[s], other[s]) for s in self):
            return False
        if isinstance(other, Captures):
            return all(_same(getattr(self, k), getattr(other, k)) for k in self._DESCRIPTION)
        return True

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Captures are immutable; use .replace(...) or .subset(...) for changed copies")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Captures are immutable")

    def __reduce__(self):
        return _rebuild, (self.to_dict(), self._state())

    # ---------------------------------------------------------------- description

    _DESCRIPTION = ("stepped", "timesteps", "steps", "reductions", "prompts", "seed", "prompt_offset", "options")

    @property
    def timesteps(self) -> np.ndarray | None:
        return self._timesteps

    @property
    def steps(self) -> np.ndarray | None:
        return self._steps

    @property
    def reductions(self) -> Mapping[str, str]:
        return self._reductions

    @property
    def prompts(self) -> tuple[str, ...]:
        return self._prompts

    @property
    def seed(self) -> int | None:
        return self._seed

    @property
    def prompt_offset(self) -> int:
        return self._prompt_offset

    @property
    def options(self) -> Mapping[str, Any]:
        return self._options

    @property
    def stepped(self) -> tuple[str, ...]:
        """The sites whose axis 1 is the step axis, in site order."""
        return self._stepped

    @property
    def n_rows(self) -> int:
        """Rows (prompts, or prompts x seeds) of every site; 0 for empty captures."""
        return next((a.shape[0] for a in self._arrays.values()), 0)

    @property
    def n_steps(self) -> int | None:
        """Entries on the step axis, None when no site has one."""
        if self._steps is not None:
            return len(self._steps)
        if self._timesteps is not None:
            return len(self._timesteps)
        return self._arrays[self._stepped[0]].shape[1] if self._stepped else None

    def _state(self) -> dict[str, Any]:
        return {"timesteps": self._timesteps, "steps": self._steps, "reductions": dict(self._reductions),
                "prompts": self._prompts, "seed": self._seed, "prompt_offset": self._prompt_offset,
                "options": dict(self._options), "stepped": self._stepped}

    # ---------------------------------------------------------------- views

    def to_dict(self) -> dict[str, np.ndarray]:
        """{site: array}: a plain dict of the same arrays."""
        return dict(self._arrays)

    def feature_sets(self, sites: Sequence[str] | None = None) -> list[FeatureSet]:
        """Every feature set, in site order then step order (module docstring); `sites`: names or
        globs to keep (None or empty: all)."""
        return _split(self._select(sites), set(self._stepped), self._timesteps, self._steps, strict=True)

    def subset(self, sites: str | Sequence[str] | None = None, steps: Sequence[int] | None = None) -> "Captures":
        """The captures of some sites (names or globs) and/or some steps (entries of `self.steps`, the
        sampler's step indices, in the order given; positions on the step axis when `steps` is None).

        Feature sets of a step subset are named by their new positions ("site@0" is the first step
        kept), as those of a capture of just those steps would be. Sites without a step axis are kept
        whole."""
        chosen = self._select([sites] if isinstance(sites, str) else sites)
        if steps is None:
            return Captures(chosen, **self._state())
        if not self._stepped:
            raise InputError("these captures have no step axis to subset")
        steps = [int(s) for s in steps]
        known = list(self._steps) if self._steps is not None else list(range(self.n_steps))
        missing = [s for s in steps if s not in known]
        if missing or len(set(steps)) != len(steps):
            raise InputError(f"steps {missing or steps} are not distinct entries of the captured steps {known}")
        positions = [known.index(s) for s in steps]
        take = (slice(positions[0], positions[-1] + 1)
                if positions == list(range(positions[0], positions[-1] + 1)) else np.asarray(positions))
        arrays = {site: a[:, take] if site in self._stepped else a for site, a in chosen.items()}
        state = self._state()
        state["steps"] = None if self._steps is None else self._steps[take]
        state["timesteps"] = None if self._timesteps is None else self._timesteps[take]
        return Captures(arrays, **state)

    def replace(self, **changes: Any) -> "Captures":
        """A new Captures with some fields changed: arrays (a new {site: array}), timesteps, steps,
        reductions, prompts, seed, prompt_offset, options, stepped (re-inferred when arrays change and
        stepped is not given)."""
        unknown = set(changes) - {"arrays", *self._DESCRIPTION}
        if unknown:
            raise TypeError(f"Captures.replace() got unknown fields {sorted(unknown)}")
        state = self._state()
        arrays = changes.pop("arrays", None)
        if arrays is not None and "stepped" not in changes:
            state["stepped"] = None
        state.update(changes)
        return Captures(self._arrays if arrays is None else arrays, **state)

    def _select(self, sites: Sequence[str] | None) -> dict[str, np.ndarray]:
        if not sites:
            return dict(self._arrays)
        chosen = {s: a for s, a in self._arrays.items() if _matches(s, sites)}
        if not chosen:
            raise InputError(f"no feature set matches {list(sites)}; these captures hold {', '.join(self._arrays)}")
        return chosen

    def __repr__(self) -> str:
        head = [f"{len(self._prompts) or self.n_rows} {'prompts' if self._prompts else 'rows'}"]
        if self._steps is not None or self._timesteps is not None:
            what = f"{self.n_steps} steps"
            if self._steps is not None:
                what += f" {_short(self._steps)}"
            if self._timesteps is not None:
                what += f" (timesteps {_short(self._timesteps)})"
            head.append(what)
        if self._seed is not None:
            head.append(f"seed {self._seed}" + (f", prompt offset {self._prompt_offset}" if self._prompt_offset else ""))
        lines = [f"Captures({', '.join(head)}; {len(self)} site{'s' if len(self) != 1 else ''}"
                 + (":" if self._arrays else ")")]
        width = max((len(s) for s in self._arrays), default=0)
        shapes = {s: str(tuple(a.shape)) for s, a in self._arrays.items()}
        shape_width = max((len(v) for v in shapes.values()), default=0)
        for site, array in self._arrays.items():
            notes = [self._reductions.get(site, ""), "per step" if site in self._stepped else ""]
            lines.append(f"  {site:<{width}}  {shapes[site]:<{shape_width}}  {array.dtype}  "
                         f"{'  '.join(n for n in notes if n)}".rstrip())
        if self._arrays:
            lines.append(")")
        return "\n".join(lines)


def feature_sets(features: Mapping[str, Any] | np.ndarray, sites: Sequence[str] | None = None) -> list[FeatureSet]:
    """The feature sets of a `Captures`, a plain {site: array} mapping, or an (F, n, d) array (sites
    "0", "1", ...): the one place features are split into feature sets (module docstring). sites:
    names or globs to keep (None or empty: all). Raises InputError when nothing is left."""
    if isinstance(features, Captures):
        return features.feature_sets(sites)
    if not isinstance(features, Mapping):
        features = np.asarray(features)
        if features.ndim != 3:
            raise InputError(f"a plain feature array must be (F, n, d), got shape {features.shape}")
        features = {str(i): f for i, f in enumerate(features)}
    if sites:
        features = {s: a for s, a in features.items() if _matches(s, sites)}
        if not features:
            raise InputError(f"no feature set matches {list(sites)}")
    arrays = {site: np.asarray(a) for site, a in features.items()}
    return _split(arrays, {s for s, a in arrays.items() if a.ndim == 3}, None, None, strict=False)


# ---------------------------------------------------------------------------------------------------------


def _split(arrays: Mapping[str, np.ndarray], stepped: set[str], timesteps: np.ndarray | None,
           steps: np.ndarray | None, *, strict: bool) -> list[FeatureSet]:
    out = []
    for site, array in arrays.items():
        if site in stepped:
            if array.ndim != 3:
                raise InputError(f"site {site!r} holds maps {array.shape} (n, steps, ...): feature sets need "
                                 "(n, steps, d); capture it with reduce='mean' (or 'max'), or flatten the maps")
            for i in range(array.shape[1]):
                out.append(FeatureSet(f"{site}@{i}", site, i, None if timesteps is None else timesteps[i],
                                      array[:, i], None if steps is None else int(steps[i])))
        elif array.ndim == 2:
            out.append(FeatureSet(site, site, -1, None, array))
        elif strict:
            raise InputError(f"site {site!r} has no step axis and is {array.shape}: a feature set is (n, d); "
                             "capture it with a token or spatial reduction (e.g. reduce='eos' or 'mean'), or pass "
                             "dict(captures) to split its axis 1 as steps")
        else:
            raise InputError(f"site {site!r}: features must be (n, d) or (n, n_timesteps, d), got {array.shape}")
    if not out:
        raise InputError("no feature sets given")
    return out


def _matches(site: str, patterns: Iterable[str]) -> bool:
    return any(site == p or fnmatch.fnmatchcase(site, p) for p in patterns)


def _readonly(value: Any) -> np.ndarray:
    """The description's arrays (timesteps, steps) as read-only views; the caller's stay writeable."""
    array = np.asarray(value)
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


def _per_site(reductions: str | Mapping[str, str] | None, arrays: Mapping[str, Any]) -> dict[str, str]:
    if reductions is None:
        return {}
    if isinstance(reductions, str):
        return {site: reductions for site in arrays}
    out = {}
    for site in arrays:
        how = reductions.get(site) if site in reductions else next(
            (r for pattern, r in reductions.items() if fnmatch.fnmatchcase(site, pattern)), None)
        if how is not None:
            out[site] = str(how)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if a is None or b is None:
            return a is b
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        try:
            return bool(np.array_equal(a, b, equal_nan=True))
        except TypeError:  # equal_nan needs a numeric dtype
            return bool(np.array_equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _short(values: np.ndarray) -> str:
    items = [_scalar(v) for v in values]
    shown = items if len(items) <= 8 else [*items[:3], "...", *items[-2:]]
    return "[" + " ".join(str(v) for v in shown) + "]"


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return round(value, 3) if isinstance(value, float) else value


def _rebuild(arrays: dict[str, np.ndarray], state: dict[str, Any]) -> Captures:
    return Captures(arrays, **state)
