"""The objects a lab is made of: LAN segments, the interfaces attaching nodes to them, and nodes
(hosts and routers), each node being one network namespace.

These classes only describe and act on what exists; `Lab` builds them (see lab.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tunnelmesh.netlab import namespace
from tunnelmesh.netlab.errors import NetlabError
from tunnelmesh.netlab.nft import NatMode
from tunnelmesh.netlab.process import Argv, Process, run_in

if TYPE_CHECKING:
    from tunnelmesh.netlab.lab import Lab

# TCP_LISTEN as /proc/net/tcp prints the socket state.
_TCP_LISTEN = "0A"


@dataclass(eq=False)
class Interface:
    """One node's attachment to one LAN: `ifname` inside the node, `port` on the LAN's bridge."""

    node: Node
    lan: Lan
    ifname: str
    port: str
    ip: str

    def __repr__(self) -> str:
        where = f"{self.node.name}/{self.ifname}"
        return f"<Interface {where} {self.ip}/{self.lan.subnet.prefixlen} on {self.lan.name}>"


@dataclass(frozen=True, slots=True)
class Route:
    """`subnet` is reachable via `via` for every node on a LAN except `owner` (the router that is `via`)."""

    subnet: ipaddress.IPv4Network
    via: str
    owner: Node


@dataclass(eq=False)
class Lan:
    """A broadcast segment (a bridge in the lab's switch namespace) with one IPv4 subnet.

    The subnet's first address is kept for the LAN's router (`gateway_ip`); hosts get the next free ones.
    """

    name: str
    subnet: ipaddress.IPv4Network
    bridge: str
    mtu: int
    gateway: Router | None = None
    interfaces: list[Interface] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    _used: set[ipaddress.IPv4Address] = field(default_factory=set)

    def __repr__(self) -> str:
        return f"<Lan {self.name} {self.subnet}>"

    @property
    def gateway_ip(self) -> str:
        return str(next(self.subnet.hosts()))

    @property
    def nodes(self) -> list[Node]:
        return [iface.node for iface in self.interfaces]

    def allocate(self, ip: str | None, *, for_gateway: bool = False) -> str:
        if ip is None and not for_gateway:
            reserved = ipaddress.IPv4Address(self.gateway_ip)
            for candidate in self.subnet.hosts():
                if candidate != reserved and candidate not in self._used:
                    self._used.add(candidate)
                    return str(candidate)
            raise NetlabError(f"LAN {self.name} ({self.subnet}) has no free address left")
        try:
            addr = ipaddress.IPv4Address(self.gateway_ip if ip is None else ip)
        except ValueError as exc:
            raise NetlabError(f"{ip!r} is not an IPv4 address") from exc
        if addr not in self.subnet or addr in (self.subnet.network_address, self.subnet.broadcast_address):
            raise NetlabError(f"{addr} is not a usable host address of LAN {self.name} ({self.subnet})")
        if addr in self._used:
            raise NetlabError(f"{addr} is already taken on LAN {self.name}")
        self._used.add(addr)
        return str(addr)

    def release(self, ip: str) -> None:
        self._used.discard(ipaddress.IPv4Address(ip))


class Node:
    """A machine in the lab: one network namespace with interfaces on LANs.

    Run commands in it (`run`, `spawn`) or act from Python inside it (`enter`, `socket`).
    """

    kind = "node"

    def __init__(self, lab: Lab, name: str, netns: str):
        self.lab = lab
        self.name = name
        self.netns = netns
        self.interfaces: list[Interface] = []
        self.has_default_route = False

    def __repr__(self) -> str:
        addrs = ",".join(i.ip for i in self.interfaces) or "no address"
        return f"<{type(self).__name__} {self.name} {addrs} netns={self.netns}>"

    @property
    def ip(self) -> str:
        """The address of the first interface (the only one, for most hosts)."""
        if not self.interfaces:
            raise NetlabError(f"{self.kind} {self.name} is not attached to any LAN, so it has no address")
        return self.interfaces[0].ip

    @property
    def ips(self) -> list[str]:
        return [iface.ip for iface in self.interfaces]

    def interface_on(self, lan: Lan) -> Interface:
        for iface in self.interfaces:
            if iface.lan is lan:
                return iface
        raise NetlabError(f"{self.kind} {self.name} has no interface on LAN {lan.name}")

    def ip_on(self, lan: Lan) -> str:
        return self.interface_on(lan).ip

    def add_ipv6(self, address: str, lan: Lan | None = None) -> None:
        """Give the interface on `lan` (the first one by default) IPv6 `address`, e.g. "fd00:1::2/64".

        Netlab is IPv4-only (new interfaces start with IPv6 off); this turns it on for that interface, with
        duplicate address detection off so `address` and the link-local fe80:: one are usable at once.
        """
        if not self.interfaces:
            raise NetlabError(f"{self.kind} {self.name} is not attached to any LAN")
        iface = self.interfaces[0] if lan is None else self.interface_on(lan)
        with self.enter():
            namespace.write_sysctl(f"net.ipv6.conf.{iface.ifname}.accept_dad", "0")
            namespace.write_sysctl(f"net.ipv6.conf.{iface.ifname}.disable_ipv6", "0")
        self.run(["ip", "-6", "addr", "add", address, "dev", iface.ifname, "nodad"])

    # -- running things inside -------------------------------------------------------------------------

    def run(
        self,
        argv: Argv,
        *,
        timeout: float = 10.0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command here and wait (at most `timeout` s) for it; output is captured as text.

        With `check` (the default) a non-zero exit raises `NetlabError` quoting the command and its stderr.
        A string command is split shell-style; no shell runs.
        """
        return run_in(self.netns, argv, timeout=timeout, check=check, input=input, env=env, where=self.name)

    def spawn(
        self,
        argv: Argv,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> Process:
        """Start a long-running command here; stdout and stderr go to `<log_dir>/<node>-<name>.log`.

        The lab stops it when it closes, if it has not been stopped before.
        """
        return self.lab._spawn(self, argv, name=name, env=env, cwd=cwd)

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """Run the block with the current thread (only) inside this node's network namespace.

        Sockets created in the block belong to the node for their whole life. Other threads are not
        affected, but threads started inside the block are born in the namespace. Do not `await` inside:
        other asyncio tasks would run in the namespace too.
        """
        self.lab._check_open()
        with namespace.entered(self.netns):
            yield

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
    ) -> socket.socket:
        """A socket living in this node's namespace (UDP over IPv4 unless told otherwise)."""
        with self.enter():
            return socket.socket(family, type, proto)

    def wait_listening(
        self, port: int, *, proto: Literal["tcp", "udp"] = "tcp", timeout: float = 5.0
    ) -> None:
        """Wait until something here listens on TCP `port` (or has UDP `port` bound), at most `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            with self.enter():
                tables = [_read_proc_net(f"{proto}{v}") for v in ("", "6")]
            for line in (row for table in tables for row in table):
                local, state = line[1], line[3]
                # Any bound UDP socket counts (connected ones too); for TCP only a listener.
                if (proto == "udp" or state == _TCP_LISTEN) and int(local.rsplit(":", 1)[1], 16) == port:
                    return
            if time.monotonic() >= deadline:
                raise NetlabError(f"nothing listens on {proto} port {port} on {self.name} after {timeout:g}s")
            time.sleep(0.02)


def _read_proc_net(table: str) -> list[list[str]]:
    # /proc/thread-self/net follows the calling thread's namespace (/proc/self/net follows the main thread).
    try:
        text = Path(f"/proc/thread-self/net/{table}").read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines()[1:]]


class Host(Node):
    """An end system: gets its LAN's router as default gateway."""

    kind = "host"


class Router(Node):
    """Forwards between a WAN and a LAN, optionally with NAT; it is the LAN's gateway at `lan.gateway_ip`."""

    kind = "router"

    def __init__(self, lab: Lab, name: str, netns: str, nat: NatMode | None):
        super().__init__(lab, name, netns)
        self.nat = nat
        self.wan: Lan | None = None
        self.lan: Lan | None = None

    @property
    def wan_ip(self) -> str:
        if self.wan is None:
            raise NetlabError(f"router {self.name} has no WAN interface yet")
        return self.ip_on(self.wan)

    @property
    def lan_ip(self) -> str:
        if self.lan is None:
            raise NetlabError(f"router {self.name} has no LAN interface yet")
        return self.ip_on(self.lan)
