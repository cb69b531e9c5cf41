"""`tunnelmesh netlab`: inspect and clean up virtual test networks (see docs/netlab.md)."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table

from tunnelmesh.netlab import NetlabError, clean_leftovers, list_labs


@click.group("netlab")
def netlab() -> None:
    """Virtual networks built from network namespaces (tests, benchmarks, chaos, demo)."""


@netlab.command("list")
def list_cmd() -> None:
    """List labs on this machine and whether their owner is alive."""
    records = list_labs()
    if not records:
        click.echo("no netlab labs")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("LAB", "left"), ("OWNER", "right"), ("STATE", "left"), ("AGE", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("NETNS", justify="right")
    table.add_column("LOGS", overflow="fold")
    now = time.time()
    for rec in records:
        state = {True: "[green]running[/]", False: "[yellow]orphaned[/]", None: "unknown"}[rec.owner_alive]
        age = f"{now - rec.created:.0f}s" if rec.created else "-"
        owner = str(rec.owner_pid) if rec.owner_pid is not None else "-"
        logs = str(rec.log_dir) if rec.log_dir else "-"
        table.add_row(rec.lab_id, owner, state, age, str(len(rec.namespaces)), logs)
    Console(width=200 if not click.get_text_stream("stdout").isatty() else None).print(table)


@netlab.command("clean")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Remove every netlab lab, including those of running tests (default: only orphaned labs).",
)
def clean_cmd(everything: bool) -> None:
    """Remove labs whose owner died: namespaces, processes, state."""
    try:
        removed = clean_leftovers(all=everything)
    except NetlabError as exc:
        raise click.ClickException(str(exc)) from exc
    if removed:
        click.echo(f"removed {len(removed)} lab(s): {' '.join(removed)}")
    else:
        click.echo("nothing to clean")
