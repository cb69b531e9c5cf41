"""`tunnelmesh coord`: run a coordinator (Raft member + public API). See docs/high-availability.md."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tunnelmesh.config import load_coord_config
from tunnelmesh.coord.raft.driver import DriverOptions
from tunnelmesh.coord.server import JOIN_SECRET_ENV, CoordOptions, run_coordinator


@click.command("coord")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: the standard location if it exists).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Raft log, snapshots, cluster CA and certificates (coord.data_dir).",
)
@click.option("--listen", default=None, help="Public gRPC API address host:port (coord.listen).")
@click.option("--raft-listen", default=None, help="Raft port host:port, mutual TLS (coord.peer_listen).")
@click.option("--advertise-host", default=None, help="Host/IP others use to reach this coordinator.")
@click.option(
    "--seed",
    "seeds",
    default=None,
    help="Public API addresses (host:port,...) of existing coordinators to join through.",
)
@click.option("--mdns", is_flag=True, default=False, help="Find coordinators to join on the LAN with mDNS.")
@click.option(
    "--bootstrap",
    is_flag=True,
    default=False,
    help="Create a NEW cluster with this coordinator as its first member.",
)
@click.option(
    "--join-secret",
    envvar=JOIN_SECRET_ENV,
    default=None,
    help=f"The cluster join secret printed at bootstrap (or env {JOIN_SECRET_ENV}).",
)
@click.option("--name", default=None, help="Human-readable name (default: the host name).")
@click.option("--max-voters", type=int, default=None, help="Voting members at most (odd; coord.max_voters).")
@click.option(
    "--snapshot-entries",
    type=int,
    default=10_000,
    show_default=True,
    help="Applied entries between snapshots.",
)
def coord(
    config_path: Path | None,
    data_dir: Path | None,
    listen: str | None,
    raft_listen: str | None,
    advertise_host: str | None,
    seeds: str | None,
    mdns: bool,
    bootstrap: bool,
    join_secret: str | None,
    name: str | None,
    max_voters: int | None,
    snapshot_entries: int,
) -> None:
    """Run a coordinator: bootstrap a new cluster (--bootstrap), join one (--seed / --mdns with
    --join-secret), or restart the member whose data dir this is."""
    flags = {
        "coord.data_dir": str(data_dir) if data_dir else None,
        "coord.listen": listen,
        "coord.peer_listen": raft_listen,
        "coord.seeds": seeds,
        "coord.advertise_host": advertise_host,
        "coord.name": name,
        "coord.max_voters": max_voters,
    }
    cfg = load_coord_config(config_path, flags={k: v for k, v in flags.items() if v is not None})
    logging.getLogger("tunnelmesh").setLevel(getattr(logging, str(cfg.log_level).upper(), logging.INFO))
    opts = CoordOptions(
        data_dir=Path(cfg.data_dir),
        listen=cfg.listen,
        raft_listen=cfg.peer_listen,
        advertise_host=str(cfg.advertise_host) if cfg.advertise_host else None,
        seeds=list(cfg.seeds),
        mdns=mdns,
        bootstrap=bootstrap,
        join_secret=join_secret,
        cluster_id=cfg.cluster_id,
        name=cfg.name,
        max_voters=cfg.max_voters,
        driver=DriverOptions(
            tick=cfg.raft.tick.total_seconds(),
            election_ticks=cfg.raft.election_ticks,
            heartbeat_ticks=cfg.raft.heartbeat_ticks,
            snapshot_entries=snapshot_entries,
            catchup_entries=max(1, snapshot_entries // 2),
        ),
    )
    run_coordinator(opts)
