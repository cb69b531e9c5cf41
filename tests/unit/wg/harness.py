"""Two in-memory devices on a simulated wire, with a fake clock: the test bench for the WireGuard core."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable
from dataclasses import astuple

from tunnelmesh.node.wg.actions import Action, DeliverPacket, Drop, Endpoint, SendDatagram
from tunnelmesh.node.wg.crypto import TAI64N, clamp_private_key
from tunnelmesh.node.wg.device import Device

A_ADDR: Endpoint = ("192.0.2.1", 51820)
B_ADDR: Endpoint = ("192.0.2.2", 51821)
A_TUNNEL = "10.0.0.1"
B_TUNNEL = "10.0.0.2"
WALL_CLOCK_START = 1_800_000_000.0


def ipv4_packet(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    """A minimal IPv4/UDP-ish packet: the core only looks at version, total length and addresses."""
    total = 20 + len(payload)
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, total, 0, 0, 64, 17, 0)
        + ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + payload
    )


def ipv6_packet(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), 17, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


class Net:
    """Devices ``a`` (10.0.0.1) and ``b`` (10.0.0.2); ``a`` knows ``b``'s endpoint, ``b`` learns ``a``'s."""

    def __init__(
        self,
        *,
        psk: bytes | None = None,
        seed: int = 0,
        a_keepalive: float = 0.0,
        b_keepalive: float = 0.0,
        b_psk: bytes | None = None,
    ) -> None:
        keys = random.Random(seed)
        self.now = 1000.0
        self._start = self.now
        self.a = Device(
            clamp_private_key(keys.randbytes(32)), rng=random.Random(seed + 1), timestamp=self._tai
        )
        self.b = Device(
            clamp_private_key(keys.randbytes(32)), rng=random.Random(seed + 2), timestamp=self._tai
        )
        self.a.add_peer(
            self.b.public_key,
            preshared_key=psk,
            endpoint=B_ADDR,
            allowed_ips=[f"{B_TUNNEL}/32", "fd00::2/128"],
            persistent_keepalive=a_keepalive,
        )
        self.b.add_peer(
            self.a.public_key,
            preshared_key=psk if b_psk is None else b_psk,
            allowed_ips=[f"{A_TUNNEL}/32", "fd00::1/128"],
            persistent_keepalive=b_keepalive,
        )
        self.addr = {id(self.a): A_ADDR, id(self.b): B_ADDR}
        # Datagrams on the wire: (destination device, source address, bytes); a log of everything sent.
        self.in_flight: list[tuple[Device, Endpoint, bytes]] = []
        self.wire: list[tuple[str, bytes]] = []
        self.wire_times: list[float] = []
        self.log: dict[int, list[Action]] = {id(self.a): [], id(self.b): []}
        # A filter deciding whether a datagram (direction "a>b"/"b>a", bytes) is lost.
        self.lose: Callable[[str, bytes], bool] = lambda direction, data: False

    def _tai(self) -> bytes:
        return TAI64N(WALL_CLOCK_START + (self.now - self._start))

    def peer_of(self, dev: Device) -> Device:
        return self.b if dev is self.a else self.a

    def emit(self, dev: Device, actions: list[Action]) -> list[Action]:
        """Record ``dev``'s actions and put its datagrams on the wire."""
        self.log[id(dev)] += actions
        other = self.peer_of(dev)
        direction = "a>b" if dev is self.a else "b>a"
        for action in actions:
            if isinstance(action, SendDatagram):
                assert action.endpoint == self.addr[id(other)], action.endpoint
                self.wire.append((direction, action.data))
                self.wire_times.append(self.now)
                if not self.lose(direction, action.data):
                    self.in_flight.append((other, self.addr[id(dev)], action.data))
        return actions

    def run(self, limit: int = 100) -> None:
        """Deliver datagrams until the wire is quiet."""
        for _ in range(limit):
            if not self.in_flight:
                return
            dst, src, data = self.in_flight.pop(0)
            self.emit(dst, dst.receive(self.now, src, data))
        raise AssertionError("the wire never went quiet")

    def hold(self) -> list[tuple[Device, Endpoint, bytes]]:
        """Take everything in flight off the wire (to deliver later, reorder or replay)."""
        held, self.in_flight = self.in_flight, []
        return held

    def inject(self, dst: Device, src: Endpoint, data: bytes) -> list[Action]:
        return self.emit(dst, dst.receive(self.now, src, data))

    def send(self, dev: Device, packet: bytes) -> list[Action]:
        return self.emit(dev, dev.send(self.now, self.peer_of(dev).public_key, packet))

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Move the clock forward, ticking both devices and delivering datagrams as we go."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            self.emit(self.a, self.a.tick(self.now))
            self.emit(self.b, self.b.tick(self.now))
            self.run()

    def handshake(self) -> None:
        """Complete a handshake initiated by ``a`` (with key confirmation on ``b``)."""
        self.emit(self.a, self.a.initiate_handshake(self.now, self.b.public_key))
        self.run()

    def delivered(self, dev: Device) -> list[bytes]:
        return [a.packet for a in self.log[id(dev)] if isinstance(a, DeliverPacket)]

    def drops(self, dev: Device) -> list[Drop]:
        return [a for a in self.log[id(dev)] if isinstance(a, Drop)]

    def sent(self, direction: str, kind: int) -> list[bytes]:
        """Datagrams of message type ``kind`` put on the wire in ``direction``."""
        return [d for dr, d in self.wire if dr == direction and d[0] == kind]


def session_state(dev: Device) -> object:
    """All of ``dev``'s session state a datagram could change (not drop counters or cookie secrets)."""
    peers = []
    for key, peer in sorted(dev.peers.items()):
        keypairs = tuple(
            None
            if k is None
            else (id(k), k.local_index, k.remote_index, k.send_counter, k.replay.last, tuple(k.replay._ring))
            for k in (peer.keypairs.previous, peer.keypairs.current, peer.keypairs.next)
        )
        timers = tuple(getattr(peer.timers, name) for name in peer.timers.__slots__ if name != "rng")
        cookie = tuple(getattr(peer.cookie, name) for name in peer.cookie.__slots__)
        peers.append(
            (key, astuple(peer.handshake), keypairs, peer.endpoint, tuple(peer.staged), timers, cookie)
        )
    index = []
    for i in sorted(dev.index_table.indexes()):
        entry = dev.index_table.lookup(i)
        assert entry is not None
        index.append((i, entry.peer.public_key, id(entry.keypair)))
    return peers, index
