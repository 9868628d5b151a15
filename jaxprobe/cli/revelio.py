"""`jaxprobe classify` and `sae train|inspect|steer`: classifiers and sparse autoencoders on diffusion features
(studies.revelio, sae/).

cli/__init__.py registers these commands; each imports what it runs inside its body, so `--help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from jaxprobe.cli import Command, Group, ModelOpt


class ClassifyCommand(Command):
    """`--baseline KIND FOLDER` takes two words, which Typer cannot declare for a repeatable option: they are
    joined into one value, KIND=FOLDER, before click parses the line."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        joined, rest = [], list(args)
        while rest:
            word = rest.pop(0)
            joined.append(word)
            if word == "--baseline" and len(rest) >= 2 and not rest[0].startswith("-") and not rest[1].startswith("-"):
                joined.append(f"{rest.pop(0)}={rest.pop(0)}")
        return super().parse_args(ctx, joined)


def _baseline(value: str) -> tuple[str, str]:
    kind, sep, folder = value.partition("=")
    if not sep or not folder:
        raise typer.BadParameter(f"--baseline takes two values, KIND FOLDER (clip or dinov2, then the encoder's "
                                 f"folder or model id), not {value!r}")
    return kind, folder


def classify(
    data: Annotated[Path, typer.Argument(help="image folder: one subfolder per class, or train/ and test/ laid out so")],
    model: Annotated[list[str], typer.Option("--model", "-m", metavar="<[label=]model>", help=(
        "'tiny', a diffusers folder or a cached model id; repeat it to compare models (LABEL=MODEL names one in the "
        "table; default label: the folder's name)"))] = ["tiny"],  # noqa: B006
    baseline: Annotated[Optional[list[str]], typer.Option("--baseline", metavar="KIND FOLDER", help=(
        "image-encoder baseline of a comparison: clip or dinov2, then its folder or model id ([LABEL=]FOLDER), "
        "repeatable"))] = None,
    sites: Annotated[Optional[list[str]], typer.Option("--sites", "-s", metavar="<glob>", help=(
        "denoiser site patterns, repeatable (default: the family's bottleneck and the blocks after it; "
        "SD: unet.mid_block, unet.up_blocks.*)"))] = None,
    t: Annotated[list[int], typer.Option("--t", metavar="<int>", help="training timestep the images are noised to, repeatable")] = [25],  # noqa: B006
    classifier: Annotated[list[str], typer.Option("--classifier", "-c", metavar="<name>", help="linear and/or conv, repeatable")] = ["linear", "conv"],  # noqa: B006
    out: Annotated[Path, typer.Option("--out", "-o", help="results folder")] = Path("jaxprobe-runs/classify"),
    cache: Annotated[Path, typer.Option(help="feature cache folder")] = Path("jaxprobe-runs/cache"),
    test_fraction: Annotated[float, typer.Option(help="held-out share of each class (no train/ test/ folders)")] = 0.25,
    prompt: Annotated[str, typer.Option(help="text the denoiser is conditioned on")] = "",
    seed: Annotated[int, typer.Option(help="split, noise and training seed")] = 0,
    conv_width: Annotated[Optional[int], typer.Option(help="channels of the conv head (default 1024)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="conv head training epochs (default 30)")] = None,
    conv_lr: Annotated[Optional[float], typer.Option(help="conv head peak learning rate (AdamW, cosine decay) "
                                                          "(default 1e-3)")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="conv head dropout (default 0.5)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per denoiser batch")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="recompute cached features")] = False,
) -> None:
    """Linear probes and a small conv head on denoiser features of real images, accuracy with 95% CIs per site and t;
    several -m (or a --baseline) compare models and image encoders in one table, figure and page.

    Example: jaxprobe classify pets/ -m runwayml/stable-diffusion-v1-5 -s unet.mid_block -s 'unet.up_blocks.*' --t 25
    """
    from jaxprobe.studies.revelio.classify import ClassifyConfig, ConvHeadConfig, compare, run_classification

    conv = {"width": conv_width, "epochs": epochs, "learning_rate": conv_lr, "dropout": dropout}
    config = ClassifyConfig(
        data=str(data), model=model[0], sites=tuple(sites or ()), timesteps=tuple(t), classifiers=tuple(classifier),
        prompt=prompt, seed=seed, test_fraction=test_fraction, dtype=dtype, batch_size=batch_size,
        conv=ConvHeadConfig(**{k: v for k, v in conv.items() if v is not None}),
        out=str(out), cache=str(cache), force=force)
    if len(model) == 1 and not baseline:
        results = run_classification(config, log=typer.echo)
    else:
        results = compare(config, model, [_baseline(b) for b in baseline or ()], log=typer.echo)
    typer.echo(f"wrote {results.files['report']}")


# --- sparse autoencoders (`jaxprobe sae train|inspect`) -------------------------------------------------

sae_app = typer.Typer(cls=Group, no_args_is_help=True, help="TopK sparse autoencoders on captured features, one per site x step.")

FeaturesOpt = Annotated[Path, typer.Option("--features", "-f", help="folder from `jaxprobe extract` (<site>.npy), "
                                                                     ".npz/.npy, or a feature-store entry folder")]
SiteOpt = Annotated[Optional[list[str]], typer.Option("--sites", "-s", metavar="<glob>", help="only sites matching these globs, repeatable")]


@sae_app.command("train", cls=Command)
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
    dead_tokens: Annotated[int, typer.Option(help="a latent is dead after this many rows without firing (at most one pass over the data)")] = 1_000_000,
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

    config = SAEConfig(k=k, expansion=expansion, steps=steps, batch_size=batch_size, learning_rate=lr,
                       warmup_steps=warmup, aux_k=aux_k, dead_tokens=dead_tokens, decoder=decoder,
                       saes_at_once=saes_at_once, seed=seed, checkpoint_every=checkpoint_every)
    saes = train_saes(features, config, out, sites=sites, resume=not force, progress=True, log=typer.echo)
    typer.echo(f"trained {len(saes.names)} SAE(s) for {saes.step} steps; wrote {out}")


@sae_app.command("inspect", cls=Command)
def sae_inspect(
    sae: Annotated[Path, typer.Argument(help="the --out folder of `jaxprobe sae train`")],
    features: FeaturesOpt,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="default: SAE/inspect")] = None,
    sites: SiteOpt = None,
    norms: Annotated[Optional[str], typer.Option(help="binder|mcrae|things|concreteness or a CSV/TSV path")] = None,
    images: Annotated[Optional[Path], typer.Option(help="folder of one image per input (by name), or a .npy")] = None,
    top_n: Annotated[int, typer.Option(help="top-activating inputs kept per latent")] = 8,
    max_latents: Annotated[int, typer.Option(help="latents shown per feature set in the page")] = 40,
    min_rated: Annotated[Optional[int], typer.Option(help="name a latent by a norms attribute or category only "
                                                     "when at least this many inputs are rated (default 20)")] = None,
) -> None:
    """Top-activating inputs, norms correlations and category purity per latent; latents.csv and an HTML page.

    Example: jaxprobe sae inspect runs/sae -f feats/ --norms binder
    """
    from jaxprobe.sae import inspect_saes

    page = inspect_saes(sae, features, out or sae / "inspect", sites=sites, norms=norms, images=images,
                        top_n=top_n, max_latents=max_latents, **({"min_rated": min_rated} if min_rated else {}))
    typer.echo(f"wrote {page}")


@sae_app.command("steer", cls=Command)
def sae_steer(
    sae: Annotated[Path, typer.Argument(help="the --out folder of `jaxprobe sae train`")],
    feature_set: Annotated[str, typer.Option("--feature-set", "-f", help="the SAE's feature set, site@step")],
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="text file, one prompt per line")],
    model: ModelOpt = "tiny",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="default: SAE/steer")] = None,
    latents: Annotated[Optional[str], typer.Option(help="latent indices, e.g. '3,17' (default: the most active)")] = None,
    n_latents: Annotated[int, typer.Option(help="how many latents by default")] = 4,
    multiples: Annotated[str, typer.Option(help="clamp values as multiples of each latent's peak")] = "0,2,4",
    steps: Annotated[int, typer.Option(help="denoising steps (as the SAE's features were captured)")] = 50,
    guidance_scale: Annotated[float, typer.Option()] = 7.5,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
) -> None:
    """Clamp SAE latents at one step while generating: image grids and the latents' activation downstream.

    Example: jaxprobe sae steer runs/sae -f unet.mid_block@10 -p prompts.txt -m runwayml/stable-diffusion-v1-5
    """
    import jaxprobe
    from jaxprobe.runtime.files import read_lines
    from jaxprobe.studies.revelio.steer import sae_steer as steer

    try:
        chosen = [int(v) for v in latents.replace(",", " ").split()] if latents else None
        factors = [float(v) for v in multiples.replace(",", " ").split()]
    except ValueError as err:
        raise typer.BadParameter(f"--latents and --multiples take numbers separated by commas: {err}") from None
    path = steer(jaxprobe.load(model, dtype=dtype), sae, feature_set, read_lines(prompts, "prompts file"),
                 out or sae / "steer", latents=chosen, n_latents=n_latents, multiples=factors,
                 num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, log=typer.echo)
    typer.echo(f"wrote {path}")
