"""`jaxprobe directions build|score|report|edit`: directions in h-space, their associations, and edits
(studies.decoding_diffusion).

cli/__init__.py registers this group; each command imports what it runs inside its body, so `--help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from jaxprobe.cli import Command, Group, numbers, step_list

directions_app = typer.Typer(cls=Group, no_args_is_help=True, help="Directions in h-space from prompts, association (bias) "
                             "scores with bootstrap intervals, clusters, report (Zeng, Chen & Wong 2024).")

DirectionsConfigArg = Annotated[Optional[Path], typer.Argument(
    help="TOML file with any DirectionsConfig field; default: the bundled professions x gender/age example")]
DirectionsOutOpt = Annotated[Optional[str], typer.Option("--out", "-o", help="results folder")]
DirectionsModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="'tiny', a diffusers folder or a cached model id (default: the config's model)")]


def _directions_config(config: Optional[Path], **overrides):
    from jaxprobe.studies.decoding_diffusion.directions import EXAMPLE, DirectionsConfig

    return DirectionsConfig.from_toml(config or EXAMPLE, **overrides)


@directions_app.command("build", cls=Command)
def directions_build(
    config: DirectionsConfigArg = None, model: DirectionsModelOpt = None,
    out: DirectionsOutOpt = None, steps: Annotated[Optional[int], typer.Option(help="denoising steps")] = None,
    force: Annotated[bool, typer.Option("--force", help="recompute cached features")] = False,
) -> None:
    """Generate every concept's prompts, capture h-space at every step, write OUT/directions.npz and tables.

    Example: jaxprobe directions build study.toml --model runwayml/stable-diffusion-v1-5 --out runs/bias
    """
    from jaxprobe.studies.decoding_diffusion.directions import build

    build(_directions_config(config, model=model, out=out, num_inference_steps=steps, force=force or None),
          progress=True, log=typer.echo)


@directions_app.command("score", cls=Command)
def directions_score(
    config: DirectionsConfigArg = None, model: DirectionsModelOpt = None,
    out: DirectionsOutOpt = None, steps: Annotated[Optional[int], typer.Option(help="denoising steps")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", "-p", help="more prompts to project onto the "
                                                    "directions, one per line")] = None,
) -> None:
    """Associations with bootstrap intervals (h-space and CLIP text space), projections, clusters -> tables."""
    from jaxprobe.runtime.files import read_lines
    from jaxprobe.studies.decoding_diffusion.directions import score

    extra = read_lines(prompts, "prompts file") if prompts else None
    score(_directions_config(config, model=model, out=out, num_inference_steps=steps), prompts=extra,
          progress=True, log=typer.echo)


@directions_app.command("report", cls=Command)
def directions_report(results: Annotated[Path, typer.Argument(help="the folder build and score wrote")]) -> None:
    """Figures and report.html from the saved tables."""
    from jaxprobe.studies.decoding_diffusion.directions import report as directions_report_fn

    path = directions_report_fn(results)
    typer.echo(f"wrote {path}")


@directions_app.command("edit", cls=Command)
def directions_edit(
    config: DirectionsConfigArg = None,
    direction: Annotated[str, typer.Option("--direction", "-d", help="the concept whose h-space direction is added")] = "",
    scales: Annotated[str, typer.Option(help="scales of the direction, e.g. '0,4,8,16' (0: the baseline)")] = "0,4,8,16",
    steps: Annotated[Optional[str], typer.Option(help="steps it is added at, e.g. '0,1,2' or '0:20' (default all)")] = None,
    image_encoder: Annotated[Optional[str], typer.Option(help="CLIP vision checkpoint that scores the images")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m")] = None, out: DirectionsOutOpt = None,
) -> None:
    """Add a built direction to h-space at several scales: dose-response of the CLIP image association, grids.

    Example: jaxprobe directions edit study.toml -d woman --scales 0,4,8 --steps 0:25 --image-encoder clip-vit
    """
    from jaxprobe.studies.decoding_diffusion.edit import edit

    if not direction:
        raise typer.BadParameter("pass --direction CONCEPT (a concept of the config's families that build saw)")
    edit(_directions_config(config, model=model, out=out), direction=direction, scales=numbers(scales, "--scales"),
         steps=step_list(steps), image_encoder=image_encoder, log=typer.echo)
