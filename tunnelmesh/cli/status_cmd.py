"""`tunnelmesh status`: this node's identity, coordinator connection and peers, from the running daemon."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from tunnelmesh.cli.dataplane_cmd import _ago, _bytes, loss_share
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.node import control


def agent_statuses(interface: str | None) -> list[dict[str, Any]]:
    """The ``show`` answer of every running node daemon (or of the one on ``interface``)."""
    if interface is not None:
        status = control.request(interface, "show")["status"]
        if "agent" not in status:
            raise TunnelMeshError(
                f"{interface} is a standalone data plane, not a node daemon; see "
                f"`tunnelmesh dataplane show {interface}`"
            )
        return [status]
    out = []
    for name in control.list_interfaces():
        try:
            status = control.request(name, "show", timeout=3.0)["status"]
        except TunnelMeshError:
            continue  # a stale socket of a process that died
        if "agent" in status:
            out.append(status)
    if not out:
        raise TunnelMeshError(
            f"no node daemon is running (no answering socket in {control.run_dir()}); start one with "
            f"`tunnelmesh node` or `tunnelmesh join COORD --token TOKEN`"
        )
    return out


@click.command("status")
@click.option("--interface", default=None, help="The node's interface (default: every running node).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the daemon's full status).")
def status(interface: str | None, as_json: bool) -> None:
    """Show this node: mesh address, coordinator connection, config version and every peer's path, RTT,
    last handshake and traffic."""
    statuses = agent_statuses(interface)
    if as_json:
        click.echo(json.dumps(statuses[0] if interface or len(statuses) == 1 else statuses, indent=2))
        return
    click.echo("\n\n".join(format_agent_status(s) for s in statuses))


def format_agent_status(s: dict[str, Any], *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    a = s["agent"]
    lines = [
        f"node {a['name']} ({a['node_id']}) on {s['interface']}: {', '.join(a['mesh_addresses'])}"
        + (f", {a['name']}.{a['mesh_domain']}" if a.get("mesh_domain") else ""),
        f"  public key: {s['public_key']}  listening port: {s['listen_port']}",
    ]
    coord = a.get("coordinator")
    version = a.get("config_version", 0)
    if coord:
        ident = f" ({coord.get('name') or 'id'} {coord['id']})" if coord.get("id") else ""
        lines.append(f"  coordinator: {coord['address']}{ident}, config version {version}")
    elif version:
        lines.append(f"  coordinator: none: using cached config v{version}")
    else:
        lines.append("  coordinator: none: no config yet")
    nat = a.get("nat") or {}
    if nat:
        cands = ", ".join(
            f"{c['address']} ({c['type'].removeprefix('CANDIDATE_TYPE_').lower()})"
            for c in nat.get("candidates", [])
        )
        lines.append(f"  NAT: {nat.get('nat_type', 'unknown')}; candidates: {cands or 'none yet'}")
    if a.get("last_config_at"):
        lines.append(f"  last config update: {_ago(now - a['last_config_at'])}")
    peers = s.get("peers", [])
    if not peers:
        lines.append("  peers: none")
        return "\n".join(lines)
    header = ("PEER", "MESH IP", "PATH", "ENDPOINT", "RTT", "HANDSHAKE", "RX", "TX", "RX LOSS")
    rows = [header]
    for p in sorted(peers, key=lambda p: p.get("name") or p["public_key"]):
        rtt = p.get("rtt_ms")
        hs = p.get("latest_handshake")
        rows.append(
            (
                p.get("name") or p["public_key"][:8],
                ",".join(p.get("mesh_ips") or []) or "-",
                p.get("path_type") or "-",
                p.get("path_endpoint") or p.get("endpoint") or "-",
                f"{rtt:.1f} ms" if rtt is not None else "-",
                _ago(now - hs) if hs else "never",
                _bytes(p.get("rx_bytes", 0)),
                _bytes(p.get("tx_bytes", 0)),
                loss_share(p.get("rx_lost", 0), p.get("rx_packets", 0)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("")
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for p in peers:
        if p.get("fallback_reason"):
            lines.append(f"  {p.get('name')}: {p['fallback_reason']}")
    return "\n".join(lines)
