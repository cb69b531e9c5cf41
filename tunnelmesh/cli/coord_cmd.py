"""`tunnelmesh coord`: run a coordinator (Raft member + public API). See docs/high-availability.md."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tunnelmesh.config import load_coord_config
from tunnelmesh.coord.bootstrap import MeshOptions
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
@click.option(
    "--relay-listen",
    default=None,
    help="UDP reflector and blind relay host:port (coord.relay_listen, default 0.0.0.0:8443); "
    "'off' disables.",
)
@click.option(
    "--http-listen",
    default=None,
    help="HTTP host:port for /metrics, /healthz, /readyz and the /relay WebSocket (coord.http_listen, "
    "default 0.0.0.0:8080); 'off' disables.",
)
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
@click.option(
    "--mesh-domain",
    default=None,
    help="With --bootstrap: the mesh DNS domain, nodes are <name>.<domain> (coord.mesh_domain, default "
    "mesh.internal).",
)
@click.option(
    "--mesh-prefix",
    default=None,
    help="With --bootstrap: the prefix mesh addresses come from (coord.mesh_cidr, default 100.64.0.0/10).",
)
@click.option("--name", default=None, help="Human-readable name (default: the host name).")
@click.option("--max-voters", type=int, default=None, help="Voting members at most (odd; coord.max_voters).")
@click.option(
    "--dead-voter-timeout",
    default=None,
    metavar="DURATION",
    help="Replace a voter silent this long by a caught-up learner, if one waits (coord.dead_voter_timeout, "
    "default 5m; 0s = never).",
)
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
    relay_listen: str | None,
    http_listen: str | None,
    advertise_host: str | None,
    seeds: str | None,
    mdns: bool,
    bootstrap: bool,
    join_secret: str | None,
    mesh_domain: str | None,
    mesh_prefix: str | None,
    name: str | None,
    max_voters: int | None,
    dead_voter_timeout: str | None,
    snapshot_entries: int,
) -> None:
    """Run a coordinator: bootstrap a new cluster (--bootstrap), join one (--seed / --mdns with
    --join-secret), or restart the member whose data dir this is."""
    flags = {
        "coord.data_dir": str(data_dir) if data_dir else None,
        "coord.listen": listen,
        "coord.peer_listen": raft_listen,
        "coord.relay_listen": None if relay_listen == "off" else relay_listen,
        "coord.http_listen": None if http_listen == "off" else http_listen,
        "coord.seeds": seeds,
        "coord.advertise_host": advertise_host,
        "coord.name": name,
        "coord.max_voters": max_voters,
        "coord.dead_voter_timeout": dead_voter_timeout,
        "coord.mesh_domain": mesh_domain,
        "coord.mesh_cidr": mesh_prefix,
    }
    cfg = load_coord_config(config_path, flags={k: v for k, v in flags.items() if v is not None})
    logging.getLogger("tunnelmesh").setLevel(getattr(logging, str(cfg.log_level).upper(), logging.INFO))
    opts = CoordOptions(
        data_dir=Path(cfg.data_dir),
        listen=cfg.listen,
        raft_listen=cfg.peer_listen,
        relay_listen=None if relay_listen == "off" else cfg.relay_listen,
        http_listen=None if http_listen == "off" else cfg.http_listen,
        advertise_host=str(cfg.advertise_host) if cfg.advertise_host else None,
        seeds=list(cfg.seeds),
        mdns=mdns,
        bootstrap=bootstrap,
        join_secret=join_secret,
        mesh=MeshOptions(domain=cfg.mesh_domain, prefix=str(cfg.mesh_cidr)),
        admin_token=cfg.admin_token.get_secret_value() if cfg.admin_token else None,
        cluster_id=cfg.cluster_id,
        name=cfg.name,
        max_voters=cfg.max_voters,
        dead_voter_timeout=cfg.dead_voter_timeout.total_seconds(),
        driver=DriverOptions(
            tick=cfg.raft.tick.total_seconds(),
            election_ticks=cfg.raft.election_ticks,
            heartbeat_ticks=cfg.raft.heartbeat_ticks,
            snapshot_entries=snapshot_entries,
            catchup_entries=max(1, snapshot_entries // 2),
        ),
    )
    run_coordinator(opts)
