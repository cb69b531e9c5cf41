"""`tunnelmesh join COORD[,COORD...] --token T`: register this machine in a mesh, then run the node daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from tunnelmesh.cli.node_cmd import daemon_options, ensure_agent_logging, run_daemon, state_dir_option
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.node import control
from tunnelmesh.node.agent import DEFAULT_INTERFACE, DEFAULT_LISTEN_PORT, join_mesh
from tunnelmesh.node.state_dir import StateDir

TOKEN_ENV = "TUNNELMESH_JOIN_TOKEN"


@click.command("join")
@click.argument("coordinators")
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    required=True,
    help=f"Join token (tmj_...) from `tunnelmesh tokens create` or `tunnelmesh up` (or env {TOKEN_ENV}).",
)
@click.option("--name", default="", help="Node name, a DNS label (default: the host name).")
@click.option(
    "--tag", "tags", multiple=True, help="Request a tag (repeatable); must be granted by the token."
)
@click.option("--no-start", is_flag=True, help="Only register and write the state directory; do not run.")
@state_dir_option
@daemon_options
def join(
    coordinators: str,
    token: str,
    name: str,
    tags: tuple[str, ...],
    no_start: bool,
    state_dir: Path,
    **options: Any,
) -> None:
    """Join this machine to a mesh, then run the node daemon (`tunnelmesh node`) in the foreground.

    COORDINATORS is one or more coordinator API addresses, comma-separated (host:port). The join token pins
    the mesh CA: the node trusts a coordinator only if it serves that CA. Running join again with the same
    state directory is safe: the node keeps its key, id and address.
    """
    ensure_agent_logging()
    _refuse_if_running(StateDir(state_dir))
    addresses = [a.strip() for a in coordinators.split(",") if a.strip()]
    node = asyncio.run(
        join_mesh(
            addresses,
            token,
            StateDir(state_dir),
            name=name,
            tags=tags,
            interface=options["interface"] or DEFAULT_INTERFACE,
            listen_port=DEFAULT_LISTEN_PORT if options["listen_port"] is None else options["listen_port"],
        )
    )
    click.echo(
        f"joined mesh {node.mesh_id} as {node.name} ({node.node_id}), mesh address "
        f"{', '.join(node.mesh_addresses)}; state in {state_dir}",
        err=True,
    )
    if no_start:
        click.echo(f"start the node with: tunnelmesh node --state-dir {state_dir}", err=True)
        return
    run_daemon(state_dir, **options)


def _refuse_if_running(state: StateDir) -> None:
    """Joining again while this node's daemon runs would replace its credential under it: say so instead."""
    if not state.joined():
        return
    try:
        node = state.read_state()
        status = control.request(node.interface, "show", timeout=3.0)["status"]
    except TunnelMeshError:
        return  # not joined properly, or not running: join
    if status.get("agent", {}).get("node_id") == node.node_id:
        raise TunnelMeshError(
            f"this node ({node.name}, {node.node_id}) is already joined and its daemon is running on "
            f"{node.interface}; see `tunnelmesh status`. To join another mesh, stop it and use another "
            f"--state-dir"
        )
