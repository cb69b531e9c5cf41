"""`tunnelmesh version`: versions of TunnelMesh and of the libraries its wire formats depend on."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import click

from tunnelmesh import __version__

# The libraries whose versions decide wire and on-disk compatibility; worth a line in a bug report.
_COMPONENTS = ("grpcio", "protobuf", "pynacl", "cryptography", "pyroute2")


@click.command()
def version() -> None:
    """Print TunnelMesh's version and the versions of its key libraries."""
    click.echo(f"tunnelmesh {__version__}")
    click.echo(f"python {platform.python_version()} ({platform.system()} {platform.machine()})")
    for name in _COMPONENTS:
        try:
            click.echo(f"{name} {package_version(name)}")
        except PackageNotFoundError:
            click.echo(f"{name} (not installed)")
