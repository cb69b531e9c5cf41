"""`tunnelmesh demo`: a whole TunnelMesh world on one machine, built with netlab and real processes.

The world (docs/getting-started.md shows it as a picture)::

    backbone 198.18.0.0/24   coordinators c1 (bootstrap), c2, c3 (join with the join secret); host "ctl"
    office   10.10.1.0/24    behind an endpoint-independent NAT: nodes office-a, office-b (a LAN pair)
    home     10.20.1.0/24    behind an endpoint-independent NAT: node home
    cafe     10.30.1.0/24    behind a symmetric NAT: node sym-a
    hotel    10.30.2.0/24    behind a symmetric NAT: node sym-b
    corp     10.40.1.0/24    behind a NAT whose firewall blocks UDP: node corp (WebSocket relay only)

Every coordinator is a real `tunnelmesh coord` process in its own namespace; every node a real
`tunnelmesh join <c1,c2,c3> --token T --interface tmd-<name>` process with its own TUN device. The demo reads
the world the way a user would: `tunnelmesh status --json` in each node's namespace and the admin API's
cluster status; it proves connectivity with `ping` over the mesh IPs, from every node to every other node.

gRPC cannot be pointed at a namespace from this process (its sockets are created by gRPC's own threads), so
admin calls run as short `python -m tunnelmesh.demo ctl ...` processes on the "ctl" host.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.netlab import Host, Lab, Process
from tunnelmesh.netlab.errors import NetlabError

log = logging.getLogger(__name__)

API_PORT = 8443
RAFT_PORT = 8444
HTTP_PORT = 8080
BACKBONE = "198.18.0.0/24"
PING_WAIT = 2  # seconds one ping waits for its reply
BOOTSTRAP_PENDING = (
    "bootstrap-pending.json"  # exists until the first leader applied InitializeMesh (bootstrap.py)
)


class DemoError(TunnelMeshError):
    """The demo world could not be built or a step of it failed."""


@dataclass(frozen=True, slots=True)
class Site:
    """A network where demo nodes live: a LAN behind a router with a NAT mode, maybe blocking UDP."""

    name: str
    subnet: str
    nat: Literal["eim", "symmetric"] | None
    nodes: tuple[str, ...]
    block_udp: bool = False
    label: str = ""


SITES = (
    Site("office", "10.10.1.0/24", "eim", ("office-a", "office-b"), label="LAN pair behind EIM NAT"),
    Site("home", "10.20.1.0/24", "eim", ("home",), label="EIM NAT"),
    Site("cafe", "10.30.1.0/24", "symmetric", ("sym-a",), label="symmetric NAT"),
    Site("hotel", "10.30.2.0/24", "symmetric", ("sym-b",), label="symmetric NAT"),
    Site("corp", "10.40.1.0/24", "eim", ("corp",), block_udp=True, label="UDP blocked"),
)


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    reason: str


@dataclass
class DemoCoord:
    name: str
    host: Host
    data_dir: Path
    proc: Process | None = None

    @property
    def api(self) -> str:
        return f"{self.host.ip}:{API_PORT}"


@dataclass
class DemoNode:
    name: str
    site: Site
    host: Host
    state_dir: Path
    proc: Process | None = None
    status: dict[str, Any] = field(default_factory=dict)
    status_error: str = ""

    @property
    def interface(self) -> str:
        return f"tmd-{self.name}"[:15]


def tunnelmesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tunnelmesh.cli.main import main; main()", *args]


def child_env(work: Path) -> dict[str, str]:
    """The environment of the world's processes: PYTHONPATH with the directory holding this `tunnelmesh`
    package first, so every process runs the very code of the demo (a source checkout, a venv); and the nodes'
    control sockets in the work dir (namespaces share the file system: two demos, or a demo on a machine that
    runs a real node, must not share /run/tunnelmesh)."""
    root = str(Path(__file__).resolve().parents[1])
    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    return {"PYTHONPATH": os.pathsep.join(paths), "TUNNELMESH_RUN_DIR": str(work / "run")}


# ------------------------------------------------------------------------------------------------------------
# Reading what nodes report: `tunnelmesh status --json` is the data plane's status plus an "agent" section
# (node/agent.py); a peer row has name, mesh_ips, path_type ("direct", "relay-udp", "relay-ws", "none") and
# rtt_ms. A node that is not up yet has no status: every reader answers "unknown" for it.


def mesh_ip_of(status: dict[str, Any]) -> str:
    addrs = (status.get("agent") or {}).get("mesh_addresses") or []
    return str(addrs[0]).split("/")[0] if addrs else ""


def peers_of(status: dict[str, Any]) -> list[dict[str, Any]]:
    peers = status.get("peers", [])
    return [p for p in peers if isinstance(p, dict)] if isinstance(peers, list) else []


def peer_name(peer: dict[str, Any]) -> str:
    return str(peer.get("name") or str(peer.get("public_key", "?"))[:8])


def path_type(peer: dict[str, Any]) -> str:
    return str(peer.get("path_type") or "?")


def rtt_ms(peer: dict[str, Any]) -> float | None:
    rtt = peer.get("rtt_ms")
    return float(rtt) if rtt is not None else None


def is_relay(kind: str) -> bool:
    return kind.startswith("relay")


def is_ws(kind: str) -> bool:
    return kind == "relay-ws"


# ------------------------------------------------------------------------------------------------------------
# The world


class DemoWorld:
    """Builds and runs the demo world inside ``lab``; ``work`` holds data dirs and state dirs."""

    def __init__(self, lab: Lab, work: Path, *, progress: Callable[[str], None] = lambda _: None) -> None:
        self.lab = lab
        self.work = work
        self.progress = progress
        self.coords: list[DemoCoord] = []
        self.nodes: list[DemoNode] = []
        self.token = ""
        self.cluster: dict[str, Any] = {}
        self.cluster_error = ""
        self.pings: dict[tuple[str, str], tuple[bool, str]] = {}
        self.started = time.monotonic()

    # -- building --------------------------------------------------------------------------------------------

    def build_network(self) -> None:
        lab = self.lab
        backbone = lab.lan("backbone", BACKBONE)
        self.ctl_host = lab.host("ctl", backbone, ip="198.18.0.10")
        for i in range(3):
            name = f"c{i + 1}"
            host = lab.host(name, backbone, ip=f"198.18.0.{11 + i}")
            self.coords.append(DemoCoord(name, host, self.work / name))
        for i, site in enumerate(SITES):
            lan = lab.lan(site.name, site.subnet)
            lab.router(f"r-{site.name}", wan=backbone, lan=lan, nat=site.nat, wan_ip=f"198.18.0.{21 + i}")
            for n in site.nodes:
                self.nodes.append(DemoNode(n, site, lab.host(n, lan), self.work / n))
            if site.block_udp:
                lab.block_udp(lan)
        sites = ", ".join(f"{s.name}: {s.label}" for s in SITES)
        self.progress(
            f"network: lab {lab.id}, backbone with 3 coordinators; {len(SITES)} sites, "
            f"{len(self.nodes)} nodes ({sites})"
        )

    def _coord_argv(self, c: DemoCoord, *extra: str) -> list[str]:
        return tunnelmesh_argv(
            "--log-level",
            "info",
            "coord",
            "--data-dir",
            str(c.data_dir),
            "--listen",
            c.api,
            "--raft-listen",
            f"{c.host.ip}:{RAFT_PORT}",
            "--advertise-host",
            c.host.ip,
            "--name",
            c.name,
            *extra,
        )

    def start_coordinators(self, deadline: float) -> None:
        first = self.coords[0]
        first.proc = first.host.spawn(
            self._coord_argv(first, "--bootstrap"), name="coord", env=child_env(self.work)
        )
        self.progress(f"coordinator {first.name}: bootstrapping a new cluster on {first.api}")

        def initialized() -> str | None:
            if not self.admin_token():
                return "no admin token yet"
            if (first.data_dir / BOOTSTRAP_PENDING).exists():
                return "mesh not initialized yet (bootstrap commands pending)"
            return None

        _until(deadline, f"{first.name} to initialize the mesh", initialized, alive=[first.proc])
        secret = (first.data_dir / "join-secret").read_text().strip()
        for c in self.coords[1:]:
            c.proc = c.host.spawn(
                self._coord_argv(c, "--seed", first.api, "--join-secret", secret),
                name="coord",
                env=child_env(self.work),
            )
            self.progress(f"coordinator {c.name}: joining through {first.name} with the join secret")

        def voters() -> str | None:
            self.poll_cluster()
            if self.cluster_error:
                return self.cluster_error
            healthy = [m for m in self.cluster.get("members", []) if m.get("healthy")]
            leader = self.cluster.get("leaderId", "")
            if len(healthy) < 3 or not leader:
                return f"{len(healthy)}/3 members healthy, leader {leader or 'none'}"
            return None

        _until(deadline, "3 healthy coordinators with a leader", voters, alive=self._coord_procs())
        self.progress(f"coordinators: 3 healthy, leader {self.leader_name()}")

    def _coord_procs(self) -> list[Process]:
        return [c.proc for c in self.coords if c.proc is not None]

    def admin_token(self) -> str:
        try:
            return (self.coords[0].data_dir / "admin-token").read_text().strip()
        except OSError:
            return ""

    def endpoints(self) -> str:
        return ",".join(c.api for c in self.coords)

    def ctl(self, op: str, args: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One admin call through the "ctl" host (see the module docstring)."""
        payload = {
            "endpoints": self.endpoints(),
            "ca": str(self.coords[0].data_dir / "ca.crt"),
            "token": self.admin_token(),
            **args,
        }
        argv = [sys.executable, "-m", "tunnelmesh.demo", "ctl", op]
        # The token goes on stdin, never on a command line (`ps` shows those).
        r = self.ctl_host.run(
            argv, input=json.dumps(payload), timeout=timeout, check=False, env=child_env(self.work)
        )
        out = r.stdout.strip().splitlines()
        if r.returncode != 0 or not out:
            raise DemoError(f"admin call {op} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        result: dict[str, Any] = json.loads(out[-1])
        return result

    def poll_cluster(self) -> None:
        try:
            self.cluster = self.ctl("cluster-status", {}, timeout=20.0)
            self.cluster_error = ""
        except (DemoError, NetlabError) as exc:
            self.cluster_error = str(exc)

    def leader_name(self) -> str:
        leader = str(self.cluster.get("leaderId", ""))
        for m in self.cluster.get("members", []):
            if str(m.get("memberId", "")) == leader and leader:
                return str(m.get("info", {}).get("name", leader))
        return "none"

    def create_token(self) -> None:
        r = self.ctl("create-join-token", {"uses": len(self.nodes)})
        self.token = str(r["secret"])
        self.progress(f"join token: reusable, {len(self.nodes)} uses ({r.get('token_id', '?')})")

    def start_nodes(self) -> None:
        for n in self.nodes:
            argv = tunnelmesh_argv(
                "--log-level",
                "info",
                "join",
                self.endpoints(),
                "--token",
                self.token,
                "--interface",
                n.interface,
                "--state-dir",
                str(n.state_dir),
                "--name",
                n.name,
            )
            n.proc = n.host.spawn(argv, name="node", env=child_env(self.work))
        self.progress(f"nodes: {len(self.nodes)} `tunnelmesh join` processes started")

    # -- observing -------------------------------------------------------------------------------------------

    def poll_node(self, n: DemoNode) -> None:
        # Exactly `tunnelmesh status --json`, without importing every other command (a 5x cheaper start:
        # the demo runs one per node per refresh, on machines that are busy running the demo).
        status_cmd = "from tunnelmesh.cli.status_cmd import status; status(prog_name='tunnelmesh status')"
        argv = [sys.executable, "-c", status_cmd, "--json", "--interface", n.interface]
        try:
            r = n.host.run(argv, timeout=20.0, check=False, env=child_env(self.work))
        except NetlabError as exc:
            n.status_error = str(exc)
            return
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).strip().splitlines()
            n.status_error = lines[-1] if lines else f"status exited {r.returncode}"
            return
        try:
            n.status = json.loads(r.stdout)
            n.status_error = ""
        except ValueError:
            n.status_error = "status --json printed no JSON"

    def poll(self, pool: concurrent.futures.Executor) -> None:
        futures = [pool.submit(self.poll_node, n) for n in self.nodes]
        futures.append(pool.submit(self.poll_cluster))
        for f in futures:
            f.result()

    def dead(self) -> list[str]:
        out = []
        named: list[tuple[str, Process | None]] = [(c.name, c.proc) for c in self.coords]
        named += [(n.name, n.proc) for n in self.nodes]
        for name, proc in named:
            if proc is not None and not proc.running:
                out.append(f"{name} exited ({proc.returncode}): {_tail(proc)}")
        return out

    def ping(self, src: DemoNode, dst: DemoNode) -> tuple[bool, str]:
        ip = mesh_ip_of(dst.status)
        if not ip:
            return False, f"{dst.name} has no mesh IP yet"
        argv = ["ping", "-c", "1", "-W", str(PING_WAIT), "-n", ip]
        try:
            r = src.host.run(argv, timeout=PING_WAIT + 5, check=False)
        except NetlabError as exc:
            return False, str(exc)
        if r.returncode == 0:
            rtt = r.stdout.split("time=")[-1].split()[0] if "time=" in r.stdout else "?"
            return True, f"reply in {rtt} ms"
        return False, f"no reply from {ip}"

    def resolve_all(self, src: DemoNode, deadline: float) -> tuple[bool, str]:
        """Ask ``src``'s mesh resolver (on its own mesh IP, port 53) for every other node's name."""
        domain = str(src.status.get("agent", {}).get("mesh_domain") or "mesh.internal")
        server = mesh_ip_of(src.status)
        if not server:
            return False, "no mesh IP"
        wrong = []
        for dst in self.nodes:
            if dst is src:
                continue
            name = f"{dst.name}.{domain}"
            if time.monotonic() >= deadline:
                wrong.append(f"{name}: not asked, out of time")
                continue
            argv = ["dig", "+short", "+time=2", "+tries=2", f"@{server}", name, "A"]
            try:
                r = src.host.run(argv, timeout=15, check=False)
                got = r.stdout.strip() or (r.stderr.strip() or "no answer")
            except NetlabError as exc:
                got = str(exc)
            if got != mesh_ip_of(dst.status):
                wrong.append(f"{name} -> {got!r} (want {mesh_ip_of(dst.status)})")
        return (not wrong), "; ".join(wrong) or f"{len(self.nodes) - 1} names answered by {server}:53"

    def ping_all(self, pool: concurrent.futures.Executor, pairs: list[tuple[DemoNode, DemoNode]]) -> None:
        results = pool.map(lambda p: (p, self.ping(*p)), pairs)
        for (a, b), res in results:
            self.pings[(a.name, b.name)] = res

    def pairs(self) -> list[tuple[DemoNode, DemoNode]]:
        return [(a, b) for a in self.nodes for b in self.nodes if a is not b]


def _tail(proc: Process, lines: int = 3) -> str:
    text = proc.log_text().strip().splitlines()
    return " | ".join(text[-lines:]) if text else "(empty log)"


def _until(
    deadline: float, what: str, probe: Callable[[], str | None], *, alive: list[Process] | None = None
) -> None:
    """Poll ``probe`` (None = done, else why not) until done; raise DemoError at the deadline or when one of
    ``alive`` exits."""
    reason = ""
    while True:
        reason = probe() or ""
        if not reason:
            return
        for p in alive or []:
            if not p.running:
                raise DemoError(f"waiting for {what}: {p.name} on {p.where} exited: {_tail(p, 6)}")
        if time.monotonic() >= deadline:
            raise DemoError(f"timed out waiting for {what}: {reason}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------------------
# Checks (--check) and the live table


def check_world(
    world: DemoWorld, deadline: float, report: Callable[[CheckResult], None]
) -> list[CheckResult]:
    """Run every check of the demo; ``report`` is called as each one is decided."""
    results: list[CheckResult] = []

    def add(name: str, ok: bool, reason: str) -> None:
        r = CheckResult(name, ok, reason)
        results.append(r)
        report(r)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        # Every node registers and learns every other node.
        want = len(world.nodes) - 1

        def everyone_sees_everyone() -> str | None:
            world.poll(pool)
            missing = [
                f"{n.name}: {n.status_error or f'{len(peers_of(n.status))}/{want} peers'}"
                for n in world.nodes
                if n.status_error or not mesh_ip_of(n.status) or len(peers_of(n.status)) < want
            ]
            dead = world.dead()
            if dead:
                raise DemoError("; ".join(dead))
            return "; ".join(missing) or None

        with contextlib.suppress(DemoError):
            _until(deadline, "every node to see every other node", everyone_sees_everyone)
        for n in world.nodes:
            ok = not n.status_error and bool(mesh_ip_of(n.status)) and len(peers_of(n.status)) >= want
            reason = (
                n.status_error or f"mesh ip {mesh_ip_of(n.status) or 'none'}, {len(peers_of(n.status))} peers"
            )
            add(f"node {n.name} registered and sees {want} peers", ok, reason)

        # All-pairs connectivity over the mesh: retried until it passes or time is up (paths take a moment).
        todo = world.pairs()
        while todo and time.monotonic() < deadline:
            world.ping_all(pool, todo)
            todo = [(a, b) for a, b in todo if not world.pings[(a.name, b.name)][0]]
            if todo:
                time.sleep(1.0)
        for a, b in world.pairs():
            ok, reason = world.pings.get((a.name, b.name), (False, "not tried: out of time"))
            add(f"ping {a.name} -> {b.name}", ok, reason)

        # Path types: what each node reports; paths settle after probing, so wait (bounded) for them.
        def paths_as_expected() -> str | None:
            world.poll(pool)
            wrong = [f"{e.src}->{e.dst}: {kind}" for e, kind in _path_results(world) if not e.holds(kind)]
            return ", ".join(wrong) or None

        with contextlib.suppress(DemoError):
            _until(
                min(deadline, time.monotonic() + PATH_SETTLE), "the expected path types", paths_as_expected
            )
        for n in world.nodes:
            kinds = {peer_name(p): path_type(p) for p in peers_of(n.status)}
            unknown = [k for k, v in kinds.items() if v in ("?", "", "none")]
            add(
                f"node {n.name} reports a path type for every peer",
                bool(kinds) and not unknown,
                ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) or n.status_error or "no peers",
            )
        for e, kind in _path_results(world):
            add(f"path {e.src} -> {e.dst} is {e.want} ({e.why})", e.holds(kind), kind)

        # Mesh DNS: every node's resolver answers every other node's name with that node's mesh IP.
        answers = pool.map(lambda n: world.resolve_all(n, deadline), world.nodes)
        for n, (ok, reason) in zip(world.nodes, answers, strict=True):
            add(f"node {n.name} resolves every peer's <name>.<mesh domain>", ok, reason)

        # The coordinator cluster, as the admin API reports it.
        world.poll_cluster()
        healthy = [m for m in world.cluster.get("members", []) if m.get("healthy")]
        add(
            "coordinator cluster: 3 healthy members and a leader",
            len(healthy) == 3 and bool(world.cluster.get("leaderId")),
            world.cluster_error or f"{len(healthy)} healthy, leader {world.leader_name()}",
        )
    return results


@dataclass(frozen=True, slots=True)
class PathExpectation:
    """What path a pair of demo nodes must end up on, and why (``dst="*"``: every peer of ``src``)."""

    src: str
    dst: str
    want: str  # "direct", "relayed", "relayed over WebSocket"
    why: str

    def holds(self, kind: str) -> bool:
        if self.want == "direct":
            return kind == "direct"
        if self.want == "relayed":
            return is_relay(kind)
        return is_relay(kind) and is_ws(kind)


PATH_EXPECTATIONS = (
    PathExpectation("office-a", "office-b", "direct", "same LAN"),
    PathExpectation("office-a", "home", "direct", "hole punched through two EIM NATs"),
    PathExpectation("sym-a", "sym-b", "relayed", "two symmetric NATs defeat hole punching"),
    PathExpectation("corp", "*", "relayed over WebSocket", "its firewall blocks UDP"),
)
PATH_SETTLE = 45.0  # seconds the checks wait for paths to settle after every pair answered a ping


def _path_results(world: DemoWorld) -> list[tuple[PathExpectation, str]]:
    by_name = {n.name: n for n in world.nodes}
    out = []
    for e in PATH_EXPECTATIONS:
        src = by_name.get(e.src)
        if src is None:
            continue
        peers = peers_of(src.status)
        if e.dst == "*":
            kinds = sorted({path_type(p) for p in peers}) or ["no peers"]
            out.append((e, "+".join(kinds)))
        else:
            out.append((e, next((path_type(p) for p in peers if peer_name(p) == e.dst), "no such peer")))
    return out


def render(world: DemoWorld) -> Any:
    """The live view: the coordinators (who leads), one row per node, and the path matrix (path type and RTT
    from each row's node to each column's node, red where the last ping failed)."""
    from rich.console import Group
    from rich.table import Table

    coords = Table(title="coordinators", expand=False)
    for col in ("name", "api", "role", "healthy"):
        coords.add_column(col)
    members = {str(m.get("info", {}).get("name", "")): m for m in world.cluster.get("members", [])}
    leader = str(world.cluster.get("leaderId", ""))
    for c in world.coords:
        m = members.get(c.name, {})
        role = "leader" if m and str(m.get("memberId")) == leader else ("member" if m else "?")
        running = c.proc is not None and c.proc.running
        coords.add_row(c.name, c.api, role if running else "stopped", "yes" if m.get("healthy") else "-")
    api_names = {c.api: c.name for c in world.coords}

    nodes = Table(title=f"nodes (up {time.monotonic() - world.started:.0f}s)", expand=False)
    for col in ("node", "site", "mesh ip", "coordinator", "peers", "rtt ms (median)", "pings ok"):
        nodes.add_column(col)
    matrix = Table(title="paths: from row to column (type, RTT ms)", expand=False)
    matrix.add_column("")
    for n in world.nodes:
        matrix.add_column(n.name)
    for n in world.nodes:
        peers = {peer_name(p): p for p in peers_of(n.status)}
        rtts = [r for r in (rtt_ms(p) for p in peers.values()) if r is not None]
        oks = [world.pings[k][0] for k in world.pings if k[0] == n.name]
        coord = (n.status.get("agent") or {}).get("coordinator") or {}
        nodes.add_row(
            n.name,
            n.site.label,
            mesh_ip_of(n.status) or "-",
            api_names.get(str(coord.get("address", "")), str(coord.get("address", "-"))),
            str(len(peers)) if not n.status_error else f"[red]{n.status_error[:40]}[/]",
            f"{statistics.median(rtts):.1f}" if rtts else "-",
            f"{sum(oks)}/{len(oks)}" if oks else "-",
        )
        cells = []
        for other in world.nodes:
            if other is n:
                cells.append("")
                continue
            peer = peers.get(other.name)
            if peer is None:
                cells.append("-")
                continue
            rtt = rtt_ms(peer)
            text = f"{path_type(peer)} {rtt:.0f}" if rtt is not None else path_type(peer)
            ping = world.pings.get((n.name, other.name))
            cells.append(f"[red]{text}[/]" if ping is not None and not ping[0] else text)
        matrix.add_row(n.name, *cells)
    footer = world.cluster_error[:200] if world.cluster_error else "Ctrl-C tears everything down."
    return Group(coords, nodes, matrix, footer)


# ------------------------------------------------------------------------------------------------------------
# Running it


@contextlib.contextmanager
def demo_world(work: Path, progress: Callable[[str], None]) -> Iterator[DemoWorld]:
    """Build the network; leaving the block stops every process and deletes every namespace."""
    work.mkdir(parents=True, exist_ok=True)
    with Lab(log_dir=work / "logs") as lab:
        world = DemoWorld(lab, work, progress=progress)
        world.build_network()
        yield world


def start_world(world: DemoWorld, deadline: float) -> None:
    world.start_coordinators(deadline)
    world.create_token()
    world.start_nodes()


def run_live(world: DemoWorld, refresh: float = 2.0) -> None:
    """Live table until Ctrl-C (the caller tears down). Pings all pairs every few refreshes."""
    from rich.live import Live

    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool,
        Live(render(world), refresh_per_second=2) as live,
    ):
        rounds = 0
        while True:
            world.poll(pool)
            if rounds % 3 == 0 and all(mesh_ip_of(n.status) for n in world.nodes):
                world.ping_all(pool, world.pairs())
            live.update(render(world))
            rounds += 1
            time.sleep(refresh)


# ------------------------------------------------------------------------------------------------------------
# `python -m tunnelmesh.demo ctl <op>`: one admin call, JSON in on stdin, JSON out on stdout


async def _ctl(op: str, args: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    from tunnelmesh.client import Client

    endpoints = [e for e in str(args["endpoints"]).split(",") if e]
    async with Client(endpoints, ca_pem=args["ca_pem"], token=args["token"], deadline=10.0) as c:
        if op == "cluster-status":
            return MessageToDict(await c.cluster_status())
        if op == "create-join-token":
            resp = await c.create_join_token(
                description="tunnelmesh demo",
                ttl=3600.0,
                reusable=True,
                max_uses=int(args.get("uses", 0)),
            )
            return {"secret": resp.secret, "token_id": resp.token.token_id}
    raise DemoError(f"unknown ctl op {op!r}")


def _main(argv: list[str]) -> int:
    import asyncio

    if len(argv) != 2 or argv[0] != "ctl":
        print(
            "usage: python -m tunnelmesh.demo ctl <cluster-status|create-join-token> < args.json",
            file=sys.stderr,
        )
        return 2
    try:
        args = json.loads(sys.stdin.read() or "{}")
        args["ca_pem"] = Path(args["ca"]).read_bytes()
        out = asyncio.run(_ctl(argv[1], args))
    except TunnelMeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
