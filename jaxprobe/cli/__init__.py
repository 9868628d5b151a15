"""`jaxprobe` command line: a thin layer over the Python API (every command has a function behind it)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from jaxprobe.errors import JaxprobeError


def describe_failure(err: BaseException) -> str:
    """One line for a failure a user can fix; anything unexpected says how to see the traceback."""
    if isinstance(err, (JaxprobeError, FileNotFoundError, PermissionError, IsADirectoryError)):
        return str(err)
    if isinstance(err, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 "
                "(e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)")
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
        return "out of memory: lower --batch-size, capture fewer sites, or use --dtype bfloat16"
    if isinstance(err, OSError):
        return f"{err.strerror or err} ({err.filename})" if err.filename else str(err)
    return (f"unexpected {type(err).__name__}: {err}\nThis may be a bug: rerun with `jaxprobe --debug ...` "
            "for the traceback and report it.")


try:  # Typer >= 0.29 carries its own copy of click, whose exceptions derive from typer.TyperException
    from typer import TyperException as _UsageError
except ImportError:  # older Typer raises click's own
    from click import ClickException as _UsageError

# How Typer itself ends a command (--help, a usage error, Ctrl-D at a prompt): not a failure to reword.
_CONTROL_FLOW = (typer.Exit, typer.Abort, _UsageError)


class Group(TyperGroup):
    """A command group whose --help lists each command's whole first line, wrapped (click cuts it at the
    terminal's width with "...", mid-sentence)."""

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:  # click's HelpFormatter, or Typer's copy
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, command.get_short_help_str(limit=1_000)) for name, command in commands
                if command is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _Commands(Group):
    """The one place a command's failure becomes a message: a line that names the fix and exit status 2,
    or, with `--debug`, the traceback. An interrupt says what was kept."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _CONTROL_FLOW:
            raise
        except KeyboardInterrupt:
            typer.secho("interrupted: finished feature chunks and results are kept; rerun the same command to "
                        "resume", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None
        except Exception as err:
            if ctx.meta.get("jaxprobe.debug"):
                raise
            typer.secho(f"error: {describe_failure(err)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None


class Command(TyperCommand):
    """A command whose usage line names its arguments as click always has, `RESULTS` or `[CONFIG]`
    (Typer >= 0.29 writes `{results}` for a required one, which reads like a placeholder left unfilled)."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


# rich_markup_mode=None: click's plain help layout, which reflows docstrings and shows no value type for
# a flag (Typer's Rich panels print `<bool>` beside every flag, --help included). Command groups inherit it.
app = typer.Typer(
    cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Find where human-meaningful semantics live inside text-to-image diffusion pipelines.\n\n"
         "Quick start: `jaxprobe run` (the bundled tiny model on Binder's concrete nouns).",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'tiny', a diffusers/transformers folder, or an "
                                                             "org/name model id in the local Hugging Face cache")]


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="show the full traceback of a failure")] = False,
    distributed: Annotated[bool, typer.Option("--distributed", help="join a multi-process job found by JAX "
                                              "(SLURM, Open MPI, TPU pods): each process takes its share")] = False,
    coordinator: Annotated[Optional[str], typer.Option(help="host:port of process 0, for a job JAX cannot detect")] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="with --coordinator: processes in the job")] = None,
    process_id: Annotated[Optional[int], typer.Option(help="with --coordinator: this process's index")] = None,
) -> None:
    """Global options: tracebacks (`--debug`), multi-process jobs (`jaxprobe --distributed run cfg.toml` under srun)."""
    from jaxprobe.runtime import distributed as dist

    ctx.meta["jaxprobe.debug"] = debug
    dist.initialize(dist.Cluster(coordinator, num_processes, process_id, auto=distributed))


def numbers(text: str, what: str, cast=float) -> list:
    """'0,4,8' or '0 4 8' -> [0.0, 4.0, 8.0]: the one parser of a list-valued option (--scales, --steps)."""
    try:
        return [cast(v) for v in text.replace(",", " ").split()]
    except ValueError as err:
        raise typer.BadParameter(f"{what} must be numbers separated by commas or spaces, not {text!r}") from err


def step_list(text: str | None) -> list[int] | range | None:
    """--steps: '0,1,2', or 'a:b' for range(a, b); None (not given) keeps the command's default."""
    if not text:
        return None
    return range(*numbers(text.replace(":", " "), "--steps", int)) if ":" in text else numbers(text, "--steps", int)


# ------------------------------------------------------------------------------------- commands
# One module per part of the package: features (info, extract, store), each study's commands. They import
# what they run inside the commands, which keeps `jaxprobe --help` free of JAX. Registered here, in the order
# `jaxprobe --help` lists them; the modules import the shared option types from above.
# Failures end in _Commands.invoke, so the commands themselves catch nothing.

from jaxprobe.cli import decoding_diffusion, features, norms_probing, revelio  # noqa: E402

for command in (features.info, features.extract, features.lens, norms_probing.probe, norms_probing.run,
                norms_probing.report, norms_probing.steer, revelio.classify):
    app.command(cls=revelio.ClassifyCommand if command is revelio.classify else Command)(command)
app.add_typer(features.store_app, name="store")
app.add_typer(decoding_diffusion.directions_app, name="directions")
app.add_typer(revelio.sae_app, name="sae")


if __name__ == "__main__":
    app()
