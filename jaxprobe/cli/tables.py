"""How `jaxprobe info --plan` prints a `MemoryPlan`: rich tables of the numbers the plan holds, nothing computed."""

from __future__ import annotations

from typing import Any


def print_plan(memory: Any) -> None:
    """Parameters by component and dtype, captured sites, temporaries and the totals, as tables."""
    from rich.console import Console
    from rich.table import Table

    from jaxprobe.pipeline.memory import format_bytes

    console = Console(width=110, highlight=False)
    console.print(f"[bold]{memory.model}[/bold] ({memory.family}): batch {memory.batch}, {memory.height}x{memory.width} "
                  f"px, {memory.steps} steps ({memory.evaluations} denoiser evaluations), "
                  f"{'classifier-free guidance' if memory.guided else 'no guidance'}, {memory.dtype}, "
                  f"reduce {memory.reduce}")
    console.print("parameters (exact, from their shapes):")
    params = Table()
    for name, style in (("component", None), ("dtype", None), ("parameters", "right"), ("bytes", "right")):
        params.add_column(name, justify=style or "left")
    for row in memory.params:
        params.add_row(row.component, row.dtype, f"{row.count:,}", format_bytes(row.bytes))
    params.add_row("[bold]total[/bold]", "", f"{sum(r.count for r in memory.params):,}",
                   f"[bold]{format_bytes(memory.param_bytes)}[/bold]")
    console.print(params)
    console.print(f"captured sites (exact: what one program of {memory.batch} prompt(s) returns, float32):")
    sites = Table()
    for name, style in (("site", "left"), ("shape", "left"), ("dtype", "left"), ("bytes", "right")):
        sites.add_column(name, justify=style)
    for row in memory.sites:
        sites.add_row(row.site, "x".join(map(str, row.shape)), row.dtype, format_bytes(row.bytes))
    console.print(sites)
    how = ("XLA memory_analysis of one evaluation" if memory.temporaries_source == "xla"
           else "analytic estimate from traced shapes")
    console.print("per device:")
    totals = Table(show_header=False)
    totals.add_column("what")
    totals.add_column("bytes", justify="right")
    totals.add_row("parameters", format_bytes(memory.param_bytes))
    totals.add_row("captured sites", format_bytes(memory.captured_bytes))
    totals.add_row(f"one denoiser evaluation's temporaries ({how})", format_bytes(memory.temporaries))
    totals.add_row("[bold]parameters + activations[/bold]", f"[bold]{format_bytes(memory.total_bytes)}[/bold]")
    totals.add_row(f"devices of {format_bytes(memory.device_memory)} ({memory.device_memory_source})",
                   f"[bold]{memory.devices}[/bold]")
    console.print(totals)
