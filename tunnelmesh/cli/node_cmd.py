"""`tunnelmesh node`: run the node daemon from its state directory; `keygen` / `pubkey` manage its key."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tunnelmesh.config import load_node_config
from tunnelmesh.identity import generate, load_node_identity, public_key_from_private, save_private_key
from tunnelmesh.node.agent import (
    DEFAULT_INTERFACE,
    DEFAULT_LISTEN_PORT,
    DEFAULT_METRICS_LISTEN,
    HEARTBEAT_INTERVAL,
    Agent,
    AgentOptions,
)
from tunnelmesh.node.state_dir import DEFAULT_STATE_DIR, StateDir

F = TypeVar("F", bound=Callable[..., Any])

_key_file_option = click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Private key file (default: node.key_file from the config, else <data_dir>/node.key).",
)


def state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_STATE_DIR,
        show_default=True,
        help="Node state: key, identity, mesh CA, last config.",
    )(f)


def daemon_options(f: F) -> F:
    """The options of the node daemon, shared by `tunnelmesh node` and `tunnelmesh join`."""
    options = [
        click.option(
            "--interface",
            default=None,
            help=f"TUN interface name (default: the one given at join, else {DEFAULT_INTERFACE}).",
        ),
        click.option(
            "--listen-port",
            type=click.IntRange(0, 65535),
            default=None,
            help=f"Data-plane UDP port, 0 = any (default: as given at join, else {DEFAULT_LISTEN_PORT}).",
        ),
        click.option(
            "--metrics-listen",
            default=DEFAULT_METRICS_LISTEN,
            show_default=True,
            help="Prometheus metrics HOST:PORT; empty to disable.",
        ),
        click.option(
            "--heartbeat-timeout",
            type=click.FloatRange(1.0),
            default=3 * HEARTBEAT_INTERVAL,
            show_default=True,
            help="Seconds without any message before the config stream counts as dead and fails over.",
        ),
        click.option(
            "--retry-max",
            type=click.FloatRange(0.1),
            default=10.0,
            show_default=True,
            help="Longest wait (seconds) between reconnection attempts (capped exponential backoff).",
        ),
        click.option("--no-dns", is_flag=True, help="Do not run the mesh DNS resolver."),
        click.option("--no-relay", is_flag=True, help="Do not use coordinator relays."),
        click.option("--no-offloads", is_flag=True, help="Plain packet I/O: no TUN TSO, no UDP GSO/GRO."),
        click.option(
            "--low-power",
            is_flag=True,
            help="No warm wake-ups after traffic: less CPU, a slower first packet after each pause.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_daemon(
    state_dir: Path,
    *,
    interface: str | None,
    listen_port: int | None,
    metrics_listen: str,
    heartbeat_timeout: float,
    retry_max: float,
    no_dns: bool,
    no_relay: bool,
    no_offloads: bool,
    low_power: bool,
) -> None:
    """Run the node daemon in the foreground until SIGTERM/SIGINT (or `tunnelmesh dataplane down IFACE`)."""
    ensure_agent_logging()
    state = StateDir(state_dir)
    node = state.read_state()
    options = AgentOptions(
        interface=interface or node.interface,
        listen_port=node.listen_port if listen_port is None else listen_port,
        metrics_listen=metrics_listen,
        heartbeat_timeout=heartbeat_timeout,
        retry_max=retry_max,
        offloads=not no_offloads,
        low_power=low_power,
        dns=not no_dns,
        relay=not no_relay,
    )
    asyncio.run(Agent(state, options).run())


def ensure_agent_logging() -> None:
    """The daemon's lifecycle and config events are worth seeing at the CLI's default level (warning)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
        )
    elif root.level == logging.WARNING:
        logging.getLogger("tunnelmesh.node").setLevel(logging.INFO)


@click.group(invoke_without_command=True)
@state_dir_option
@daemon_options
@click.pass_context
def node(ctx: click.Context, /, state_dir: Path, **options: Any) -> None:
    """Run this machine's node daemon (after `tunnelmesh join`), or manage its key.

    Without a subcommand: run the daemon in the foreground from the state directory. It restores the last
    config first, so the mesh keeps forwarding even if no coordinator is reachable.
    """
    if ctx.invoked_subcommand is not None:
        return
    run_daemon(state_dir, **options)


@node.command()
@_key_file_option
@click.option("--force", is_flag=True, help="Replace an existing key (the node gets a new identity).")
def keygen(key_file: Path | None, force: bool) -> None:
    """Create a node private key (mode 0600) and print its public key."""
    path = key_file or load_node_config().key_path
    identity = generate()
    save_private_key(identity, path, overwrite=force)
    click.echo(f"wrote {path}", err=True)
    click.echo(identity.public_key_b64)


@node.command()
@_key_file_option
def pubkey(key_file: Path | None) -> None:
    """Print the public key: of a private key on stdin (like `wg pubkey`), else of this node's key."""
    if key_file is None and not sys.stdin.isatty():
        data = sys.stdin.read()
        if data.strip():
            click.echo(public_key_from_private(data))
            return
    cfg = load_node_config()
    click.echo(load_node_identity(key_file or cfg.key_path, None if key_file else cfg.ssh_key).public_key_b64)
