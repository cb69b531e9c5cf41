"""`tunnelmesh up`, `tunnelmesh down`, `tunnelmesh service install`: a one-machine mesh in one command.

`up` bootstraps a single coordinator, starts it as a detached daemon, waits until it serves, writes the admin
client profile, creates a reusable join token, joins this machine as a node (a second daemon) and prints the
command another machine runs to join. Re-running it is safe: what runs is left alone and reported; what is
stopped is restarted from its state. Everything lives under one directory (``--data-dir``, default
``/var/lib/tunnelmesh`` for root)::

    D/coord/        the coordinator's data dir (Raft, CA, admin-token, join-secret)
    D/node/         the node's state dir (key, identity, last config)
    D/run/          coord.pid, node.pid (pid + start time, so a reused pid is never mistaken for ours),
                    coord.log, node.log (the daemons' stdout and stderr)
    D/up.json       the settings of the first `up` (listen, advertise, interface), reused by later runs and by
                    `service install`
    D/join-token    the reusable join token printed for other machines (0600)

No systemd is needed; `service install` writes units that run the same commands under systemd instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from tunnelmesh import hostaddr
from tunnelmesh.config import default_data_dir
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.netlab.procfs import process_start_time

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "0.0.0.0:8443"
DEFAULT_INTERFACE = "tunnelmesh0"
ADMIN_TOKEN_FILE = "admin-token"
RAFT_DIR = "raft"
BOOTSTRAP_PENDING = "bootstrap-pending.json"  # exists until the first leader applied InitializeMesh
JOIN_TOKEN_TTL = dt.timedelta(days=30)
# A token this close to its expiry is replaced rather than printed: the user may need a while to use it.
JOIN_TOKEN_MIN_LEFT = dt.timedelta(days=1)
_POLL = 0.25


class UpError(TunnelMeshError):
    """`tunnelmesh up`/`down`/`service install` could not do what was asked."""


# ------------------------------------------------------------------------------------------------------------
# Layout and settings


@dataclass(frozen=True, slots=True)
class Layout:
    """Where `up` keeps everything (see the module docstring)."""

    root: Path

    @property
    def coord_dir(self) -> Path:
        return self.root / "coord"

    @property
    def node_dir(self) -> Path:
        return self.root / "node"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def settings_file(self) -> Path:
        return self.root / "up.json"

    @property
    def join_token_file(self) -> Path:
        return self.root / "join-token"

    def pid_file(self, what: str) -> Path:
        return self.run_dir / f"{what}.pid"

    def log_file(self, what: str) -> Path:
        return self.run_dir / f"{what}.log"


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str
    advertise: str
    interface: str

    @property
    def port(self) -> int:
        return _split(self.listen)[1]

    @property
    def api_address(self) -> str:
        """The address other machines (and this one's node) use for the coordinator's public API."""
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"{host}:{self.port}"


def _split(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise UpError(f"--listen {addr!r}: expected host:port, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def reachable_address() -> str:
    """This machine's address that others most likely reach (see tunnelmesh.hostaddr)."""
    addr = hostaddr.reachable_address()
    if addr is None:
        raise UpError(
            "cannot find an address other machines can reach this one at: pass --advertise <ip or name>"
        )
    return addr


def resolve_settings(
    layout: Layout, listen: str | None, advertise: str | None, interface: str | None
) -> Settings:
    """Flags given now win; else what the first `up` recorded; else the defaults."""
    saved: dict[str, str] = {}
    if layout.settings_file.exists():
        try:
            saved = json.loads(layout.settings_file.read_text())
        except (OSError, ValueError) as exc:
            raise UpError(f"{layout.settings_file}: unreadable ({exc}); fix or delete it") from None
    listen = listen or saved.get("listen") or DEFAULT_LISTEN
    host, _ = _split(listen)
    # A coordinator bound to one address is reached at that address.
    bound = host if host not in ("", "0.0.0.0", "::") else None
    return Settings(
        listen=listen,
        advertise=advertise or saved.get("advertise") or bound or reachable_address(),
        interface=interface or saved.get("interface") or DEFAULT_INTERFACE,
    )


def saved_settings(layout: Layout) -> Settings | None:
    try:
        data = json.loads(layout.settings_file.read_text())
        return Settings(str(data["listen"]), str(data["advertise"]), str(data["interface"]))
    except (OSError, ValueError, KeyError):
        return None


def _save_settings(layout: Layout, s: Settings) -> None:
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"listen": s.listen, "advertise": s.advertise, "interface": s.interface}
    layout.settings_file.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------------
# Daemons: detached processes with a pid file (pid + start time) and a log file


def tunnelmesh_argv() -> list[str]:
    """How to run this same `tunnelmesh` (the console script next to this interpreter, not a pyenv shim)."""
    script = Path(sys.executable).parent / "tunnelmesh"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from tunnelmesh.cli.main import main; main()"]


def same_code_env() -> dict[str, str]:
    """The environment for our daemons: this one, with the directory holding this `tunnelmesh` package first
    on PYTHONPATH, so a daemon runs the very code that started it (a source checkout, a venv)."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def running_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file`` if that very process still runs (same start time), else None."""
    try:
        pid_s, start_s = pid_file.read_text().split()
        pid, start = int(pid_s), int(start_s)
    except (OSError, ValueError):
        return None
    return pid if process_start_time(pid) == start else None


def spawn_daemon(argv: list[str], *, pid_file: Path, log_file: Path) -> int:
    """Start ``argv`` detached (own session, stdin from /dev/null, output appended to ``log_file``)."""
    pid_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_file, "ab") as out:
        out.write(f"\n=== {dt.datetime.now().isoformat(timespec='seconds')} {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=same_code_env(),
        )
    start = process_start_time(proc.pid)
    pid_file.write_text(f"{proc.pid} {start or 0}\n")
    log.info("event=daemon_started pid=%d argv=%s log=%s", proc.pid, shlex.join(argv), log_file)
    return proc.pid


def stop_daemon(pid_file: Path, *, timeout: float) -> int | None:
    """SIGTERM the daemon's process group, wait up to ``timeout`` s, then SIGKILL. Returns the pid stopped."""
    pid = running_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return None
    start = process_start_time(pid)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_start_time(pid) == start:
        time.sleep(0.1)
    if process_start_time(pid) == start:
        log.warning("event=daemon_kill pid=%d reason='no exit %gs after SIGTERM'", pid, timeout)
        _signal_group(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 5.0
        while time.monotonic() < kill_deadline and process_start_time(pid) == start:
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return pid


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        try:
            os.killpg(pid, sig)  # the daemon leads its own session: its children go too
        except ProcessLookupError:  # not a group leader after all: the process alone
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise UpError(f"not allowed to stop pid {pid} (started by another user?): run this as root") from None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(what: str, probe: Callable[[], str | None], *, timeout: float, alive: Callable[[], bool]) -> None:
    """Poll ``probe`` (None = ready, else the reason it is not) until ready; show progress; fail on deadline
    or when the daemon died."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last_shown = 0.0
    reason = "not checked yet"
    while True:
        reason = probe() or ""
        if not reason:
            return
        if not alive():
            raise UpError(f"{what} exited while starting ({reason})")
        now = time.monotonic()
        if now >= deadline:
            raise UpError(f"{what} not ready after {timeout:g}s: {reason}")
        if now - last_shown >= 3.0:
            click.echo(f"  waiting for {what} ({now - started:.0f}s): {reason}", err=True)
            last_shown = now
        time.sleep(_POLL)


# ------------------------------------------------------------------------------------------------------------
# The coordinator


def coord_argv(layout: Layout, s: Settings) -> list[str]:
    """The coordinator's command line (the same under `up` and under systemd). ``--bootstrap`` only while the
    data dir holds no cluster (a coordinator ignores it on restart anyway, but says so in its log)."""
    argv = [
        "coord",
        "--data-dir",
        str(layout.coord_dir),
        "--listen",
        s.listen,
        "--advertise-host",
        s.advertise,
    ]
    if not (layout.coord_dir / RAFT_DIR).exists():
        argv.append("--bootstrap")
    return argv


def _admin_token(layout: Layout) -> str | None:
    try:
        return (layout.coord_dir / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def _ca_pem(layout: Layout) -> bytes:
    return (layout.coord_dir / "ca.crt").read_bytes()


def _client(layout: Layout, s: Settings, *, deadline: float = 5.0) -> Any:
    from tunnelmesh.client import Client

    token = _admin_token(layout)
    if token is None:
        raise UpError(f"{layout.coord_dir / ADMIN_TOKEN_FILE} is missing: the coordinator has not written it")
    return Client([s.api_address], ca_pem=_ca_pem(layout), token=token, deadline=deadline)


async def _cluster_status(layout: Layout, s: Settings, deadline: float = 3.0) -> Any:
    async with _client(layout, s, deadline=deadline) as c:
        return await c.cluster_status()


def coordinator_ready(layout: Layout, s: Settings) -> str | None:
    """None when the coordinator serves admin calls with a leader; else why not."""
    if _admin_token(layout) is None:
        return "no admin token yet"
    if (layout.coord_dir / BOOTSTRAP_PENDING).exists():
        return "mesh not initialized yet (bootstrap commands pending)"
    try:
        st = asyncio.run(_cluster_status(layout, s))
    except TunnelMeshError as exc:
        return str(exc)
    if not st.leader_id:
        return "no leader yet"
    return None


def _ensure_coordinator(layout: Layout, s: Settings, timeout: float) -> None:
    pid = running_pid(layout.pid_file("coord"))
    if pid is not None:
        click.echo(f"coordinator: already running (pid {pid})", err=True)
    else:
        fresh = not (layout.coord_dir / RAFT_DIR).exists()
        argv = [*tunnelmesh_argv(), "--log-level", "info", *coord_argv(layout, s)]
        pid = spawn_daemon(argv, pid_file=layout.pid_file("coord"), log_file=layout.log_file("coord"))
        verb = "bootstrapping a new mesh" if fresh else "restarting"
        click.echo(f"coordinator: {verb} (pid {pid}, log {layout.log_file('coord')})", err=True)

    def alive() -> bool:
        return running_pid(layout.pid_file("coord")) is not None

    try:
        _wait("the coordinator", lambda: coordinator_ready(layout, s), timeout=timeout, alive=alive)
    except UpError as exc:
        log_file = layout.log_file("coord")
        raise UpError(f"{exc}\nlast lines of {log_file}:\n{log_tail(log_file)}") from None


def _save_admin_profile(layout: Layout, s: Settings) -> Path:
    """Writes the admin client profile so `tunnelmesh nodes`, `cluster`, `tokens` work without flags."""
    from tunnelmesh.client import Profile, save_profile

    return save_profile(Profile((s.api_address,), _ca_pem(layout), _admin_token(layout)))


# ------------------------------------------------------------------------------------------------------------
# The reusable join token


def _load_join_token(layout: Layout) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(layout.join_token_file.read_text())
        expires = dt.datetime.fromisoformat(str(data["expires_at"]))
    except (OSError, ValueError, KeyError):
        return None
    if expires - dt.datetime.now(dt.UTC) < JOIN_TOKEN_MIN_LEFT:
        return None
    return data


async def _create_join_token(layout: Layout, s: Settings) -> dict[str, Any]:
    async with _client(layout, s, deadline=15.0) as c:
        resp = await c.create_join_token(
            description="tunnelmesh up: this machine and the machines it invites",
            ttl=JOIN_TOKEN_TTL.total_seconds(),
            reusable=True,
        )
    expires = resp.token.expires_at.ToDatetime(tzinfo=dt.UTC)
    return {"secret": resp.secret, "token_id": resp.token.token_id, "expires_at": expires.isoformat()}


async def _token_active(layout: Layout, s: Settings, token_id: str) -> bool:
    async with _client(layout, s, deadline=10.0) as c:
        return any(t.token_id == token_id for t in await c.list_join_tokens())


def ensure_join_token(layout: Layout, s: Settings) -> str:
    """The reusable join token to print: the stored one while it is active (not revoked, not about to
    expire), else a new one."""
    data = _load_join_token(layout)
    if data is not None and not asyncio.run(_token_active(layout, s, str(data.get("token_id", "")))):
        log.info("event=join_token_replaced token_id=%s reason=inactive", data.get("token_id"))
        data = None
    if data is None:
        data = asyncio.run(_create_join_token(layout, s))
        fd = os.open(layout.join_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        log.info("event=join_token_created token_id=%s expires=%s", data["token_id"], data["expires_at"])
    return str(data["secret"])


# ------------------------------------------------------------------------------------------------------------
# The node


def node_argv(layout: Layout, s: Settings, token: str | None) -> list[str]:
    """The node's command line: `join` with the token the first time; once registered, `node` (the daemon,
    from its state dir: no token needed, so none ends up in a unit file)."""
    if token is None:
        return ["node", "--state-dir", str(layout.node_dir), "--interface", s.interface]
    return [
        "join",
        s.api_address,
        "--token",
        token,
        "--state-dir",
        str(layout.node_dir),
        "--interface",
        s.interface,
    ]


def node_info(layout: Layout) -> dict[str, Any] | None:
    """The node's identity file (node.json) once it has registered."""
    try:
        data: dict[str, Any] = json.loads((layout.node_dir / "node.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def mesh_ip(info: dict[str, Any]) -> str:
    for key in ("mesh_ip", "mesh_ipv4", "address", "ipv4"):
        if info.get(key):
            return str(info[key]).split("/")[0]
    addrs = info.get("mesh_addresses") or info.get("addresses") or []
    return str(addrs[0]).split("/")[0] if addrs else "?"


def _ensure_node(layout: Layout, s: Settings, token: str, timeout: float) -> None:
    pid = running_pid(layout.pid_file("node"))
    if pid is not None:
        click.echo(f"node: already running (pid {pid})", err=True)
    else:
        registered = node_info(layout) is not None
        args = node_argv(layout, s, None if registered else token)
        argv = [*tunnelmesh_argv(), "--log-level", "info", *args]
        pid = spawn_daemon(argv, pid_file=layout.pid_file("node"), log_file=layout.log_file("node"))
        verb = "restarting" if registered else "joining"
        click.echo(f"node: {verb} (pid {pid}, log {layout.log_file('node')})", err=True)

    def ready() -> str | None:
        return None if node_info(layout) else "not registered yet"

    def alive() -> bool:
        return running_pid(layout.pid_file("node")) is not None

    try:
        _wait("the node", ready, timeout=timeout, alive=alive)
    except UpError as exc:
        log_file = layout.log_file("node")
        raise UpError(f"{exc}\nlast lines of {log_file}:\n{log_tail(log_file)}") from None


# ------------------------------------------------------------------------------------------------------------
# Commands

_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where everything lives: coord/, node/, run/ (default /var/lib/tunnelmesh for root).",
)


def _layout(data_dir: Path | None) -> Layout:
    return Layout((data_dir or default_data_dir()).absolute())


@click.command("up")
@_data_dir_option
@click.option("--listen", default=None, help=f"Coordinator public API address [default: {DEFAULT_LISTEN}].")
@click.option(
    "--advertise",
    default=None,
    help="Host or IP other machines reach this one at [default: the address of the default route].",
)
@click.option("--interface", default=None, help=f"Tunnel interface name [default: {DEFAULT_INTERFACE}].")
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each daemon."
)
def up(
    data_dir: Path | None, listen: str | None, advertise: str | None, interface: str | None, timeout: float
) -> None:
    """Start a single-coordinator mesh on this machine, join this machine, print the join command.

    Safe to re-run: what runs is left alone, what is stopped is restarted."""
    if os.geteuid() != 0:
        raise UpError("`tunnelmesh up` needs root: the node creates a TUN interface (run it with sudo)")
    layout = _layout(data_dir)
    s = resolve_settings(layout, listen, advertise, interface)
    before = saved_settings(layout)
    running = running_pid(layout.pid_file("coord")) or running_pid(layout.pid_file("node"))
    if running and before is not None and before != s:
        raise UpError(
            f"the mesh in {layout.root} is running with other settings ({before}); "
            f"`tunnelmesh down --data-dir {layout.root}` first, then `up` with the new flags"
        )
    _save_settings(layout, s)
    _ensure_coordinator(layout, s, timeout)
    profile = _save_admin_profile(layout, s)
    token = ensure_join_token(layout, s)
    _ensure_node(layout, s, token, timeout)
    _print_status(layout, s, profile=profile)
    click.echo("")
    click.echo("Join another machine (as root there):")
    click.echo(f"  tunnelmesh join {s.api_address} --token {token}")


def _print_status(layout: Layout, s: Settings, *, profile: Path | None = None) -> None:
    cpid = running_pid(layout.pid_file("coord"))
    npid = running_pid(layout.pid_file("node"))
    leader = "?"
    if cpid is not None:
        with contextlib.suppress(TunnelMeshError):
            st = asyncio.run(_cluster_status(layout, s))
            leader = "this coordinator" if st.leader_id == st.member_id else (st.leader_id or "none")
    info = node_info(layout) or {}
    click.echo(f"data dir     {layout.root}")
    coord_state = f"running (pid {cpid})" if cpid else "stopped"
    click.echo(f"coordinator  {coord_state}  api {s.api_address}  leader {leader}")
    node_state = f"running (pid {npid})" if npid else "stopped"
    name = info.get("name", "?")
    click.echo(f"node         {node_state}  name {name}  mesh ip {mesh_ip(info)}  interface {s.interface}")
    if profile:
        click.echo(f"admin        profile {profile}")


def _forget_profile(layout: Layout) -> None:
    """Delete the admin profile if it is this mesh's (same CA): it would point at a mesh that is gone."""
    from tunnelmesh.client import default_profile_path, load_profile

    try:
        profile = load_profile()
        ours = _ca_pem(layout)
    except (OSError, TunnelMeshError):
        return
    if profile is not None and profile.ca_pem == ours:
        default_profile_path().unlink(missing_ok=True)
        click.echo(f"removed the admin profile {default_profile_path()}")


@click.command("down")
@_data_dir_option
@click.option(
    "--purge", is_flag=True, help="Also delete the mesh's state (coordinator data, node identity, tokens)."
)
@click.option(
    "--timeout", type=float, default=15.0, show_default=True, help="Seconds after SIGTERM before SIGKILL."
)
def down(data_dir: Path | None, purge: bool, timeout: float) -> None:
    """Stop what `tunnelmesh up` started; the state stays for the next `up` unless --purge."""
    layout = _layout(data_dir)
    for what in ("node", "coord"):  # the node first: it should not see its coordinator vanish and fail over
        pid = stop_daemon(layout.pid_file(what), timeout=timeout)
        label = "coordinator" if what == "coord" else "node"
        click.echo(f"{label}: {f'stopped (pid {pid})' if pid else 'not running'}")
    if purge:
        _forget_profile(layout)
        for d in (layout.coord_dir, layout.node_dir, layout.run_dir):
            shutil.rmtree(d, ignore_errors=True)
        for f in (layout.settings_file, layout.join_token_file):
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            layout.root.rmdir()  # only if nothing else lives there
        click.echo(f"purged the mesh state under {layout.root}")


# ------------------------------------------------------------------------------------------------------------
# systemd units


def _unit(description: str, argv: list[str], *, wants: str = "") -> str:
    deps = "After=network-online.target\nWants=network-online.target\n"
    if wants:
        deps += f"Wants={wants}\n"
    return (
        "# Written by `tunnelmesh service install`; re-run it to rewrite.\n"
        "[Unit]\n"
        f"Description={description}\n"
        f"{deps}"
        "\n[Service]\n"
        # Started once ready (the node: its interface forwards; a coordinator: caught up with its cluster, or
        # 60 s without a quorum), so `systemctl restart` of one coordinator after another waits for each.
        "Type=notify\n"
        "NotifyAccess=main\n"
        "TimeoutStartSec=120\n"
        f"ExecStart={shlex.join(argv)}\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "TimeoutStopSec=20\n"
        "LimitNOFILE=65536\n"
        "\n[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def service_units(layout: Layout, s: Settings) -> dict[str, str]:
    exe = tunnelmesh_argv()
    coord = _unit("TunnelMesh coordinator", [*exe, *coord_argv(layout, s)])
    # No token in the unit (unit files are world-readable): the node starts from its registered state dir.
    # Not After= the coordinator: that would hold the data plane back until the coordinator is ready (up to
    # 60 s without a quorum), and the node forwards with its cached config and retries the coordinator anyway.
    node = _unit("TunnelMesh node", [*exe, *node_argv(layout, s, None)], wants="tunnelmesh-coord.service")
    return {"tunnelmesh-coord.service": coord, "tunnelmesh-node.service": node}


@click.group("service")
def service() -> None:
    """Run the mesh of `tunnelmesh up` under systemd instead."""


@service.command("install")
@_data_dir_option
@click.option("--listen", default=None, help="As for `up` [default: what `up` used].")
@click.option("--advertise", default=None, help="As for `up` [default: what `up` used].")
@click.option("--interface", default=None, help="As for `up` [default: what `up` used].")
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/systemd/system"),
    show_default=True,
    help="Where to write the units.",
)
@click.option("--dry-run", is_flag=True, help="Print the units and commands; write nothing.")
def install(
    data_dir: Path | None,
    listen: str | None,
    advertise: str | None,
    interface: str | None,
    unit_dir: Path,
    dry_run: bool,
) -> None:
    """Write tunnelmesh-coord.service and tunnelmesh-node.service (same arguments as `up`)."""
    layout = _layout(data_dir)
    s = resolve_settings(layout, listen, advertise, interface)
    units = service_units(layout, s)
    for name, text in units.items():
        path = unit_dir / name
        if dry_run:
            click.echo(f"# {path} (dry run: not written)")
            click.echo(text)
            continue
        unit_dir.mkdir(parents=True, exist_ok=True)
        old = path.read_text() if path.exists() else None
        path.write_text(text)
        click.echo(f"{'unchanged' if old == text else 'wrote'} {path}")
    if node_info(layout) is None:
        click.echo(
            "note: the node has not registered yet; run `tunnelmesh up` once first (the unit has no token)",
            err=True,
        )
    click.echo("")
    click.echo("Then run:" if not dry_run else "Without --dry-run, then run:")
    click.echo(f"  tunnelmesh down --data-dir {layout.root}    # stop the daemons `up` started")
    click.echo("  systemctl daemon-reload")
    click.echo("  systemctl enable --now " + " ".join(units))
