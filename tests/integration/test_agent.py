"""The node agent for real: a `tunnelmesh coord --bootstrap` process and `tunnelmesh join` processes, each in
its own netlab namespace with its own TUN device, driven only through the CLI a user has.

What a user observes: every node pings every other over the mesh addresses; a node that joins later is in
everyone's config within a second or two (measured from the agents' logs) and reachable; a removed node
disappears from every peer list and its own agent stops with a clear message; with the coordinator killed
(kill -9) the mesh keeps forwarding, a restarted agent forwards from its cached config, `tunnelmesh status`
says "none: using cached config"; when the coordinator returns every agent re-syncs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.coordlab import Coord, CoordLab, coord_argv
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.netlab import Host, Lab, NetlabError, Process
from tunnelmesh.node import control

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.timeout(300),
]

_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SCRAPE = (
    "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9465/metrics', timeout=9).read().decode())"
)
CONFIG_REACH_MARGIN = 5.0  # seconds; the issue asks for 1 s, measured and printed, asserted with a margin


@dataclass
class Node:
    name: str
    host: Host
    state_dir: Path
    iface: str
    env: dict[str, str]
    proc: Process | None = None
    starts: int = 0

    def join(self, coordinators: str, token: str) -> Process:
        self.starts += 1
        argv = coord_argv(
            "join",
            coordinators,
            "--name",
            self.name,
            "--state-dir",
            str(self.state_dir),
            *self._daemon_flags(),
        )
        self.proc = self.host.spawn(
            argv, name=f"join{self.starts}", env={**self.env, "TUNNELMESH_JOIN_TOKEN": token}
        )
        return self.proc

    def restart(self, env: dict[str, str] | None = None) -> Process:
        self.starts += 1
        argv = coord_argv("node", "--state-dir", str(self.state_dir), *self._daemon_flags())
        self.proc = self.host.spawn(argv, name=f"node{self.starts}", env={**self.env, **(env or {})})
        return self.proc

    def _daemon_flags(self) -> list[str]:
        return ["--interface", self.iface, "--heartbeat-timeout", "30", "--retry-max", "1"]

    def resolve(self, name: str) -> str:
        """Ask this node's mesh DNS resolver (on its mesh address, port 53) with dig, a real DNS client."""
        domain = json.loads((self.state_dir / "node.json").read_text())["mesh_domain"]
        r = self.host.run(
            ["dig", "+short", "+time=2", "+tries=1", f"@{self.mesh_ip()}", f"{name}.{domain}", "A"]
        )
        return r.stdout.strip()

    def status(self) -> dict[str, Any]:
        """What `tunnelmesh status --json` prints, read from the daemon's socket directly: polling through a
        fresh CLI process each time would be slow on a loaded machine (`status_cli` checks the CLI)."""
        return control.request(self.iface, "show")["status"]  # type: ignore[no-any-return]

    def status_cli(self) -> dict[str, Any]:
        r = self.host.run(coord_argv("status", "--interface", self.iface, "--json"), env=self.env, timeout=30)
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def status_text(self) -> str:
        return self.host.run(coord_argv("status", "--interface", self.iface), env=self.env, timeout=30).stdout

    def mesh_ip(self) -> str:
        state = json.loads((self.state_dir / "node.json").read_text())
        return str(state["mesh_addresses"][0]).split("/")[0]

    def peers(self) -> dict[str, dict[str, Any]]:
        return {p.get("name"): p for p in self.status().get("peers", [])}

    def peer_names(self) -> set[str]:
        return set(self.peers())

    def log(self) -> str:
        return self.proc.log_text() if self.proc is not None else ""


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (TunnelMeshError, KeyError, ValueError, json.JSONDecodeError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else "")
    )


def ping(host: Host, ip: str, *, count: int = 1, deadline: float = 15.0) -> None:
    """Ping until one reply (a fresh peer needs a handshake first), within ``deadline``."""
    end = time.monotonic() + deadline
    while True:
        r = host.run(["ping", "-c", str(count), "-W", "1", "-i", "0.2", ip], check=False, timeout=count + 5)
        if r.returncode == 0:
            return
        if time.monotonic() > end:
            raise AssertionError(f"{host.name} cannot ping {ip}: {r.stdout}{r.stderr}")


def ping_all_replies(host: Host, ip: str, count: int = 10) -> None:
    """Every one of ``count`` pings answered: nothing interrupted the data plane."""
    r = host.run(["ping", "-c", str(count), "-W", "2", "-i", "0.2", ip], check=False, timeout=count + 10)
    assert f"{count} received" in r.stdout, f"{host.name} -> {ip} lost packets:\n{r.stdout}{r.stderr}"


def log_times(text: str, pattern: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if re.search(pattern, line):
            m = _LOG_TS.match(line)
            if m:
                out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


@dataclass
class World:
    lab: Lab
    cl: CoordLab
    coord: Coord
    nodes: dict[str, Node]
    env: dict[str, str]
    tmp: Path

    def admin(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return self.coord.host.run(
            coord_argv(*args, "--data-dir", str(self.coord.data_dir)),
            env={**self.env, **self.cl.client_env()},
            timeout=timeout,
        )

    def join_token(self) -> str:
        last = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = self.admin("tokens", "create", "--reusable", "--max-uses", "20", "--ttl", "1h", "-q")
                return r.stdout.strip().splitlines()[-1]
            except NetlabError as exc:  # no leader / mesh not initialized yet
                last = str(exc)
                time.sleep(0.5)
        raise AssertionError(f"cannot create a join token: {last}")

    def node(self, name: str) -> Node:
        host = self.lab.host(name, self.cl.lan)
        n = Node(name, host, self.tmp / f"state-{name}", f"tm{self.lab.id}{name}", self.env)
        self.nodes[name] = n
        return n


@contextlib.contextmanager
def build_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinators: int) -> Iterator[World]:
    env = {
        "TUNNELMESH_RUN_DIR": str(tmp_path / "run"),
        "TUNNELMESH_PROFILE": str(tmp_path / "no-profile.json"),
    }
    monkeypatch.setenv("TUNNELMESH_RUN_DIR", env["TUNNELMESH_RUN_DIR"])
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        if coordinators == 1:
            coord = cl.add()
            coord.start("--bootstrap")
            coord.wait_serving(timeout=30)
        else:
            coord = cl.start_cluster(coordinators, timeout=60)[0]
        w = World(lab, cl, coord, {}, env, tmp_path)
        try:
            yield w
        finally:
            for n in w.nodes.values():
                if n.proc is not None and n.proc.running:
                    n.proc.stop()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with build_world(tmp_path, monkeypatch, 1) as w:
        yield w


def test_agents_build_the_mesh_follow_changes_and_survive_the_coordinator(
    world: World, tmp_path: Path
) -> None:
    token = world.join_token()
    coords = world.coord.api
    a, b = world.node("a"), world.node("b")

    # Bad tokens: a clear error, exit 1, and nothing written (no key, no state directory).
    tid, _secret, pin = token.removeprefix("tmj_").split("_")
    bad = {
        "garbage": ("tmj_nope", "malformed join token"),
        "wrong CA pin": (f"tmj_{tid}_{'0' * 40}_{'ab' * 32}", "pinned CA fingerprint"),
        "wrong secret": (f"tmj_{tid}_{'0' * 40}_{pin}", "UNAUTHENTICATED"),
    }
    for what, (text, message) in bad.items():
        r = a.host.run(
            coord_argv("join", coords, "--no-start", "--state-dir", str(a.state_dir)),
            env={**a.env, "TUNNELMESH_JOIN_TOKEN": text},
            check=False,
            timeout=60,
        )
        assert r.returncode == 1 and message in r.stderr, f"{what}: {r.returncode} {r.stderr[-1500:]}"
        assert not a.state_dir.exists(), f"{what}: a refused join left {list(a.state_dir.iterdir())}"
    for n in (a, b):
        n.join(coords, token)
    for n in (a, b):
        assert n.proc is not None
        n.proc.wait_for_log(r"event=watch_connected", timeout=30)
    wait_until(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 20, "a and b to see each other")
    ip = {n.name: n.mesh_ip() for n in (a, b)}
    assert ip["a"] != ip["b"] and ip["a"].startswith("100.")
    ping(a.host, ip["b"])
    ping(b.host, ip["a"])

    # A node that joins later reaches everyone's config quickly, and everyone can reach it.
    c = world.node("c")
    c.join(coords, token)
    assert c.proc is not None
    c.proc.wait_for_log(r"event=node_registered", timeout=30)
    wait_until(lambda: "c" in a.peer_names() and "c" in b.peer_names(), 15, "a and b to learn about c")
    registered = log_times(c.log(), r"event=register_sent")[-1]
    for n in (a, b):
        seen = [t for t in log_times(n.log(), r"event=config_applied .*peers=2") if t >= registered - 1]
        assert seen, f"{n.name} never applied a config with c:\n{n.log()[-3000:]}"
        lag = seen[0] - registered
        print(f"config reach: {n.name} applied c's registration {lag * 1000:.0f} ms after c sent Register")
        assert lag < CONFIG_REACH_MARGIN, f"{n.name} learned about c only after {lag:.2f} s"
    ip["c"] = c.mesh_ip()
    for src in (a, b, c):
        for dst in ("a", "b", "c"):
            if dst != src.name:
                ping(src.host, ip[dst])
    wait_until(lambda: a.peers()["b"]["path_type"] == "direct", 20, "a's path to b to be measured as direct")
    metrics = a.host.run([sys.executable, "-c", SCRAPE], timeout=30).stdout
    agent_metrics = "\n".join(m for m in metrics.splitlines() if m.startswith("tunnelmesh_agent"))
    version = a.status()["agent"]["config_version"]
    assert f"tunnelmesh_agent_config_version {float(version)}" in metrics, agent_metrics
    assert f'tunnelmesh_agent_coordinator_connected{{coordinator="{coords}"}} 1.0' in metrics
    assert re.search(
        r'tunnelmesh_agent_peer_path\{name="b",path_type="direct",peer="[^"]+"\} 1.0', metrics
    ), agent_metrics
    assert "tunnelmesh_dataplane_peer_rx_bytes_total" in metrics
    again = a.host.run(
        coord_argv("join", coords, "--no-start", "--state-dir", str(a.state_dir)),
        env={**a.env, "TUNNELMESH_JOIN_TOKEN": token},
        check=False,
        timeout=60,
    )
    assert again.returncode == 1 and "already joined and its daemon is running" in again.stderr, again.stderr
    text = a.status_text()
    print(text)
    wait_until(lambda: a.resolve("c") == ip["c"], 10, "a's mesh DNS to answer for c")
    assert a.resolve("b") == ip["b"] and a.resolve("nobody") == ""
    assert "coordinator: " + coords in text and "direct" in text and "RX LOSS" in text, text
    cli = a.status_cli()
    rows = {p["name"]: p for p in cli["peers"]}
    assert set(rows) == {"b", "c"} and rows["b"]["mesh_ips"] == [ip["b"]], cli
    assert rows["b"]["path_type"] == "direct" and rows["b"]["latest_handshake"], rows["b"]
    assert rows["b"]["rx_lost"] == 0, rows["b"]  # a clean LAN

    # Removing c (admin API) removes it from every peer list; c's agent stops and says why.
    world.admin("nodes", "remove", "c")
    wait_until(lambda: "c" not in a.peer_names() and "c" not in b.peer_names(), 15, "c to disappear")
    wait_until(lambda: a.resolve("c") == "", 10, "c's name to disappear from a's mesh DNS")
    c.proc.wait(30)
    assert c.proc.returncode == 1
    assert "removed from the mesh" in c.log(), c.log()[-2000:]
    assert not (c.state_dir / "config.pb").exists()

    # Every coordinator down: the mesh keeps forwarding, even for an agent restarted meanwhile.
    version = a.status()["agent"]["config_version"]
    world.coord.kill()
    ping_all_replies(a.host, ip["b"])
    wait_until(lambda: a.status()["agent"]["coordinator"] is None, 20, "a to notice the coordinator is gone")
    assert f"none: using cached config v{version}" in a.status_text()
    assert b.proc is not None
    b.proc.stop()
    # Under systemd (Type=notify) the restarted agent reports itself started without any coordinator: its
    # interface forwards with the cached config.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(30)
        b.restart(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"})
        ready = dict(line.split("=", 1) for line in manager.recv(4096).decode().split("\n"))
        assert manager.recv(4096) == b"WATCHDOG=1"  # WatchdogSec=2: pinged from the agent's event loop
    assert ready["READY"] == "1" and f"up on {b.iface}: mesh address {ip['b']}" in ready["STATUS"], ready
    assert "event=cached_config_applied" in b.log()  # before READY: started means forwarding
    ping(b.host, ip["a"], deadline=20)
    ping_all_replies(b.host, ip["a"])

    # The coordinator returns: both agents re-sync (resume from their version) and changes flow again.
    world.coord.start()
    world.coord.wait_serving(timeout=30)
    wait_until(
        lambda: all(n.status()["agent"]["coordinator"] is not None for n in (a, b)), 30, "agents to reconnect"
    )
    d = world.node("d")
    d.join(coords, world.join_token())
    wait_until(lambda: "d" in a.peer_names() and "d" in b.peer_names(), 20, "a and b to learn about d")
    ip["d"] = d.mesh_ip()
    ping(d.host, ip["a"])
    ping(b.host, ip["d"])


def test_config_streams_fail_over_between_coordinators_without_interrupting_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with build_world(tmp_path, monkeypatch, 3) as world:
        token = world.join_token()
        coords = ",".join(c.api for c in world.cl.coords)
        a, b = world.node("a"), world.node("b")
        a.join(world.coord.api, token)  # a learns the other coordinators from its config
        b.join(coords, token)
        wait_until(
            lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 30, "a and b to see each other"
        )
        ip = {n.name: n.mesh_ip() for n in (a, b)}
        ping(a.host, ip["b"])
        listed = a.status()["agent"]["coordinators"]
        assert sorted(listed) == sorted(c.api for c in world.cl.coords), listed
        joined_with = json.loads((a.state_dir / "node.json").read_text())["coordinators"]
        assert sorted(joined_with) == sorted(listed), joined_with  # kept for a restart

        # Kill (-9) the coordinator a streams from: traffic does not notice, a's stream resumes elsewhere.
        serving = a.status()["agent"]["coordinator"]["address"]
        victim = next(c for c in world.cl.coords if c.api == serving)
        version = a.status()["agent"]["config_version"]
        pinger = a.host.spawn(["ping", "-c", "25", "-i", "0.2", "-W", "2", ip["b"]], name="ping-failover")
        time.sleep(1.0)
        victim.kill()
        wait_until(
            lambda: (a.status()["agent"]["coordinator"] or {}).get("address") not in (None, serving),
            30,
            "a's config stream to resume on another coordinator",
        )
        wait_until(
            lambda: (b.status()["agent"]["coordinator"] or {}).get("address") not in (None, victim.api),
            30,
            "b's config stream to run on a live coordinator",
        )
        pinger.wait(30)
        assert pinger.returncode == 0 and "25 received" in pinger.log_text(), pinger.log_text()
        assert a.status()["agent"]["config_version"] >= version
        now_serving = a.status()["agent"]["coordinator"]["address"]
        resumed = re.findall(
            rf"event=watch_start coordinator={re.escape(now_serving)} resume_from_version=(\d+)", a.log()
        )
        assert resumed and int(resumed[0]) >= version > 0, a.log()[-3000:]  # resumed, not a fresh snapshot

        # Changes still reach every node through the surviving coordinators.
        c = world.node("c")
        c.join(coords, token)
        wait_until(lambda: "c" in a.peer_names() and "c" in b.peer_names(), 30, "a and b to learn about c")
        ping(c.host, ip["a"])
        ping(b.host, c.mesh_ip())
