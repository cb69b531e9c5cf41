"""`tunnelmesh netlab`: inspect and clean up virtual test networks (see docs/netlab.md)."""

from __future__ import annotations

import time

import click

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
    click.echo(f"{'LAB':<8} {'OWNER':>8} {'STATE':<9} {'AGE':>8} {'NETNS':>5}  LOGS")
    now = time.time()
    for rec in records:
        state = {True: "running", False: "orphaned", None: "unknown"}[rec.owner_alive]
        age = f"{now - rec.created:.0f}s" if rec.created else "-"
        owner = str(rec.owner_pid) if rec.owner_pid is not None else "-"
        logs = str(rec.log_dir) if rec.log_dir else "-"
        click.echo(f"{rec.lab_id:<8} {owner:>8} {state:<9} {age:>8} {len(rec.namespaces):>5}  {logs}")


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
