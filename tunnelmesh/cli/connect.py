"""Click options shared by every command that talks to the coordinators' public API (cluster, nodes, tokens).

    @cluster.command("status")
    @connection_options
    def status(conn: Connection) -> None:
        st = conn.run(lambda c: c.cluster_status())

Where to connect comes from, field by field (first found wins; see ``client.resolve_profile``):
``--coord``/``--ca``/``--token``, then ``TUNNELMESH_COORD``/``TUNNELMESH_CA``/``TUNNELMESH_API_TOKEN``, then
``--data-dir`` of a local coordinator, then the profile file (``--profile`` / ``TUNNELMESH_PROFILE``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from tunnelmesh.client import COORD_ENV, TOKEN_ENV, Client, Profile, resolve_profile

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Connection:
    """The connection flags of one command invocation, resolved lazily (so ``--help`` needs no CA)."""

    coordinators: str | None
    ca_file: Path | None
    token: str | None
    data_dir: Path | None
    profile_path: Path | None

    def profile(self) -> Profile:
        """Raises TunnelMeshError (exit 1, with what to pass) when the coordinators or the CA are unknown."""
        return resolve_profile(
            coordinators=self.coordinators,
            ca_file=self.ca_file,
            token=self.token,
            data_dir=self.data_dir,
            profile_path=self.profile_path,
        )

    def client(self, **kwargs: Any) -> Client:
        return client_from_options(self, **kwargs)

    def run(self, fn: Callable[[Client], Awaitable[T]], **kwargs: Any) -> T:
        """Open a client, run ``fn(client)`` in a fresh event loop, close the client."""

        async def main() -> T:
            async with self.client(**kwargs) as c:
                return await fn(c)

        return asyncio.run(main())


def client_from_options(conn: Connection, **kwargs: Any) -> Client:
    """A :class:`Client` for the resolved connection; ``kwargs`` go to the Client (deadline, ...)."""
    return conn.profile().client(**kwargs)


def connection_options(fn: F) -> F:
    """Add --coord, --ca, --token, --data-dir and --profile; the command receives ``conn: Connection``."""

    @click.option(
        "--coord",
        "--coordinator",
        "-c",
        "coordinators",
        envvar=COORD_ENV,
        default=None,
        help=f"Public API address(es) of any coordinator, host:port, comma-separated (env {COORD_ENV}).",
    )
    @click.option(
        "--ca",
        "ca_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The cluster CA certificate (ca.crt of a coordinator's data dir; env TUNNELMESH_CA).",
    )
    @click.option(
        "--token",
        default=None,
        help=f"API token tma_... (env {TOKEN_ENV}; prefer the env or a profile: flags show up in ps).",
    )
    @click.option(
        "--data-dir",
        "conn_data_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Data dir of a coordinator on this machine: use its address, CA and bootstrap admin token.",
    )
    @click.option(
        "--profile",
        "profile_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Client profile file (env TUNNELMESH_PROFILE; default written by `tunnelmesh up`).",
    )
    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        coordinators: str | None,
        ca_file: Path | None,
        token: str | None,
        conn_data_dir: Path | None,
        profile_path: Path | None,
        **kwargs: Any,
    ) -> Any:
        conn = Connection(coordinators, ca_file, token, conn_data_dir, profile_path)
        return fn(*args, conn=conn, **kwargs)

    return wrapper  # type: ignore[return-value]
