"""`jaxprobe info`, `extract`, `lens` and `store ls|verify|gc`: the model and its sites, the Diffusion Lens,
features on disk (features/).

cli/__init__.py registers these commands; each imports what it runs inside its body, so `--help` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from jaxprobe.cli import Command, Group, ModelOpt
from jaxprobe.pipeline.sites import TEXT_TOWER_SITES   # light: site names without JAX


def info(model: Annotated[Optional[str], typer.Option("--sites", help="list the capture sites of this model")] = None,
         all_sites: Annotated[bool, typer.Option("--all", help="with --sites: every site, not only block level")] = False,
         plan_model: Annotated[Optional[str], typer.Option("--plan", metavar="MODEL", help="the memory a capture "
                                                           "of MODEL needs, from shapes alone (no weights drawn)")] = None,
         batch: Annotated[int, typer.Option(help="with --plan: prompts per program")] = 1,
         resolution: Annotated[Optional[str], typer.Option(help="with --plan: image size in pixels, 1024 or "
                                                           "HEIGHTxWIDTH (default: the model's)")] = None,
         steps: Annotated[int, typer.Option(help="with --plan: denoising steps")] = 50,
         cfg: Annotated[bool, typer.Option("--cfg/--no-cfg", help="with --plan: classifier-free guidance")] = True,
         dtype: Annotated[str, typer.Option(help="with --plan: float32 or bfloat16")] = "float32",
         site: Annotated[Optional[list[str]], typer.Option("--site", metavar="<glob>", help="with --plan: captured "
                                                           "site patterns, repeatable (default: the bottleneck)")] = None,
         reduce: Annotated[str, typer.Option(help="with --plan: the captured sites' reduction")] = "mean",
         device_memory: Annotated[Optional[str], typer.Option(help="with --plan: memory of one device, e.g. 80GB "
                                                              "(default: the local device's, else 80 GB)")] = None,
         xla: Annotated[Optional[bool], typer.Option("--xla/--no-xla", help="with --plan: compile one denoiser "
                                                     "evaluation for XLA's figure, or estimate it (default: "
                                                     "compile small denoisers only)")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="with --plan: print the plan as JSON")] = False,
         ) -> None:
    """JAX backend and devices, versions, models in the local Hugging Face cache (and a model's sites, or with
    --plan the memory a capture of it needs).

    Example: jaxprobe info --plan sd3-random --resolution 1024 --batch 2 --steps 28 --dtype bfloat16
    """
    if plan_model:
        import jaxprobe
        from jaxprobe.cli.tables import print_plan

        height, width = _resolution(resolution)
        memory = jaxprobe.plan(plan_model, site, batch=batch, height=height, width=width, steps=steps, cfg=cfg,
                               dtype=dtype, reduce=reduce, device_memory=device_memory,
                               xla="auto" if xla is None else xla)
        if as_json:
            typer.echo(json.dumps(memory.to_dict(), indent=2))
        else:
            print_plan(memory)
        return
    import importlib.metadata as md

    import jax

    from jaxprobe.checkpoints.loading import hf_cache_dir

    typer.echo(f"JAX backend: {jax.default_backend()}; devices: {', '.join(str(d) for d in jax.devices())}")
    versions = []
    for name in ("jaxprobe", "jax", "flax", "optax", "transformers", "numpy"):
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    typer.echo("versions: " + ", ".join(versions))
    cache = hf_cache_dir()
    repos = sorted(p.name.removeprefix("models--").replace("--", "/") for p in cache.glob("models--*")) if cache.is_dir() else []
    typer.echo(f"Hugging Face cache {cache}: " + (", ".join(repos) if repos else "no models"))
    if model:
        import jaxprobe

        sites = jaxprobe.load(model).sites(all=all_sites)
        typer.echo(f"{len(sites)} sites of {model}:")
        for site in sites:
            typer.echo(f"  {site}")


def _resolution(text: str | None) -> tuple[int | None, int | None]:
    """--resolution: '1024' (square) or '768x1344' (height x width)."""
    if not text:
        return None, None
    parts = text.lower().replace("*", "x").split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise typer.BadParameter(f"--resolution must be pixels, 1024 or HEIGHTxWIDTH such as 768x1344, not {text!r}")
    return sides[0], sides[-1]


def lens(
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="text file, one prompt per line")],
    layers: Annotated[list[int], typer.Option("--layers", "-l", metavar="<int>", help="text-encoder hidden states "
                                              "(0: embeddings, the number of layers: the normal run), as --layers 4 "
                                              "8 12 (the values after the first arrive as arguments)")],
    more_layers: Annotated[Optional[list[int]], typer.Argument(metavar="LAYERS", show_default=False, hidden=True)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("jaxprobe-runs/lens"),
    model: ModelOpt = "tiny",
    steps: Annotated[int, typer.Option(help="denoising steps")] = 50,
    guidance_scale: Annotated[float, typer.Option()] = 7.5,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option(help="prompts per device program")] = 8,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
) -> None:
    """Diffusion Lens: generate each prompt from several text-encoder layers -> OUT/lens.html and a grid.

    Example: jaxprobe lens --model runwayml/stable-diffusion-v1-5 --prompts prompts.txt --layers 4 8 12
    """
    import jaxprobe
    from jaxprobe.pipeline.lens import write_lens
    from jaxprobe.runtime.files import read_lines

    texts = read_lines(prompts, "prompts file")
    # click options take one value each; the rest of `--layers 4 8 12` arrives as arguments
    path = write_lens(jaxprobe.load(model, dtype=dtype), texts, [*layers, *(more_layers or [])], out,
                      num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
    typer.echo(f"wrote {path}")


def extract(
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="text file, one prompt per line")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: one .npy per site + manifest.json")],
    model: ModelOpt = "tiny",
    sites: Annotated[list[str], typer.Option("--sites", "-s", metavar="<glob>", help="glob patterns, repeatable (default: every text tower's layers)")] = [TEXT_TOWER_SITES],  # noqa: B006
    reduce: Annotated[str, typer.Option(help="eos|mean|last_content|none for text; mean|max|none for UNet")] = "mean",
    steps: Annotated[int, typer.Option(help="denoising steps (UNet sites)")] = 50,
    guidance_scale: Annotated[float, typer.Option()] = 7.5,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option(help="prompts per device program (halved on out-of-memory)")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    image_encoder: Annotated[Optional[str], typer.Option(help="CLIP vision checkpoint for image_encoder.* sites")] = None,
    cache: Annotated[Path, typer.Option(help="feature store: finished chunks survive a crash and are reused")] = Path("jaxprobe-runs/cache"),
    chunk_size: Annotated[int, typer.Option(help="prompts per committed chunk")] = 64,
    force: Annotated[bool, typer.Option("--force", help="recompute cached chunks")] = False,
    model_config: Annotated[Optional[str], typer.Option("--model-config", help="for a single-file checkpoint: the "
                                                        "diffusers folder or cached id whose configs to use")] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", metavar="FILE[:SCALE]", help="LoRA file merged at load, FILE or FILE:SCALE "
                                                      "(repeatable)")] = None,
    shard: Annotated[Optional[str], typer.Option(help="params over the devices when one cannot hold them: fsdp|tensor "
                                                 "(default: a replica on each)")] = None,
    concepts: Annotated[Optional[Path], typer.Option("--concepts", help="text file, the concept of each prompt, one "
                                                     "per line: written as OUT/concepts.txt for `probe`")] = None,
) -> None:
    """Capture sites for a file of prompts (resumable: rerun the same command after a crash).

    Example: jaxprobe extract -m tiny -p prompts.txt -s 'text_encoder.*' -s unet.mid_block -o feats/
    """
    import jaxprobe
    from jaxprobe.features.extract import cached_capture
    from jaxprobe.features.settings import ModelSettings, RunSettings, SamplingSettings
    from jaxprobe.runtime import distributed
    from jaxprobe.reporting.random_weights import is_random_weights
    from jaxprobe.runtime.files import atomic_write_npy, atomic_write_text, read_lines

    # The settings' own checks, before the model loads: a bad option fails in a second, not after minutes.
    SamplingSettings(num_inference_steps=steps, guidance_scale=guidance_scale, seeds=(seed,))
    RunSettings(batch_size=batch_size, chunk_size=chunk_size)
    ModelSettings(model=model, dtype=dtype, shard=shard)
    texts = read_lines(prompts, "prompts file")
    names = read_lines(concepts, "concepts file") if concepts else None
    if names is not None and len(names) != len(texts):
        raise jaxprobe.InputError(f"{concepts} holds {len(names)} concepts for {len(texts)} prompts: give one "
                                  "concept per prompt, in the same order")
    pipe = jaxprobe.load(model, dtype=dtype, image_encoder=image_encoder, config=model_config, lora=lora or (),
                         shard=shard)
    feats = cached_capture(pipe, texts, sites, cache=cache, chunk_size=chunk_size, force=force, reduce=reduce,
                           num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                           batch_size=batch_size)
    if not distributed.is_leader():
        return
    out.mkdir(parents=True, exist_ok=True)
    for site, value in feats.items():
        atomic_write_npy(out / f"{site}.npy", value)
    if names is not None:
        atomic_write_text(out / "concepts.txt", "\n".join(names) + "\n")
    else:  # a concepts.txt left by an earlier extract into OUT would name these rows wrongly
        (out / "concepts.txt").unlink(missing_ok=True)
    manifest = {"model": model, "random_weights": is_random_weights(pipe), "loaded": pipe.provenance, "prompts": texts, "concepts": names, "reduce": reduce, "steps": steps,
                "guidance_scale": guidance_scale, "seed": seed, "sites": {s: list(v.shape) for s, v in feats.items()}}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    typer.echo(f"wrote {len(feats)} site(s) for {len(texts)} prompts to {out}")


# ---------------------------------------------------------------------------------------- store

store_app = typer.Typer(cls=Group, no_args_is_help=True, help="Look after a feature store (the cache of `run` and `extract`).")
CacheArg = Annotated[Path, typer.Argument(help="feature store folder")]


@store_app.command("ls", cls=Command)
def store_ls(cache: CacheArg = Path("jaxprobe-runs/cache")) -> None:
    """Entries: key, kind, prompts, chunks present/total, size, last used, sites."""
    import datetime

    from jaxprobe.features.store import FeatureStore

    entries = FeatureStore(cache).list()
    if not entries:
        typer.echo(f"{cache}: no entries")
        return
    rows = [(e.key, e.kind, str(e.n_prompts), f"{e.chunks_present}/{e.chunks_total}", f"{e.bytes / 2**20:.1f}",
             datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M"),
             ", ".join(e.sites[:3]) + (f", ... ({len(e.sites)} sites)" if len(e.sites) > 3 else ""))
            for e in entries]
    header = ("key", "kind", "prompts", "chunks", "MiB", "last used", "sites")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    right = {"prompts", "chunks", "MiB"}  # numbers line up on their last digit
    for row in (header, *rows):
        cells = [cell.rjust(w) if name in right else cell.ljust(w) for cell, w, name in zip(row, widths, header)]
        typer.echo("  ".join([*cells, row[-1]]))


@store_app.command("verify", cls=Command)
def store_verify(cache: CacheArg = Path("jaxprobe-runs/cache")) -> None:
    """Read every chunk against its checksum; exit code 1 when anything is damaged or stray."""
    from jaxprobe.features.store import FeatureStore

    report = FeatureStore(cache).verify()
    typer.echo(f"{len(report.ok)} chunk(s) ok, {len(report.damaged)} damaged, {len(report.stray)} stray file(s), "
               f"{len(report.broken_entries)} broken entr(ies)")
    for label, paths in (("damaged", report.damaged), ("stray", report.stray), ("broken", report.broken_entries)):
        for path in paths:
            typer.echo(f"  {label}: {path}")
    if not report.clean:
        typer.echo(f"`jaxprobe store gc {cache} --now` removes them all (plain `gc` leaves what changed in the last "
                   "hour, in case a writer is still at work); reruns recompute damaged chunks either way")
        raise typer.Exit(1)


@store_app.command("gc", cls=Command)
def store_gc(
    cache: CacheArg = Path("jaxprobe-runs/cache"),
    older_than: Annotated[Optional[float], typer.Option(help="also remove entries unused for this many days")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, remove nothing")] = False,
    now: Annotated[bool, typer.Option("--now", help="also what changed in the last hour: only when no writer "
                                      "(run, extract) is using this cache")] = False,
) -> None:
    """Remove damaged chunks, leftover temporary files and broken entries (older than an hour, or all with --now)."""
    from jaxprobe.features.store import FeatureStore

    removed = FeatureStore(cache).gc(older_than_days=older_than, dry_run=dry_run, grace_s=0.0 if now else 3600.0)
    for path in removed:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    typer.echo(f"{len(removed)} path(s) {'to remove' if dry_run else 'removed'}")
