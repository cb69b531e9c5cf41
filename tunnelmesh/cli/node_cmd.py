"""`tunnelmesh node`: this machine's node identity (the node daemon itself arrives with the node agent)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tunnelmesh.config import load_node_config
from tunnelmesh.identity import generate, load_node_identity, public_key_from_private, save_private_key

_key_file_option = click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Private key file (default: node.key_file from the config, else <data_dir>/node.key).",
)


@click.group()
def node() -> None:
    """This machine's node identity: X25519 keys, compatible with wireguard-tools."""


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
