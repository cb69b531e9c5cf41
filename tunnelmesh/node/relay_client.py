"""The node side of the coordinators' blind relay: loopback "virtual endpoints" for peers reached by relay.

Theory of operation
-------------------
The data plane knows nothing about relays: it sends WireGuard datagrams to a peer's endpoint. For a peer
reached through a relay, that endpoint is a *virtual endpoint*: a UDP socket this client binds on
``127.0.0.1:<ephemeral>`` for that peer. What the data plane sends there is wrapped in ``RELAY_DATA`` (the
peer's key + the datagram, still WireGuard-encrypted end to end) and sent to a coordinator. What a
coordinator delivers from peer ``K`` is sent *from* ``K``'s virtual socket to the data plane's port, so the
data plane sees the peer at its virtual endpoint and WireGuard's roaming logic never moves it elsewhere.

Upstreams: the client keeps one binding per coordinator and transport ("udp" to the coordinator's relay
port, "ws" to its ``/relay`` WebSocket), each refreshed by a ``RELAY_HELLO`` every ``hello_interval`` and
considered up while its last hello was acknowledged recently. A frame for a peer leaves through the first
coordinator (sorted by id) whose upstream on the peer's transport is up (falling back to the other transport
if none is), so two nodes that see the same coordinators meet at the same one without agreeing in advance;
inbound frames are accepted from any upstream. When an upstream stops answering, the next coordinator takes
over within ``hello_interval + 2 * ack_timeout``.

Wire formats: ``coord/relay.py``. The client is asyncio; the data plane's threads only see UDP sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp
import nacl.public
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from tunnelmesh.config import split_host_port
from tunnelmesh.coord import relay as wire
from tunnelmesh.identity import fingerprint
from tunnelmesh.metrics import by_label, counter_family, gauge_family

log = logging.getLogger(__name__)

TRANSPORTS: Final = ("udp", "ws")
HELLO_INTERVAL: Final = wire.HELLO_INTERVAL
ACK_TIMEOUT: Final = 3.0  # a hello not acknowledged within this is retried
CONNECT_TIMEOUT: Final = 5.0  # WebSocket connect + upgrade
SEND_TIMEOUT: Final = 5.0  # one WebSocket send; a slower server connection is dropped and redialled
BACKOFF_MAX: Final = 15.0
WS_QUEUE: Final = 512  # frames waiting for one WebSocket upstream; beyond that they are dropped
LOOPBACK: Final = "127.0.0.1"
VIRTUAL_BATCH: Final = 64  # datagrams read from one virtual endpoint per wakeup


class CoordinatorLike(Protocol):
    """What the client reads from a ``CoordinatorInfo`` (common.proto)."""

    id: str
    relay_udp_address: str
    relay_ws_url: str
    relay_public_key: bytes


@dataclass(frozen=True, slots=True)
class _Target:
    id: str
    udp: tuple[str, int] | None
    ws_url: str | None
    relay_key: bytes


@dataclass(slots=True)
class _Stats:
    dropped: dict[str, int] = field(default_factory=dict)
    tx_packets: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class _Upstream:
    """One coordinator over one transport: hellos, acks and frames in both directions."""

    def __init__(self, client: RelayClient, target: _Target, transport: str) -> None:
        self.client = client
        self.target = target
        self.transport = transport
        self.acked_at: float | None = None
        self.connected = False
        self.last_error = ""
        self._pending: dict[bytes, float] = {}  # hello nonce -> sent at
        self._acked = asyncio.Event()
        self._udp: asyncio.DatagramTransport | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(WS_QUEUE)

    @property
    def address(self) -> str:
        if self.transport == "udp":
            assert self.target.udp is not None
            return f"{self.target.udp[0]}:{self.target.udp[1]}"
        return self.target.ws_url or ""

    def up(self, now: float) -> bool:
        c = self.client
        return (
            self.connected
            and self.acked_at is not None
            and now - self.acked_at < c.hello_interval + 2 * c.ack_timeout
        )

    def send(self, frame: bytes) -> bool:
        if self.transport == "udp":
            if self._udp is None:
                return False
            self._udp.sendto(frame)
            return True
        if self._ws is None:
            return False
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.client.stats.drop("ws_queue_full")
            return False
        return True

    def received(self, frame: bytes) -> None:
        t = wire.frame_type(frame)
        if t == wire.RELAY_HELLO_ACK and len(frame) == wire.HELLO_ACK_LEN:
            nonce = frame[wire.HEADER_LEN :]
            if self._pending.pop(nonce, None) is not None:
                first = not self.up(time.monotonic())
                self.acked_at = time.monotonic()
                self._pending.clear()
                self._acked.set()
                self.client._changed.set()
                if first:
                    log.info(
                        "event=relay_upstream_up coordinator=%s transport=%s addr=%s",
                        self.target.id,
                        self.transport,
                        self.address,
                    )
            else:
                self.client.stats.drop("unexpected_ack")
        elif t == wire.RELAY_DATA and len(frame) >= wire.DATA_MIN_LEN:
            src, payload = wire.decode_data(frame)
            self.client._deliver(src, payload)
        else:
            self.client.stats.drop("bad_frame")

    # -- the upstream's task --------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                if self.transport == "udp":
                    await self._run_udp()
                else:
                    await self._run_ws()
                backoff = 0.5
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info(
                    "event=relay_upstream_down coordinator=%s transport=%s error=%r",
                    self.target.id,
                    self.transport,
                    self.last_error,
                )
            finally:
                self._close()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    def _close(self) -> None:
        self.connected = False
        self.acked_at = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._ws = None

    async def _hello_loop(self) -> None:
        """Hello every interval; retried every ack_timeout until acknowledged. Returns only by raising."""
        c = self.client
        while True:
            nonce = secrets.token_bytes(wire.NONCE_LEN)
            now = time.monotonic()
            self._pending = {n: t for n, t in self._pending.items() if now - t < c.hello_interval * 2}
            self._pending[nonce] = now
            self._acked.clear()
            if not self.send(wire.encode_hello(c._key, self.target.relay_key, nonce)):
                raise ConnectionError("upstream closed")
            try:
                async with asyncio.timeout(c.ack_timeout):
                    await self._acked.wait()
            except TimeoutError:
                if self.acked_at is not None and not self.up(time.monotonic()):
                    log.info(
                        "event=relay_upstream_down coordinator=%s transport=%s error='no hello ack'",
                        self.target.id,
                        self.transport,
                    )
                    self.acked_at = None
                continue
            await asyncio.sleep(max(0.0, c.hello_interval - (time.monotonic() - now)))

    async def _run_udp(self) -> None:
        assert self.target.udp is not None
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(self), remote_addr=self.target.udp
        )
        self._udp = transport
        self.connected = True
        await self._hello_loop()

    async def _run_ws(self) -> None:
        assert self.target.ws_url is not None
        session = await self.client._session_get()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await session.ws_connect(
                self.target.ws_url,
                heartbeat=None,
                max_msg_size=wire.DATA_MIN_LEN + 65536,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            )
        try:
            self._ws = ws
            self._queue = asyncio.Queue(WS_QUEUE)
            self.connected = True
            # All three run until one fails (the group then cancels the others): a closed socket, a
            # send past its deadline, or hellos no longer acknowledged.
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._ws_reader(ws))
                tg.create_task(self._ws_writer(ws))
                tg.create_task(self._hello_loop())
        except* (ConnectionError, aiohttp.ClientError, TimeoutError) as eg:
            raise eg.exceptions[0] from None
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await ws.close()

    async def _ws_reader(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        # The server closes a connection silent for a binding lifetime; our hellos keep it busy well before.
        idle = self.client.hello_interval * 4
        while True:
            msg = await ws.receive(timeout=idle)
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.received(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise ConnectionError(f"websocket closed by the coordinator ({ws.close_code})")
            elif msg.type == aiohttp.WSMsgType.ERROR:
                raise ConnectionError(f"websocket error: {ws.exception()}")
            else:
                self.client.stats.drop("bad_frame")

    async def _ws_writer(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            frame = await self._queue.get()
            async with asyncio.timeout(SEND_TIMEOUT):
                await ws.send_bytes(frame)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, up: _Upstream) -> None:
        self._up = up

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._up.received(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable: the coordinator is not listening (yet); the hello retries and the upstream
        # goes down if no ack comes.
        self._up.last_error = f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class _Virtual:
    """A peer's virtual endpoint: a non-blocking loopback socket watched by the event loop."""

    key: bytes
    transport: str
    sock: socket.socket
    port: int
    via: str = ""  # the coordinator/transport the last frame left through
    tx: int = 0
    rx: int = 0


class RelayClient:
    """Reach peers through the coordinators' relays (see the module comment). Use from one event loop."""

    def __init__(
        self,
        private_key: bytes | nacl.public.PrivateKey,
        dataplane_port: int,
        *,
        hello_interval: float = HELLO_INTERVAL,
        ack_timeout: float = ACK_TIMEOUT,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._key = (
            private_key
            if isinstance(private_key, nacl.public.PrivateKey)
            else nacl.public.PrivateKey(private_key)
        )
        self.public_key = bytes(self._key.public_key)
        self.dataplane_port = dataplane_port
        self.hello_interval = hello_interval
        self.ack_timeout = ack_timeout
        self.stats = _Stats()
        self._targets: list[_Target] = []
        self._upstreams: dict[tuple[str, str], _Upstream] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._virtual: dict[bytes, _Virtual] = {}
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self._changed = asyncio.Event()  # pulsed when an upstream comes up
        self._registry = registry
        self._collector = _Collector(self)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        if self._registry is not None:
            self._registry.register(self._collector)
        self._reconcile()

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for up in self._upstreams.values():
            up._close()
        self._upstreams.clear()
        for v in self._virtual.values():
            self._close_virtual(v)
        self._virtual.clear()
        if self._session is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._session.close()
            self._session = None
        if self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)

    async def _session_get(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    # -- configuration -------------------------------------------------------------------------------------

    def set_coordinators(self, coordinators: Iterable[CoordinatorLike]) -> None:
        """The coordinators to bind to (those with a relay key and at least one relay address)."""
        targets: list[_Target] = []
        for c in coordinators:
            key = bytes(c.relay_public_key)
            if len(key) != wire.KEY_LEN or not (c.relay_udp_address or c.relay_ws_url):
                continue
            udp = None
            if c.relay_udp_address:
                try:
                    udp = split_host_port(c.relay_udp_address)
                except ValueError as exc:
                    log.warning("event=relay_bad_address coordinator=%s error=%r", c.id, str(exc))
            targets.append(_Target(c.id, udp, c.relay_ws_url or None, key))
        self._targets = sorted(targets, key=lambda t: t.id)
        self._reconcile()

    def _reconcile(self) -> None:
        if not self._started:
            return
        wanted: dict[tuple[str, str], _Target] = {}
        for t in self._targets:
            if t.udp is not None:
                wanted[(t.id, "udp")] = t
            if t.ws_url is not None:
                wanted[(t.id, "ws")] = t
        for k in list(self._upstreams):
            if k not in wanted or self._upstreams[k].target != wanted[k]:
                self._upstreams.pop(k)._close()
                task = self._tasks.pop(k, None)
                if task is not None:
                    task.cancel()
        for k, t in wanted.items():
            if k not in self._upstreams:
                up = _Upstream(self, t, k[1])
                self._upstreams[k] = up
                task = asyncio.get_running_loop().create_task(up.run(), name=f"relay-{k[0]}-{k[1]}")
                task.add_done_callback(self._task_done)
                self._tasks[k] = task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("event=relay_upstream_crashed error=%r", task.exception())

    # -- peers ---------------------------------------------------------------------------------------------

    def endpoint_for(self, peer_public_key: bytes, transport: str = "udp") -> tuple[str, int]:
        """The loopback endpoint the data plane uses for ``peer_public_key`` while it goes through a relay
        on ``transport`` ("udp" or "ws"). Calling again with another transport keeps the endpoint."""
        if transport not in TRANSPORTS:
            raise ValueError(f"relay transport must be one of {TRANSPORTS}, not {transport!r}")
        if len(peer_public_key) != wire.KEY_LEN:
            raise ValueError("a peer public key is 32 bytes")
        v = self._virtual.get(peer_public_key)
        if v is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((LOOPBACK, 0))
                v = _Virtual(peer_public_key, transport, sock, sock.getsockname()[1])
                asyncio.get_running_loop().add_reader(sock.fileno(), self._on_virtual, v)
            except BaseException:
                sock.close()
                raise
            self._virtual[peer_public_key] = v
            log.info(
                "event=relay_endpoint peer=%s transport=%s endpoint=%s:%d",
                fingerprint(peer_public_key),
                transport,
                LOOPBACK,
                v.port,
            )
        elif v.transport != transport:
            log.info("event=relay_transport peer=%s transport=%s", fingerprint(peer_public_key), transport)
            v.transport = transport
        return (LOOPBACK, v.port)

    def release(self, peer_public_key: bytes) -> None:
        """Close a peer's virtual endpoint (it no longer goes through a relay)."""
        v = self._virtual.pop(peer_public_key, None)
        if v is not None:
            self._close_virtual(v)

    def _close_virtual(self, v: _Virtual) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(v.sock.fileno())
        v.sock.close()

    def available(self, transport: str) -> bool:
        """Whether some coordinator currently acknowledges our hello on ``transport``."""
        now = time.monotonic()
        return any(up.transport == transport and up.up(now) for up in self._upstreams.values())

    async def wait_available(self, transport: str, timeout: float) -> bool:  # noqa: ASYNC109 - a wait budget
        """Wait up to ``timeout`` seconds until :meth:`available` (``transport``); returns whether it is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.available(transport):
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        return True

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        coords = []
        for t in self._targets:
            entry: dict[str, object] = {"id": t.id}
            for transport in TRANSPORTS:
                up = self._upstreams.get((t.id, transport))
                if up is None:
                    continue
                entry[transport] = {
                    "address": up.address,
                    "up": up.up(now),
                    "ack_age": None if up.acked_at is None else round(now - up.acked_at, 3),
                    "error": up.last_error,
                }
            coords.append(entry)
        peers = {
            fingerprint(k): {
                "endpoint": f"{LOOPBACK}:{v.port}",
                "transport": v.transport,
                "via": v.via,
                "tx_packets": v.tx,
                "rx_packets": v.rx,
            }
            for k, v in self._virtual.items()
        }
        s = self.stats
        return {
            "coordinators": coords,
            "peers": peers,
            "tx_packets": s.tx_packets,
            "rx_packets": s.rx_packets,
            "dropped": dict(s.dropped),
        }

    # -- packet paths --------------------------------------------------------------------------------------

    def _pick(self, transport: str) -> _Upstream | None:
        now = time.monotonic()
        for wanted in (transport, "ws" if transport == "udp" else "udp"):
            for t in self._targets:
                up = self._upstreams.get((t.id, wanted))
                if up is not None and up.up(now):
                    return up
        return None

    def _on_virtual(self, v: _Virtual) -> None:
        """The data plane sent to a virtual endpoint: drain the socket, wrap each datagram, send it on."""
        for _ in range(VIRTUAL_BATCH):
            try:
                data, src = v.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stats.drop("virtual_error")
                log.debug("event=relay_virtual_error peer=%s error=%r", fingerprint(v.key), exc)
                return
            self._outbound(v, data, src)

    def _outbound(self, v: _Virtual, data: bytes, src: tuple[str, int]) -> None:
        if src[1] != self.dataplane_port:
            self.stats.drop("foreign_sender")  # only our data plane may use the virtual endpoint
            return
        up = self._pick(v.transport)
        if up is None:
            self.stats.drop("no_relay")
            return
        if up.send(wire.encode_data(v.key, data)):
            v.via = f"{up.target.id}/{up.transport}"
            v.tx += 1
            self.stats.tx_packets += 1
            self.stats.tx_bytes += len(data)

    def _deliver(self, src: bytes, payload: bytes) -> None:
        v = self._virtual.get(src)
        if v is None:
            self.stats.drop("unknown_peer")
            return
        try:
            v.sock.sendto(payload, (LOOPBACK, self.dataplane_port))
        except OSError:  # loopback buffer full (the data plane is behind): like a lost datagram
            self.stats.drop("dataplane_busy")
            return
        v.rx += 1
        self.stats.rx_packets += 1
        self.stats.rx_bytes += len(payload)


class _Collector(Collector):
    def __init__(self, client: RelayClient) -> None:
        self._client = client

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._client.stats
        yield counter_family(
            "tunnelmesh_node_relay_packets",
            "Datagrams through coordinator relays.",
            ["direction"],
            [(("tx",), s.tx_packets), (("rx",), s.rx_packets)],
        )
        yield counter_family(
            "tunnelmesh_node_relay_dropped",
            "Relay datagrams dropped by this node, by reason.",
            ["reason"],
            by_label(s.dropped),
        )
        now = time.monotonic()
        yield gauge_family(
            "tunnelmesh_node_relay_upstream_up",
            "1 while a coordinator acknowledges our relay hello on a transport.",
            ["coordinator", "transport"],
            [
                ((cid, transport), 1.0 if up.up(now) else 0.0)
                for (cid, transport), up in sorted(self._client._upstreams.items())
            ],
        )
