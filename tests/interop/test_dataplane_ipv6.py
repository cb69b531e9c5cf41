"""IPv6 endpoints: the data plane's one dual-stack UDP socket serves IPv4 and IPv6 peers on the same port.

A netlab LAN whose hosts also have IPv6 addresses (``Node.add_ipv6``). Against Debian's wireguard-go + wg,
both sides configured with ``[v6]:port`` endpoints, each initiating in turn. Between TunnelMesh engines, one
hub with a peer configured by its IPv4 endpoint and another by its IPv6 endpoint: traffic flows both ways,
``peers()`` reports the IPv4 peer as plain ``a.b.c.d`` (not ``::ffff:a.b.c.d``), so nobody "roams" to the
address they were configured with; and a peer whose packets switch from IPv4 to IPv6 mid-stream is followed
without losing its TCP stream.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.dataplane_helpers import WG_PORT, Engine, PeerSpec, TmNode, WgGoNode, ping, tcp_transfer
from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.topology import Host

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates network namespaces and runs wireguard-go"
    ),
    pytest.mark.timeout(120),
]

SUBNET, SUBNET6 = "10.76.0.0/24", "fd00:76::/64"
TUN = {"a": "10.77.0.1", "b": "10.77.0.2", "c": "10.77.0.3"}


def ip6(n: int) -> str:
    return f"fd00:76::{n}"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab


def dual_stack_hosts(lab: Lab, *names: str) -> dict[str, Host]:
    lan = lab.lan("l", SUBNET)
    hosts = {name: lab.host(name, lan) for name in names}
    for i, h in enumerate(hosts.values(), start=1):
        h.add_ipv6(f"{ip6(i)}/64")
    return hosts


@pytest.mark.parametrize(
    "tm_initiates", [True, False], ids=["tunnelmesh-initiates", "wireguard-go-initiates"]
)
def test_wireguard_go_over_ipv6_endpoints(lab: Lab, tmp_path: Path, tm_initiates: bool) -> None:
    hosts = dual_stack_hosts(lab, "tm", "wg")
    tm = TmNode(hosts["tm"], f"tm{lab.id}", tmp_path, tmp_path / "run")
    wgo = WgGoNode(hosts["wg"], f"wg{lab.id}", tmp_path)
    tm_ep, wg_ep = f"[{ip6(1)}]:{WG_PORT}", f"[{ip6(2)}]:{WG_PORT}"
    wgo.up(f"{TUN['b']}/24", [PeerSpec(tm.pub, f"{TUN['a']}/32", None if tm_initiates else tm_ep)])
    tm.up(f"{TUN['a']}/24", [PeerSpec(wgo.pub, f"{TUN['b']}/32", wg_ep if tm_initiates else None)])
    initiator, responder = (tm.host, wgo.host) if tm_initiates else (wgo.host, tm.host)
    ping(initiator, TUN["b"] if tm_initiates else TUN["a"])
    ping(responder, TUN["a"] if tm_initiates else TUN["b"])
    peer = tm.peer(wgo.pub)
    assert peer["handshakes"] >= 1 and wgo.latest_handshake() > 0
    assert peer["endpoint"] == wg_ep  # learned from (or kept through) the authenticated handshake
    assert f"endpoint: {wg_ep}" in tm.cli("show", tm.iface)  # like `wg show`: brackets around IPv6
    # wireguard-go saw us at our IPv6 address too: its own view of the endpoint.
    assert wgo.host.run(["wg", "show", wgo.iface, "endpoints"]).stdout.split()[1] == tm_ep
    tcp_transfer(lab, tm.host, wgo.host, TUN["b"], 2 * 1024 * 1024)


@pytest.fixture
def engines(lab: Lab) -> Iterator[dict[str, Engine]]:
    hosts = dual_stack_hosts(lab, "a", "b", "c")
    made = {name: Engine(h, name, lab.id, TUN[name]) for name, h in hosts.items()}
    try:
        for e in made.values():
            e.start()
        yield made
    finally:
        for e in made.values():
            e.plane.stop()


def test_one_socket_serves_ipv4_and_ipv6_peers(
    engines: dict[str, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    """a knows b by its IPv4 endpoint and c by its IPv6 one; b and c know a the same way. Nobody's endpoint
    moves: a's packets from b arrive (on the dual-stack socket) as b's plain IPv4 address."""
    a, b, c = engines["a"], engines["b"], engines["c"]
    assert a.plane.udp is not None and a.plane.udp.local_address[0] == "::"
    b4, c6 = (b.host.ip, WG_PORT), (ip6(3), WG_PORT)
    a.add_peer(b.as_peer(b4))
    a.add_peer(c.as_peer(c6))
    b.add_peer(a.as_peer((a.host.ip, WG_PORT)))
    c.add_peer(a.as_peer((ip6(1), WG_PORT)))
    with caplog.at_level(logging.INFO, logger="tunnelmesh.node.dataplane"):
        ping(a.host, TUN["b"], count=2)
        ping(a.host, TUN["c"], count=2)
        ping(b.host, TUN["a"], count=2)
        ping(c.host, TUN["a"], count=2)
    assert a.peer(b).endpoint == b4  # exactly the configured tuple: "10.76.0.2", not "::ffff:10.76.0.2"
    assert a.peer(c).endpoint == c6
    assert b.peer(a).endpoint == (a.host.ip, WG_PORT) and c.peer(a).endpoint == (ip6(1), WG_PORT)
    assert "event=endpoint_changed" not in caplog.text
    shown = {p.public_key: p.to_json()["endpoint"] for p in a.plane.peers()}  # what `show --json` prints
    assert shown == {b.public: f"{b.host.ip}:{WG_PORT}", c.public: f"[{ip6(3)}]:{WG_PORT}"}
    drops = a.plane.drops()
    assert drops["decrypt_failure"] == 0 and drops["allowed_ips"] == 0, drops


def test_a_peer_moving_from_ipv4_to_ipv6_keeps_its_stream(lab: Lab, engines: dict[str, Engine]) -> None:
    """b lands on an IPv6-only network mid-stream: its IPv4 address goes away and it is told a's IPv6
    endpoint. a follows b's first authenticated IPv6 packet and the TCP stream carries on. (With b's IPv4
    address still up, a packet from a to it could make b roam back: both sides follow their peer.)"""
    a, b = engines["a"], engines["b"]
    a.add_peer(b.as_peer(None))  # a learns b's endpoint from b's packets
    b.add_peer(a.as_peer((a.host.ip, WG_PORT)))
    ping(b.host, TUN["a"], count=2)
    assert a.peer(b).endpoint == (b.host.ip, WG_PORT)
    errors: list[BaseException] = []

    def stream() -> None:
        try:  # ~6 MB paced over ~3 s, so the switch happens mid-stream
            tcp_transfer(lab, b.host, a.host, TUN["a"], 6 * 1024 * 1024, pace=0.03, port=7021)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.0)
    b.host.run(["ip", "addr", "del", f"{b.host.ip}/24", "dev", "eth0"])
    b.plane.update_peer(a.public, endpoint=(ip6(1), WG_PORT))
    t.join(60)
    assert not t.is_alive(), "stream did not finish"
    assert not errors, errors
    assert a.peer(b).endpoint == (ip6(2), WG_PORT)
    ping(a.host, TUN["b"], count=2)


def test_link_local_endpoints_keep_their_scope(engines: dict[str, Engine]) -> None:
    """A link-local peer is only reachable through one interface: its endpoint carries the scope (interface
    index, as ``fe80::1%2``) and the packets that come back compare equal to it."""
    a, c = engines["a"], engines["c"]
    a_ll, c_ll = (_link_local(e.host) for e in (a, c))
    a.add_peer(c.as_peer((f"{c_ll}%{_ifindex(a.host)}", WG_PORT)))
    c.add_peer(a.as_peer((f"{a_ll}%{_ifindex(c.host)}", WG_PORT)))
    ping(a.host, TUN["c"], count=2)
    ping(c.host, TUN["a"], count=2)
    assert a.peer(c).endpoint == (f"{c_ll}%{_ifindex(a.host)}", WG_PORT)
    assert c.peer(a).endpoint == (f"{a_ll}%{_ifindex(c.host)}", WG_PORT)
    (shown,) = [p.to_json()["endpoint"] for p in a.plane.peers()]
    assert shown == f"[{c_ll}%{_ifindex(a.host)}]:{WG_PORT}"


def _link_local(host: Host) -> str:
    out = host.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]).stdout.split()
    return out[3].split("/")[0]


def _ifindex(host: Host) -> int:
    return int(host.run(["ip", "-o", "link", "show", "eth0"]).stdout.split(":")[0])


def test_an_explicit_ipv4_listen_host_stays_ipv4_and_says_why_an_ipv6_peer_is_unreachable(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    hosts = dual_stack_hosts(lab, "a", "c")
    a = Engine(hosts["a"], "a", lab.id, TUN["a"], listen_host="0.0.0.0")
    c = Engine(hosts["c"], "c", lab.id, TUN["c"])
    a.start()
    try:
        assert a.plane.udp is not None and not a.plane.udp.ipv6
        with caplog.at_level(logging.WARNING, logger="tunnelmesh.node.dataplane"):
            a.add_peer(c.as_peer((ip6(2), WG_PORT)))
        assert f"event=peer_endpoint_unreachable iface={a.plane.name}" in caplog.text
    finally:
        a.plane.stop()
