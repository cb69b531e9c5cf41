"""Shared pieces of the data plane interop tests: keys, processes and byte-exact TCP transfers in a netlab.

TunnelMesh nodes run as real ``python -m tunnelmesh.cli.dataplane_cmd up --config FILE`` processes (the
`tunnelmesh dataplane up` command) inside netlab hosts; the tests read their state through the control socket
(``show --json``) exactly as a user would; tests of the Python API itself (live peer changes, status,
metrics, sockets) drive an in-process ``Engine`` instead. ``wireguard-go`` runs in the foreground (``-f``)
and is configured with ``wg``; interface names carry the lab id because its control socket path is global.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.public
from prometheus_client import CollectorRegistry

from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.process import Process
from tunnelmesh.netlab.topology import Host, Node
from tunnelmesh.node.dataplane import WARM_TICK, DataPlane, InterfaceConfig, PeerConfig, PeerStatus

ROOT = Path(__file__).resolve().parents[2]
WG_PORT = 51820

# A TCP sink that prints the SHA-256 and size of everything it received, and a source that sends N seeded
# pseudo-random bytes and prints the same digest of what it sent.
TCP_TOOL = textwrap.dedent(
    """
    import hashlib, random, socket, sys
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    h = hashlib.sha256(); n = 0
    if mode == "sink":
        srv = socket.create_server((host, port)); srv.settimeout(60)
        conn, _ = srv.accept(); conn.settimeout(60)
        while chunk := conn.recv(1 << 20):
            h.update(chunk); n += len(chunk)
    else:
        size, seed, pace = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
        rng = random.Random(seed)
        conn = socket.create_connection((host, port), timeout=60)
        import time
        while n < size:
            chunk = rng.randbytes(min(1 << 16, size - n))
            conn.sendall(chunk); h.update(chunk); n += len(chunk)
            if pace: time.sleep(pace)
        conn.shutdown(socket.SHUT_WR); conn.recv(1)
    conn.close()
    print(n, h.hexdigest(), flush=True)
    """
)


def genkey() -> tuple[str, str]:
    key = subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    pub = subprocess.run(
        ["wg", "pubkey"], input=key, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    return key, pub


def genpsk() -> str:
    return subprocess.run(
        ["wg", "genpsk"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


@dataclass
class PeerSpec:
    public_key: str
    allowed_ips: str
    endpoint: str | None = None
    psk: str | None = None
    keepalive: int = 0


def wg_quick_text(
    private_key: str, address: str, peers: list[PeerSpec], port: int = WG_PORT, interface: Sequence[str] = ()
) -> str:
    """A wg-quick file; ``interface``: more ``Key = Value`` lines for [Interface] (``Table = off``, ...)."""
    lines = ["[Interface]", f"PrivateKey = {private_key}", f"ListenPort = {port}", f"Address = {address}"]
    lines += [*interface, ""]
    for p in peers:
        lines += ["[Peer]", f"PublicKey = {p.public_key}", f"AllowedIPs = {p.allowed_ips}"]
        if p.endpoint:
            lines.append(f"Endpoint = {p.endpoint}")
        if p.psk:
            lines.append(f"PresharedKey = {p.psk}")
        if p.keepalive:
            lines.append(f"PersistentKeepalive = {p.keepalive}")
        lines.append("")
    return "\n".join(lines)


class Engine:
    """A data plane in this process, in netlab ``host``'s namespace, driven through its Python API (as the
    node agent does). TUN address ``tun_ip``/24, UDP port ``listen_port``, metrics in its own ``registry``."""

    def __init__(
        self,
        host: Host,
        name: str,
        lab_id: str,
        tun_ip: str,
        *,
        offloads: bool = True,
        listen_host: str | None = None,
        listen_port: int = WG_PORT,
        warm_tick: float = WARM_TICK,
    ) -> None:
        self.host, self.name, self.tun_ip = host, name, tun_ip
        self.key = nacl.public.PrivateKey.generate()
        self.public = bytes(self.key.public_key)
        self.registry = CollectorRegistry()
        self.plane = DataPlane(
            InterfaceConfig(
                private_key=bytes(self.key),
                name=f"tm{lab_id}{name}",  # unique per lab, as wireguard-go's would need
                listen_port=listen_port,
                addresses=(f"{tun_ip}/24",),
                offloads=offloads,
                listen_host=listen_host,
                warm_tick=warm_tick,
            ),
            registry=self.registry,
        )

    def start(self) -> None:
        with self.host.enter():
            self.plane.start()

    @property
    def lan_endpoint(self) -> tuple[str, int]:
        return (self.host.ip, self.plane.config.listen_port)

    def as_peer(self, endpoint: tuple[str, int] | None) -> PeerConfig:
        """This engine as another's peer: its TUN address as allowed IP, reached at ``endpoint`` (None: learnt
        from its packets)."""
        return PeerConfig(self.public, allowed_ips=(f"{self.tun_ip}/32",), endpoint=endpoint)

    def add_peer(self, cfg: PeerConfig) -> None:
        with self.host.enter():  # routes go in through netlink in the caller's namespace
            self.plane.add_peer(cfg)

    def peer(self, other: Engine) -> PeerStatus:
        (found,) = [p for p in self.plane.peers() if p.public_key == other.public]
        return found


class TmNode:
    """A `tunnelmesh dataplane up` process on a netlab host."""

    def __init__(self, host: Host, iface: str, workdir: Path, run_dir: Path) -> None:
        self.host, self.iface, self.workdir, self.run_dir = host, iface, workdir, run_dir
        self.key, self.pub = genkey()
        self.proc: Process | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"TUNNELMESH_RUN_DIR": str(self.run_dir), "PYTHONPATH": str(ROOT)}

    def up(
        self,
        address: str,
        peers: list[PeerSpec],
        port: int = WG_PORT,
        interface: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        conf = self.workdir / f"{self.iface}.conf"
        conf.write_text(wg_quick_text(self.key, address, peers, port, interface))
        conf.chmod(0o600)
        self.proc = self.host.spawn(
            [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf), *args],
            name=f"tm-{self.iface}-{time.monotonic_ns()}",
            env=self.env,
        )
        self.proc.wait_for_log(r"interface \S+ up", timeout=20)

    def cli(self, *args: str, timeout: float = 15) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", *args],
            env={**self.env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise AssertionError(f"dataplane {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def show(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.cli("show", "--json", self.iface))
        return status

    def peer(self, public_key: str) -> dict[str, Any]:
        for p in self.show()["peers"]:
            if p["public_key"] == public_key:
                return dict(p)
        raise AssertionError(f"{self.iface} has no peer {public_key[:8]}")

    def down(self) -> None:
        if self.proc is not None and self.proc.running:
            self.cli("down", self.iface)
            self.proc.wait(10)


class WgGoNode:
    """A Debian wireguard-go interface on a netlab host, configured with `wg`."""

    def __init__(self, host: Host, iface: str, workdir: Path) -> None:
        self.host, self.iface, self.workdir = host, iface, workdir
        self.key, self.pub = genkey()
        self.proc: Process | None = None
        self._address = ""
        self._peers: list[PeerSpec] = []

    def up(self, address: str, peers: list[PeerSpec]) -> None:
        self._address, self._peers = address, peers
        self.proc = self.host.spawn(["wireguard-go", "-f", self.iface], name=f"wggo-{time.monotonic_ns()}")
        deadline = time.monotonic() + 10
        while self.host.run(["ip", "link", "show", self.iface], check=False).returncode != 0:
            assert time.monotonic() < deadline, f"wireguard-go did not create {self.iface}"
            time.sleep(0.05)
        keyfile = self.workdir / f"{self.iface}.key"
        keyfile.write_text(self.key + "\n")
        keyfile.chmod(0o600)
        self.host.run(["wg", "set", self.iface, "private-key", str(keyfile), "listen-port", str(WG_PORT)])
        for p in peers:
            argv = ["wg", "set", self.iface, "peer", p.public_key, "allowed-ips", p.allowed_ips]
            if p.endpoint:
                argv += ["endpoint", p.endpoint]
            if p.psk:
                pskfile = self.workdir / f"{self.iface}.psk"
                pskfile.write_text(p.psk + "\n")
                pskfile.chmod(0o600)
                argv += ["preshared-key", str(pskfile)]
            self.host.run(argv)
        self.host.run(["ip", "addr", "add", address, "dev", self.iface])
        self.host.run(["ip", "link", "set", self.iface, "mtu", "1420", "up"])

    def restart(self) -> None:
        assert self.proc is not None
        self.proc.stop()
        deadline = time.monotonic() + 10
        while self.host.run(["ip", "link", "show", self.iface], check=False).returncode == 0:
            assert time.monotonic() < deadline, f"{self.iface} did not go away"
            time.sleep(0.05)
        self.up(self._address, self._peers)

    def latest_handshake(self) -> int:
        out = self.host.run(["wg", "show", self.iface, "latest-handshakes"]).stdout.split()
        return int(out[1]) if len(out) >= 2 else 0


def ping(host: Node, dst: str, count: int = 3, deadline: float = 10) -> None:
    host.run(["ping", "-c", str(count), "-i", "0.2", "-w", str(int(deadline)), dst], timeout=deadline + 5)


def tcp_transfer(
    lab: Lab, src: Host, dst: Host, dst_ip: str, size: int, *, pace: float = 0.0, port: int = 7001
) -> None:
    """Send ``size`` seeded random bytes from ``src`` to ``dst_ip`` on ``dst``; assert they arrive intact."""
    tool = Path(lab.log_dir) / "tcp_tool.py"
    tool.write_text(TCP_TOOL)
    sink = dst.spawn(
        [sys.executable, str(tool), "sink", "0.0.0.0", str(port)], name=f"sink-{time.monotonic_ns()}"
    )
    dst.wait_listening(port, timeout=10)
    sent = src.run(
        [sys.executable, str(tool), "source", dst_ip, str(port), str(size), "7", str(pace)], timeout=90
    ).stdout.split()
    sink.wait(30)
    received = sink.log_text().split()
    assert received[-2:] == sent, f"sent {sent}, received {received[-2:]}"
    assert int(sent[0]) == size
