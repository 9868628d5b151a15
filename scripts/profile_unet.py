"""Where one UNet evaluation spends its time: XLA's per-op timings beside torch's profiler, by category.

One guided evaluation (the CFG pair, batch 2) of a full-size UNet with random weights, float32 on CPU:
jaxprobe's compiled `apply` traced with `jax.profiler` (XLA's CPU runtime records every thunk when
`--xla_cpu_enable_xprof_traceme` is on; this script turns it on), and diffusers' UNet2DConditionModel
under `torch.profiler`. Each op is put in one of a few categories (convolutions, attention, other
matmuls, norms, the rest) from its HLO instruction (what it computes and which module emitted it) or
its aten name, and the table is printed as markdown (BENCHMARKS.md's profile) and written as JSON.

    python scripts/profile_unet.py --model sd15-random --json benchmarks/cpu-speed/profile.json
    JAXPROBE_ATTENTION=xla python scripts/profile_unet.py ...     # the whole-matrix attention, for comparison
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402 - XLA reads its flags when the backend starts, so they are set before jax loads
import collections  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import MODELS, make_inputs  # noqa: E402

from jaxprobe.checkpoints.random import random_params  # noqa: E402
from jaxprobe.models.families import family_of_config  # noqa: E402
from jaxprobe.models.layers import attention_implementation  # noqa: E402
from jaxprobe.models.unet import UNet2DConditionModel, UNetConfig, example_inputs  # noqa: E402

CATEGORIES = ("convolution", "attention", "other matmul", "norm", "elementwise and copies")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_ATTENTION_MODULE = re.compile(r"/(attn1|attn2|attentions\.\d+/(?!.*(proj_in|proj_out|norm)))")
_PROJECTION = re.compile(r"/(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff|net\.\d)")


def hlo_instructions(hlo: str) -> dict[str, dict]:
    """{instruction name: {"opcode", "opcodes": every opcode it runs (through the computations it calls),
    "op_name": the jax source path of its metadata}} for every instruction of the optimised module."""
    opcodes_of: dict[str, set[str]] = collections.defaultdict(set)     # computation -> its opcodes
    callees_of: dict[str, set[str]] = collections.defaultdict(set)     # computation -> computations it calls
    instructions: dict[str, dict] = {}
    current = None
    for line in hlo.splitlines():
        if (m := _COMPUTATION.match(line)) and "=" not in line.split("{")[0]:
            current = m.group(1)
            continue
        if (m := _INSTRUCTION.match(line)) is None or current is None:
            continue
        name, opcode, rest = m.groups()
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        opcodes_of[current].add(opcode)
        callees_of[current].update(called)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instructions[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "", "calls": called}

    def reachable(computation: str, seen: set[str]) -> set[str]:
        if computation in seen:
            return set()
        seen.add(computation)
        found = set(opcodes_of.get(computation, ()))
        for callee in callees_of.get(computation, ()):
            found |= reachable(callee, seen)
        return found

    for info in instructions.values():
        info["opcodes"] = {info["opcode"]}.union(*(reachable(c, set()) for c in info.pop("calls")))
    return instructions


def category_of(info: dict) -> str:
    ops, where = info["opcodes"], info["op_name"]
    if "convolution" in ops:
        return "convolution"
    in_attention = _ATTENTION_MODULE.search(where) and not _PROJECTION.search(where.split("attn")[-1])
    if in_attention and ({"dot", "exponential", "reduce", "divide"} & ops or "while" in where):
        return "attention"
    if "dot" in ops:
        return "other matmul"
    if "rsqrt" in ops or "norm" in where.rsplit("/", 2)[-2:][0]:
        return "norm"
    return "elementwise and copies"


def jax_profile(config: UNetConfig, noise: np.ndarray, conditioning: dict, repeats: int) -> dict:
    module = UNet2DConditionModel(config, dtype=jnp.float32)
    params = jax.tree.map(jnp.asarray, random_params(module, *example_inputs(config)))
    family = family_of_config(config)
    latents = jnp.asarray(np.concatenate([noise, noise]))
    cond = {k: jnp.asarray(v) for k, v in conditioning.items()}
    apply = jax.jit(lambda p, x, c: family.apply(module, p, x, jnp.float32(999), c)[0])
    compiled = apply.lower(params, latents, cond).compile()
    instructions = hlo_instructions(compiled.as_text())
    jax.block_until_ready(compiled(params, latents, cond))
    wall = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, latents, cond))
        wall.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(compiled(params, latents, cond))
        jax.profiler.stop_trace()
        trace = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    per_op: dict[str, float] = collections.defaultdict(float)
    for plane in trace.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                info = instructions.get(event.name)
                if info is not None and info["opcode"] not in ("while", "call", "conditional"):  # leaves only
                    per_op[event.name] += event.duration_ns / 1e6
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms in per_op.items():
        by_category[category_of(instructions[name])] += ms
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {"wall_ms": float(np.median(wall)) * 1e3, "op_ms_total": sum(per_op.values()), "by_category": by_category,
            "top_ops": [{"op": n, "ms": ms, "category": category_of(instructions[n]),
                         "where": instructions[n]["op_name"][-90:]} for n, ms in top]}


def torch_category(name: str) -> str | None:
    """The category of an aten op's self time; None for wrappers whose time their children already count."""
    if "convolution" in name or "conv2d" in name:
        return "convolution"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"):
        return "other matmul"
    if "norm" in name:
        return "norm"
    return "elementwise and copies"


def torch_profile(kwargs: dict, noise: np.ndarray, conditioning: dict, repeats: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from torch.profiler import ProfilerActivity, profile

    unet = TorchUNet(**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}).eval()
    x = torch.from_numpy(np.concatenate([noise, noise])).permute(0, 3, 1, 2).contiguous()
    context = torch.from_numpy(conditioning["encoder_hidden_states"])
    added = ({k: torch.from_numpy(conditioning[k]) for k in ("text_embeds", "time_ids")}
             if "time_ids" in conditioning else None)
    with torch.no_grad():
        def run():
            return unet(x, 999, encoder_hidden_states=context, added_cond_kwargs=added).sample
        run()
        wall = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            wall.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    per_op = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms in per_op.items():
        by_category[torch_category(name)] += ms
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {"wall_ms": float(np.median(wall)) * 1e3, "op_ms_total": sum(per_op.values()), "by_category": by_category,
            "top_ops": [{"op": n, "ms": ms, "category": torch_category(n)} for n, ms in top],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def markdown(result: dict) -> str:
    jx, pt = result["jaxprobe"], result.get("diffusers")
    lines = ["| category | jaxprobe ms | diffusers ms |" if pt else "| category | jaxprobe ms |",
             "|---|---:|---:|" if pt else "|---|---:|"]
    for cat in CATEGORIES:
        row = f"| {cat} | {jx['by_category'][cat]:.0f} |"
        lines.append(row + (f" {pt['by_category'][cat]:.0f} |" if pt else ""))
    lines.append(f"| **sum of ops** | {jx['op_ms_total']:.0f} |" + (f" {pt['op_ms_total']:.0f} |" if pt else ""))
    lines.append(f"| wall time (median) | {jx['wall_ms']:.0f} |" + (f" {pt['wall_ms']:.0f} |" if pt else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), default="sd15-random")
    parser.add_argument("--repeats", type=int, default=2, help="untraced timed runs for the wall time")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    kwargs, _ = MODELS[args.model]
    config = UNetConfig(**kwargs)
    noise, conditioning = make_inputs(config, batch=1)
    result = {"model": args.model, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "attention": attention_implementation(), "cfg_unet_batch": 2,
              "jaxprobe": jax_profile(config, noise, conditioning, args.repeats)}
    if not args.no_peer:
        result["diffusers"] = torch_profile(kwargs, noise, conditioning, args.repeats)
    print(markdown(result))
    for who in ("jaxprobe", "diffusers"):
        for op in result.get(who, {}).get("top_ops", [])[:8]:
            print(f"  {who:9s} {op['ms']:8.1f} ms  {op['category']:22s} {op['op'][:40]}  {op.get('where', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
