"""TunnelMesh to TunnelMesh: a three-node full mesh of `tunnelmesh dataplane up` processes in a netlab.

What a user of the mesh would observe: every node reaches every other; a node whose UDP address changes in the
middle of a TCP stream keeps its stream (the peer follows it after the first authenticated packet from the new
address, never before); replayed and tampered datagrams injected with a plain UDP socket are dropped, counted
and move no endpoint; and a flood of handshake initiations makes the responder answer with cookie replies
while its established sessions keep carrying traffic.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.interop.dataplane_helpers import WG_PORT, PeerSpec, TmNode, ping, tcp_transfer
from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.topology import Host
from tunnelmesh.node.dataplane import WARM_TICK
from tunnelmesh.node.wg.constants import LABEL_MAC1, MESSAGE_INITIATION_SIZE
from tunnelmesh.node.wg.crypto import HASH, MAC

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.timeout(120),
]

TUN = {"a": "10.71.0.1", "b": "10.71.0.2", "c": "10.71.0.3"}
ETH_P_IP = 0x0800
FLOOD_RATE = 20000  # initiations per second


@dataclass
class Mesh:
    lab: Lab
    nodes: dict[str, TmNode]
    evil: Host


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mesh")
    with Lab(log_dir=tmp / "netlab") as lab:
        lan = lab.lan("l", "10.70.0.0/24")
        hosts = {name: lab.host(name, lan) for name in TUN}
        evil = lab.host("evil", lan)
        nodes = {name: TmNode(h, f"tm{lab.id}{name}", tmp, tmp / "run") for name, h in hosts.items()}
        for name, node in nodes.items():
            peers = [
                PeerSpec(other.pub, f"{TUN[o]}/32", f"{other.host.ip}:{WG_PORT}")
                for o, other in nodes.items()
                if o != name
            ]
            node.up(f"{TUN[name]}/24", peers, args=["--low-power"] if name == "c" else [])
        yield Mesh(lab, nodes, evil)
        for node in nodes.values():
            node.down()


def test_full_mesh_every_node_reaches_every_other(mesh: Mesh) -> None:
    for name, node in mesh.nodes.items():
        for other in TUN:
            if other != name:
                ping(node.host, TUN[other], count=2)
    for name, node in mesh.nodes.items():
        status = node.show()
        assert status["warm_tick"] == (0 if name == "c" else WARM_TICK), "c runs with --low-power"
        assert len(status["peers"]) == 2
        for p in status["peers"]:
            assert p["latest_handshake"], f"{name}: no handshake with {p['public_key'][:8]}"
            assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0


def test_replayed_and_tampered_packets_are_dropped_and_counted(mesh: Mesh) -> None:
    a, b = mesh.nodes["a"], mesh.nodes["b"]
    with b.host.enter():
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sniffer.bind(("eth0", ETH_P_IP))
    sniffer.settimeout(0.5)
    pinger = a.host.spawn(["ping", "-c", "50", "-i", "0.05", TUN["b"]], name="replay-ping")
    captured = None
    deadline = time.monotonic() + 10
    try:
        while captured is None and time.monotonic() < deadline:
            try:
                pkt = sniffer.recv(65535)
            except TimeoutError:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            if pkt[9] != 17 or socket.inet_ntoa(pkt[12:16]) != a.host.ip:
                continue
            dport = struct.unpack_from("!H", pkt, ihl + 2)[0]
            payload = pkt[ihl + 8 :]
            if dport == WG_PORT and payload[0] == 4 and len(payload) > 32:  # a transport message with data
                captured = payload
    finally:
        sniffer.close()
        pinger.stop()
    assert captured is not None, "captured no transport message from a to b"

    before = b.show()["drops"]
    tampered = bytearray(captured)
    tampered[-20] ^= 0x01  # one bit of ciphertext
    inject = mesh.evil.socket()
    try:
        for _ in range(5):
            inject.sendto(captured, (b.host.ip, WG_PORT))
            inject.sendto(bytes(tampered), (b.host.ip, WG_PORT))
    finally:
        inject.close()
    deadline = time.monotonic() + 5
    while True:
        after = b.show()["drops"]
        if (
            after["replay"] >= before["replay"] + 5
            and after["decrypt_failure"] >= before["decrypt_failure"] + 5
        ):
            break
        assert time.monotonic() < deadline, f"drops not counted: before {before}, after {after}"
        time.sleep(0.1)
    assert after["replay"] == before["replay"] + 5
    assert after["decrypt_failure"] == before["decrypt_failure"] + 5
    # Neither moved a's endpoint to the injector's address.
    assert b.peer(a.pub)["endpoint"] == f"{a.host.ip}:{WG_PORT}"
    ping(a.host, TUN["b"], count=2)


def _initiation(responder_public: bytes, n: int) -> bytes:
    """A 148-byte initiation with random contents and a valid mac1 for the responder: it costs the responder
    a Diffie-Hellman unless it is under load and demands a cookie."""
    body = struct.pack("<II", 1, n) + os.urandom(MESSAGE_INITIATION_SIZE - 8 - 32)
    mac1 = MAC(HASH(LABEL_MAC1, responder_public), body)
    return body + mac1 + bytes(16)


def test_initiation_flood_gets_cookie_replies_and_established_peers_keep_working(mesh: Mesh) -> None:
    import base64

    a, b = mesh.nodes["a"], mesh.nodes["b"]
    b_public = base64.b64decode(b.pub)
    ping(a.host, TUN["b"], count=1)
    flood = mesh.evil.socket()
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    stop = threading.Event()
    cookies = 0
    sent = 0

    def flooder() -> None:
        # FLOOD_RATE initiations per second, in bursts every 10 ms: several times what the responder can
        # afford to answer with a Diffie-Hellman each, so it must fall back to cookie replies.
        nonlocal sent
        msgs = [_initiation(b_public, i) for i in range(FLOOD_RATE // 100)]
        start = time.monotonic()
        while not stop.is_set():
            for m in msgs:
                flood.sendto(m, (b.host.ip, WG_PORT))
            sent += len(msgs)
            time.sleep(max(0.0, start + sent / FLOOD_RATE - time.monotonic()))

    t = threading.Thread(target=flooder, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        # The established session a <-> b keeps working during the flood.
        result = a.host.run(["ping", "-c", "15", "-i", "0.1", "-W", "1", TUN["b"]], timeout=20, check=False)
        under_load_seen = b.show()["under_load"]
    finally:
        stop.set()
        t.join(5)
    flood.settimeout(0.2)
    try:
        while True:
            data = flood.recv(2048)
            if data[0] == 3 and len(data) == 64:
                cookies += 1
    except (TimeoutError, BlockingIOError):
        pass
    finally:
        flood.close()
    received = int(result.stdout.split(" received")[0].rsplit(",", 1)[-1].strip() or 0)
    assert received >= 12, f"established peer starved during the flood: {result.stdout}"
    drops = b.show()["drops"]
    assert sent > 1000
    assert drops["cookie_sent"] > 0, drops
    assert cookies > 0, "no cookie replies reached the flooder"
    assert under_load_seen or drops["cookie_sent"] > 0


def test_roaming_peer_keeps_its_stream(mesh: Mesh) -> None:
    b, c = mesh.nodes["b"], mesh.nodes["c"]
    old_ip = c.host.ip
    new_ip = "10.70.0.200"
    assert b.peer(c.pub)["endpoint"] == f"{old_ip}:{WG_PORT}"
    errors: list[BaseException] = []

    def stream() -> None:
        try:  # ~12 MB paced over ~3 s, so the address changes mid-stream
            tcp_transfer(mesh.lab, c.host, b.host, TUN["b"], 12 * 1024 * 1024, pace=0.015, port=7011)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.0)
    # c's UDP address changes: the new address becomes its only one (a laptop moving networks).
    c.host.run(["sysctl", "-q", "-w", "net.ipv4.conf.eth0.promote_secondaries=1"])
    c.host.run(["ip", "addr", "add", f"{new_ip}/24", "dev", "eth0"])
    c.host.run(["ip", "addr", "del", f"{old_ip}/24", "dev", "eth0"])
    t.join(60)
    assert not t.is_alive(), "stream did not finish"
    assert not errors, errors
    assert b.peer(c.pub)["endpoint"] == f"{new_ip}:{WG_PORT}"
    ping(b.host, TUN["c"], count=2)
