"""The engine's Python API, as the node agent will drive it: three in-process engines in three namespaces.

Peers are added, changed and removed live while another peer's session keeps going (its handshake count does
not move), ``peers()`` reports what ``wg show`` would, each engine's Prometheus metrics live in its own
registry, the plain (no offload) path interoperates with the offload path, and ``stop()`` leaves no thread
and no TUN device behind.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.interop.dataplane_helpers import WG_PORT, Engine, ping
from tunnelmesh.netlab import Lab
from tunnelmesh.node.dataplane import DataPlane
from tunnelmesh.node.errors import DataplaneError

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.timeout(90),
]

TUN = {"a": "10.73.0.1", "b": "10.73.0.2", "c": "10.73.0.3"}


@pytest.fixture
def nodes() -> Iterator[dict[str, Engine]]:
    with Lab() as lab:
        lan = lab.lan("l", "10.72.0.0/24")
        made = {n: Engine(lab.host(n, lan), n, lab.id, TUN[n], offloads=(n != "c")) for n in TUN}
        for n in made.values():
            n.start()
        try:
            yield made
        finally:
            for n in made.values():
                n.plane.stop()


def test_live_peer_changes_leave_other_sessions_alone(nodes: dict[str, Engine]) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    for x, y in ((a, b), (b, a), (a, c), (c, a)):
        x.add_peer(y.as_peer(y.lan_endpoint))
    ping(a.host, TUN["b"], count=2)
    ping(a.host, TUN["c"], count=2)  # c runs the plain path (no virtio_net_hdr, no GSO/GRO)
    assert c.plane.tun is not None and not c.plane.tun.vnet_hdr
    handshakes_b = a.peer(b).to_json()["handshakes"]
    assert handshakes_b == 1

    # Keep traffic to b flowing while c is removed, re-added and changed.
    stop = threading.Event()
    failures: list[str] = []

    def keep_pinging() -> None:
        while not stop.is_set():
            r = a.host.run(["ping", "-c", "1", "-W", "1", TUN["b"]], check=False, timeout=5)
            if r.returncode != 0:
                failures.append(r.stdout)

    t = threading.Thread(target=keep_pinging)
    t.start()
    try:
        a.plane.remove_peer(c.public)
        assert not a.host.run(["ip", "route", "show", f"{TUN['c']}/32"]).stdout.strip(), "route left behind"
        r = a.host.run(["ping", "-c", "1", "-W", "1", TUN["c"]], check=False, timeout=5)
        assert r.returncode != 0, "c is still reachable after remove_peer"
        a.add_peer(c.as_peer(c.lan_endpoint))
        ping(a.host, TUN["c"], count=2)
        a.plane.update_peer(c.public, persistent_keepalive=1.0)
        a.plane.update_peer(b.public, allowed_ips=(f"{TUN['b']}/32", "10.74.0.0/24"))
        time.sleep(1.5)
    finally:
        stop.set()
        t.join(10)
    assert not failures, failures
    assert a.peer(b).to_json()["handshakes"] == handshakes_b, "b's session was disturbed"
    assert a.peer(b).to_json()["allowed_ips"] == [f"{TUN['b']}/32", "10.74.0.0/24"]
    assert a.plane.name in a.host.run(["ip", "route", "show", "10.74.0.0/24"]).stdout
    assert a.plane.name in a.host.run(["ip", "route", "show", f"{TUN['c']}/32"]).stdout
    assert a.peer(c).to_json()["persistent_keepalive"] == 1.0
    with pytest.raises(DataplaneError, match="no peer"):
        a.plane.remove_peer(bytes(32))
    with pytest.raises(DataplaneError, match="cannot add peer"):
        a.plane.add_peer(c.as_peer(c.lan_endpoint))


def test_peers_and_metrics(nodes: dict[str, Engine]) -> None:
    a, b = nodes["a"], nodes["b"]
    a.add_peer(b.as_peer(b.lan_endpoint))
    b.add_peer(a.as_peer(a.lan_endpoint))
    ping(a.host, TUN["b"], count=3)
    st = a.peer(b).to_json()
    assert st["endpoint"] == f"{b.host.ip}:{WG_PORT}"
    assert isinstance(st["latest_handshake"], float) and abs(st["latest_handshake"] - time.time()) < 30
    assert st["rx_packets"] >= 3 and st["tx_packets"] >= 3
    labels = {"interface": a.plane.name, "peer": base64.b64encode(b.public).decode()}
    reg = a.registry
    assert reg.get_sample_value("tunnelmesh_dataplane_peer_tx_packets_total", labels) == st["tx_packets"]
    assert reg.get_sample_value("tunnelmesh_dataplane_peer_rx_bytes_total", labels) == st["rx_bytes"]
    assert reg.get_sample_value("tunnelmesh_dataplane_peer_handshakes_total", labels) == 1
    lost = reg.get_sample_value("tunnelmesh_dataplane_peer_rx_lost_packets_total", labels)
    assert lost == st["rx_lost"] == 0
    drop = {"interface": a.plane.name, "reason": "replay"}
    assert reg.get_sample_value("tunnelmesh_dataplane_drops_total", drop) == 0
    # Another engine's registry has its own series only.
    assert b.registry.get_sample_value("tunnelmesh_dataplane_peer_tx_packets_total", labels) is None


def test_stop_joins_threads_and_removes_the_device(nodes: dict[str, Engine]) -> None:
    a = nodes["a"]
    name = a.plane.name
    threads = {t.name for t in threading.enumerate()}
    assert {f"{name}-tx", f"{name}-rx", f"{name}-control"} <= threads
    a.plane.stop()
    assert not {f"{name}-tx", f"{name}-rx", f"{name}-control"} & {t.name for t in threading.enumerate()}
    assert a.host.run(["ip", "link", "show", name], check=False).returncode != 0
    a.plane.stop()  # idempotent


def test_settled_sessions_keep_the_timer_bookkeeping(nodes: dict[str, Engine]) -> None:
    """After the handshake, received runs of a settled session skip ``Device.receive`` (latency fast path)
    but must still tell the timers, before anything is sent back: the sender sees its reply (no rehandshake
    pending) and the responder owes no keepalive because it answered."""
    a, b = nodes["a"], nodes["b"]
    a.add_peer(b.as_peer(b.lan_endpoint))
    b.add_peer(a.as_peer(a.lan_endpoint))
    ping(a.host, TUN["b"], count=5)
    ta = a.plane.device.peers[b.public].timers
    tb = b.plane.device.peers[a.public].timers
    deadline = time.monotonic() + 5
    while (ta.new_handshake_at, tb.send_keepalive_at) != (None, None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ta.new_handshake_at is None, "a's replies were not reported to its timers"
    assert tb.send_keepalive_at is None, "b's timers saw its reply sent before the request received"


def _count_batch_paths(plane: DataPlane, monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Record every use of the batch paths' send (``_send_packets``) and TUN write (``_deliver``)."""
    for name in ("_send_packets", "_deliver"):
        real = getattr(plane, name)

        def spy(*args: object, _real: Callable[..., None] = real, _name: str = name) -> None:
            calls.append(_name)
            _real(*args)

        monkeypatch.setattr(plane, name, spy)


def test_lone_packets_take_the_lanes_and_keep_the_books(
    nodes: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a session is settled, a ping's packets take the lone-packet paths on both sides (neither batch
    path runs) and are counted exactly as the batch paths count them; a packet whose inner source is not
    the sending peer's is dropped there and counted as such."""
    a, b = nodes["a"], nodes["b"]
    a.add_peer(b.as_peer(b.lan_endpoint))
    b.add_peer(a.as_peer(a.lan_endpoint))
    deadline = time.monotonic() + 10
    while not (a.plane._tx_lanes and a.plane._rx_lanes and b.plane._tx_lanes and b.plane._rx_lanes):
        assert time.monotonic() < deadline, "the batch paths made no lanes"
        ping(a.host, TUN["b"], count=1)
    calls: list[str] = []
    for e in (a, b):
        _count_batch_paths(e.plane, monkeypatch, calls)
    before = a.peer(b), b.peer(a)
    a.host.run(["ping", "-q", "-c", "20", "-i", "0.02", "-W", "2", TUN["b"]], timeout=30)
    after = a.peer(b), b.peer(a)
    assert calls == [], f"the batch paths ran: {calls}"
    datagram = 16 + 96 + 16  # header, an 84-byte echo padded to a multiple of 16, tag
    for side in (0, 1):  # requests from a to b, replies from b to a: 20 each way
        assert after[side].tx_packets - before[side].tx_packets == 20
        assert after[side].rx_packets - before[side].rx_packets == 20
        assert after[side].tx_bytes - before[side].tx_bytes == 20 * datagram
        assert after[side].rx_bytes - before[side].rx_bytes == 20 * datagram
    assert a.plane.device.peers[b.public].timers.new_handshake_at is None  # the replies were seen

    # b sends from an address outside its allowed IPs on a: a's lone path drops and counts each one.
    drop = {"interface": a.plane.name, "reason": "allowed_ips"}
    assert a.registry.get_sample_value("tunnelmesh_dataplane_drops_total", drop) == 0
    b.host.run(["ip", "addr", "add", "10.73.0.99/24", "dev", b.plane.name])
    r = b.host.run(["ping", "-c", "3", "-i", "0.05", "-W", "1", "-I", "10.73.0.99", TUN["a"]], check=False)
    assert r.returncode != 0, "a answered a packet from outside b's allowed IPs"
    assert a.registry.get_sample_value("tunnelmesh_dataplane_drops_total", drop) == 3
    assert calls == [], f"the batch paths ran: {calls}"
