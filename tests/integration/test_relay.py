"""The coordinator's UDP reflector and blind relay, and the WebSocket relay, in a real netlab world.

World: a coordinator host ``c`` on the "internet"; host ``a`` behind an endpoint-independent NAT; ``n1`` and
``n2`` each behind a symmetric NAT (no direct path between them can exist); ``w`` behind a NAT on a network
that blocks UDP. The coordinator's relay hub runs in this process, on sockets made inside ``c``'s namespace
(its ``is_node`` is a test set of registered keys); nodes are real processes in their namespaces: a
``DataPlane`` with a TUN device and a ``RelayClient`` (``tests/integration/relay_node.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nacl.public
import pytest
from prometheus_client import CollectorRegistry

from tests.integration.blocking import LoopThread, wait_for
from tests.interop.dataplane_helpers import ROOT, tcp_transfer
from tunnelmesh import client, identity, keyproof, tokens
from tunnelmesh.api.v1 import common_pb2, node_pb2, node_pb2_grpc, state_pb2
from tunnelmesh.coord import relay
from tunnelmesh.coord.config_view import coordinators_from_members
from tunnelmesh.coord.http import HttpServer
from tunnelmesh.coord.raft.driver import DriverOptions
from tunnelmesh.coord.server import CoordinatorProcess, CoordOptions
from tunnelmesh.coord.state import encode_command, ns_to_timestamp
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.process import Process
from tunnelmesh.netlab.topology import Host, Router
from tunnelmesh.node.relay_client import RelayClient

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.timeout(180),
]

ANSWER_WAIT = 5.0  # a reply that must come: patient with a loaded machine
SILENCE_WAIT = 0.5  # a reply that must not come


class TappingHub(relay.RelayHub):
    """The real hub, plus a record of every payload it forwarded (what the coordinator could see)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[bytes] = []

    def _forward(self, src: bytes, frame: bytes, now: float) -> None:
        if len(self.seen) < 20000:
            self.seen.append(bytes(frame[relay.HEADER_LEN + relay.KEY_LEN :]))
        super()._forward(src, frame, now)


@dataclass
class World:
    lab: Lab
    tmp: Path
    c: Host
    a: Host
    nat_a: Router
    n1: Host
    n2: Host
    w: Host
    loop: LoopThread
    hub: TappingHub
    server: relay.RelayServer
    http: HttpServer
    registered: set[bytes] = field(default_factory=set)

    @property
    def relay_addr(self) -> tuple[str, int]:
        return (self.c.ip, self.server.port)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.c.ip}:{self.http.port}/relay"

    def coordinator(self) -> dict[str, str]:
        return {
            "id": "0000000000000001",
            "relay_udp_address": f"{self.c.ip}:{self.server.port}",
            "relay_ws_url": self.ws_url,
            "relay_public_key": self.hub.public_key.hex(),
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("relay")
    with Lab(log_dir=tmp / "netlab") as lab:
        inet = lab.lan("inet", "198.18.0.0/24")
        c = lab.host("c", inet)
        homes = {}
        for name, subnet, nat in (
            ("a", "10.1.0.0/24", "eim"),
            ("n1", "10.2.0.0/24", "symmetric"),
            ("n2", "10.3.0.0/24", "symmetric"),
            ("w", "10.4.0.0/24", "eim"),
        ):
            lan = lab.lan(f"home-{name}", subnet)
            homes[name] = (lab.host(name, lan), lab.router(f"r-{name}", wan=inet, lan=lan, nat=nat))
        loop = LoopThread("coord", timeout=15.0)
        registered: set[bytes] = set()
        hub = TappingHub(relay.generate_key(), registered.__contains__, registry=CollectorRegistry())
        server = relay.RelayServer(hub, f"{c.ip}:0")
        http = HttpServer(f"{c.ip}:0", hub=hub, ready=lambda: (True, "test"), registry=CollectorRegistry())
        with c.enter():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((c.ip, 0))
        tcp.bind((c.ip, 0))
        loop.run(lambda: server.start(sock=sock))
        loop.run(lambda: http.start(sock=tcp))
        try:
            yield World(
                lab,
                tmp,
                c,
                homes["a"][0],
                homes["a"][1],
                homes["n1"][0],
                homes["n2"][0],
                homes["w"][0],
                loop,
                hub,
                server,
                http,
                registered,
            )
        finally:
            loop.run(http.stop)
            loop.run(server.stop)
            loop.close()


def recv_or_none(sock: socket.socket, wait: float) -> bytes | None:
    sock.settimeout(wait)
    try:
        return sock.recv(2048)
    except TimeoutError:
        return None


# -- reflection ----------------------------------------------------------------------------------------------


def test_reflection_returns_the_address_the_nat_maps(world: World) -> None:
    with world.a.socket() as s:
        s.bind(("0.0.0.0", 40123))
        txid = secrets.token_bytes(relay.TXID_LEN)
        req = relay.encode_reflect_request(txid)
        assert len(req) == relay.REFLECT_REQUEST_LEN
        s.sendto(req, world.relay_addr)
        resp = recv_or_none(s, ANSWER_WAIT)
        assert resp is not None, "no reflect response"
        got_txid, (ip, port) = relay.decode_reflect_response(resp)
        assert got_txid == txid
        # The NAT's WAN address, not the host's private one; an EIM NAT keeps the free source port.
        assert ip == world.nat_a.wan_ip
        assert port == 40123
        assert len(resp) <= len(req), "a reflect response must never be larger than its request"


def test_malformed_reflect_requests_get_nothing_and_are_counted(world: World) -> None:
    before = dict(world.hub.counters.dropped)
    good = relay.encode_reflect_request(secrets.token_bytes(relay.TXID_LEN))
    bad = [
        good[:63],
        good + b"\0",
        good[:10],
        b"\x20\0",
        b"\x21\0\0\0" + bytes(60),
        b"\x20\x01\0\0" + bytes(60),
    ]
    with world.a.socket() as s:
        for frame in bad:
            s.sendto(frame, world.relay_addr)
        assert recv_or_none(s, SILENCE_WAIT) is None, "a malformed request was answered"

    def delta(reason: str) -> int:
        return world.hub.dropped(reason) - before.get(reason, 0)

    wait_for(
        lambda: (
            delta("bad_reflect_size") == 3
            and delta("short") == 1
            and delta("unknown_type") == 1
            and delta("bad_header") == 1
        ),
        "the six malformed requests to be counted",
        timeout=ANSWER_WAIT,
    )


# -- hellos --------------------------------------------------------------------------------------------------


def test_a_registered_node_is_bound_and_bad_hellos_are_refused_and_counted(world: World) -> None:
    node = nacl.public.PrivateKey.generate()
    stranger = nacl.public.PrivateKey.generate()
    world.registered.add(bytes(node.public_key))
    before = dict(world.hub.counters.dropped)
    now = time.time_ns()

    def hello(key: nacl.public.PrivateKey, ts: int, *, claim: bytes | None = None) -> bytes:
        frame = relay.encode_hello(key, world.hub.public_key, secrets.token_bytes(relay.NONCE_LEN), ts)
        if claim is not None:  # claim another node's key, sealed with ours
            frame = frame[: relay.HEADER_LEN] + claim + frame[relay.HEADER_LEN + relay.KEY_LEN :]
        return frame

    good = hello(node, now)
    with world.a.socket() as s:
        s.sendto(good, world.relay_addr)
        ack = recv_or_none(s, ANSWER_WAIT)
        assert ack == relay.encode_hello_ack(good[relay.HEADER_LEN + relay.KEY_LEN : -24])
        refused = {
            "replayed_hello": [good, hello(node, now - 1_000_000)],  # the same, and an older one
            "stale_hello": [hello(node, now - 120 * 10**9), hello(node, now + 120 * 10**9)],
            "unknown_node": [hello(stranger, now + 1)],
            "bad_hello_auth": [hello(stranger, now + 2, claim=bytes(node.public_key))],
            "bad_hello_size": [good[:-1], good + b"\\0"],
        }
        for frames in refused.values():
            for frame in frames:
                s.sendto(frame, world.relay_addr)
        assert recv_or_none(s, SILENCE_WAIT) is None, "a refused hello was acknowledged"
    expected = {reason: len(frames) for reason, frames in refused.items()}
    wait_for(
        lambda: {r: world.hub.dropped(r) - before.get(r, 0) for r in expected} == expected,
        f"refused hellos counted as {expected}",
        timeout=ANSWER_WAIT,
    )
    assert world.hub.bindings().get(bytes(node.public_key)) == "udp"
    assert bytes(stranger.public_key) not in world.hub.bindings()


# -- two real data planes through the relay ----------------------------------------------------------------

PING_PATTERN = "6d6573682d706c61696e74657874"  # "mesh-plaintext": must never be visible to the coordinator


@dataclass
class RelayNode:
    host: Host
    identity: NodeIdentity
    proc: Process
    status_path: Path

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.status_path.read_text()))


def start_node(
    world: World,
    host: Host,
    ident: NodeIdentity,
    address: str,
    peer: NodeIdentity,
    peer_ip: str,
    transport: str,
) -> RelayNode:
    spec = {
        "private_key": ident.private_key_b64(),
        "iface": "tmrelay0",
        "address": address,
        "peer_key": peer.public_key_b64,
        "peer_ip": f"{peer_ip}/32",
        "transport": transport,
        "hello_interval": 5.0,
        "coordinators": [world.coordinator()],
    }
    tag = f"{host.name}-{time.monotonic_ns()}"
    spec_path = world.tmp / f"{tag}.json"
    spec_path.write_text(json.dumps(spec))
    spec_path.chmod(0o600)
    status_path = world.tmp / f"{tag}.status.json"
    proc = host.spawn(
        [
            sys.executable,
            "-m",
            "tests.integration.relay_node",
            "--spec",
            str(spec_path),
            "--status",
            str(status_path),
        ],
        name=tag,
        env={"PYTHONPATH": str(ROOT)},
    )
    proc.wait_for_log(r"relay-node ready", timeout=40)
    wait_for(status_path.exists, f"{host.name} status file", timeout=10)
    return RelayNode(host, ident, proc, status_path)


@contextlib.contextmanager
def relay_pair(
    world: World, first: tuple[Host, str], second: tuple[Host, str], net: int
) -> Iterator[tuple[RelayNode, RelayNode, str, str]]:
    """Two nodes whose only path to each other is the coordinator's relay (UDP or WebSocket each)."""
    ids = (identity.generate(), identity.generate())
    ips = (f"10.200.{net}.1", f"10.200.{net}.2")
    for ident in ids:
        world.registered.add(ident.public_key_bytes)
    nodes: list[RelayNode] = []
    try:
        nodes.append(start_node(world, first[0], ids[0], f"{ips[0]}/24", ids[1], ips[1], first[1]))
        nodes.append(start_node(world, second[0], ids[1], f"{ips[1]}/24", ids[0], ips[0], second[1]))
        yield nodes[0], nodes[1], ips[0], ips[1]
    finally:
        for n in nodes:
            n.proc.stop(timeout=10)


def check_traffic(world: World, a: RelayNode, b: RelayNode, a_ip: str, b_ip: str, net: int) -> None:
    """Ping both ways, a byte-exact TCP stream, and the coordinator saw only WireGuard ciphertext."""
    world.hub.seen.clear()
    a.host.run(["ping", "-c", "3", "-i", "0.2", "-w", "30", "-p", PING_PATTERN, b_ip], timeout=40)
    b.host.run(["ping", "-c", "3", "-i", "0.2", "-w", "30", "-p", PING_PATTERN, a_ip], timeout=40)
    tcp_transfer(world.lab, a.host, b.host, b_ip, 1 << 20, port=7000 + net)
    # The peer stays at its loopback virtual endpoint: nothing ever reached the data plane from elsewhere.
    for node in (a, b):
        (peer,) = node.status()["peers"]
        assert peer["endpoint"].startswith("127.0.0.1:"), peer
        assert peer["latest_handshake"], peer
    seen = list(world.hub.seen)
    types = {p[0] for p in seen}
    assert types <= {1, 2, 3, 4, 0x10}, f"the relay carried non-WireGuard frames: types {sorted(types)}"
    transport_frames = [p for p in seen if p[0] == 4]
    assert len(transport_frames) > 100, f"only {len(transport_frames)} type-4 frames went through the relay"
    marker = bytes.fromhex(PING_PATTERN)
    assert not any(marker in p for p in seen), "the coordinator saw plaintext"


def test_two_data_planes_behind_symmetric_nats_talk_through_the_udp_relay(world: World) -> None:
    before = world.hub.counters.packets.get("udp", 0)
    with relay_pair(world, (world.n1, "udp"), (world.n2, "udp"), 1) as (a, b, a_ip, b_ip):
        check_traffic(world, a, b, a_ip, b_ip, 1)
        assert world.hub.counters.packets.get("udp", 0) - before > 200
        assert world.hub.bindings()[a.identity.public_key_bytes] == "udp"


def test_websocket_on_one_side_and_udp_on_the_other(world: World) -> None:
    before = world.hub.counters.packets.get("ws", 0)
    with relay_pair(world, (world.n1, "ws"), (world.n2, "udp"), 2) as (a, b, a_ip, b_ip):
        check_traffic(world, a, b, a_ip, b_ip, 2)
        assert world.hub.counters.packets.get("ws", 0) - before > 100, "nothing left over the WebSocket"
        assert world.hub.bindings()[a.identity.public_key_bytes] == "ws"
        assert world.hub.bindings()[b.identity.public_key_bytes] == "udp"


def test_a_udp_blocked_network_uses_the_websocket_relay(world: World) -> None:
    with (
        world.lab.block_udp(world.w),
        relay_pair(world, (world.w, "ws"), (world.n1, "udp"), 3) as (a, b, a_ip, b_ip),
    ):
        check_traffic(world, a, b, a_ip, b_ip, 3)
        coord = a.status()["relay"]["coordinators"][0]
        assert coord["ws"]["up"] is True
        assert coord["udp"]["up"] is False, "UDP is blocked: the UDP upstream cannot be up"


# -- a real coordinator: relay bound to the replicated state, HTTP endpoints --------------------------------


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def poll(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_real_coordinator_relays_for_registered_nodes_only_and_serves_http(tmp_path: Path) -> None:
    relay_port, http_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    api = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    proc = CoordinatorProcess(
        CoordOptions(
            data_dir=tmp_path / "c1",
            listen=api,
            raft_listen=f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
            relay_listen=f"127.0.0.1:{relay_port}",
            http_listen=f"127.0.0.1:{http_port}",
            bootstrap=True,
            name="c1",
            driver=DriverOptions(tick=0.05),
        )
    )
    task = asyncio.create_task(proc.run(), name="coordinator")
    clients: list[RelayClient] = []
    socks: list[socket.socket] = []
    try:

        def serving() -> bool:
            if task.done():
                task.result()
            return hasattr(proc, "node_api") and proc.node_api.c.driver.state.settings is not None

        await poll("the coordinator to serve an initialized mesh", serving)
        coord = proc.node_api.c
        key_file = tmp_path / "c1" / relay.RELAY_KEY_FILE
        assert key_file.stat().st_mode & 0o777 == 0o600
        (info,) = coordinators_from_members(coord.driver.registry.members.values())
        assert info.relay_udp_address == f"127.0.0.1:{relay_port}"
        assert info.relay_ws_url == f"ws://127.0.0.1:{http_port}/relay"
        assert info.relay_public_key == bytes(relay.load_relay_key(tmp_path / "c1").public_key)

        # Two registered nodes (Register with a join token, as `tunnelmesh join` does) and one stranger.
        jt = tokens.JoinToken.new(proc.node_api.ca_fingerprint)
        body = state_pb2.CreateJoinToken(
            token_id=jt.token_id,
            secret_hash=jt.secret_hash,
            reusable=True,
            expires_at=ns_to_timestamp(time.time_ns() + 3600 * 10**9),
        )
        result = await coord.write(encode_command(body, proposed_at=time.time_ns()), 20.0)
        assert not result.HasField("error"), result.error
        ids = [identity.generate() for _ in range(3)]
        async with client.open_channel(api, ca_pem=proc.node_api.ca_pem) as ch:
            for n, ident in enumerate(ids[:2]):
                await keyproof.register(
                    node_pb2_grpc.NodeServiceStub(ch),
                    node_pb2.RegisterRequest(
                        join_token=str(jt), public_key=ident.public_key_bytes, hostname=f"relay{n}.lan"
                    ),
                    bytes(ident.private_key),
                    timeout=30.0,
                )
        # Stand-ins for the data planes (the netlab tests above use real ones): plain loopback sockets.
        for ident in ids:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
            rc = RelayClient(bytes(ident.private_key), s.getsockname()[1], hello_interval=2.0)
            await rc.start()
            rc.set_coordinators([info])
            clients.append(rc)
        for rc in clients[:2]:
            assert await rc.wait_available("udp", 30.0)
            assert await rc.wait_available("ws", 30.0)
        assert not await clients[2].wait_available("udp", 1.0), "an unregistered key was bound"
        assert not await clients[2].wait_available("ws", 1.0), "an unregistered key was bound"

        loop = asyncio.get_running_loop()
        for transport in ("udp", "ws"):
            ep_ab = clients[0].endpoint_for(ids[1].public_key_bytes, transport)
            ep_ba = clients[1].endpoint_for(ids[0].public_key_bytes, "udp")
            payload = b"\x04\0\0\0" + secrets.token_bytes(100)
            socks[0].sendto(payload, ep_ab)
            async with asyncio.timeout(10):
                data, src = await loop.sock_recvfrom(socks[1], 2048)
            assert (data, src) == (payload, ep_ba), "delivered from the sender's virtual endpoint"

        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{http_port}"
            async with http.get(f"{base}/healthz", timeout=aiohttp.ClientTimeout(10)) as r:
                assert r.status == 200
            async with http.get(f"{base}/readyz", timeout=aiohttp.ClientTimeout(10)) as r:
                assert r.status == 200 and (await r.text()).startswith("ready"), await r.text()
            async with http.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(10)) as r:
                metrics = await r.text()
        assert 'tunnelmesh_relay_dropped_total{reason="unknown_node"}' in metrics
        assert 'tunnelmesh_relay_bindings{transport="ws"} 2.0' in metrics
    finally:
        for rc in clients:
            await rc.stop()
        for s in socks:
            s.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- loopback: WebSocket back-pressure and coordinator failover ---------------------------------------------


async def start_hub(keys: set[bytes], **http_kw: Any) -> tuple[relay.RelayHub, relay.RelayServer, HttpServer]:
    hub = relay.RelayHub(relay.generate_key(), keys.__contains__, registry=None)
    server = relay.RelayServer(hub, "127.0.0.1:0")
    await server.start()
    http = HttpServer(
        "127.0.0.1:0", hub=hub, ready=lambda: (True, "test"), registry=CollectorRegistry(), **http_kw
    )
    await http.start()
    return hub, server, http


def info_for(
    cid: str, hub: relay.RelayHub, server: relay.RelayServer, http: HttpServer
) -> common_pb2.CoordinatorInfo:
    return common_pb2.CoordinatorInfo(
        id=cid,
        relay_udp_address=f"127.0.0.1:{server.port}",
        relay_ws_url=f"ws://127.0.0.1:{http.port}/relay",
        relay_public_key=hub.public_key,
    )


def ws_frame(payload: bytes) -> bytes:
    """A masked client-to-server binary WebSocket frame (RFC 6455 §5.2), for a hand-driven raw client."""
    mask = secrets.token_bytes(4)
    n = len(payload)
    head = bytes((0x82, 0x80 | n)) if n < 126 else bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_websocket_client_that_stops_reading_never_blocks_the_hub() -> None:
    slow, b, c, d = (identity.generate() for _ in range(4))
    keys = {k.public_key_bytes for k in (slow, b, c, d)}
    hub, server, http = await start_hub(keys, ws_queue=32, ws_send_timeout=1.0)
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        # The slow client: a raw socket with a tiny receive buffer that says hello and then never reads.
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        socks.append(raw)
        raw.setblocking(False)
        await loop.sock_connect(raw, ("127.0.0.1", http.port))
        upgrade = (
            f"GET /relay HTTP/1.1\r\nHost: 127.0.0.1:{http.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(raw, upgrade.encode())
        async with asyncio.timeout(10):
            head = b""
            while b"\r\n\r\n" not in head:
                head += await loop.sock_recv(raw, 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        hello_frame = relay.encode_hello(
            slow.private_key, hub.public_key, secrets.token_bytes(relay.NONCE_LEN), time.time_ns()
        )
        await loop.sock_sendall(raw, ws_frame(hello_frame))
        await poll("the slow client's binding", lambda: hub.bindings().get(slow.public_key_bytes) == "ws", 10)

        # Three UDP nodes: b floods the slow client; c and d talk meanwhile.
        udp: dict[str, socket.socket] = {}
        for name, ident in (("b", b), ("c", c), ("d", d)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
            udp[name] = s
            s.sendto(
                relay.encode_hello(ident.private_key, hub.public_key, secrets.token_bytes(24)),
                server_addr(server),
            )
            async with asyncio.timeout(10):
                await loop.sock_recv(s, 100)  # the ack
        flood = relay.encode_data(slow.public_key_bytes, b"\x04" + bytes(1300))
        to_d = relay.encode_data(d.public_key_bytes, b"\x04ping")
        received = 0
        for i in range(3000):
            udp["b"].sendto(flood, server_addr(server))
            await asyncio.sleep(0)  # the hub reads one datagram per wakeup: pace below the socket buffer
            if i % 30 == 0:
                udp["c"].sendto(to_d, server_addr(server))
                with contextlib.suppress(BlockingIOError):
                    while udp["d"].recv(2048):
                        received += 1
        async with asyncio.timeout(10):
            while received < 100:
                await loop.sock_recv(udp["d"], 2048)
                received += 1
        await poll(
            "the slow client's frames to be dropped and counted",
            lambda: hub.dropped("ws_queue_full") > 0 or hub.dropped("ws_send_failed") > 0,
            15,
        )
        assert received == 100, "c -> d lost frames while the slow client was flooded"
    finally:
        for s in socks:
            s.close()
        await http.stop()
        await server.stop()


def server_addr(server: relay.RelayServer) -> tuple[str, int]:
    return ("127.0.0.1", server.port)


async def test_the_client_fails_over_to_the_next_coordinator_within_its_deadline() -> None:
    a, b = identity.generate(), identity.generate()
    keys = {a.public_key_bytes, b.public_key_bytes}
    coords = [await start_hub(keys), await start_hub(keys)]
    infos = [info_for(f"000000000000000{i + 1}", *coords[i]) for i in range(2)]
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    clients: list[RelayClient] = []
    hello_interval, ack_timeout = 1.0, 0.5
    try:
        for ident in (a, b):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
            rc = RelayClient(
                ident.private_key, s.getsockname()[1], hello_interval=hello_interval, ack_timeout=ack_timeout
            )
            await rc.start()
            rc.set_coordinators(reversed(infos))  # order given does not matter: lowest id first
            clients.append(rc)
        for rc in clients:
            await poll(
                "both coordinators up",
                lambda rc=rc: all(c["udp"]["up"] for c in rc.status()["coordinators"]),
                20,
            )  # type: ignore[misc]
        ep = clients[0].endpoint_for(b.public_key_bytes, "udp")
        clients[1].endpoint_for(a.public_key_bytes, "udp")

        async def delivered(within: float) -> bool:
            payload = b"\x04" + secrets.token_bytes(16)
            socks[0].sendto(payload, ep)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    while (await loop.sock_recv(socks[1], 2048)) != payload:
                        pass
                    return True
            return False

        assert await delivered(5.0)
        assert (
            clients[0].status()["peers"][identity.fingerprint(b.public_key_bytes)]["via"]
            == f"{infos[0].id}/udp"
        )
        await coords[0][1].stop()  # coordinator 1's relay goes away
        await coords[0][2].stop()
        stopped = time.monotonic()
        while not await delivered(0.2):
            assert time.monotonic() - stopped < 20, "no failover to coordinator 2"
        took = time.monotonic() - stopped
        assert (
            clients[0].status()["peers"][identity.fingerprint(b.public_key_bytes)]["via"]
            == f"{infos[1].id}/udp"
        )
        # The bound: the last ack may be fresh when the relay dies; add scheduling slack for a loaded machine.
        assert took < hello_interval + 2 * ack_timeout + 5.0, f"failover took {took:.1f}s"
    finally:
        for rc in clients:
            await rc.stop()
        for s in socks:
            s.close()
        for _, server, http in coords:
            await http.stop()
            await server.stop()
