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


@app.callback()
def main(
    distributed: Annotated[bool, typer.Option("--distributed", help="join a multi-process job found by JAX "
                                              "(SLURM, Open MPI, TPU pods): each process takes its share")] = False,
    coordinator: Annotated[Optional[str], typer.Option(help="host:port of process 0, for a job JAX cannot detect")] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="with --coordinator: processes in the job")] = None,
    process_id: Annotated[Optional[int], typer.Option(help="with --coordinator: this process's index")] = None,
) -> None:
    """Global options: multi-process jobs (`jaxprobe --distributed run cfg.toml` under srun)."""
    from jaxprobe.runtime import distributed as dist

    try:
        dist.initialize(dist.Cluster(coordinator, num_processes, process_id, auto=distributed))
    except JaxprobeError as err:
        _fail(err)


@app.command()
def info(model: Annotated[Optional[str], typer.Option("--sites", help="list the capture sites of this model")] = None,
         all_sites: Annotated[bool, typer.Option("--all", help="with --sites: every site, not only block level")] = False,
         ) -> None:
    """JAX backend and devices, versions, models in the local Hugging Face cache (and a model's sites)."""
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
    batch_size: Annotated[int, typer.Option(help="prompts per device program (halved on out-of-memory)")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    image_encoder: Annotated[Optional[str], typer.Option(help="CLIP vision checkpoint for image_encoder.* sites")] = None,
    cache: Annotated[Path, typer.Option(help="feature store: finished chunks survive a crash and are reused")] = Path("jaxprobe-runs/cache"),
    chunk_size: Annotated[int, typer.Option(help="prompts per committed chunk")] = 64,
    force: Annotated[bool, typer.Option("--force", help="recompute cached chunks")] = False,
    concepts: Annotated[Optional[Path], typer.Option("--concepts", help="text file, the concept of each prompt, one "
                                                     "per line: written as OUT/concepts.txt for `probe`")] = None,
) -> None:
    """Capture sites for a file of prompts (resumable: rerun the same command after a crash).

    Example: jaxprobe extract -m tiny -p prompts.txt -s 'text_encoder.*' -s unet.mid_block -o feats/
    """
    import jaxprobe
    from jaxprobe.runtime import distributed
    from jaxprobe.features.extract import cached_capture
    from jaxprobe.runtime.files import atomic_write_npy, atomic_write_text

    try:
        texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        if not texts:
            raise jaxprobe.InputError(f"{prompts} holds no prompts (one per line)")
        if chunk_size < 1:
            raise jaxprobe.InputError(f"--chunk-size must be at least 1, not {chunk_size}")
        names = [line.strip() for line in concepts.read_text().splitlines() if line.strip()] if concepts else None
        if names is not None and len(names) != len(texts):
            raise jaxprobe.InputError(f"{concepts} holds {len(names)} concepts for {len(texts)} prompts: give one "
                                      "concept per prompt, in the same order")
        pipe = jaxprobe.load(model, dtype=dtype, image_encoder=image_encoder)
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
        manifest = {"model": model, "prompts": texts, "concepts": names, "reduce": reduce, "steps": steps,
                    "guidance_scale": guidance_scale, "seed": seed, "sites": {s: list(v.shape) for s, v in feats.items()}}
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    except (JaxprobeError, OSError) as err:
        _fail(err)
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
    concept_column: Annotated[Optional[str], typer.Option(help="targets column naming each row's concept "
                                                          "(default: 'concept', else the first column)")] = None,
    concepts: Annotated[Optional[Path], typer.Option("--concepts", help="text file, the concept of each feature "
                                                     "row, one per line (instead of the features' own)")] = None,
    assume_same_order: Annotated[bool, typer.Option("--assume-same-order", help="features that name no concepts: "
                                                    "pair feature row i with targets row i")] = False,
) -> None:
    """Nested cross-validated ridge probes for every feature set x target, as a tidy table.

    Feature rows are matched to targets rows by concept, never silently by position: by --concepts,
    else the features' own concepts (.npz "concepts", concepts.txt from `extract --concepts`), else
    the prompts of extract's manifest.json matched by exact text to the concept column (so prompts
    like "a photo of a dog" need --concepts). Repeated or unmatched concepts are an error.

    Example: jaxprobe probe -f feats/ -t ratings.csv -o probes.parquet --n-permutations 100
    """
    from jaxprobe.probes import run_probe_files

    try:
        table = run_probe_files(features, targets, out, outer_cv=outer_cv,
                                inner_cv=inner_cv if inner_cv == "loo" else int(inner_cv),
                                n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed,
                                concept_column=concept_column, concepts=concepts,
                                assume_same_order=assume_same_order, log=typer.echo)
    except (JaxprobeError, OSError, ValueError) as err:
        _fail(err)
    if table is not None:
        typer.echo(f"wrote {len(table)} rows to {out}")


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

    from jaxprobe.studies.norms_probing.experiment import EMBEDDED_DEFAULT, ExperimentConfig, run_experiment

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
    from jaxprobe.studies.norms_probing import report as report_module

    try:
        path = report_module.rerender(results)
    except (JaxprobeError, OSError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------- store

store_app = typer.Typer(no_args_is_help=True, help="Look after a feature store (the cache of `run` and `extract`).")
app.add_typer(store_app, name="store")
CacheArg = Annotated[Path, typer.Argument(help="feature store folder")]


@store_app.command("ls")
def store_ls(cache: CacheArg = Path("jaxprobe-runs/cache")) -> None:
    """Entries: key, kind, prompts, chunks present/total, size, last used, sites."""
    import datetime

    from jaxprobe.features.store import FeatureStore

    entries = FeatureStore(cache).list()
    if not entries:
        typer.echo(f"{cache}: no entries")
    for e in entries:
        when = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        sites = ", ".join(e.sites[:3]) + (f", ... ({len(e.sites)} sites)" if len(e.sites) > 3 else "")
        typer.echo(f"{e.key}  {e.kind:8s} {e.n_prompts:6d} prompts  {e.chunks_present}/{e.chunks_total} chunks  "
                   f"{e.bytes / 2**20:8.1f} MiB  {when}  {sites}")


@store_app.command("verify")
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
        typer.echo("`jaxprobe store gc` removes them; reruns recompute damaged chunks either way")
        raise typer.Exit(1)


@store_app.command("gc")
def store_gc(
    cache: CacheArg = Path("jaxprobe-runs/cache"),
    older_than: Annotated[Optional[float], typer.Option(help="also remove entries unused for this many days")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, remove nothing")] = False,
) -> None:
    """Remove damaged chunks, leftover temporary files and broken entries (older than an hour)."""
    from jaxprobe.features.store import FeatureStore

    removed = FeatureStore(cache).gc(older_than_days=older_than, dry_run=dry_run)
    for path in removed:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    typer.echo(f"{len(removed)} path(s) {'to remove' if dry_run else 'removed'}")


# --- classify: classifiers on diffusion features of real images (studies.revelio) --------------------


@app.command()
def classify(
    data: Annotated[Path, typer.Argument(help="image folder: one subfolder per class, or train/ and test/ laid out so")],
    model: ModelOpt = "tiny",
    sites: Annotated[list[str], typer.Option("--sites", "-s", help="UNet site patterns, repeatable")] = ["unet.mid_block", "unet.up_blocks.*"],  # noqa: B006
    t: Annotated[list[int], typer.Option("--t", help="training timestep the images are noised to, repeatable")] = [25],  # noqa: B006
    classifier: Annotated[list[str], typer.Option("--classifier", "-c", help="linear and/or conv, repeatable")] = ["linear", "conv"],  # noqa: B006
    out: Annotated[Path, typer.Option("--out", "-o", help="results folder")] = Path("jaxprobe-runs/classify"),
    cache: Annotated[Path, typer.Option(help="feature cache folder")] = Path("jaxprobe-runs/cache"),
    test_fraction: Annotated[float, typer.Option(help="held-out share of each class (no train/ test/ folders)")] = 0.25,
    prompt: Annotated[str, typer.Option(help="text the UNet is conditioned on")] = "",
    seed: Annotated[int, typer.Option(help="split, noise and training seed")] = 0,
    conv_width: Annotated[Optional[int], typer.Option(help="channels of the conv head (default 1024)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="conv head training epochs (default 30)")] = None,
    conv_lr: Annotated[Optional[float], typer.Option(help="conv head peak learning rate (AdamW, cosine decay) "
                                                          "(default 1e-3)")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="conv head dropout (default 0.5)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per UNet batch")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="recompute cached features")] = False,
) -> None:
    """Linear probes and a small conv head on UNet features of real images, accuracy with 95% CIs per site and t.

    Example: jaxprobe classify pets/ -m runwayml/stable-diffusion-v1-5 -s unet.mid_block -s 'unet.up_blocks.*' --t 25
    """
    from jaxprobe.studies.revelio.classify import ClassifyConfig, ConvHeadConfig, run_classification

    conv = {"width": conv_width, "epochs": epochs, "learning_rate": conv_lr, "dropout": dropout}
    try:
        config = ClassifyConfig(
            data=str(data), model=model, sites=tuple(sites), timesteps=tuple(t), classifiers=tuple(classifier),
            prompt=prompt, seed=seed, test_fraction=test_fraction, dtype=dtype, batch_size=batch_size,
            conv=ConvHeadConfig(**{k: v for k, v in conv.items() if v is not None}),
            out=str(out), cache=str(cache), force=force)
        results = run_classification(config, log=typer.echo)
    except (JaxprobeError, OSError) as err:
        _fail(err)
    typer.echo(f"wrote {results.files['report']}")


# --- directions (Decoding Diffusion: directions in h-space, associations) ------------------------------

directions_app = typer.Typer(no_args_is_help=True, help="Directions in h-space from prompts, association (bias) "
                             "scores with bootstrap intervals, clusters, report (Zeng, Chen & Wong 2024).")
app.add_typer(directions_app, name="directions")

DirectionsConfigArg = Annotated[Optional[Path], typer.Argument(
    help="TOML file with any DirectionsConfig field; default: the bundled professions x gender/age example")]
DirectionsOutOpt = Annotated[Optional[str], typer.Option("--out", "-o", help="results folder")]


def _directions_config(config: Optional[Path], **overrides):
    from jaxprobe.studies.decoding_diffusion.directions import EXAMPLE, DirectionsConfig

    return DirectionsConfig.from_toml(config or EXAMPLE, **overrides)


@directions_app.command("build")
def directions_build(
    config: DirectionsConfigArg = None, model: Annotated[Optional[str], typer.Option("--model", "-m")] = None,
    out: DirectionsOutOpt = None, steps: Annotated[Optional[int], typer.Option(help="denoising steps")] = None,
    force: Annotated[bool, typer.Option("--force", help="recompute cached features")] = False,
) -> None:
    """Generate every concept's prompts, capture h-space at every step, write OUT/directions.npz and tables.

    Example: jaxprobe directions build study.toml --model runwayml/stable-diffusion-v1-5 --out runs/bias
    """
    from jaxprobe.studies.decoding_diffusion.directions import build

    try:
        build(_directions_config(config, model=model, out=out, num_inference_steps=steps, force=force or None),
              progress=True, log=typer.echo)
    except (JaxprobeError, OSError) as err:
        _fail(err)


@directions_app.command("score")
def directions_score(
    config: DirectionsConfigArg = None, model: Annotated[Optional[str], typer.Option("--model", "-m")] = None,
    out: DirectionsOutOpt = None, steps: Annotated[Optional[int], typer.Option(help="denoising steps")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", "-p", help="more prompts to project onto the "
                                                    "directions, one per line")] = None,
) -> None:
    """Associations with bootstrap intervals (h-space and CLIP text space), projections, clusters -> tables."""
    from jaxprobe.studies.decoding_diffusion.directions import read_prompt_file, score

    try:
        extra = read_prompt_file(str(prompts), "prompts file") if prompts else None
        score(_directions_config(config, model=model, out=out, num_inference_steps=steps), prompts=extra,
              progress=True, log=typer.echo)
    except (JaxprobeError, OSError) as err:
        _fail(err)


@directions_app.command("report")
def directions_report(results: Annotated[Path, typer.Argument(help="the folder build and score wrote")]) -> None:
    """Figures and report.html from the saved tables."""
    from jaxprobe.studies.decoding_diffusion.directions import report as directions_report_fn

    try:
        path = directions_report_fn(results)
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
