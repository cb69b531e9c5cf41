"""The coordinator's UDP endpoint reflector and blind relay (one port, ``--relay-listen``).

Theory of operation
-------------------
Frames are non-WireGuard datagrams: a type byte in 0x20-0x2F and three zero bytes, then a body.

* ``REFLECT_REQUEST`` (0x20, exactly 64 bytes, so a reply is never larger than its request) is answered
  with ``REFLECT_RESPONSE`` (0x21): the transaction id and the source address the coordinator saw. A node
  behind NAT learns its mapped (reflexive) address this way. Requests are rate-limited per source IP.
* ``RELAY_HELLO`` (0x24) binds a node's static public key to where the hello came from (a UDP address or a
  WebSocket connection). It is a NaCl ``Box`` from the node's static key to this coordinator's relay key over
  a nanosecond timestamp: only the holder of a registered node's private key can make one, and a captured one
  cannot be replayed (window +-60 s, strictly newer than the last accepted one for that key). The answer is
  ``RELAY_HELLO_ACK`` (0x25) echoing the nonce.
* ``RELAY_DATA`` (0x26) carries an opaque payload (a WireGuard datagram, already end-to-end encrypted between
  the two nodes). Client to coordinator, the key field names the destination; coordinator to client, the
  source. The hub forwards only between bound keys and never parses a payload: it is blind.

``RelayHub`` holds the bindings and the decisions; it is shared by the UDP endpoint here and the WebSocket
endpoint (``coord/http.py``), so a node on UDP and a node on WebSocket reach each other. A key holds at most
one binding per transport (a new hello from elsewhere replaces it), traffic to it leaves on the binding it
used last, and a binding expires ``BINDING_TTL`` after its last hello or data. Anything refused is dropped
silently (no answer, no amplification) and counted in ``tunnelmesh_relay_dropped_total{reason}``. The hub is
sans-I/O apart from the sinks it is handed, and reads time only through injected clocks (unit-tested).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, cast

import nacl.exceptions
import nacl.public
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from tunnelmesh import identity
from tunnelmesh.errors import ProtocolError

log = logging.getLogger(__name__)

# -- wire format (shared with the node side: node/relay_client.py, node/nat.py) ------------------------------

REFLECT_REQUEST: Final = 0x20
REFLECT_RESPONSE: Final = 0x21
RELAY_HELLO: Final = 0x24
RELAY_HELLO_ACK: Final = 0x25
RELAY_DATA: Final = 0x26

HEADER_LEN: Final = 4
KEY_LEN: Final = 32
TXID_LEN: Final = 12
NONCE_LEN: Final = 24
REFLECT_REQUEST_LEN: Final = 64
HELLO_LEN: Final = HEADER_LEN + KEY_LEN + NONCE_LEN + 8 + 16  # 8-byte timestamp + Poly1305 tag
HELLO_ACK_LEN: Final = HEADER_LEN + NONCE_LEN
DATA_MIN_LEN: Final = HEADER_LEN + KEY_LEN + 1

RELAY_KEY_FILE: Final = "relay.key"
BINDING_TTL: Final = 60.0  # seconds after the last hello or data
HELLO_INTERVAL: Final = 15.0  # clients repeat their hello this often
HELLO_SKEW: Final = 60.0  # accepted distance between a hello's timestamp and our clock, seconds
RATE_PER_SOURCE: Final = 50.0  # reflections + UDP hellos per second per source IP (NATs hide many nodes)
RATE_BURST: Final = 100.0
_MAX_SOURCES: Final = 65536  # rate-limit buckets kept at most (sources beyond that share no state)
_SWEEP_EVERY: Final = 5.0

_U64: Final = struct.Struct(">Q")
_U16: Final = struct.Struct(">H")

Address = tuple[str, int]


def header(msg_type: int) -> bytes:
    return bytes((msg_type, 0, 0, 0))


def frame_type(frame: bytes) -> int | None:
    """The type of a TunnelMesh control frame (0x20-0x2F with three zero bytes), else None."""
    if len(frame) < HEADER_LEN or not 0x20 <= frame[0] <= 0x2F or frame[1:4] != b"\0\0\0":
        return None
    return frame[0]


def encode_reflect_request(txid: bytes) -> bytes:
    if len(txid) != TXID_LEN:
        raise ValueError(f"txid must be {TXID_LEN} bytes")
    return (header(REFLECT_REQUEST) + txid).ljust(REFLECT_REQUEST_LEN, b"\0")


def encode_reflect_response(txid: bytes, addr: Address) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return header(REFLECT_RESPONSE) + txid + bytes((ip.version,)) + _U16.pack(addr[1]) + ip.packed


def decode_reflect_response(frame: bytes) -> tuple[bytes, Address]:
    """(txid, observed address) of a REFLECT_RESPONSE; raises ProtocolError on anything malformed."""
    if frame_type(frame) != REFLECT_RESPONSE or len(frame) < HEADER_LEN + TXID_LEN + 3:
        raise ProtocolError("not a reflect response")
    txid = frame[HEADER_LEN : HEADER_LEN + TXID_LEN]
    family = frame[HEADER_LEN + TXID_LEN]
    port = _U16.unpack_from(frame, HEADER_LEN + TXID_LEN + 1)[0]
    raw = frame[HEADER_LEN + TXID_LEN + 3 :]
    if (family, len(raw)) not in ((4, 4), (6, 16)):
        raise ProtocolError(f"reflect response: bad family {family} / address length {len(raw)}")
    return txid, (str(ipaddress.ip_address(raw)), port)


def encode_hello(
    node_key: nacl.public.PrivateKey, relay_public_key: bytes, nonce: bytes, now_ns: int | None = None
) -> bytes:
    """A RELAY_HELLO from ``node_key`` to the coordinator whose relay key is ``relay_public_key``."""
    ts = time.time_ns() if now_ns is None else now_ns
    box = nacl.public.Box(node_key, nacl.public.PublicKey(relay_public_key))
    sealed = box.encrypt(_U64.pack(ts), nonce).ciphertext
    return header(RELAY_HELLO) + bytes(node_key.public_key) + nonce + sealed


def encode_hello_ack(nonce: bytes) -> bytes:
    return header(RELAY_HELLO_ACK) + nonce


def encode_data(peer_key: bytes, payload: bytes) -> bytes:
    return header(RELAY_DATA) + peer_key + payload


def decode_data(frame: bytes) -> tuple[bytes, bytes]:
    """(peer key, payload) of a RELAY_DATA frame; raises ProtocolError if it is not one."""
    if frame_type(frame) != RELAY_DATA or len(frame) < DATA_MIN_LEN:
        raise ProtocolError("not a relay data frame")
    return frame[HEADER_LEN : HEADER_LEN + KEY_LEN], frame[HEADER_LEN + KEY_LEN :]


def generate_key() -> nacl.public.PrivateKey:
    """A fresh relay key (tests, and the first start before it is saved)."""
    return identity.generate().private_key


def load_relay_key(data_dir: Path) -> nacl.public.PrivateKey:
    """The coordinator's relay key ``D/relay.key`` (X25519, wg key format, 0600), created on first start."""
    ident, created = identity.load_or_create(Path(data_dir) / RELAY_KEY_FILE)
    if created:
        log.info("event=relay_key_created public=%s", ident.fingerprint)
    return ident.private_key


# -- the hub -------------------------------------------------------------------------------------------------


class Sink(Protocol):
    """Where frames for a bound key go: a UDP address or a WebSocket connection."""

    transport: str  # "udp" or "ws"

    def send(self, frame: bytes) -> bool:
        """Queue or send one frame without blocking; False if it was dropped."""
        ...


@dataclass(slots=True)
class _UdpSink:
    udp: asyncio.DatagramTransport
    addr: Address
    transport: str = "udp"

    def send(self, frame: bytes) -> bool:
        self.udp.sendto(frame, self.addr)
        return True


@dataclass(slots=True)
class _Binding:
    sink: Sink
    expires: float
    used: int  # use sequence number (hello or data): a key's most recently used binding gets its traffic
    addr: Address | None  # the UDP address this binding answers to (None for WebSocket)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass(slots=True)
class _Counters:
    dropped: dict[str, int] = field(default_factory=dict)
    packets: dict[str, int] = field(default_factory=dict)  # forwarded, by outbound transport
    bytes: dict[str, int] = field(default_factory=dict)
    reflects: int = 0
    hellos: int = 0


class RelayHub:
    """Bindings, reflection and forwarding decisions. Not thread-safe: call from the event loop only.

    A key may hold one UDP and one WebSocket binding at once (a client keeps both transports ready); it may
    send from either, and traffic to it leaves on the one it used last (hello or data), so a node that
    switches a peer to WebSocket gets that peer's answers over WebSocket too.
    """

    def __init__(
        self,
        relay_key: nacl.public.PrivateKey,
        is_node: Callable[[bytes], bool],
        *,
        registry: CollectorRegistry | None = REGISTRY,
        binding_ttl: float = BINDING_TTL,
        hello_skew: float = HELLO_SKEW,
        rate: float = RATE_PER_SOURCE,
        burst: float = RATE_BURST,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._key = relay_key
        self.public_key = bytes(relay_key.public_key)
        self._is_node = is_node
        self._ttl = binding_ttl
        self._skew_ns = int(hello_skew * 1e9)
        self._rate = rate
        self._burst = burst
        self._now = monotonic
        self._wall_ns = wall_ns
        self._bindings: dict[tuple[bytes, str], _Binding] = {}
        self._by_addr: dict[Address, bytes] = {}
        self._last_ts: dict[bytes, int] = {}
        self._boxes: dict[bytes, nacl.public.Box] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._next_sweep = 0.0
        self._seq = 0
        self.counters = _Counters()
        self._registry = registry
        self._collector = _Collector(self)
        if registry is not None:
            try:
                registry.register(self._collector)
            except ValueError:  # another hub in this process (tests run several coordinators in one)
                log.warning("event=relay_metrics_not_registered reason='another relay hub exports them'")
                self._registry = None

    def close(self) -> None:
        if self._registry is not None:
            self._registry.unregister(self._collector)
            self._registry = None

    # -- entry points --------------------------------------------------------------------------------------

    def handle_udp(self, frame: bytes, addr: Address, udp: asyncio.DatagramTransport) -> None:
        """One datagram from ``addr`` on the relay port."""
        now = self._now()
        self._maybe_sweep(now)
        t = frame_type(frame)
        if t is None:
            self.count_drop("short" if len(frame) < HEADER_LEN else "bad_header")
        elif t == RELAY_DATA:
            src = self._by_addr.get(addr)
            b = self._bindings.get((src, "udp")) if src is not None else None
            if src is None or b is None or b.addr != addr or b.expires <= now:
                self.count_drop("unbound_sender")
            else:
                b.expires, b.used = now + self._ttl, self._tick()
                self._forward(src, frame, now)
        elif t == REFLECT_REQUEST:
            if len(frame) != REFLECT_REQUEST_LEN:
                self.count_drop("bad_reflect_size")
            elif self._limited(addr[0], now):
                self.count_drop("rate_limited")
            else:
                udp.sendto(encode_reflect_response(frame[HEADER_LEN : HEADER_LEN + TXID_LEN], addr), addr)
                self.counters.reflects += 1
        elif t == RELAY_HELLO:
            if self._limited(addr[0], now):
                self.count_drop("rate_limited")
                return
            key = self._check_hello(frame)
            if key is not None:
                old = self._bindings.get((key, "udp"))
                if old is not None and old.addr == addr and old.expires > now:
                    old.expires, old.used = now + self._ttl, self._tick()  # same place: keep the sink
                else:
                    self._bind(key, _UdpSink(udp, addr), addr, now)
                udp.sendto(encode_hello_ack(_nonce(frame)), addr)
        else:
            self.count_drop("unknown_type")

    def handle_ws(self, frame: bytes, sink: Sink, bound_key: bytes | None) -> bytes | None:
        """One binary WebSocket message on connection ``sink``, bound to ``bound_key`` so far (None before
        its first accepted hello). Returns the key the connection is bound to afterwards."""
        now = self._now()
        self._maybe_sweep(now)
        t = frame_type(frame)
        if t is None:
            self.count_drop("short" if len(frame) < HEADER_LEN else "bad_header")
        elif t == RELAY_HELLO:
            key = self._check_hello(frame)
            if key is not None:
                if bound_key is not None and bound_key != key:
                    self.unbind(bound_key, sink)
                old = self._bindings.get((key, "ws"))
                if old is not None and old.sink is sink:
                    old.expires, old.used = now + self._ttl, self._tick()
                else:
                    self._bind(key, sink, None, now)
                sink.send(encode_hello_ack(_nonce(frame)))
                return key
        elif t == RELAY_DATA:
            b = self._bindings.get((bound_key, "ws")) if bound_key is not None else None
            if bound_key is None or b is None or b.sink is not sink or b.expires <= now:
                self.count_drop("unbound_sender")
            else:
                b.expires, b.used = now + self._ttl, self._tick()
                self._forward(bound_key, frame, now)
        else:
            self.count_drop("unknown_type")  # reflection is UDP only: it is about UDP mappings
        return bound_key

    def unbind(self, key: bytes, sink: Sink) -> None:
        """Forget ``key``'s binding if it still goes to ``sink`` (a WebSocket connection closing)."""
        b = self._bindings.get((key, sink.transport))
        if b is not None and b.sink is sink:
            self._remove(key, b)

    # -- introspection -------------------------------------------------------------------------------------

    def bindings(self) -> dict[bytes, str]:
        """Live bindings: public key -> the transport its traffic leaves on."""
        now = self._now()
        out: dict[bytes, str] = {}
        for key, _ in list(self._bindings):
            b = self._route(key, now)
            if b is not None:
                out[key] = b.sink.transport
        return out

    def binding_counts(self) -> dict[str, int]:
        """Live bindings by transport (a key bound on both counts once in each)."""
        now = self._now()
        counts = {"udp": 0, "ws": 0}
        for (_, transport), b in self._bindings.items():
            if b.expires > now:
                counts[transport] = counts.get(transport, 0) + 1
        return counts

    def dropped(self, reason: str) -> int:
        return self.counters.dropped.get(reason, 0)

    def count_drop(self, reason: str) -> None:
        """Count a dropped frame under ``reason`` (``tunnelmesh_relay_dropped_total``)."""
        d = self.counters.dropped
        d[reason] = d.get(reason, 0) + 1

    # -- internals -----------------------------------------------------------------------------------------

    def _limited(self, source: str, now: float) -> bool:
        b = self._buckets.get(source)
        if b is None:
            if len(self._buckets) >= _MAX_SOURCES:
                self._sweep(now)
            b = self._buckets[source] = _Bucket(self._burst, now)
        b.tokens = min(self._burst, b.tokens + (now - b.stamp) * self._rate)
        b.stamp = now
        if b.tokens < 1.0:
            return True
        b.tokens -= 1.0
        return False

    def _check_hello(self, frame: bytes) -> bytes | None:
        """The node key of a valid hello, else None (dropped and counted)."""
        if len(frame) != HELLO_LEN:
            self.count_drop("bad_hello_size")
            return None
        key = frame[HEADER_LEN : HEADER_LEN + KEY_LEN]
        sealed = frame[HEADER_LEN + KEY_LEN + NONCE_LEN :]
        try:
            known = self._is_node(key)
        except Exception:  # a state lookup failing must not take the relay down
            log.exception("event=relay_is_node_failed")
            known = False
        if not known:
            self.count_drop("unknown_node")
            return None
        box = self._boxes.get(key)
        if box is None:
            if len(self._boxes) >= 4096:
                self._boxes.clear()
            box = self._boxes[key] = nacl.public.Box(self._key, nacl.public.PublicKey(key))
        try:
            ts = _U64.unpack(box.decrypt(sealed, _nonce(frame)))[0]
        except (nacl.exceptions.CryptoError, struct.error):
            self.count_drop("bad_hello_auth")
            return None
        if abs(self._wall_ns() - ts) > self._skew_ns:
            self.count_drop("stale_hello")
            return None
        if ts <= self._last_ts.get(key, -1):
            self.count_drop("replayed_hello")
            return None
        self._last_ts[key] = ts
        self.counters.hellos += 1
        return key

    def _bind(self, key: bytes, sink: Sink, addr: Address | None, now: float) -> None:
        old = self._bindings.get((key, sink.transport))
        if old is not None:
            self._remove(key, old)
        self._bindings[(key, sink.transport)] = _Binding(sink, now + self._ttl, self._tick(), addr)
        if addr is not None:
            stale = self._by_addr.get(addr)
            if stale is not None and stale != key:
                # Another key used this address before (a NAT reused the port): that binding is dead.
                sb = self._bindings.get((stale, "udp"))
                if sb is not None and sb.addr == addr:
                    self._remove(stale, sb)
            self._by_addr[addr] = key
        log.info(
            "event=relay_bound node=%s transport=%s addr=%s",
            identity.fingerprint(key),
            sink.transport,
            f"{addr[0]}:{addr[1]}" if addr else "-",
        )

    def _remove(self, key: bytes, b: _Binding) -> None:
        self._bindings.pop((key, b.sink.transport), None)
        if b.addr is not None and self._by_addr.get(b.addr) == key:
            del self._by_addr[b.addr]

    def _tick(self) -> int:
        self._seq += 1
        return self._seq

    def _route(self, key: bytes, now: float) -> _Binding | None:
        """The live binding traffic to ``key`` leaves on: its most recently used one."""
        best: _Binding | None = None
        for transport in ("udp", "ws"):
            b = self._bindings.get((key, transport))
            if b is not None and b.expires > now and (best is None or b.used > best.used):
                best = b
        return best

    def _forward(self, src: bytes, frame: bytes, now: float) -> None:
        if len(frame) < DATA_MIN_LEN:
            self.count_drop("short")
            return
        b = self._route(frame[HEADER_LEN : HEADER_LEN + KEY_LEN], now)
        if b is None:
            self.count_drop("unknown_destination")
            return
        # Same header, the key field now names the source; the payload is copied through untouched.
        out = frame[:HEADER_LEN] + src + frame[HEADER_LEN + KEY_LEN :]
        transport = b.sink.transport
        if b.sink.send(out):
            c = self.counters
            c.packets[transport] = c.packets.get(transport, 0) + 1
            c.bytes[transport] = c.bytes.get(transport, 0) + len(out) - HEADER_LEN - KEY_LEN

    def _maybe_sweep(self, now: float) -> None:
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_EVERY
        for (key, transport), b in [(k, b) for k, b in self._bindings.items() if b.expires <= now]:
            self._remove(key, b)
            log.info("event=relay_binding_expired node=%s transport=%s", identity.fingerprint(key), transport)
        # A timestamp older than the window is refused as stale anyway: no need to remember it.
        horizon = self._wall_ns() - self._skew_ns
        bound = {k for k, _ in self._bindings}
        for key in [k for k, ts in self._last_ts.items() if ts < horizon and k not in bound]:
            del self._last_ts[key]
        full = self._burst / self._rate if self._rate > 0 else 0.0
        for src in [s for s, b in self._buckets.items() if now - b.stamp > full]:
            del self._buckets[src]


def _nonce(frame: bytes) -> bytes:
    return frame[HEADER_LEN + KEY_LEN : HEADER_LEN + KEY_LEN + NONCE_LEN]


class _Collector(Collector):
    def __init__(self, hub: RelayHub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self._hub.counters
        dropped = CounterMetricFamily(
            "tunnelmesh_relay_dropped", "Relay/reflector frames dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted(c.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        packets = CounterMetricFamily(
            "tunnelmesh_relay_forwarded_packets",
            "Relay data frames forwarded, by the transport they left on.",
            labels=["transport"],
        )
        octets = CounterMetricFamily(
            "tunnelmesh_relay_forwarded_bytes",
            "Relayed payload bytes forwarded, by the transport they left on.",
            labels=["transport"],
        )
        for transport in ("udp", "ws"):
            packets.add_metric([transport], c.packets.get(transport, 0))
            octets.add_metric([transport], c.bytes.get(transport, 0))
        yield packets
        yield octets
        yield CounterMetricFamily(
            "tunnelmesh_relay_reflections", "Reflect requests answered.", value=c.reflects
        )
        yield CounterMetricFamily(
            "tunnelmesh_relay_hellos_accepted", "Relay hellos accepted.", value=c.hellos
        )
        gauge = GaugeMetricFamily("tunnelmesh_relay_bindings", "Live relay bindings.", labels=["transport"])
        for transport, n in sorted(self._hub.binding_counts().items()):
            gauge.add_metric([transport], n)
        yield gauge


# -- the UDP endpoint ----------------------------------------------------------------------------------------


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, hub: RelayHub) -> None:
        self._hub = hub
        self._udp: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._udp = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._udp is None:
            return
        try:
            self._hub.handle_udp(data, (str(addr[0]), int(addr[1])), self._udp)
        except Exception:  # one bad datagram must never stop the endpoint
            log.exception("event=relay_datagram_failed")

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for a peer that went away: the binding simply expires.
        log.debug("event=relay_udp_error error=%s", exc)


class RelayServer:
    """The UDP reflector/relay endpoint on ``listen`` ("host:port") in front of ``hub``."""

    def __init__(self, hub: RelayHub, listen: str) -> None:
        self.hub = hub
        self.listen = listen
        self._udp: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        assert self._udp is not None
        return int(self._udp.get_extra_info("sockname")[1])

    async def start(self, *, sock: object | None = None) -> None:
        """Bind (or adopt ``sock``, e.g. one made inside a netlab namespace)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _RelayProtocol(self.hub),
                sock=sock,  # type: ignore[arg-type]
            )
        else:
            host, _, port = self.listen.rpartition(":")
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _RelayProtocol(self.hub), local_addr=(host.strip("[]") or "0.0.0.0", int(port))
            )
        self._udp = transport
        log.info("event=relay_listening addr=%s", self.listen if sock is None else f"sock:{self.port}")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
