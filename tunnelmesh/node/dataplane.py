"""The data plane's I/O shell: a TUN device, a UDP socket and a sans-I/O ``wg.Device``, wired with threads.

Theory of operation
-------------------
The WireGuard protocol lives in ``node/wg/`` (pure, no I/O). This module feeds it and moves packets. Three
threads own the work; the per-packet path never touches asyncio:

* **tx** (TUN -> UDP): drain the TUN device (TSO super-packets of up to 64 KiB when the kernel offers
  ``IFF_VNET_HDR``), cut them into MTU-sized IP packets (``offload.segment``), route each super-packet once by
  destination (cryptokey routing: allowed IPs, longest prefix), encrypt the whole run with the peer's current
  :class:`~.wg.keypair.Keypair` directly and hand equal-sized runs of datagrams to the kernel in one UDP GSO
  ``sendmsg``. The device is told once per batch (timers, byte counters, rekey). A peer without a usable
  session goes through ``Device.send_many`` instead (which stages the packets and starts a handshake).
* **rx** (UDP -> TUN): drain the socket (one GRO ``recvmsg`` carries a train of datagrams from one source),
  decrypt transport messages with the keypair the receiver index names, check each inner source address
  against the sending peer's allowed IPs, merge in-order TCP segments of one flow (``offload.coalesce``) and
  write each merge to the TUN device as one GSO super-packet. The first datagram of every (keypair, source)
  run in a batch goes through ``Device.receive``, which does the bookkeeping once per batch: key
  confirmation, timers and **roaming** (an endpoint changes only after a packet authenticated, as the core
  reports with ``EndpointChanged``) - unless the session is settled (current keypair, same endpoint, no
  rekey due), when the only bookkeeping is one timers call made here. Handshake messages (types 1-3) are
  copied to a bounded queue for the control thread, so Diffie-Hellman work never stalls the packet path.
* **control**: handshake messages from the queue, the device's timers (rekey, retransmit, keepalives,
  persistent keepalive, key zeroing) at ``Device.next_deadline`` and live peer changes. When its queue backs
  up it sets ``Device.under_load``: initiations without a valid mac2 are then answered with cookie replies
  (no DH), and sources exceeding the rate limit are dropped, while established sessions keep flowing.

Locks: ``_lock`` guards the device's tables (peers, index table, timers); ``_send_lock`` serialises every
``Keypair.encrypt`` (a keypair's counter is the AEAD nonce and must never repeat). Order: ``_lock`` before
``_send_lock``. Decryption happens only on the rx thread (one decrypting thread per keypair, as the core
requires). The tx thread takes ``_lock`` for a few dict reads per batch and encrypts holding only
``_send_lock``, so the rx thread's bookkeeping and the control thread's handshakes do not wait for crypto.
``_tx_lock`` owns the TUN read side: the tx thread holds it per batch, and the rx thread takes it (without
waiting) around its TUN writes, so what the kernel answers at once (echo replies, TCP ACKs) is read and sent
by the thread that is already running instead of a freshly woken one. Meanwhile the TUN device's
readability is masked (``TunDevice.hold_wakeups``), so the write does not wake the tx thread either. Lanes
are made and dropped under ``_lock`` and read without it (a dict probe, then identity checks).

Latency (one packet after idle, e.g. ping): a packet thread that just woke takes the *lone-packet path*
(``_tx_lone``, ``_rx_lone``) for its first packet. A packet of a settled session (one with a ``_Lane``: its
current keypair and endpoint, made by the batch paths) is handled there with about what a bare tunnel does:
a memo probe for the route, identity checks that the lane still holds, the timers and counters, the AEAD
and one syscall to hand it on; anything else (handshakes, offloaded super-packets, GRO trains, roaming, a
session with bookkeeping due, a datagram that does not decrypt) goes on to the batch path as before. The rx
thread sleeps in the receive itself (``SO_RCVTIMEO``) rather than in ``poll`` first. The bookkeeping comes
before the hand-over and nothing but the wait after it: whatever the hand-over woke may be queued on the
same CPU. For a second after their last packet, the packet threads wait one short tick at a time
(``InterfaceConfig.warm_tick``) and on each tick run part of their path on nothing (the tx thread a TUN read,
the rx thread a dummy AEAD open), so the next lone packet does not find its CPU cold. See docs/dataplane.md,
Latency.

Checksums (negotiated, TunnelMesh peers only): right after every handshake each side sends a *capabilities*
message (type 0x10, encrypted and replay-checked like transport). A peer that offers ``CAP_PARTIAL_CSUM``
under the current keypair gets *seeded transport* (type 0x11): TCP/UDP checksums hold only the pseudo-header
seed, and it writes those packets to its TUN as ``NEEDS_CSUM``. A stock WireGuard peer never offers it (it
drops both unknown types), so it always gets type 4 with complete checksums. See docs/dataplane.md.

Routes (netlink, in the interface's namespace, whichever thread changes a peer): every peer's allowed IPs
through the TUN device, in the main table or ``InterfaceConfig.table``. A /0 with the table left "auto"
becomes wg-quick's policy routing instead (fwmark on the socket, a table of its own, two rules and an nftables
table: ``_sync_full_tunnel``, ``routes.py`` and docs/dataplane.md, Full tunnel), removed again when the /0
goes or the engine stops.

Offloads degrade gracefully: a kernel without ``IFF_VNET_HDR`` gives one packet per TUN read and write (and
no seeded checksums), a socket without UDP GSO/GRO one datagram per syscall (``udp.py``).

Metrics are exported by a collector that reads plain integers when Prometheus scrapes (nothing per packet
touches ``prometheus_client``); pass a ``CollectorRegistry`` so several engines in one process do not collide.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import ipaddress
import logging
import os
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from tunnelmesh.node import routes, wg
from tunnelmesh.node.errors import DataplaneError, OffloadError
from tunnelmesh.node.offload import VNET_HDR_LEN, VNET_HDR_NONE, Buffer, coalesce, parse_vnet_hdr, segment
from tunnelmesh.node.tun import MAX_READ, TunDevice
from tunnelmesh.node.udp import UdpSocket, gso_runs
from tunnelmesh.node.wg.actions import Endpoint
from tunnelmesh.node.wg.constants import (
    KEEPALIVE_TIMEOUT,
    MESSAGE_TRANSPORT_MIN_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)
from tunnelmesh.node.wg.crypto import AEAD, TAI64N
from tunnelmesh.node.wg.device import UNCHANGED, _Unchanged
from tunnelmesh.node.wg.keypair import Keypair, ReplayedCounter
from tunnelmesh.node.wg.peer import Peer
from tunnelmesh.node.wg.timers import Timers

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_MTU: Final = 1420
TX_READS: Final = 16  # TUN reads per transmit batch
TX_BATCH: Final = 64  # datagrams per transmit batch (one GSO send carries up to 64)
HANDSHAKE_QUEUE: Final = 4096  # handshake messages waiting for the control thread (wireguard-go: 4096)
UNDER_LOAD_QUEUE: Final = HANDSHAKE_QUEUE // 8  # backlog at which the device answers with cookies
UNDER_LOAD_HOLD: Final = 1.0  # seconds the device stays "under load" after the backlog clears
IDLE_WAIT: Final = 0.2  # seconds a packet thread sleeps in poll() before re-checking for shutdown
# For WARM_PERIOD seconds after its last packet, an idle packet thread wakes every WARM_TICK seconds, which
# keeps its CPU out of long idle, so the next lone packet is not handled cold (docs/dataplane.md, Latency).
WARM_TICK: Final = 0.001
WARM_PERIOD: Final = 1.0
# ... unless the other packet thread carries more packets a second than this: a tick would take the GIL from
# a thread moving bulk traffic (a single TCP stream lost 7 % to ticks every 1 ms), and a busy process needs
# no warming. A ping or a request/response exchange stays far below it.
WARM_BUSY_RATE: Final = 2000
_WARM_NONCE: Final = bytes(12)
_WARM_SIZE: Final = 96  # the padded payload of a ping
CONTROL_TICK: Final = 0.25  # upper bound on the control thread's sleep
THREAD_JOIN: Final = 5.0
HANDSHAKE_BURST: Final = 64  # handshake messages per control-loop round before timers are checked

_U32: Final = struct.Struct("<I")
_U16: Final = struct.Struct(">H")
_MSG_TRANSPORT: Final = 4
# TunnelMesh's own message types (WireGuard uses 1-4; a stock peer drops anything else silently):
# capabilities, and transport whose TCP/UDP checksums hold only the pseudo-header seed. Both are built and
# checked exactly like type 4 (same keypair, counter and replay window); only the type byte differs.
MESSAGE_TM_CAPABILITIES: Final = 0x10
MESSAGE_TM_TRANSPORT_SEEDED: Final = 0x11
CAPABILITY_MAGIC: Final = b"TMCAP\x01"
CAP_PARTIAL_CSUM: Final = 1  # "send me seeds: I write what I decrypt as checksum-pending (NEEDS_CSUM)"
_SEEDED: Final = bytes((MESSAGE_TM_TRANSPORT_SEEDED,))
_CAPS: Final = bytes((MESSAGE_TM_CAPABILITIES,))
_GSO_LIMIT: Final = 65000
_HANDSHAKE_TYPES: Final = frozenset((1, 2, 3))
# An initiator's keypair this old makes a received packet start a rekey (``Device``'s keep-key-fresh rule).
_REKEY_ON_RECEIVE_AGE: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
# Control datagrams on the data-plane socket (reflection, path probes, relay framing: see node/nat.py and
# coord/relay.py). They share the socket so NAT mappings are the tunnel's; the rx thread hands them over.
RAW_TYPE_MIN: Final = 0x20
RAW_TYPE_MAX: Final = 0x2F
RawHandler = Callable[[bytes, Endpoint], None]
_UNKNOWN: Final = b"?"  # not in AllowedIPs.memo (a real answer is a 32-byte key or None)


def key_b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def short(key: bytes) -> str:
    """The log name of a public key: its first 8 base64 characters (as ``identity.fingerprint``)."""
    return key_b64(key)[:8]


# -- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer, as a ``[Peer]`` section of a wg-quick file describes it."""

    public_key: bytes
    allowed_ips: tuple[str, ...] = ()
    endpoint: Endpoint | None = None
    preshared_key: bytes | None = field(default=None, repr=False)
    persistent_keepalive: float = 0.0

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise DataplaneError(f"peer public key must be 32 bytes, got {len(self.public_key)}")
        if self.preshared_key is not None and len(self.preshared_key) != 32:
            raise DataplaneError(f"peer {short(self.public_key)}: preshared key must be 32 bytes")
        for net in self.allowed_ips:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise DataplaneError(f"peer {short(self.public_key)}: bad allowed IP {net!r}: {exc}") from exc
        if self.persistent_keepalive < 0 or self.persistent_keepalive > 65535:
            raise DataplaneError(f"peer {short(self.public_key)}: persistent keepalive out of range 0-65535")


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """The ``[Interface]`` of a wg-quick file plus the engine's own knobs."""

    private_key: bytes = field(repr=False)
    name: str = "tm0"
    listen_port: int = 0
    addresses: tuple[str, ...] = ()
    mtu: int = DEFAULT_MTU
    # None: one dual-stack socket for IPv4 and IPv6 peers (IPv4 only, logged, if the kernel has no IPv6).
    listen_host: str | None = None
    offloads: bool = True  # TUN virtio_net_hdr + TSO and UDP GSO/GRO where the kernel has them
    manage_routes: bool = True  # route the peers' allowed IPs through the TUN device (``Table = off``: False)
    # wg-quick's ``Table``: None is "auto" (the main table; a /0 through policy routing, docs/dataplane.md
    # "Full tunnel"); a table number puts every route, a /0 too, in that table and adds no rules.
    table: int | None = None
    fwmark: int = 0  # SO_MARK on the UDP socket (wg-quick ``FwMark``); 0: none, unless a /0 needs one
    udp_buffer: int = 4 << 20
    # Offer TunnelMesh peers to skip payload checksums (negotiated per session; stock peers never see it).
    skip_checksums: bool = True
    # Seconds between wake-ups of an idle packet thread while traffic is recent (WARM_PERIOD); 0: sleep
    # until a packet comes (less CPU, a slower first packet after each pause).
    warm_tick: float = WARM_TICK

    def __post_init__(self) -> None:
        if not 0 <= self.warm_tick <= IDLE_WAIT:
            raise DataplaneError(f"warm tick must be 0 (off) or up to {IDLE_WAIT} s, got {self.warm_tick}")


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What ``peers()`` reports for one peer (``wg show``'s fields plus packet counts)."""

    public_key: bytes
    endpoint: Endpoint | None
    allowed_ips: tuple[str, ...]
    latest_handshake: float | None  # wall-clock seconds (time.time()), None before the first handshake
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    handshakes: int
    persistent_keepalive: float
    has_preshared_key: bool
    # Messages from the peer that never arrived intact: gaps in its counters (``Keypairs.rx_lost``).
    rx_lost: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "public_key": key_b64(self.public_key),
            "endpoint": None if self.endpoint is None else _fmt_endpoint(self.endpoint),
            "allowed_ips": list(self.allowed_ips),
            "latest_handshake": self.latest_handshake,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets,
            "tx_packets": self.tx_packets,
            "rx_lost": self.rx_lost,
            "handshakes": self.handshakes,
            "persistent_keepalive": self.persistent_keepalive,
            "preshared_key": self.has_preshared_key,
        }


class _Counters:
    """Per-peer counters the device does not keep. Plain ints written by one thread each."""

    __slots__ = ("handshakes", "rx_packets", "tx_packets")

    def __init__(self) -> None:
        self.rx_packets = 0
        self.tx_packets = 0
        self.handshakes = 0


class _Warmth:
    """One packet thread's warm waits (see ``DataPlane._warmth``)."""

    __slots__ = ("_asked", "_seen", "quiet", "tick", "ticks")

    def __init__(self, tick: float, ticks: int) -> None:
        self.tick, self.ticks = tick, ticks  # ticks: how many empty waits in a row end the warm period
        self.quiet = ticks  # empty waits in a row (the thread counts them); it starts cold
        self._seen, self._asked = 0, 0.0

    def warm(self, sibling_packets: int) -> bool:
        """Whether the next wait is a short tick: this thread had traffic within the warm period, and the
        other packet thread (``sibling_packets``: its running count) carried fewer than WARM_BUSY_RATE
        packets a second since the last ask."""
        if self.quiet >= self.ticks:
            return False
        now = time.monotonic()
        busy = sibling_packets - self._seen > (now - self._asked) * WARM_BUSY_RATE
        self._seen, self._asked = sibling_packets, now
        return not busy


class _Lane:
    """What a lone packet of a settled session needs, gathered once per keypair and endpoint.

    The batch paths make a lane when they find a peer's current keypair usable with its endpoint; the
    lone-packet paths (``_tx_lone``, ``_rx_lone``) find it by peer (sending) or receiver index (receiving).
    Each use checks, by identity, that the peer still has this keypair as current and this endpoint, and
    that no limit is near (``tx_until``/``rx_until``: rekey or reject by age; the send counter). Otherwise
    the packet takes the batch path, which does the bookkeeping and makes a new lane."""

    __slots__ = ("counters", "endpoint", "keypair", "peer", "recv_from", "rx_until", "send_to", "tx_until")

    def __init__(
        self, peer: Peer, keypair: Keypair, endpoint: Endpoint, udp: UdpSocket, counters: _Counters
    ) -> None:
        self.peer = peer
        self.keypair = keypair
        self.endpoint = endpoint
        self.send_to = udp.sockaddr(endpoint)
        self.recv_from = udp.received_form(endpoint)
        self.counters = counters
        initiator = keypair.is_initiator
        self.tx_until = keypair.created + (REKEY_AFTER_TIME if initiator else REJECT_AFTER_TIME)
        self.rx_until = keypair.created + (_REKEY_ON_RECEIVE_AGE if initiator else REJECT_AFTER_TIME)


# -- the engine ----------------------------------------------------------------------------------------------


class DataPlane:
    """A running WireGuard-compatible interface. ``start()`` opens everything, ``stop()`` closes it.

    ``start`` must run in the network namespace the TUN device and socket belong to (the calling thread's).
    All public methods are thread-safe.
    """

    def __init__(
        self,
        config: InterfaceConfig,
        peers: Iterable[PeerConfig] = (),
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self._initial_peers = list(peers)
        self.device = wg.Device(
            config.private_key,
            rng=random.SystemRandom(),
            timestamp=lambda: TAI64N(time.time()),
            mtu=config.mtu,
            jitter_rng=random.Random(),
        )
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped = False
        # Handshake messages for the control thread: a deque (append/popleft are atomic) and an event that
        # wakes the control thread; cheaper per message than queue.Queue, which matters under a flood.
        self._handshakes: deque[tuple[Endpoint, bytes]] = deque()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counters: dict[bytes, _Counters] = {}
        self._allowed: dict[bytes, tuple[str, ...]] = {}
        self._handshake_wall: dict[bytes, float] = {}
        self._under_load_until = 0.0
        self.handshake_queue_drops = 0
        self.tun_write_drops = 0
        self.no_route_drops = 0
        self.seeded_drops = 0  # checksum-seeded packets caught by a session change (rare; TCP resends)
        # Peers that proved (authenticated, under the keypair whose local index is stored) that they accept
        # seeded checksums. Only then do we skip payload checksums toward them.
        self._seeded_peers: dict[bytes, int] = {}
        # The transmit side: whoever holds _tx_lock reads the TUN device into these buffers and sends. The
        # rx thread takes it opportunistically right after a TUN write, so a reply the kernel generated in
        # that write (an echo reply, a TCP ACK) leaves without waking the tx thread.
        self._tx_lock = threading.Lock()
        self._tx_pool = [bytearray(MAX_READ) for _ in range(TX_READS)]
        self._tx_views = [memoryview(b) for b in self._tx_pool]
        self._tx_drained = False
        # Packets each packet thread carried (sent; received): the other one's warm waits read them (_Warmth).
        self._tx_packets = self._rx_packets = 0
        # Lanes of settled sessions for the lone-packet paths: by peer key, and by our receiver index. Written
        # under _lock, read without it (one dict probe each).
        self._tx_lanes: dict[bytes, _Lane] = {}
        self._rx_lanes: dict[int, _Lane] = {}
        self._tun_hdr = 0  # bytes before the IP packet in a TUN read (the virtio_net_hdr, if any)
        self._local_caps = 0
        self.errors: list[str] = []  # unexpected exceptions in worker threads (also logged)
        self.tun: TunDevice | None = None
        self.udp: UdpSocket | None = None
        self._registry = registry
        self._netns_fd = -1
        self._collector: _Collector | None = None
        self._raw_handler: RawHandler | None = None
        self.raw_handler_errors = 0
        # Full tunnel (a /0 with Table = auto): IP version -> priorities of the two rules added for it.
        self._routes_lock = threading.Lock()
        self._full_tunnel: dict[int, tuple[int, int]] = {}
        self._nft_families: set[int] = set()  # IP versions with our nftables table (routes.firewall_up)
        self._fwmark_table = 0

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self.device.public_key

    @property
    def name(self) -> str:
        return self.tun.name if self.tun is not None else self.config.name

    @property
    def listen_port(self) -> int:
        if self.udp is None:
            return self.config.listen_port
        return int(self.udp.local_address[1])

    def start(self) -> DataPlane:
        cfg = self.config
        # OpenSSL looks the cipher up on its first use in a process (~1 ms here): pay that now rather than
        # in the first handshake, where it delays the first packet on both sides.
        AEAD(bytes(32), 0, b"", b"")
        # The namespace the interface lives in: later route changes run there, whichever thread asks.
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.tun = TunDevice.open(cfg.name, vnet_hdr=cfg.offloads, offloads=cfg.offloads)
            self.tun.configure(cfg.addresses, mtu=cfg.mtu, up=True, txqueuelen=1000)
            if cfg.skip_checksums and self.tun.vnet_hdr and "csum" in self.tun.offloads:
                self._local_caps |= CAP_PARTIAL_CSUM
            self.udp = UdpSocket.bind(
                cfg.listen_host,
                cfg.listen_port,
                bufsize=cfg.udp_buffer,
                gso=cfg.offloads,
                gro=cfg.offloads,
                recv_slots=8,
                fwmark=cfg.fwmark,
            )
            self._tun_hdr = VNET_HDR_LEN if self.tun.vnet_hdr else 0
            # The rx thread's longest wait: it checks _stop in between (shorter while warm: _rx_loop).
            self.udp.set_receive_timeout(IDLE_WAIT)
            for peer in self._initial_peers:
                self.add_peer(peer)
        except BaseException:
            self._close_io()
            raise
        if self._registry is not None:
            self._collector = _Collector(self)
            self._registry.register(self._collector)
        for target, name in ((self._tx_loop, "tx"), (self._rx_loop, "rx"), (self._control_loop, "control")):
            t = threading.Thread(target=self._guard, args=(target,), name=f"{self.name}-{name}", daemon=True)
            self._threads.append(t)
            t.start()
        log.info(
            "event=dataplane_started iface=%s public_key=%s listen_port=%d vnet_hdr=%s offloads=%s gso=%s "
            "gro=%s peers=%d",
            self.name,
            short(self.public_key),
            self.listen_port,
            self.tun.vnet_hdr,
            ",".join(sorted(self.tun.offloads)) or "none",
            self.udp.gso,
            self.udp.gro,
            len(self._initial_peers),
        )
        return self

    def stop(self) -> None:
        """Stop the threads (each waits at most ``IDLE_WAIT`` in poll) and close the TUN device and socket."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(THREAD_JOIN)
            if t.is_alive():
                log.error("event=dataplane_thread_stuck thread=%s", t.name)
        if self._collector is not None and self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)
        self._close_io()
        log.info("event=dataplane_stopped iface=%s", self.config.name)

    def _close_io(self) -> None:
        if self.udp is not None:
            self._sync_full_tunnel(stopping=True)
        if self._netns_fd >= 0:
            os.close(self._netns_fd)
            self._netns_fd = -1
        if self.udp is not None:
            self.udp.close()
        if self.tun is not None:
            self.tun.close()

    def __enter__(self) -> DataPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stopped and all(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop()`` is called or a worker thread dies; True if stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.wait(0.5):
            if self._threads and not all(t.is_alive() for t in self._threads):
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    # -- control datagrams (types 0x20-0x2F) ----------------------------------------------------------------

    def send_raw(self, endpoint: Endpoint, data: bytes) -> None:
        """Send a control datagram (type byte 0x20-0x2F) from the data-plane socket, so it leaves with the
        tunnel's source port and NAT mapping. Raises ``DataplaneError`` if the engine is not running or the
        send fails."""
        udp = self.udp
        if udp is None or self._stopped:
            raise DataplaneError(f"{self.name}: data plane not running")
        if not data or not RAW_TYPE_MIN <= data[0] <= RAW_TYPE_MAX:
            raise DataplaneError(f"{self.name}: send_raw takes types 0x20-0x2F only")
        udp.send(data, endpoint)

    def set_raw_handler(self, handler: RawHandler | None) -> None:
        """Hand datagrams of types 0x20-0x2F to ``handler(data, source)`` (None: drop them as unknown, the
        default). It runs on the rx thread, so it must only enqueue (e.g. ``loop.call_soon_threadsafe``);
        an exception it raises is logged and counted, never fatal."""
        self._raw_handler = handler

    def in_netns(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (blocking; e.g. listing addresses over netlink) in the interface's network namespace
        and return its result."""
        box: list[_T] = []
        self._in_netns(lambda: box.append(fn()))
        if not box:
            raise DataplaneError(f"{self.name}: call in the interface's namespace did not finish")
        return box[0]

    def _raw(self, src: Endpoint, d: Buffer) -> bool:
        """A control datagram for the raw handler; False if there is none (the caller drops it)."""
        handler = self._raw_handler
        if handler is None:
            return False
        try:
            handler(bytes(d), src)
        except Exception:
            self.raw_handler_errors += 1
            log.exception("event=raw_handler_failed iface=%s", self.name)
        return True

    # -- peers -----------------------------------------------------------------------------------------------

    def add_peer(self, peer: PeerConfig) -> None:
        """Add a peer live; other peers' sessions are untouched."""
        with self._lock:
            try:
                self.device.add_peer(
                    peer.public_key,
                    preshared_key=peer.preshared_key,
                    endpoint=peer.endpoint,
                    allowed_ips=peer.allowed_ips,
                    persistent_keepalive=peer.persistent_keepalive,
                )
            except ValueError as exc:
                raise DataplaneError(f"cannot add peer {short(peer.public_key)}: {exc}") from exc
            self._counters[peer.public_key] = _Counters()
            self._allowed[peer.public_key] = tuple(peer.allowed_ips)
        self._add_routes(peer.allowed_ips)
        self._sync_full_tunnel()
        self._wake_control()
        log.info(
            "event=peer_added iface=%s peer=%s endpoint=%s allowed_ips=%s",
            self.name,
            short(peer.public_key),
            _fmt_endpoint(peer.endpoint),
            ",".join(peer.allowed_ips),
        )
        self._warn_unreachable(peer.public_key, peer.endpoint)

    def update_peer(
        self,
        public_key: bytes,
        *,
        endpoint: Endpoint | _Unchanged = UNCHANGED,
        allowed_ips: Sequence[str] | _Unchanged = UNCHANGED,
        preshared_key: bytes | _Unchanged | None = UNCHANGED,
        persistent_keepalive: float | _Unchanged = UNCHANGED,
    ) -> None:
        """Change a peer's settings (like ``wg set``); its session and everyone else's continue."""
        with self._lock:
            if public_key not in self.device.peers:
                raise DataplaneError(f"no peer {short(public_key)} on {self.name}")
            self.device.update_peer(
                public_key,
                endpoint=endpoint,
                allowed_ips=allowed_ips,
                preshared_key=preshared_key,
                persistent_keepalive=persistent_keepalive,
            )
            old: tuple[str, ...] = ()
            if not isinstance(allowed_ips, _Unchanged):
                old = self._allowed.get(public_key, ())
                self._allowed[public_key] = tuple(allowed_ips)
        if not isinstance(allowed_ips, _Unchanged):
            self._del_routes(set(old) - set(allowed_ips))
            self._add_routes(allowed_ips)
            self._sync_full_tunnel()
        self._wake_control()
        log.info("event=peer_updated iface=%s peer=%s", self.name, short(public_key))
        if not isinstance(endpoint, _Unchanged):
            self._warn_unreachable(public_key, endpoint)

    def _warn_unreachable(self, public_key: bytes, endpoint: Endpoint | None) -> None:
        """An IPv6 endpoint on an IPv4-only socket (explicit ``listen_host`` or no IPv6 in the kernel) fails
        every send: say so once, here, rather than at debug level per packet."""
        if endpoint is not None and ":" in endpoint[0] and self.udp is not None and not self.udp.ipv6:
            log.warning(
                "event=peer_endpoint_unreachable iface=%s peer=%s endpoint=%s reason=%r",
                self.name,
                short(public_key),
                _fmt_endpoint(endpoint),
                "IPv6 endpoint but the UDP socket is IPv4-only",
            )

    def remove_peer(self, public_key: bytes) -> None:
        """Remove a peer and destroy its keys; other peers are untouched."""
        with self._lock, self._send_lock:
            if public_key not in self.device.peers:
                raise DataplaneError(f"no peer {short(public_key)} on {self.name}")
            self.device.remove_peer(public_key)
            self._counters.pop(public_key, None)
            networks = self._allowed.pop(public_key, ())
            self._handshake_wall.pop(public_key, None)
            self._seeded_peers.pop(public_key, None)
            self._drop_lane(public_key)
        self._del_routes(networks)
        self._sync_full_tunnel()
        log.info("event=peer_removed iface=%s peer=%s", self.name, short(public_key))

    def peers(self) -> list[PeerStatus]:
        out: list[PeerStatus] = []
        with self._lock:
            for key, peer in self.device.peers.items():
                c = self._counters.get(key) or _Counters()
                out.append(
                    PeerStatus(
                        public_key=key,
                        endpoint=peer.endpoint,
                        allowed_ips=self._allowed.get(key, ()),
                        latest_handshake=self._handshake_wall.get(key),
                        rx_bytes=peer.rx_bytes,
                        tx_bytes=peer.tx_bytes,
                        rx_packets=c.rx_packets,
                        tx_packets=c.tx_packets,
                        handshakes=c.handshakes,
                        persistent_keepalive=peer.persistent_keepalive,
                        has_preshared_key=peer.handshake.preshared_key != bytes(32),
                        rx_lost=peer.keypairs.rx_lost(),
                    )
                )
        return out

    def drops(self) -> dict[str, int]:
        """Drop counters by reason (the core's, plus the shell's own)."""
        with self._lock:
            out = {str(reason): n for reason, n in self.device.drops.items()}
        out["handshake_queue_full"] = self.handshake_queue_drops
        out["tun_queue_full"] = self.tun_write_drops
        out["no_route"] = self.no_route_drops
        out["seeded_without_session"] = self.seeded_drops
        out["raw_handler_failed"] = self.raw_handler_errors
        return out

    def status(self) -> dict[str, object]:
        """Everything ``tunnelmesh dataplane show`` prints, as JSON-ready data."""
        tun, udp = self.tun, self.udp
        return {
            "interface": self.name,
            "public_key": key_b64(self.public_key),
            "listen_port": self.listen_port,
            "fwmark": udp.fwmark if udp is not None else self.config.fwmark,
            "mtu": self.config.mtu,
            "addresses": list(self.config.addresses),
            "offloads": {
                "vnet_hdr": bool(tun and tun.vnet_hdr),
                "tun": sorted(tun.offloads) if tun else [],
                "udp_gso": bool(udp and udp.gso),
                "udp_gro": bool(udp and udp.gro),
                "payload_checksums": "skipped with negotiating TunnelMesh peers"
                if self._local_caps & CAP_PARTIAL_CSUM
                else "computed",
            },
            "warm_tick": self.config.warm_tick,  # 0: off (low power)
            "warm_period": WARM_PERIOD,
            "under_load": self.device.under_load,
            "drops": self.drops(),
            "peers": [p.to_json() for p in self.peers()],
        }

    # -- routes ----------------------------------------------------------------------------------------------

    def _add_routes(self, networks: Iterable[str]) -> None:
        """Route ``networks`` through the TUN device: into ``config.table`` if set, else into the main table,
        where a /0 is left to ``_sync_full_tunnel`` (it would take over the namespace's own default route)."""
        self._routes("replace", networks)

    def _del_routes(self, networks: Iterable[str]) -> None:
        """Remove the routes ``_add_routes`` added."""
        self._routes("del", networks)

    def _routes(self, op: str, networks: Iterable[str]) -> None:
        if not self.config.manage_routes or self.tun is None:
            return
        table = self.config.table
        nets = [ipaddress.ip_network(x, strict=False) for x in networks]
        nets = [n for n in nets if n.prefixlen or table is not None]
        if not nets:
            return
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        name = self.tun.name
        extra = {} if table is None else {"table": table}

        def apply() -> None:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    return
                for n in nets:
                    # A /0 (in an explicit table) is added, never replaced: it may be the table's own
                    # default route, e.g. with ``Table = main``, which we must not take away.
                    how = "add" if op == "replace" and not n.prefixlen else op
                    try:
                        ipr.route(how, dst=str(n), oif=found[0], family=routes.FAMILY[n.version], **extra)
                    except NetlinkError as exc:
                        if op == "del":  # already gone (or never added): nothing to undo
                            log.debug(
                                "event=route_del_failed iface=%s network=%s error=%r", name, n, str(exc)
                            )
                        else:
                            log.warning("event=route_failed iface=%s network=%s error=%r", name, n, str(exc))

        self._in_netns(apply)

    def _sync_full_tunnel(self, *, stopping: bool = False) -> None:
        """Make the policy routing for a /0 among the peers' allowed IPs (``Table = auto``) match them, as
        wg-quick does: packets without the tunnel's fwmark look up table T (= the fwmark), whose default route
        is the TUN device, after the main table has answered for anything more specific than its default
        route; the tunnel's own UDP carries the mark, so it skips table T and leaves by the main table.
        ``stopping``: remove all of it (rules outlive the TUN device; its routes do not)."""
        if not self.config.manage_routes or self.config.table is not None or self.tun is None:
            return
        with self._lock:
            wanted = {
                ipaddress.ip_network(n, strict=False).version
                for nets in self._allowed.values()
                for n in nets
                if n.endswith("/0") and not stopping
            }
        with self._routes_lock:
            if wanted == set(self._full_tunnel):
                return
            name, udp = self.tun.name, self.udp
            assert udp is not None
            try:
                if not self._full_tunnel:  # the first /0 (``wanted`` is not empty)
                    self._fwmark_table = self.config.fwmark or self.in_netns(routes.free_table)
                    udp.set_mark(self._fwmark_table)  # before any rule: our own packets must never loop
                table = self._fwmark_table
                for version in sorted(set(self._full_tunnel) - wanted):
                    prefs = self._full_tunnel.pop(version)
                    try:  # each family on its own: one failure must not leave the other's rules behind
                        self._in_netns(
                            functools.partial(routes.full_tunnel_down, name, version, table, prefs)
                        )
                    except (DataplaneError, OSError) as exc:
                        log.error(
                            "event=default_route_remove_failed iface=%s ip=%d error=%r",
                            name,
                            version,
                            str(exc),
                        )
                    else:
                        log.info("event=default_route_removed iface=%s table=%d ip=%d", name, table, version)
                    self._firewall(version, up=False)
                for version in sorted(wanted - set(self._full_tunnel)):
                    prefs = self.in_netns(functools.partial(routes.full_tunnel_up, name, version, table))
                    self._full_tunnel[version] = prefs
                    log.info(
                        "event=default_route_added iface=%s table=%d fwmark=%#x ip=%d rule_prefs=%d,%d",
                        name,
                        table,
                        table,
                        version,
                        *prefs,
                    )
                    self._firewall(version, up=True)
                if not self._full_tunnel:
                    udp.set_mark(self.config.fwmark)
            except (DataplaneError, OSError) as exc:
                log.error("event=default_route_failed iface=%s error=%r", name, str(exc))

    def _firewall(self, version: int, *, up: bool) -> None:
        """Add or remove the full tunnel's nftables table of this family (``routes.firewall_up``). Without it
        the routing still works, unless reverse-path filtering is strict: that is logged."""
        name = self.name
        if not up and version not in self._nft_families:
            return
        try:
            if up:
                addrs = self.config.addresses
                self._in_netns(
                    functools.partial(routes.firewall_up, name, version, self._fwmark_table, addrs)
                )
                self._nft_families.add(version)
            else:
                self._nft_families.discard(version)
                self._in_netns(functools.partial(routes.firewall_down, name, version))
        except (DataplaneError, OSError) as exc:
            log.error("event=default_route_failed iface=%s ip=%d error=%r", name, version, str(exc))
            if up and version == 4:
                self._in_netns(functools.partial(routes.warn_strict_rp_filter, name))
        else:
            log.info(
                "event=nft_table_%s iface=%s ip=%d table=%s",
                "added" if up else "removed",
                name,
                version,
                routes.nft_table(name),
            )

    def _in_netns(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (netlink work) in the interface's network namespace: directly if the calling thread is
        already there, else in a short-lived helper thread that joins it (setns affects one thread only)."""
        fd = self._netns_fd
        if fd < 0 or os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(fd).st_ino:
            fn()
            return
        box: list[BaseException] = []

        def target() -> None:
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise DataplaneError(f"cannot enter the namespace of {self.name}: {os.strerror(err)}")
                fn()
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=target, name=f"{self.name}-netns", daemon=True)
        t.start()
        t.join(THREAD_JOIN)
        if box:
            raise box[0]

    def _wake_control(self) -> None:
        self._wake.set()

    # -- actions ---------------------------------------------------------------------------------------------

    def _execute(self, actions: list[wg.Action]) -> list[bytes]:
        """Carry out what the device asked; returns packets to deliver (the caller writes them to TUN)."""
        deliver: list[bytes] = []
        udp = self.udp
        assert udp is not None
        for a in actions:
            if isinstance(a, wg.SendDatagram):
                try:
                    udp.send(a.data, a.endpoint)
                except DataplaneError as exc:
                    log.debug(
                        "event=udp_send_failed endpoint=%s error=%r", _fmt_endpoint(a.endpoint), str(exc)
                    )
            elif isinstance(a, wg.DeliverPacket):
                deliver.append(a.packet)
                c = self._counters.get(a.peer)
                if c is not None:
                    c.rx_packets += 1
            elif isinstance(a, wg.Drop):
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "event=drop reason=%s peer=%s detail=%r",
                        a.reason,
                        short(a.peer) if a.peer else "-",
                        a.detail,
                    )
            elif isinstance(a, wg.HandshakeCompleted):
                self._send_capabilities(a.peer)
                self._handshake_wall[a.peer] = time.time()
                c = self._counters.get(a.peer)
                if c is not None:
                    c.handshakes += 1
                log.info(
                    "event=handshake_complete iface=%s peer=%s initiator=%s",
                    self.name,
                    short(a.peer),
                    a.initiator,
                )
            elif isinstance(a, wg.EndpointChanged):
                log.info(
                    "event=endpoint_changed iface=%s peer=%s old=%s new=%s",
                    self.name,
                    short(a.peer),
                    _fmt_endpoint(a.old),
                    _fmt_endpoint(a.new),
                )
            elif isinstance(a, wg.HandshakeGaveUp):
                log.warning("event=handshake_gave_up iface=%s peer=%s", self.name, short(a.peer))
            elif isinstance(a, wg.KeysZeroed):
                with self._lock:
                    self._drop_lane(a.peer)  # a lane must not keep the keys alive
                log.info("event=keys_zeroed iface=%s peer=%s", self.name, short(a.peer))
        return deliver

    def _guard(self, loop: object) -> None:
        assert callable(loop)
        try:
            loop()
        except Exception as exc:
            if self._stop.is_set():
                return  # the socket or TUN device closed under us during shutdown
            self.errors.append(f"{threading.current_thread().name}: {exc!r}")
            log.exception("event=dataplane_thread_failed thread=%s", threading.current_thread().name)
            self._stop.set()

    # -- tx: TUN -> UDP --------------------------------------------------------------------------------------

    def _tx_loop(self) -> None:
        tun = self.tun
        assert tun is not None
        stop = self._stop
        tx_lock = self._tx_lock
        warmth = self._warmth()
        woke = False
        while not stop.is_set():
            with tx_lock:
                if not woke:
                    # Found the device empty: wait right away rather than ask again (a read and an exception).
                    woke = not self._tx_batch() or self._tx_drained
                else:  # most likely for one packet (a ping, a request, an ACK): it leaves before any batching
                    # After a wait that timed out too: a read that finds nothing keeps this path warm.
                    sent = self._tx_lone()
                    if sent > 0:
                        self._tx_batch(pre=sent)
                        woke = self._tx_drained
                    # After a lone packet (sent < 0), wait right away: a wait returns at once if more came.
            if woke:
                if tun.wait_readable(warmth.tick if warmth.warm(self._rx_packets) else IDLE_WAIT):
                    warmth.quiet = 0
                else:
                    warmth.quiet += 1

    def _warmth(self) -> _Warmth:
        """A packet thread's warm waits: for WARM_PERIOD after its last packet it waits one short tick at a
        time (``InterfaceConfig.warm_tick``; 0 turns this off) and does a little of its work on each.

        Why: a CPU left idle for more than a few milliseconds runs the next packet's Python cold (caches,
        TLB, branch predictors; on a VM also the host's scheduling), several times slower than one that
        woke a moment ago; short waits after traffic keep it warm for a little CPU (docs/dataplane.md). The
        rx thread's tick is a receive timeout (``SO_RCVTIMEO``), which the kernel counts in whole clock ticks
        plus one (about 8 ms at HZ=250); a precise 1 ms poll there cost more CPU and was no faster."""
        tick = self.config.warm_tick
        return _Warmth(tick, max(1, round(WARM_PERIOD / tick)) if tick > 0 else 0)

    def _tx_lone(self) -> int:
        """Read one packet and, if it is plain (no offload) and its peer has a lane, send it from here. Caller
        holds ``_tx_lock``. Returns -1 if it sent the packet, 0 if the device had none, or else the size read
        (the packet is in the first pool buffer) for ``_tx_batch(pre=...)``.

        The latency path: right after a wait, a CPU's caches are cold and every Python step costs many times
        what it costs in a busy loop, so this does about what a bare tunnel would (a memo probe for the
        route, identity checks, the timers, encrypt, send) and leaves everything else to the batch path."""
        tun, udp = self.tun, self.udp
        assert tun is not None and udp is not None
        buf = self._tx_pool[0]
        n = tun.read_into(buf)
        h = self._tun_hdr
        if n <= h or (h and (buf[0] or buf[1])):  # nothing, or an offloaded packet (GSO, NEEDS_CSUM)
            return n
        version = buf[h] >> 4
        if version == 4 and n - h >= 20:
            dst = bytes(buf[h + 16 : h + 20])
        elif version == 6 and n - h >= 40:
            dst = bytes(buf[h + 24 : h + 40])
        else:
            return n
        allowed = self.device.allowed_ips
        peer_key = allowed.memo.get(dst, _UNKNOWN)
        if peer_key is _UNKNOWN:
            peer_key = allowed.remember(dst)
        lane = None if peer_key is None else self._tx_lanes.get(peer_key)
        if lane is None:
            return n
        peer, keypair = lane.peer, lane.keypair
        now = time.monotonic()
        with self._lock:
            if (
                peer.keypairs.current is not keypair
                or peer.endpoint is not lane.endpoint
                or peer.staged
                or keypair.send_counter >= REKEY_AFTER_MESSAGES
                or now >= lane.tx_until
            ):
                return n
            peer.timers.on_transport_sent(now, True)  # before the send: see _send_packets
            with self._send_lock:
                datagram = keypair.encrypt(buf[h:n])
            peer.tx_bytes += len(datagram)
            lane.counters.tx_packets += 1
            self._tx_packets += 1
        try:
            udp.send(datagram, lane.send_to)
        except DataplaneError as exc:
            log.debug("event=udp_send_failed peer=%s error=%r", short(peer.public_key), str(exc))
        return -1

    def _make_lane(self, peer: Peer, keypair: Keypair) -> None:
        """A lane for ``peer``'s current ``keypair`` and endpoint, replacing its old one (under _lock)."""
        if peer.endpoint is None or peer.keypairs.current is not keypair or self.udp is None:
            return
        key = peer.public_key
        self._drop_lane(key)
        lane = _Lane(peer, keypair, peer.endpoint, self.udp, self._counters.get(key) or _Counters())
        self._tx_lanes[key] = lane
        self._rx_lanes[keypair.local_index] = lane

    def _drop_lane(self, peer_key: bytes) -> None:
        """Caller holds _lock."""
        lane = self._tx_lanes.pop(peer_key, None)
        if lane is not None and self._rx_lanes.get(lane.keypair.local_index) is lane:
            del self._rx_lanes[lane.keypair.local_index]

    def _take_tx(self) -> bool:
        """Take the transmit side (without waiting) around a TUN write whose immediate answer this thread
        will send itself (see _rx_loop), masking the tx thread's wake-ups meanwhile. False if the tx thread
        has it."""
        if not self._tx_lock.acquire(blocking=False):
            return False
        try:
            assert self.tun is not None
            self.tun.hold_wakeups(True)
        except BaseException:
            self._tx_lock.release()
            raise
        return True

    def _give_tx(self) -> None:
        """Undo ``_take_tx``: unmask (a packet left pending wakes the tx thread then) and release."""
        try:
            assert self.tun is not None
            self.tun.hold_wakeups(False)
        finally:
            self._tx_lock.release()

    def _tx_answer(self, probe: bool) -> None:
        """Send what the kernel answered at once to a TUN write (an echo reply, TCP ACKs). Caller holds
        ``_tx_lock``. ``probe``: ask first whether anything is pending (after a batch, often nothing is); then
        the rest of the batch follows here too. Without it, one packet (the answer to a lone packet, likely
        there), and anything after it wakes the tx thread when the caller unmasks the device."""
        tun = self.tun
        assert tun is not None
        if probe and not tun.pending():
            return
        sent = self._tx_lone()
        if sent > 0:
            self._tx_batch(pre=sent)
        elif sent < 0 and probe:
            self._tx_batch(probe=True)

    def _tx_batch(self, probe: bool = False, pre: int = 0) -> bool:
        """Read one batch from the TUN device, encrypt and send it. Caller holds ``_tx_lock`` (whoever holds
        it owns the read buffers and the order of sends). Returns False if nothing was pending.

        ``pre``: the size of a packet ``_tx_lone`` already read into the first buffer (the batch starts with
        it). ``probe``: nothing may be pending (the caller wrote to the device rather than woke for it), so
        ``TunDevice.pending`` asks before the first read: a read that finds nothing raises, and on a cold
        CPU that costs several times the syscall. Sets ``_tx_drained`` if it found the device empty."""
        tun, udp = self.tun, self.udp
        assert tun is not None and udp is not None
        pool, views = self._tx_pool, self._tx_views
        vnet = tun.vnet_hdr
        lookup = self.device.allowed_ips.lookup_destination
        seeded_peers = self._seeded_peers
        peers = self.device.peers
        no_route = 0
        # One batch: packets grouped by peer, in read order.
        groups: dict[tuple[bytes, bool], list[Buffer]] = {}
        count = 0
        self._tx_drained = False
        for buf, view in zip(pool, views, strict=True):
            if probe:
                if not tun.pending():
                    self._tx_drained = True
                    break
                probe = False
            if pre:
                n, pre = pre, 0
            else:
                n = tun.read_into(buf)
            if not n:
                self._tx_drained = True
                break
            if vnet:
                pkt = view[VNET_HDR_LEN:n]
                if n <= VNET_HDR_LEN:
                    continue
            else:
                pkt = view[:n]
            try:
                peer_key = lookup(cast(bytes, pkt))  # the core reads any buffer
            except Exception:
                peer_key = None
            if peer_key is None:
                no_route += 1
                continue
            seeded = False
            cap = seeded_peers.get(peer_key)
            if cap is not None:
                peer = peers.get(peer_key)
                current = None if peer is None else peer.keypairs.current
                seeded = current is not None and current.local_index == cap
            if vnet and (view[0] or view[1]):  # NEEDS_CSUM or a GSO super-packet
                try:
                    segs = segment(parse_vnet_hdr(view), pkt, payload_csum=not seeded)
                    if type(segs[0]) is memoryview:  # a checksum completed in place: copy out of the pool
                        segs = [bytes(segs[0])]
                except OffloadError as exc:
                    log.debug("event=segment_failed error=%r", str(exc))
                    continue
            else:
                seeded = False  # complete checksums already: send them as they are
                segs = [bytes(pkt)]
            g = groups.get((peer_key, seeded))
            if g is None:
                groups[(peer_key, seeded)] = segs
            else:
                g += segs
            count += len(segs)
            if count >= TX_BATCH:
                break
        if no_route:
            # Nothing in the allowed IPs: dropped silently, as WireGuard does.
            self.no_route_drops += no_route
        if not groups:
            return False
        self._tx_packets += count
        now = time.monotonic()
        for (peer_key, seeded), packets in groups.items():
            self._send_packets(now, peer_key, packets, udp, seeded)
        return True

    def _send_packets(
        self, now: float, peer_key: bytes, packets: list[Buffer], udp: UdpSocket, seeded: bool = False
    ) -> None:
        with self._lock:
            peer = self.device.peers.get(peer_key)
            if peer is None:
                return
            keypair = peer.keypairs.current
            endpoint = peer.endpoint
            fast = (
                keypair is not None
                and endpoint is not None
                and not peer.staged
                and keypair.send_counter + len(packets) < REJECT_AFTER_MESSAGES
                and now - keypair.created < REJECT_AFTER_TIME
            )
            if not fast:
                if seeded:  # staged packets may end up in a new session: never leave seeds in them
                    self.seeded_drops += len(packets)
                    return
                # No usable session: the device stages the packets and starts (or waits for) a handshake.
                with self._send_lock:
                    actions = self.device.send_many(now, peer_key, [bytes(p) for p in packets])
                c = self._counters.get(peer_key)
                if c is not None:  # counted when staged; a failed handshake shows up in the drop counters
                    c.tx_packets += len(packets)
            else:
                # Before the send: the reply can arrive, and the rx thread tell the timers, before this thread
                # is back from sendmsg. "Sent" after "received" would arm a rehandshake nothing cancels.
                peer.timers.on_transport_sent(now, True)
                lane = self._tx_lanes.get(peer_key)
                if lane is None or lane.keypair is not keypair or lane.endpoint is not endpoint:
                    self._make_lane(peer, cast(Keypair, keypair))
        if not fast:
            self._execute(actions)
            return
        assert keypair is not None and endpoint is not None
        with self._send_lock:
            encrypt = keypair.encrypt
            datagrams = [encrypt(cast(bytes, p)) for p in packets]  # bytes or bytearray here
        try:
            if seeded:
                _send_retyped(udp, datagrams, _SEEDED, endpoint)
            elif len(datagrams) == 1:
                udp.send(datagrams[0], endpoint)
            else:
                udp.send_batch(datagrams, endpoint)
        except DataplaneError as exc:
            log.debug("event=udp_send_failed peer=%s error=%r", short(peer_key), str(exc))
        tx = sum(map(len, datagrams))
        with self._lock:
            if self.device.peers.get(peer_key) is not peer:
                return
            peer.tx_bytes += tx
            c = self._counters.get(peer_key)
            if c is not None:
                c.tx_packets += len(packets)
            rekey = keypair.send_counter > REKEY_AFTER_MESSAGES or (
                keypair.is_initiator and now - keypair.created > REKEY_AFTER_TIME
            )
            if rekey and peer.keypairs.current is keypair:
                actions = self.device.initiate_handshake(now, peer_key)
            else:
                actions = []
        if actions:
            self._execute(actions)

    # -- rx: UDP -> TUN --------------------------------------------------------------------------------------

    def _rx_loop(self) -> None:
        tun, udp = self.tun, self.udp
        assert tun is not None and udp is not None
        stop = self._stop
        merge = tun.vnet_hdr
        index_lookup = self.device.index_table.lookup
        allowed = self.device.allowed_ips
        lookup_v4, lookup_v6 = allowed.lookup_v4, allowed.lookup_v6
        handshakes = self._handshakes
        reason = wg.DropReason
        wake = False
        accept_seeded = bool(self._local_caps & CAP_PARTIAL_CSUM)
        rx_lanes = self._rx_lanes
        warmth = self._warmth()  # the socket starts with the long receive timeout
        warm_aead = ChaCha20Poly1305(bytes(32))  # opened on warm ticks: the AEAD's code stays in the caches
        warm_sealed = warm_aead.encrypt(_WARM_NONCE, bytes(_WARM_SIZE), None)
        idle = True
        while not stop.is_set():
            lone = idle
            if idle:
                # Nothing pending: wait in a receive (SO_RCVTIMEO: the tick while warm, else IDLE_WAIT).
                # What comes is most likely one datagram (a ping, a request): the lone path delivers it, or
                # hands it back as a batch of one.
                batch = self._rx_lone()
                if batch == []:
                    if warmth.warm(self._tx_packets):
                        warm_aead.decrypt(_WARM_NONCE, warm_sealed, None)
                    warmth.quiet += 1
                    if warmth.quiet == warmth.ticks:
                        udp.set_receive_timeout(IDLE_WAIT)
                    continue
                if warmth.quiet >= warmth.ticks and warmth.ticks:
                    udp.set_receive_timeout(warmth.tick)
                warmth.quiet = 0
                if batch is None:
                    continue
            else:
                batch = udp.recv_batch()
            if not batch:
                idle = True
                continue
            idle = False
            self._rx_packets += sum(len(dgrams) for _, dgrams in batch)
            now = time.monotonic()
            deliver: list[Buffer] = []
            seeded: list[Buffer] = []
            seen: set[tuple[int, Endpoint]] = set()
            bad: dict[wg.DropReason, int] = {}
            src_cache: dict[bytes, bytes | None] = {}
            settled: list[tuple[Timers, bool]] = []  # told after the TUN write, before anything is sent
            for src, dgrams in batch:
                for d in dgrams:
                    n = len(d)
                    kind = d[0] if n >= 4 else 0
                    if (
                        kind == _MSG_TRANSPORT or (kind == MESSAGE_TM_TRANSPORT_SEEDED and accept_seeded)
                    ) and n >= MESSAGE_TRANSPORT_MIN_SIZE:
                        out = deliver if kind == _MSG_TRANSPORT else seeded
                        receiver = _U32.unpack_from(d, 4)[0]
                        entry = index_lookup(receiver)
                        run_start = (receiver, src) not in seen
                        if (
                            entry is None
                            or (kp := entry.keypair) is None
                            or (
                                run_start
                                and not (
                                    kp is entry.peer.keypairs.current
                                    and entry.peer.endpoint == src
                                    and not (kp.is_initiator and now - kp.created > _REKEY_ON_RECEIVE_AGE)
                                )
                            )
                        ):
                            # First of its run with something to do (key confirmation, roaming, a rekey
                            # due) or unknown: the device does the bookkeeping.
                            seen.add((receiver, src))
                            if kind != _MSG_TRANSPORT:
                                d = memoryview(b"\x04" + d[1:].tobytes())
                            with self._lock, self._send_lock:
                                actions = self.device.receive(now, src, cast(bytes, d))
                            if actions:
                                out += self._execute(actions)
                            continue
                        keypair: Keypair = kp
                        peer = entry.peer
                        if run_start:  # settled: current keypair, the endpoint, no rekey due
                            seen.add((receiver, src))
                            lane = rx_lanes.get(receiver)
                            if lane is None or lane.endpoint is not peer.endpoint:
                                with self._lock:
                                    self._make_lane(peer, keypair)
                        if now - keypair.created > REJECT_AFTER_TIME:
                            bad[reason.KEY_EXPIRED] = bad.get(reason.KEY_EXPIRED, 0) + 1
                            continue
                        try:
                            pt = keypair.decrypt(cast(bytes, d))
                        except InvalidTag:
                            bad[reason.DECRYPT_FAILURE] = bad.get(reason.DECRYPT_FAILURE, 0) + 1
                            continue
                        except ReplayedCounter:
                            bad[reason.REPLAY] = bad.get(reason.REPLAY, 0) + 1
                            continue
                        peer.rx_bytes += n
                        size = len(pt)
                        if run_start:  # settled session: the device's only bookkeeping is the timers
                            settled.append((peer.timers, size > 0))
                        if not size:
                            continue  # keepalive
                        b0 = pt[0] >> 4
                        if b0 == 4 and size >= 20:
                            length = (pt[2] << 8) | pt[3]
                            skey = pt[12:16]
                            sender = src_cache.get(skey, b"")
                            if sender == b"":
                                sender = src_cache[skey] = lookup_v4(int.from_bytes(skey, "big"))
                        elif b0 == 6 and size >= 40:
                            length = ((pt[4] << 8) | pt[5]) + 40
                            skey = pt[8:24]
                            sender = src_cache.get(skey, b"")
                            if sender == b"":
                                sender = src_cache[skey] = lookup_v6(int.from_bytes(skey, "big"))
                        else:
                            length, sender = 0, None
                        if length > size or length < 20:
                            bad[reason.MALFORMED] = bad.get(reason.MALFORMED, 0) + 1
                        elif sender != peer.public_key:
                            bad[reason.ALLOWED_IPS] = bad.get(reason.ALLOWED_IPS, 0) + 1
                        else:
                            out.append(pt if length == size else memoryview(pt)[:length])
                            c = self._counters.get(sender)
                            if c is not None:
                                c.rx_packets += 1
                    elif kind == MESSAGE_TM_CAPABILITIES and n >= MESSAGE_TRANSPORT_MIN_SIZE:
                        self._receive_capabilities(now, src, d)
                    elif kind in _HANDSHAKE_TYPES:
                        if len(handshakes) < HANDSHAKE_QUEUE:
                            handshakes.append((src, bytes(d)))
                            wake = True
                        else:
                            self.handshake_queue_drops += 1
                    elif RAW_TYPE_MIN <= kind <= RAW_TYPE_MAX and self._raw(src, d):
                        pass
                    else:
                        # Unknown type or runt: the device counts it as malformed.
                        with self._lock:
                            self.device.receive(now, src, bytes(d))
            if wake:
                self._wake.set()
                wake = False
            if bad:
                with self._lock:
                    drops = self.device.drops
                    for r, k in bad.items():
                        drops[r] += k
            if deliver or seeded:
                # Take the transmit side first if it is idle: a TUN write often makes the kernel answer at
                # once (an echo reply, a TCP ACK). Holding _tx_lock, this thread sends that answer itself,
                # hot, instead of the tx thread (woken by the same write) competing for the GIL to do it.
                # The tx thread waits on the TUN device: without the mask this write would wake it, and it
                # would take the GIL from us just to find the reply gone.
                own_tx = self._take_tx()
                try:
                    if deliver:
                        self._deliver(tun, deliver, merge)
                    if seeded:
                        self._deliver(tun, seeded, merge, partial=True)
                    if settled:
                        self._settle(now, settled)
                        settled = []
                    if own_tx:
                        self._tx_answer(probe=True)
                finally:
                    if own_tx:
                        self._give_tx()
            if settled:  # nothing delivered (keepalives, drops)
                self._settle(now, settled)
            # Found empty, or most likely empty after a lone datagram (asking costs less than a receive that
            # finds nothing): wait right away.
            if not udp.pending() if lone else udp.drained:
                idle = True

    def _rx_lone(self) -> list[tuple[Endpoint, list[memoryview]]] | None:
        """Wait for one datagram (at most the socket's receive timeout, see _rx_loop) and, if it is transport
        under a lane's keypair from the lane's endpoint, deliver it from here: decrypt, check the inner
        source, write it to the TUN device, tell the timers and send what the kernel answered at once.
        Returns None if it did, [] if nothing came, or else the datagram as a ``recv_batch`` batch for the
        batch path (handshakes, a session with bookkeeping due, roaming, GRO trains, a datagram that does
        not decrypt: the batch path decrypts it again and counts the drop, as the replay window only moves
        for authentic new counters). See ``_tx_lone`` for why."""
        udp, tun = self.udp, self.tun
        assert udp is not None and tun is not None
        got = udp.recv_lone(block=True)
        if got is None:
            return []
        n, anc, flags, addr = got
        view = udp.lone_view
        lane = None
        if not anc and not flags and n >= MESSAGE_TRANSPORT_MIN_SIZE and view[0] == _MSG_TRANSPORT:
            lane = self._rx_lanes.get(_U32.unpack_from(view, 4)[0])
        now = time.monotonic()
        if (
            lane is None
            or addr != lane.recv_from
            or now >= lane.rx_until
            or lane.peer.keypairs.current is not lane.keypair
            or lane.peer.endpoint is not lane.endpoint
        ):
            entry = udp.entry(view, n, anc, flags, addr)
            return [] if entry is None else [entry]
        try:
            pt = lane.keypair.decrypt(view[:n])  # type: ignore[arg-type]  # reads any buffer
        except (InvalidTag, ReplayedCounter):
            entry = udp.entry(view, n, anc, flags, addr)
            return [] if entry is None else [entry]
        peer = lane.peer
        peer.rx_bytes += n
        size = len(pt)
        drop: wg.DropReason | None = None
        answered = False  # the kernel answers it within our write: an echo request, a TCP segment
        if size:
            version = pt[0] >> 4
            if version == 4 and size >= 20:
                length, source = (pt[2] << 8) | pt[3], pt[12:16]
                icmp = (pt[0] & 15) * 4
                answered = pt[9] == 6 or (pt[9] == 1 and icmp < length and pt[icmp] == 8)
            elif version == 6 and size >= 40:
                length, source = ((pt[4] << 8) | pt[5]) + 40, pt[8:24]
                answered = pt[6] == 6 or (pt[6] == 58 and length > 40 and pt[40] == 128)
            else:
                length, source = 0, b""
            if length > size or length < 20:
                drop = wg.DropReason.MALFORMED
            else:
                allowed = self.device.allowed_ips
                sender = allowed.memo.get(source, _UNKNOWN)
                if sender is _UNKNOWN:
                    sender = allowed.remember(source)
                if sender != peer.public_key:
                    drop = wg.DropReason.ALLOWED_IPS
        with self._lock:  # before the write: "received" before anything is sent (see _settle)
            peer.timers.on_transport_received(now, size > 0)
            if drop is not None:
                self.device.drops[drop] += 1
        if not size or drop is not None:
            return None
        lane.counters.rx_packets += 1
        self._rx_packets += 1
        packet = pt if length == size else memoryview(pt)[:length]
        # The write hands the packet on (and wakes its reader): nothing but the answer follows it before this
        # thread waits again. The answer is sent from here, as the batch path does (see _rx_loop), if the
        # kernel makes one within the write; for anything else it would be a read that finds nothing.
        own_tx = answered and self._take_tx()
        try:
            if not tun.write_iov((VNET_HDR_NONE, packet) if self._tun_hdr else (packet,)):
                self.tun_write_drops += 1
            if own_tx:
                self._tx_answer(probe=False)
        finally:
            if own_tx:
                self._give_tx()
        return None

    def _settle(self, now: float, settled: list[tuple[Timers, bool]]) -> None:
        """Timers for runs of settled sessions (what ``Device.receive`` would do for them). Called before
        this thread sends anything, so the order "received, then sent" that the timers rely on holds."""
        with self._lock:
            for timers, data in settled:
                timers.on_transport_received(now, data)

    def _deliver(self, tun: TunDevice, packets: list[Buffer], merge: bool, *, partial: bool = False) -> None:
        if len(packets) == 1 and not partial and tun.vnet_hdr:  # nothing to merge: skip coalesce (latency)
            if not tun.writev((VNET_HDR_NONE, packets[0])):
                self.tun_write_drops += 1
            return
        if merge:
            for iov in coalesce(packets, partial_csum_peer=partial):
                if not tun.writev(iov):
                    self.tun_write_drops += 1
        elif tun.vnet_hdr:
            for p in packets:
                if not tun.writev((VNET_HDR_NONE, p)):
                    self.tun_write_drops += 1
        else:
            for p in packets:
                if not tun.write(p):
                    self.tun_write_drops += 1

    # -- capabilities (TunnelMesh peers only) ----------------------------------------------------------------

    def _send_capabilities(self, peer_key: bytes) -> None:
        """Tell a peer, under the session just completed, what we accept. A stock WireGuard peer drops the
        unknown message type; a TunnelMesh peer learns it may send us seeded checksums."""
        udp = self.udp
        if udp is None:
            return
        with self._lock, self._send_lock:
            peer = self.device.peers.get(peer_key)
            keypair = None if peer is None else peer.keypairs.current
            if peer is None or keypair is None or peer.endpoint is None:
                return
            endpoint = peer.endpoint
            data = keypair.encrypt(CAPABILITY_MAGIC + struct.pack("<I", self._local_caps))
        try:
            udp.send(_CAPS + data[1:], endpoint)
        except DataplaneError as exc:
            log.debug("event=udp_send_failed peer=%s error=%r", short(peer_key), str(exc))

    def _receive_capabilities(self, now: float, src: Endpoint, d: Buffer) -> None:
        """A capabilities message: authenticated and replay-checked like transport, then remembered for the
        keypair it came under. Changes nothing else (no endpoint, no timers)."""
        entry = self.device.index_table.lookup(_U32.unpack_from(d, 4)[0])
        if entry is None or entry.keypair is None or now - entry.keypair.created > REJECT_AFTER_TIME:
            return
        try:
            pt = entry.keypair.decrypt(d)  # type: ignore[arg-type]
        except (InvalidTag, ReplayedCounter):
            with self._lock:
                self.device.drops[wg.DropReason.DECRYPT_FAILURE] += 1
            return
        if not pt.startswith(CAPABILITY_MAGIC) or len(pt) < len(CAPABILITY_MAGIC) + 4:
            return
        flags = struct.unpack_from("<I", pt, len(CAPABILITY_MAGIC))[0]
        key = entry.peer.public_key
        if flags & CAP_PARTIAL_CSUM:
            if self._seeded_peers.get(key) != entry.keypair.local_index:
                log.info(
                    "event=peer_capabilities iface=%s peer=%s seeded_checksums=on", self.name, short(key)
                )
            self._seeded_peers[key] = entry.keypair.local_index
        else:
            self._seeded_peers.pop(key, None)

    # -- control: handshakes and timers ----------------------------------------------------------------------

    def _control_loop(self) -> None:
        stop = self._stop
        q = self._handshakes
        wake = self._wake
        while not stop.is_set():
            now = time.monotonic()
            if not q:
                with self._lock:
                    deadline = self.device.next_deadline()
                wait = CONTROL_TICK if deadline is None else min(CONTROL_TICK, max(0.0, deadline - now))
                if wait > 0:
                    wake.wait(wait)
                wake.clear()
            for _ in range(HANDSHAKE_BURST):
                if not q:
                    break
                backlog = len(q)
                src, data = q.popleft()
                now = time.monotonic()
                if backlog >= UNDER_LOAD_QUEUE:
                    self._under_load_until = now + UNDER_LOAD_HOLD
                self._set_under_load(now < self._under_load_until, backlog)
                with self._lock, self._send_lock:
                    actions = self.device.receive(now, src, data)
                self._execute(actions)  # handshake messages never deliver packets
                # Hand the GIL to the packet threads between handshake messages: under a flood this thread
                # would otherwise keep it for a whole switch interval (5 ms) at a time.
                time.sleep(0)
            now = time.monotonic()
            if not q:
                self._set_under_load(now < self._under_load_until, 0)
            with self._lock:
                d = self.device.next_deadline()
                due = d is not None and d <= now
            if due:
                with self._lock, self._send_lock:
                    actions = self.device.tick(now)
                self._execute(actions)

    def _set_under_load(self, under_load: bool, backlog: int) -> None:
        if under_load != self.device.under_load:
            self.device.under_load = under_load
            log.warning(
                "event=handshake_load iface=%s under_load=%s backlog=%d", self.name, under_load, backlog
            )


class _Collector(Collector):
    """Prometheus view of one engine, computed at scrape time from plain counters."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        iface = self.plane.name
        labels = ["interface", "peer"]
        rx_b = CounterMetricFamily(
            "tunnelmesh_dataplane_peer_rx_bytes", "Bytes received from a peer (UDP payload)", labels=labels
        )
        tx_b = CounterMetricFamily(
            "tunnelmesh_dataplane_peer_tx_bytes", "Bytes sent to a peer (UDP payload)", labels=labels
        )
        rx_p = CounterMetricFamily(
            "tunnelmesh_dataplane_peer_rx_packets", "IP packets received from a peer", labels=labels
        )
        tx_p = CounterMetricFamily(
            "tunnelmesh_dataplane_peer_tx_packets", "IP packets sent to a peer", labels=labels
        )
        lost = CounterMetricFamily(
            "tunnelmesh_dataplane_peer_rx_lost_packets",
            "Messages from a peer that never arrived intact (gaps in its counters; keepalives count)",
            labels=labels,
        )
        hs = CounterMetricFamily(
            "tunnelmesh_dataplane_peer_handshakes", "Completed handshakes with a peer", labels=labels
        )
        last = GaugeMetricFamily(
            "tunnelmesh_dataplane_peer_latest_handshake_seconds",
            "Unix time of the latest completed handshake (0: never)",
            labels=labels,
        )
        for p in self.plane.peers():
            lv = [iface, key_b64(p.public_key)]
            rx_b.add_metric(lv, p.rx_bytes)
            tx_b.add_metric(lv, p.tx_bytes)
            rx_p.add_metric(lv, p.rx_packets)
            tx_p.add_metric(lv, p.tx_packets)
            lost.add_metric(lv, p.rx_lost)
            hs.add_metric(lv, p.handshakes)
            last.add_metric(lv, p.latest_handshake or 0.0)
        drops = CounterMetricFamily(
            "tunnelmesh_dataplane_drops",
            "Packets and datagrams dropped, by reason",
            labels=["interface", "reason"],
        )
        for r, n in self.plane.drops().items():
            drops.add_metric([iface, r], n)
        load = GaugeMetricFamily(
            "tunnelmesh_dataplane_under_load",
            "1 while handshakes are answered with cookies",
            labels=["interface"],
        )
        load.add_metric([iface], 1.0 if self.plane.device.under_load else 0.0)
        yield from (rx_b, tx_b, rx_p, tx_p, lost, hs, last, drops, load)


_CLONE_NEWNET: Final = 0x40000000


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _send_retyped(udp: UdpSocket, datagrams: Sequence[bytes], first: bytes, endpoint: Endpoint) -> None:
    """Send datagrams with their type byte replaced by ``first``, as GSO runs, without copying them."""
    for i, j in gso_runs([len(d) for d in datagrams], _GSO_LIMIT):
        iov: list[Buffer] = []
        for dg in datagrams[i:j]:
            iov += (first, memoryview(dg)[1:])
        if j - i == 1:
            udp.send(b"".join(iov), endpoint)
        else:
            udp.send_gso(iov, len(datagrams[i]), endpoint)


def _fmt_endpoint(ep: Endpoint | None) -> str:
    if ep is None:
        return "-"
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
