"""`tunnelmesh dataplane`: the WireGuard-compatible data plane on its own, driven by a wg-quick config file.

    tunnelmesh dataplane up --config /etc/tunnelmesh/tm0.conf   # foreground, until `down` or a signal
    tunnelmesh dataplane show [tm0] [--json]                    # like `wg show`
    tunnelmesh dataplane reload tm0                             # apply the file's [Peer] changes live
    tunnelmesh dataplane down tm0

`up` serves its state on a root-only UNIX socket (``/run/tunnelmesh/<iface>.sock``, see ``node/control.py``),
which `show` and `down` talk to. In wg-quick's order: ``PreUp``, the interface (addresses, routes), ``DNS``
through resolvconf (``node/resolvconf.py``), ``PostUp``; on the way down ``PreDown``, the interface goes, the
DNS record is removed, ``PostDown``. Hooks run as with wg-quick (``bash -c``, ``%i`` = the interface),
each with a deadline (``HOOK_TIMEOUT``): a failing ``PreUp``, ``DNS`` or ``PostUp`` stops `up` (whatever was
made is undone); a failing ``PreDown``/``PostDown`` or DNS removal is reported and the interface still goes
down.

`reload` (or SIGHUP to `up`) re-reads the file and applies what changed in its peers (added, removed,
changed: ``wgquick.diff``) without touching the other peers' sessions, as ``wg syncconf`` does; a file that
does not parse, or that changes ``[Interface]`` settings a running interface cannot take, is refused and
nothing is applied.

A record left by an `up` that died (``kill -9``) or whose removal failed would keep the host asking the
tunnel's name servers; a marker in the run dir (``control.dns_marker_path``) remembers it until it is
removed, by `down IFACE` (when no process answers) or by the next `up` of that interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import click
from prometheus_client import CollectorRegistry, Counter

from tunnelmesh import hostaddr, sdnotify
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.node import control, resolvconf, wgquick
from tunnelmesh.node.dataplane import DataPlane, key_b64

log = logging.getLogger(__name__)

HOOK_TIMEOUT = 60.0  # seconds one PreUp/PostUp/PreDown/PostDown command may take
RELOAD_TIMEOUT = 60.0  # seconds `reload` waits for `up` (routes for many peers take a while)


@click.group(name="dataplane")
def dataplane() -> None:
    """Standalone WireGuard-compatible data plane (wg-quick style config files)."""


@dataplane.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="wg-quick style file ([Interface] and [Peer] sections).",
)
@click.option(
    "--interface", "iface", default=None, help="Interface name (default: the file name without .conf)."
)
@click.option("--no-offloads", is_flag=True, help="Plain packet I/O: no TUN TSO, no UDP GSO/GRO.")
@click.option(
    "--no-routes", is_flag=True, help="Do not add routes for the peers' allowed IPs (as `Table = off`)."
)
@click.option(
    "--low-power",
    is_flag=True,
    help="No warm wake-ups after traffic: less CPU, a slower first packet after each pause.",
)
@click.option("--metrics", "metrics_addr", default=None, help="Serve Prometheus metrics on HOST:PORT.")
def up(
    config_path: str,
    iface: str | None,
    no_offloads: bool,
    no_routes: bool,
    low_power: bool,
    metrics_addr: str | None,
) -> None:
    """Bring an interface up from a wg-quick config and run it in the foreground."""
    _ensure_logging()
    # As wg(8) at boot: a name server that does not answer yet is waited for (the warnings show each retry).
    cfg = wgquick.load(config_path, name=iface, resolve_retries=wgquick.resolution_retries())
    for where in cfg.ignored:
        log.warning(
            "event=config_key_ignored where=%r reason=%r", where, "only wg-quick's shell script uses it"
        )
    interface = cfg.interface
    if no_offloads or no_routes or low_power:
        interface = dataclasses.replace(
            interface,
            offloads=interface.offloads and not no_offloads,
            manage_routes=interface.manage_routes and not no_routes,  # `Table = off` stays off
            warm_tick=0 if low_power else interface.warm_tick,
        )
    registry = CollectorRegistry() if metrics_addr else None
    plane = DataPlane(interface, cfg.peers, registry=registry)
    hooks = cfg.hooks
    _run_hooks("PreUp", hooks.pre_up, interface.name)
    stopping, reload_requested = threading.Event(), threading.Event()
    reloader = _Reloader(plane, config_path, cfg, registry)
    server = control.ControlServer(interface.name, plane.status, stopping.set, reloader)
    server.start()  # refuses if another `up` serves this interface: a DNS marker now is a dead one's
    is_up = dns_set = False
    down_failures: list[str] = []
    try:
        try:
            _remove_stale_dns(interface.name)
        except TunnelMeshError as exc:  # the tunnel itself does not depend on it: warn, keep the marker
            log.warning("event=dns_stale_record_kept iface=%s reason=%r", interface.name, str(exc))
        plane.start()
        if cfg.dns:
            marker = control.dns_marker_path(interface.name)
            marker.write_text(resolvconf.record_name(interface.name) + "\n")  # before: a crash may follow
            try:
                resolvconf.set_dns(interface.name, cfg.dns.servers, cfg.dns.search)
            except BaseException:
                marker.unlink(missing_ok=True)  # resolvconf changed nothing
                raise
            dns_set = True
        _run_hooks("PostUp", hooks.post_up, interface.name)
        is_up = True
        if metrics_addr and registry is not None:
            from prometheus_client import start_http_server

            from tunnelmesh.config import split_host_port

            host, port = split_host_port(metrics_addr)
            with hostaddr.listening(metrics_addr, "--metrics"):  # on failure the interface comes down again
                start_http_server(port, addr=host, registry=registry)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, lambda signum, frame: reload_requested.set())
        click.echo(
            f"interface {plane.name} up: public key {key_b64(plane.public_key)}, listening on UDP port "
            f"{plane.listen_port}, {len(cfg.peers)} peer(s)",
        )
        sys.stdout.flush()
        sdnotify.ready(reloader.status())  # Type=notify units: started now, with routes, DNS and PostUp done
        watchdog, next_ping = sdnotify.watchdog_interval(), 0.0
        while not stopping.wait(0.5 if watchdog is None else min(0.5, watchdog)):
            if watchdog is not None and plane.running and time.monotonic() >= next_ping:
                sdnotify.notify("WATCHDOG=1")  # WatchdogSec= in the unit: only while the packet threads run
                next_ping = time.monotonic() + watchdog
            if reload_requested.is_set():
                reload_requested.clear()
                with contextlib.suppress(TunnelMeshError):  # logged by the reloader
                    reloader()
            if not plane.running:
                raise TunnelMeshError(
                    f"data plane {plane.name} failed: {'; '.join(plane.errors) or 'thread exited'}"
                )
    finally:
        sdnotify.stopping(f"taking {interface.name} down")
        server.close()
        if is_up:  # as wg-quick: the down hooks belong to an interface that came up
            down_failures += _run_hooks("PreDown", hooks.pre_down, interface.name, check=False)
        plane.stop()
        if dns_set:
            if failure := resolvconf.unset_dns(interface.name):
                down_failures.append(failure)  # the marker stays: `down IFACE` retries
            else:
                control.dns_marker_path(interface.name).unlink(missing_ok=True)
        if is_up:
            down_failures += _run_hooks("PostDown", hooks.post_down, interface.name, check=False)
    click.echo(f"interface {interface.name} down")
    if down_failures:
        raise TunnelMeshError("; ".join(down_failures))


class _Reloader:
    """Applies a new version of the running interface's config file: its peer changes, live (``reload``,
    SIGHUP). Anything else that changed refuses the reload before anything is applied."""

    def __init__(
        self,
        plane: DataPlane,
        path: str,
        running: wgquick.WgQuickConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._plane, self._path, self._running = plane, path, running
        self._lock = threading.Lock()  # the control thread and SIGHUP may ask at once
        self._outcomes = Counter(
            "tunnelmesh_dataplane_config_reloads",
            "Config file reloads (`dataplane reload`, SIGHUP) by outcome: applied, or refused (the file does "
            "not parse, changes [Interface], or a change failed to apply)",
            ["interface", "outcome"],
            registry=registry,
        )

    def __call__(self) -> dict[str, Any]:
        name = self._running.interface.name
        with self._lock:
            sdnotify.reloading(f"interface {name}: reloading {self._path}")
            try:
                result = self._reload()
            except TunnelMeshError as exc:
                self._outcomes.labels(name, "refused").inc()
                log.error("event=config_reload_refused path=%s reason=%r", self._path, str(exc))
                sdnotify.ready(f"{self.status()}; the last reload was refused: {exc}")
                raise
            sdnotify.ready(self.status())
        self._outcomes.labels(name, "applied").inc()
        return result

    def status(self) -> str:
        """The one-line state ``systemctl status`` shows."""
        return f"interface {self._running.interface.name} up, {len(self._running.peers)} peer(s)"

    def _reload(self) -> dict[str, Any]:
        name = self._running.interface.name
        # No retries here: a reload answers within its deadline; a name that does not resolve now refuses it.
        new = wgquick.load(self._path, name=name)
        change = wgquick.diff(self._running, new)
        if change.restart:
            raise TunnelMeshError(
                f"{self._path}: {', '.join(change.restart)} changed, which a running interface cannot take; "
                f"nothing was applied. Undo that change, or restart the interface (`tunnelmesh dataplane "
                f"down {name}`, then `up`)"
            )
        peers = {p.public_key: p for p in self._running.peers}
        try:
            # Removed first: their allowed IPs may have moved to an added or changed peer.
            for key in change.removed:
                self._plane.remove_peer(key)
                del peers[key]
            for peer, fields in change.changed:
                self._plane.update_peer(peer.public_key, **{f: getattr(peer, f) for f in fields})
                peers[peer.public_key] = peer
            for peer in change.added:
                self._plane.add_peer(peer)
                peers[peer.public_key] = peer
        finally:  # what was applied is what runs now, even if a step failed
            self._running = dataclasses.replace(self._running, peers=tuple(peers.values()))
        result = {
            "path": self._path,
            "added": [key_b64(p.public_key) for p in change.added],
            "removed": [key_b64(k) for k in change.removed],
            "changed": {
                key_b64(p.public_key): sorted(wgquick.PEER_FIELD_KEYS[f] for f in fields)
                for p, fields in change.changed
            },
            "unchanged": change.unchanged,
        }
        log.info(
            "event=config_reloaded iface=%s added=%d removed=%d changed=%d unchanged=%d",
            name,
            len(change.added),
            len(change.removed),
            len(change.changed),
            change.unchanged,
        )
        return result


def _remove_stale_dns(iface: str) -> bool:
    """Take back the DNS record an earlier `up` of ``iface`` left set (it died, or its removal failed).
    Returns whether there was one; raises TunnelMeshError if resolvconf fails (the marker stays)."""
    marker = control.dns_marker_path(iface)
    if not marker.exists():
        return False
    if failure := resolvconf.unset_dns(iface):
        raise TunnelMeshError(f"a DNS record left by an earlier `up` of {iface}: {failure}")
    marker.unlink(missing_ok=True)
    log.warning("event=dns_stale_record_removed iface=%s", iface)
    return True


def _run_hooks(stage: str, commands: Sequence[str], iface: str, *, check: bool = True) -> list[str]:
    """Run ``commands`` in order (output goes where ours goes). With ``check`` the first failure raises
    TunnelMeshError; without, every command runs and the failures are returned (and logged)."""
    shell = shutil.which("bash") or "/bin/sh"
    failures: list[str] = []
    for command in commands:
        line = command.replace("%i", iface)
        log.info("event=hook_run stage=%s iface=%s command=%r", stage, iface, line)
        sys.stdout.flush()
        try:
            code = subprocess.run([shell, "-c", line], timeout=HOOK_TIMEOUT, check=False).returncode
            failure = f"{stage} `{line}` exited with status {code}" if code else ""
        except subprocess.TimeoutExpired:
            failure = f"{stage} `{line}` did not finish within {HOOK_TIMEOUT:g} s"
        if not failure:
            continue
        log.error("event=hook_failed stage=%s iface=%s reason=%r", stage, iface, failure)
        if check:
            raise TunnelMeshError(failure)
        failures.append(failure)
    return failures


@dataplane.command()
@click.argument("iface", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(iface: str | None, as_json: bool) -> None:
    """Show interfaces and peers: latest handshake, endpoint, transfer (like `wg show`)."""
    names = [iface] if iface else control.list_interfaces()
    statuses = [control.request(name, "show")["status"] for name in names]
    if as_json:
        click.echo(json.dumps(statuses[0] if iface else statuses, indent=2))
        return
    if not statuses:
        click.echo("no running data plane interfaces")
        return
    click.echo("\n\n".join(format_status(s) for s in statuses))


@dataplane.command()
@click.argument("iface")
def reload(iface: str) -> None:
    """Apply the [Peer] changes in IFACE's config file to the running interface (like `wg syncconf`): the
    other peers' sessions continue. A file that does not parse or changes [Interface] is refused."""
    r = control.request(iface, "reload", timeout=RELOAD_TIMEOUT)["result"]
    click.echo(
        f"interface {iface} reloaded from {r['path']}: {len(r['added'])} peer(s) added, {len(r['removed'])} "
        f"removed, {len(r['changed'])} changed, {r['unchanged']} unchanged"
    )
    for key in r["added"]:
        click.echo(f"  added:   {key}")
    for key in r["removed"]:
        click.echo(f"  removed: {key}")
    for key, fields in r["changed"].items():
        click.echo(f"  changed: {key} ({', '.join(fields)})")


@dataplane.command()
@click.argument("iface")
def down(iface: str) -> None:
    """Stop a running `dataplane up` for IFACE (or, if its process died, remove the DNS record it left)."""
    if not control.is_running(iface):
        control.socket_path(iface).unlink(missing_ok=True)  # stale: its process died
        if _remove_stale_dns(iface):
            click.echo(f"interface {iface} was not running (its `up` process died); removed its DNS record")
            return
    control.request(iface, "down")
    path = control.socket_path(iface)
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if path.exists():
        raise TunnelMeshError(f"interface {iface} did not stop within 10 s")
    click.echo(f"interface {iface} down")


def format_status(s: dict[str, Any], *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"interface: {s['interface']}",
        f"  public key: {s['public_key']}",
        f"  listening port: {s['listen_port']}",
    ]
    if s.get("fwmark"):
        lines.append(f"  fwmark: {s['fwmark']:#x}")
    off = s.get("offloads", {})
    lines.append(
        f"  offloads: tun={','.join(off.get('tun', [])) or 'none'} gso={_yn(off.get('udp_gso'))} "
        f"gro={_yn(off.get('udp_gro'))}"
    )
    if "warm_tick" in s:
        tick = s["warm_tick"]
        lines.append(
            f"  warm wake-ups: every {tick * 1000:g} ms for {s['warm_period']:g} s after traffic"
            if tick
            else "  warm wake-ups: off (low power)"
        )
    peers = sorted(s.get("peers", []), key=lambda p: -(p.get("latest_handshake") or 0))
    for p in peers:
        lines.append("")
        lines.append(f"peer: {p['public_key']}")
        if p.get("preshared_key"):
            lines.append("  preshared key: (hidden)")
        if p.get("endpoint"):
            lines.append(f"  endpoint: {p['endpoint']}")
        lines.append(f"  allowed ips: {', '.join(p.get('allowed_ips') or []) or '(none)'}")
        if p.get("latest_handshake"):
            lines.append(f"  latest handshake: {_ago(now - p['latest_handshake'])}")
        if p.get("rx_bytes") or p.get("tx_bytes"):
            lines.append(f"  transfer: {_bytes(p['rx_bytes'])} received, {_bytes(p['tx_bytes'])} sent")
        if lost := p.get("rx_lost"):
            share = loss_share(lost, p.get("rx_packets") or 0)
            lines.append(f"  receive loss: {lost} packet{'s' if lost != 1 else ''} ({share})")
        if p.get("persistent_keepalive"):
            lines.append(f"  persistent keepalive: every {_ago(p['persistent_keepalive'], suffix='')}")
    return "\n".join(lines)


def loss_share(lost: int, received: int) -> str:
    """Packets from a peer lost on the way (the data plane's ``rx_lost``) as a share of all it sent; "-"
    before anything arrived."""
    if not lost + received:
        return "-"
    return f"{100 * lost / (lost + received):.2g}%"


def _yn(v: object) -> str:
    return "on" if v else "off"


def _ago(seconds: float, *, suffix: str = " ago") -> str:
    total = max(0, int(seconds))
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        n, total = divmod(total, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return (", ".join(parts) or "0 seconds") + suffix


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.2f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _ensure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
        )
    elif root.level > logging.INFO and root.level == logging.WARNING:
        # `tunnelmesh --log-level` defaults to warning; the daemon's lifecycle events are worth seeing.
        logging.getLogger("tunnelmesh.node.dataplane").setLevel(logging.INFO)


def main(args: list[str] | None = None) -> int:
    """Run the group on its own (``python -m tunnelmesh.cli.dataplane_cmd``), with the CLI's error style."""
    try:
        dataplane.main(args=args, prog_name="tunnelmesh dataplane", standalone_mode=False)
    except TunnelMeshError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except click.exceptions.Abort:
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
