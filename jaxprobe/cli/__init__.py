"""`jaxprobe` command line: a thin layer over the Python API (every command has a function behind it)."""

from __future__ import annotations

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


# ------------------------------------------------------------------------------------- commands
# One module per part of the package: features (info, extract, store), each study's commands. They import
# what they run inside the commands, which keeps `jaxprobe --help` free of JAX. Registered here, in the order
# `jaxprobe --help` lists them; the modules import _fail and the shared option types from above.

from jaxprobe.cli import decoding_diffusion, features, norms_probing, revelio  # noqa: E402

app.command()(features.info)
app.command()(features.extract)
app.command()(features.lens)
app.command()(norms_probing.probe)
app.command()(norms_probing.run)
app.command()(norms_probing.report)
app.command()(revelio.classify)
app.add_typer(features.store_app, name="store")
app.add_typer(decoding_diffusion.directions_app, name="directions")
app.add_typer(revelio.sae_app, name="sae")


if __name__ == "__main__":
    app()
