"""`jaxprobe` command line: a thin layer over the Python API (every command has a function behind it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from jaxprobe.errors import JaxprobeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Find where human-meaningful semantics live inside text-to-image diffusion pipelines.\n\n"
         "Quick start: `jaxprobe run` (the bundled tiny model on Binder's concrete nouns).",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'tiny', a diffusers/transformers folder, or an "
                                                             "org/name model id in the local Hugging Face cache")]


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def info(model: Annotated[Optional[str], typer.Option("--sites", help="list the capture sites of this model")] = None,
         all_sites: Annotated[bool, typer.Option("--all", help="with --sites: every site, not only block level")] = False,
         ) -> None:
    """JAX backend and devices, versions, models in the local Hugging Face cache (and a model's sites)."""
    import importlib.metadata as md

    import jax

    from jaxprobe.loading import hf_cache_dir

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
        try:
            import jaxprobe

            sites = jaxprobe.load(model).sites(all=all_sites)
        except JaxprobeError as err:
            _fail(err)
        typer.echo(f"{len(sites)} sites of {model}:")
        for site in sites:
            typer.echo(f"  {site}")


@app.command()
def extract(
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="text file, one prompt per line")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: one .npy per site + manifest.json")],
    model: ModelOpt = "tiny",
    sites: Annotated[list[str], typer.Option("--sites", "-s", help="glob patterns, repeatable")] = ["text_encoder.*"],  # noqa: B006
    reduce: Annotated[str, typer.Option(help="eos|mean|last_content|none for text; mean|max|none for UNet")] = "mean",
    steps: Annotated[int, typer.Option(help="denoising steps (UNet sites)")] = 50,
    guidance_scale: Annotated[float, typer.Option()] = 7.5,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 16,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    image_encoder: Annotated[Optional[str], typer.Option(help="CLIP vision checkpoint for image_encoder.* sites")] = None,
) -> None:
    """Capture sites for a file of prompts.

    Example: jaxprobe extract -m tiny -p prompts.txt -s 'text_encoder.*' -s unet.mid_block -o feats/
    """
    import numpy as np

    import jaxprobe
    from jaxprobe.store import atomic_write_bytes, atomic_write_text

    try:
        lines = [line.strip() for line in prompts.read_text().splitlines()]
        texts = [line for line in lines if line]
        if not texts:
            raise jaxprobe.InputError(f"{prompts} holds no prompts (one per line)")
        pipe = jaxprobe.load(model, dtype=dtype, image_encoder=image_encoder)
        feats = pipe.capture(texts, sites, reduce=reduce, num_inference_steps=steps, guidance_scale=guidance_scale,
                             seed=seed, batch_size=batch_size, progress=True)
    except (JaxprobeError, OSError) as err:
        _fail(err)
    import io

    out.mkdir(parents=True, exist_ok=True)
    for site, value in feats.items():
        buffer = io.BytesIO()
        np.save(buffer, value)
        atomic_write_bytes(out / f"{site}.npy", buffer.getvalue())
    manifest = {"model": model, "prompts": texts, "reduce": reduce, "steps": steps, "guidance_scale": guidance_scale,
                "seed": seed, "sites": {s: list(v.shape) for s, v in feats.items()}}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    typer.echo(f"wrote {len(feats)} site(s) for {len(texts)} prompts to {out}")


@app.command()
def probe(
    features: Annotated[Path, typer.Option("--features", "-f", help=".npz, .npy, or a folder of <site>.npy")],
    targets: Annotated[Path, typer.Option("--targets", "-t", help="CSV/TSV: a concept column, one column per target")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output table (.parquet and .csv written side by side)")],
    outer_cv: Annotated[int, typer.Option()] = 5,
    inner_cv: Annotated[str, typer.Option(help="folds, or 'loo'")] = "5",
    n_permutations: Annotated[int, typer.Option()] = 0,
    n_bootstrap: Annotated[int, typer.Option()] = 0,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Nested cross-validated ridge probes for every feature set x target, as a tidy table.

    Example: jaxprobe probe -f feats/ -t ratings.csv -o probes.parquet --n-permutations 100
    """
    from jaxprobe.probes import run_probe_files

    try:
        path = run_probe_files(features, targets, out, outer_cv=outer_cv,
                               inner_cv=inner_cv if inner_cv == "loo" else int(inner_cv),
                               n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed)
    except (JaxprobeError, OSError, ValueError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="TOML file with any ExperimentConfig field")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="'tiny' (default), a folder or a cached model id")] = None,
    norms: Annotated[Optional[str], typer.Option(help="binder|mcrae|things|things66|concreteness or a CSV/TSV path")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="results folder")] = None,
    steps: Annotated[Optional[int], typer.Option(help="denoising steps")] = None,
    max_concepts: Annotated[Optional[int], typer.Option(help="only the first N concepts")] = None,
    image_encoder: Annotated[Optional[str], typer.Option(help="CLIP vision checkpoint: probe image embeddings too")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 or bfloat16")] = None,
    force: Annotated[bool, typer.Option("--force", help="recompute cached features")] = False,
) -> None:
    """The whole experiment: features at every text layer and UNet site x step, probes, analyses, report.

    With no argument it runs the bundled random tiny model on Binder's concrete nouns (a few minutes on
    2 CPU cores). Example: jaxprobe run --model runwayml/stable-diffusion-v1-5 --out runs/sd15
    """
    import dataclasses

    from jaxprobe.experiment import EMBEDDED_DEFAULT, ExperimentConfig, run_experiment

    overrides = {"model": model, "norms": norms, "out": out, "num_inference_steps": steps,
                 "max_concepts": max_concepts, "image_encoder": image_encoder, "dtype": dtype,
                 "force": force or None}
    try:
        if config is not None:
            cfg = ExperimentConfig.from_toml(config, **overrides)
        elif model in (None, "tiny"):
            cfg = dataclasses.replace(EMBEDDED_DEFAULT, **{k: v for k, v in overrides.items() if v is not None})
        else:
            cfg = ExperimentConfig.from_mapping({k: v for k, v in overrides.items() if v is not None})
        run_experiment(cfg, log=typer.echo)
    except (JaxprobeError, OSError) as err:
        _fail(err)


@app.command()
def report(results: Annotated[Path, typer.Argument(help="a results folder written by `jaxprobe run`")]) -> None:
    """Re-render figures and report.html from a run's saved tables."""
    from jaxprobe import report as report_module

    try:
        path = report_module.rerender(results)
    except (JaxprobeError, OSError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


# --- sparse autoencoders (`jaxprobe sae train|inspect`) -------------------------------------------------

sae_app = typer.Typer(no_args_is_help=True, help="TopK sparse autoencoders on captured features, one per site x step.")
app.add_typer(sae_app, name="sae")

FeaturesOpt = Annotated[Path, typer.Option("--features", "-f", help="folder from `jaxprobe extract` (<site>.npy), "
                                                                     ".npz/.npy, or a feature-store entry folder")]
SiteOpt = Annotated[Optional[list[str]], typer.Option("--sites", "-s", help="only sites matching these globs")]


@sae_app.command("train")
def sae_train(
    features: FeaturesOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for checkpoints, history.csv, metrics.csv, curves")],
    sites: SiteOpt = None,
    k: Annotated[int, typer.Option(help="latents kept per input")] = 32,
    expansion: Annotated[int, typer.Option(help="latents per input dimension")] = 64,
    steps: Annotated[int, typer.Option()] = 10_000,
    batch_size: Annotated[int, typer.Option()] = 8192,
    lr: Annotated[float, typer.Option(help="Adam learning rate after warm-up")] = 4e-4,
    warmup: Annotated[int, typer.Option(help="linear warm-up steps")] = 500,
    aux_k: Annotated[int, typer.Option(help="AuxK dead-latent loss with this many latents (0: off)")] = 0,
    dead_tokens: Annotated[int, typer.Option(help="a latent is dead after this many rows without firing")] = 1_000_000,
    decoder: Annotated[str, typer.Option(help="dense|sparse (same maths; speed differs by device)")] = "dense",
    saes_at_once: Annotated[int, typer.Option(help="SAEs per vectorised group in a step (0: all; lower it on OOM)")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 1000,
    force: Annotated[bool, typer.Option("--force", help="start afresh instead of resuming from OUT")] = False,
) -> None:
    """Train one SAE per feature set (site, or site@step), all at once; rerun to resume.

    Example: jaxprobe sae train -f feats/ -s 'unet.*' -o runs/sae --steps 5000
    """
    from jaxprobe.sae import SAEConfig, train_saes

    try:
        config = SAEConfig(k=k, expansion=expansion, steps=steps, batch_size=batch_size, learning_rate=lr,
                           warmup_steps=warmup, aux_k=aux_k, dead_tokens=dead_tokens, decoder=decoder,
                           saes_at_once=saes_at_once, seed=seed, checkpoint_every=checkpoint_every)
        saes = train_saes(features, config, out, sites=sites, resume=not force, progress=True, log=typer.echo)
    except (JaxprobeError, OSError) as err:
        _fail(err)
    typer.echo(f"trained {len(saes.names)} SAE(s) for {saes.step} steps; wrote {out}")


@sae_app.command("inspect")
def sae_inspect(
    sae: Annotated[Path, typer.Argument(help="the --out folder of `jaxprobe sae train`")],
    features: FeaturesOpt,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="default: SAE/inspect")] = None,
    sites: SiteOpt = None,
    norms: Annotated[Optional[str], typer.Option(help="binder|mcrae|things|concreteness or a CSV/TSV path")] = None,
    images: Annotated[Optional[Path], typer.Option(help="folder of one image per input (by name), or a .npy")] = None,
    top_n: Annotated[int, typer.Option(help="top-activating inputs kept per latent")] = 8,
    max_latents: Annotated[int, typer.Option(help="latents shown per feature set in the page")] = 40,
) -> None:
    """Top-activating inputs, norms correlations and category purity per latent; latents.csv and an HTML page.

    Example: jaxprobe sae inspect runs/sae -f feats/ --norms binder
    """
    from jaxprobe.sae import inspect_saes

    try:
        page = inspect_saes(sae, features, out or sae / "inspect", sites=sites, norms=norms, images=images,
                            top_n=top_n, max_latents=max_latents)
    except (JaxprobeError, OSError) as err:
        _fail(err)
    typer.echo(f"wrote {page}")


if __name__ == "__main__":
    app()
