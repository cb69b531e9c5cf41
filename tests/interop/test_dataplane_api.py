"""The engine's Python API, as the node agent will drive it: three in-process engines in three namespaces.

Peers are added, changed and removed live while another peer's session keeps going (its handshake count does
not move), ``peers()`` reports what ``wg show`` would, each engine's Prometheus metrics live in its own
registry, the plain (no offload) path interoperates with the offload path, and ``stop()`` leaves no thread
and no TUN device behind.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tests.interop.dataplane_helpers import WG_PORT, Engine, ping
from tunnelmesh.netlab import Lab
from tunnelmesh.node import dataplane
from tunnelmesh.node.dataplane import IDLE_WAIT, DataPlane
from tunnelmesh.node.errors import DataplaneError
from tunnelmesh.node.tun import TunDevice
from tunnelmesh.node.udp import UdpSocket

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


@contextlib.contextmanager
def _warm_and_cold_pair(tick: float) -> Iterator[tuple[Engine, Engine]]:
    """Engines a (warm waits every ``tick``) and b (``warm_tick=0``), peered, in a lab of their own."""
    with Lab() as lab:
        lan = lab.lan("l", "10.72.0.0/24")
        a = Engine(lab.host("a", lan), "a", lab.id, TUN["a"], warm_tick=tick)
        b = Engine(lab.host("b", lan), "b", lab.id, TUN["b"], warm_tick=0)
        for e in (a, b):
            e.start()
        try:
            a.add_peer(b.as_peer(b.lan_endpoint))
            b.add_peer(a.as_peer(a.lan_endpoint))
            yield a, b
        finally:
            for e in (a, b):
                e.plane.stop()


def test_packet_threads_wake_on_the_tick_after_traffic_then_sleep_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a packet, an engine's idle packet threads wait one tick at a time (the tx thread polls the TUN
    device with the tick, the rx thread's receive times out after it and opens a dummy message) for
    WARM_PERIOD, then go back to the long wait; an engine with ``warm_tick=0`` only ever waits long."""
    tick = 0.01
    monkeypatch.setattr(dataplane, "WARM_PERIOD", 0.3)  # 30 ticks
    waits: list[tuple[object, float | None]] = []
    timeouts: list[tuple[object, float]] = []
    real_wait, real_timeout = TunDevice.wait_readable, UdpSocket.set_receive_timeout

    def wait_readable(tun: TunDevice, timeout: float | None) -> bool:
        waits.append((tun, timeout))
        return real_wait(tun, timeout)

    def set_receive_timeout(udp: UdpSocket, seconds: float) -> None:
        timeouts.append((udp, seconds))
        real_timeout(udp, seconds)

    warm_opens: dict[str, int] = {}  # by the rx thread's name

    class CountingAEAD:  # the Rust class cannot be subclassed
        def __init__(self, key: bytes) -> None:
            self.aead = ChaCha20Poly1305(key)

        def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
            return self.aead.encrypt(nonce, data, associated_data)

        def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
            name = threading.current_thread().name
            warm_opens[name] = warm_opens.get(name, 0) + 1
            return self.aead.decrypt(nonce, data, associated_data)

    monkeypatch.setattr(dataplane, "ChaCha20Poly1305", CountingAEAD)
    monkeypatch.setattr(TunDevice, "wait_readable", wait_readable)
    monkeypatch.setattr(UdpSocket, "set_receive_timeout", set_receive_timeout)
    with _warm_and_cold_pair(tick) as (a, b):
        ping(a.host, TUN["b"], count=1)

        def a_rx(seconds: float) -> list[float]:
            return [s for u, s in timeouts if u is a.plane.udp and s == seconds]

        deadline = time.monotonic() + 10
        while len(a_rx(IDLE_WAIT)) < len(a_rx(tick)) or not a_rx(tick):
            assert time.monotonic() < deadline, "a's rx thread never went back to the long wait"
            time.sleep(0.05)
        time.sleep(3 * IDLE_WAIT)  # the tx thread too: its last tick wait is long over
        waits.clear()
        timeouts.clear()
        warm_opens.clear()

        ping(a.host, TUN["b"], count=1)  # a: tx thread sends the request, rx thread gets the reply
        while len(a_rx(IDLE_WAIT)) < 1:
            assert time.monotonic() < deadline + 10, "a's rx thread stayed on the tick"
            time.sleep(0.05)
        time.sleep(3 * IDLE_WAIT)
        a_tun = [t for d, t in waits if d is a.plane.tun]
        b_tun = [t for d, t in waits if d is b.plane.tun]
    assert [s for u, s in timeouts if u is a.plane.udp] == [tick, IDLE_WAIT], timeouts
    assert a_tun.count(tick) >= 30, f"a's tx thread waited {a_tun.count(tick)} ticks"
    assert a_tun[-1] == IDLE_WAIT, "a's tx thread stayed on the tick"
    assert not [1 for u, _ in timeouts if u is b.plane.udp], "b (warm_tick=0) changed its receive timeout"
    assert b_tun and set(b_tun) == {IDLE_WAIT}, f"b (warm_tick=0) waited {set(b_tun)}"
    assert warm_opens.get(f"{a.plane.name}-rx", 0) >= 1, warm_opens  # at least one tick in 0.3 s
    assert f"{b.plane.name}-rx" not in warm_opens, "b (warm_tick=0) opened warm-up messages"


FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.sendto(bytes(512), (sys.argv[1], 9))
"""


def test_a_packet_thread_does_not_tick_while_the_other_carries_bulk_traffic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tick takes the GIL, so a thread whose sibling moves bulk traffic waits long instead: a's tx thread,
    warm after a ping, stops ticking while a UDP flood from b keeps a's rx thread busy, and ticks again once
    the flood is over (after at most two long waits: the first one after the flood still sees its packets)."""
    tick = 0.01
    monkeypatch.setattr(dataplane, "WARM_PERIOD", 2.0)  # 200 ticks: warm through the whole flood
    waits: list[tuple[float, float | None]] = []  # a's tx thread: (when, timeout)
    real_wait = TunDevice.wait_readable

    def wait_readable(tun: TunDevice, timeout: float | None) -> bool:
        if tun.name.endswith("a"):
            waits.append((time.monotonic(), timeout))
        return real_wait(tun, timeout)

    monkeypatch.setattr(TunDevice, "wait_readable", wait_readable)
    with _warm_and_cold_pair(tick) as (a, b):
        ping(a.host, TUN["b"], count=2)
        a.host.run(["ping", "-c", "1", TUN["b"]], timeout=10)  # a's tx thread: warm now
        received = a.plane._rx_packets
        start = time.monotonic()
        b.host.run([sys.executable, "-c", FLOOD, TUN["a"], "0.6"], timeout=30)
        end = time.monotonic()
        flooded = a.plane._rx_packets - received
        time.sleep(3 * IDLE_WAIT + 0.2)
    assert flooded > 2 * dataplane.WARM_BUSY_RATE * (end - start), f"only {flooded} packets: no bulk traffic"
    during = [t for when, t in waits if start + 0.1 < when < end]
    after = [t for when, t in waits if when > end + 3 * IDLE_WAIT]
    assert during.count(tick) <= 2, f"a's tx thread ticked {during.count(tick)} times during the flood"
    assert after.count(tick) >= 5, "a's tx thread did not tick again after the flood"
