"""`jaxprobe.plan`: the memory a capture needs, worked out from shapes alone (no weights drawn or read).

Three parts, each as exact as it can be without running anything:

- parameters: every component's leaves from its abstract parameter tree, by dtype (exact);
- captured sites: the arrays the capture program returns for one batch, from `jax.eval_shape` of that very
  program on abstract parameters and inputs (exact: steps, batch, reductions and dtype as a run has them);
- temporaries of one denoiser evaluation (the CFG-doubled batch at the requested resolution): XLA's own
  `memory_analysis` of that evaluation compiled alone, or, where compiling would take minutes on this host,
  an analytic estimate from the traced shapes of every activation the loop's evaluation passes between modules
  (`ANALYTIC_FACTOR` times the largest one plus the evaluation's inputs and outputs). `MemoryPlan.temporaries_source` says which.

Nothing here is specific to a family: the family's own `example_inputs`, `apply` and conditioning (through the
capture program's functions) give every shape, so a new family in `models.families.FAMILIES` plans as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import InputError
from jaxprobe.pipeline import sampling
from jaxprobe.pipeline.programs import evaluation, sampling_stage, text_stage
from jaxprobe.pipeline.sites import SAMPLER_SITES

if TYPE_CHECKING:
    from jaxprobe.pipeline.pipeline import Pipeline

DEFAULT_DEVICE_MEMORY = 80 * 10**9
# Peak live temporaries of one evaluation per its largest activation (the largest array a module is given or
# returns, often a feed-forward's wide hidden state), when XLA's figure is not computed: a block holds about that,
# its input and the residual at once; XLA fuses some of it away. Against XLA's memory_analysis on this CPU: tiny
# (batch 2 with CFG) 4.3 MB estimated vs 5.7 MB, sd15-random (batch 1 with CFG, 512 px) 0.34 GB vs 0.19 GB: within
# a factor of two, a rough figure.
ANALYTIC_FACTOR = 4
# Denoisers up to this many parameters are compiled for XLA's figure when `xla="auto"`: the tiny test models
# compile in seconds; an SD 1.5 UNet takes 160 s on 2 CPU cores (SDXL, MMDiTs: longer), so those are estimated.
XLA_AUTO_MAX_PARAMS = 200_000_000
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


@dataclass(frozen=True)
class ParamBytes:
    """One component's parameters of one dtype."""

    component: str
    dtype: str
    count: int
    bytes: int


@dataclass(frozen=True)
class SiteBytes:
    """One captured site: the array one program (one batch) returns for it."""

    site: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    """What one capture program of `batch` prompts holds on a device. Bytes are exact except `temporaries`
    (see `temporaries_source`)."""

    model: str
    family: str
    batch: int
    height: int
    width: int
    steps: int                          # num_inference_steps asked for
    evaluations: int                    # denoiser evaluations the sampler makes (len of its timesteps)
    guided: bool
    dtype: str
    reduce: str
    params: tuple[ParamBytes, ...]
    sites: tuple[SiteBytes, ...]
    temporaries: int                    # one denoiser evaluation's working memory
    temporaries_source: str             # "xla" (memory_analysis) or "analytic"
    device_memory: int
    device_memory_source: str           # "given", "local device" or "default"

    @property
    def param_bytes(self) -> int:
        return sum(p.bytes for p in self.params)

    @property
    def captured_bytes(self) -> int:
        return sum(s.bytes for s in self.sites)

    @property
    def activation_bytes(self) -> int:
        """Captured arrays (kept on the device for every step until the program ends) plus one evaluation's
        temporaries."""
        return self.captured_bytes + self.temporaries

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.activation_bytes

    @property
    def devices(self) -> int:
        """Devices of `device_memory` that parameters plus activations need when the parameters are split over
        them (1: it fits on one, parameters replicated as jaxprobe runs today)."""
        return max(1, math.ceil(self.total_bytes / self.device_memory))

    def by_component(self) -> dict[str, dict[str, int]]:
        """{component: {dtype: bytes}}."""
        out: dict[str, dict[str, int]] = {}
        for p in self.params:
            out.setdefault(p.component, {})[p.dtype] = p.bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, with the totals."""
        out = dataclasses.asdict(self)
        out.update(param_bytes=self.param_bytes, captured_bytes=self.captured_bytes,
                   activation_bytes=self.activation_bytes, total_bytes=self.total_bytes, devices=self.devices)
        return out


def parse_bytes(text: str | int | float) -> int:
    """'80GB', '80 GiB', '24G', '8e10' -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise InputError(f"device memory {text!r} is not a size: write it like 80GB, 141GB, 24GiB or 8e10")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def local_device_memory() -> int | None:
    """The first local device's memory limit as its runtime reports it (GPUs, TPUs); None where unknown (CPUs)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    return stats.get("bytes_limit")


def param_bytes(components: Iterable[Any]) -> tuple[ParamBytes, ...]:
    """Every component's parameters by dtype, from their abstract trees (lazy weights stay undrawn)."""
    rows = []
    for c in components:
        totals: dict[str, list[int]] = {}
        for leaf in jax.tree.leaves(c.abstract_params):
            count = math.prod(leaf.shape)
            entry = totals.setdefault(np.dtype(leaf.dtype).name, [0, 0])
            entry[0] += count
            entry[1] += count * np.dtype(leaf.dtype).itemsize
        rows += [ParamBytes(c.name, dtype, n, b) for dtype, (n, b) in sorted(totals.items())]
    return tuple(rows)


def _nbytes(x: Any) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def plan(pipe_or_source: "Pipeline | str", sites: str | Sequence[str] | None = None, *, batch: int = 1,
         height: int | None = None, width: int | None = None, steps: int = 50, cfg: bool = True,
         dtype: str | None = None, reduce: str = "mean", device_memory: str | int | None = None,
         xla: bool | str = "auto") -> MemoryPlan:
    """The memory of `pipe.capture(batch prompts, sites, num_inference_steps=steps, height=, width=, reduce=)`,
    with classifier-free guidance when `cfg`, worked out without drawing or reading any weight of a random
    model (a folder is loaded as `jaxprobe.load` loads it).

    pipe_or_source: a Pipeline, or what `jaxprobe.load` takes ("sd3-random", a folder), loaded with `dtype`
    (default float32). sites: capture patterns (default: the family's bottleneck). height/width: pixels (default
    the denoiser's sample size). device_memory: "80GB" etc. (default: the local device's, else 80 GB).
    xla: True compiles one denoiser evaluation for XLA's temporaries figure, False estimates them analytically,
    "auto" compiles denoisers up to XLA_AUTO_MAX_PARAMS parameters.
    """
    from jaxprobe.pipeline.load import load

    if isinstance(pipe_or_source, str) or hasattr(pipe_or_source, "__fspath__"):
        pipe = load(pipe_or_source, dtype=dtype or "float32")
    else:
        pipe = pipe_or_source
        if dtype is not None and np.dtype(pipe.dtype) != np.dtype(jnp.dtype(dtype)):
            raise InputError(f"dtype={dtype!r} differs from the pipeline's {np.dtype(pipe.dtype).name}: load it "
                             f"with jaxprobe.load(..., dtype={dtype!r}), or pass the model's name instead")
    if pipe.unet is None:
        raise InputError(f"{pipe.source} has no denoiser: a memory plan is for a capture's sampling loop")
    if batch < 1:
        raise InputError(f"batch must be at least 1, not {batch}")
    family = pipe.family
    chosen = pipe.select(sites if sites is not None else pipe.bottleneck_site)
    options = dict(num_inference_steps=steps, guidance_scale=7.5 if cfg else 1.0, reduce=reduce, height=height,
                   width=width)
    program_plan, schedule = sampling.plan_capture(pipe, chosen, **options)
    if schedule is None:   # text sites only: the capture never samples, but a plan is for the sampling loop
        program_plan, schedule = sampling.plan_capture(pipe, [*chosen, "latents"], **options)
    o = {**sampling.CAPTURE_DEFAULTS, **options}
    prompts = [0] * batch if family.class_conditioned else ["a"] * batch   # shapes do not depend on the text
    inputs, shared = sampling.program_inputs(pipe, prompts, program_plan, o)
    models = sampling.models_of(pipe)
    params = {name: c.abstract_params for name, c in sampling.program_components(pipe).items()}
    program_inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), {**inputs, **shared})
    seed, scale = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    # capture_program's two halves traced apart (each tower and the denoiser once): the conditioning the text
    # passes hand the loop is also what one evaluation is compiled or estimated on.
    text_out, conditioning = jax.eval_shape(lambda p, i: text_stage(models, p, program_plan, i), params,
                                            program_inputs)
    largest = [0]
    with _largest_activation(largest):
        loop_out = jax.eval_shape(lambda p, s, i, c, k, g: sampling_stage(models, p, s, program_plan, i, k, g, c),
                                  params, schedule, program_inputs, conditioning, seed, scale)
    captured = _captured({**text_out, **loop_out}, program_plan, pipe.unet.name, chosen)

    # One evaluation as the loop makes it: [uncond; cond] latents, the conditioning the text passes give.
    rows = batch * (2 if program_plan.guided else 1)
    latents = jax.ShapeDtypeStruct((rows, *program_plan.latent_shape), models.denoiser.dtype)
    t = jax.ShapeDtypeStruct((), jnp.float32)
    n_denoiser = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params["denoiser"]))
    compile_it = xla is True or (xla == "auto" and n_denoiser <= XLA_AUTO_MAX_PARAMS)
    if compile_it:
        temporaries = xla_temporaries(models, params, program_plan, latents, t, conditioning)
    else:   # the evaluation's edges: its latents, conditioning and prediction
        edges = 2 * _nbytes(latents) + sum(_nbytes(a) for a in jax.tree.leaves(conditioning))
        temporaries = int(ANALYTIC_FACTOR * largest[0] + edges)
    memory, memory_source = _device_memory(device_memory)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 8
    return MemoryPlan(
        model=str(pipe.source), family=family.name, batch=batch, height=program_plan.latent_shape[0] * factor,
        width=program_plan.latent_shape[1] * factor, steps=steps, evaluations=len(schedule.timesteps),
        guided=program_plan.guided, dtype=np.dtype(pipe.dtype).name, reduce=reduce,
        params=param_bytes(sampling.program_components(pipe).values()), sites=captured, temporaries=temporaries,
        temporaries_source="xla" if compile_it else "analytic", device_memory=memory, device_memory_source=memory_source)


def _captured(out: dict[str, Any], program_plan: Any, prefix: str, chosen: Sequence[str]) -> tuple[SiteBytes, ...]:
    """The program's returned arrays under the sites' public names, in the order asked for."""
    named = {s: out[f"text:{s}"] for s in program_plan.text_sites}
    named.update({s if s in SAMPLER_SITES else f"{prefix}.{s}": out[f"denoiser:{s}"]
                  for s in program_plan.denoiser_sites})
    return tuple(SiteBytes(s, tuple(named[s].shape), np.dtype(named[s].dtype).name, _nbytes(named[s]))
                 for s in chosen if s in named)


def xla_temporaries(models: Any, params: Any, program_plan: Any, latents: Any, t: Any, conditioning: Any) -> int:
    """XLA's temporaries (plus outputs) of one denoiser evaluation compiled alone on abstract inputs."""
    def run(p, x, tt, cond):
        return evaluation(models, p, program_plan, x, tt, cond)

    compiled = jax.jit(run).lower({"denoiser": params["denoiser"]}, latents, t, conditioning).compile()
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


@contextlib.contextmanager
def _largest_activation(record: list[int]) -> Iterator[None]:
    """While tracing inside, record[0] becomes the bytes of the largest array any Flax module is given or returns
    (the analytic estimate's unit: every activation of the loop's one traced evaluation)."""
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            sizes = [_nbytes(a) for a in jax.tree.leaves((args, out)) if hasattr(a, "shape") and hasattr(a, "dtype")]
            record[0] = max([record[0], *sizes])
        return out

    with nn.intercept_methods(interceptor):
        yield


def _device_memory(given: str | int | None) -> tuple[int, str]:
    if given is not None:
        return parse_bytes(given), "given"
    local = local_device_memory()
    return (int(local), "local device") if local else (DEFAULT_DEVICE_MEMORY, "default")


def format_bytes(n: int) -> str:
    """Bytes in decimal units, three significant figures (1.53 GB): how device memory is sold."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
