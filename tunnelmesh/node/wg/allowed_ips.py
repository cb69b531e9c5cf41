"""Cryptokey routing (whitepaper §2): allowed IPs, longest-prefix match, for IPv4 and IPv6.

Sending, the destination address of an IP packet selects the peer to encrypt for; receiving, the source
address of a decrypted packet must map back to the peer it came from, or the packet is dropped.

The table keeps, per address family, one dict per prefix length (network address as an int -> peer) and the
lengths in use sorted longest first. A lookup masks the address once per length in use and stops at the first
hit, which in a mesh (a handful of distinct lengths: /32, /128, a few subnets) is a few dict probes. As in
wireguard-go, an allowed IP belongs to at most one peer: inserting it for another peer moves it.

``memo`` remembers answers by packed address for the data plane's lone-packet path (one dict probe, no
calls). Every change replaces it with an empty dict rather than clearing it, so a reader that looked up
under the old table can only write its answer into a dict nobody reads any more.
"""

from __future__ import annotations

import ipaddress

from tunnelmesh.errors import ProtocolError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Family:
    __slots__ = ("bits", "lengths", "masks", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, bytes]] = {}
        self.lengths: list[int] = []  # longest first
        self.masks: list[int] = []  # parallel to lengths

    def reindex(self) -> None:
        self.lengths = sorted((n for n, t in self.tables.items() if t), reverse=True)
        full = (1 << self.bits) - 1
        self.masks = [full ^ ((1 << (self.bits - n)) - 1) for n in self.lengths]

    def lookup(self, address: int) -> bytes | None:
        tables = self.tables
        for length, mask in zip(self.lengths, self.masks, strict=True):
            peer = tables[length].get(address & mask)
            if peer is not None:
                return peer
        return None


MEMO_MAX = 4096  # addresses ``memo`` holds at most (a scan of a large subnet must not grow it for ever)


class AllowedIPs:
    """Longest-prefix-match table from IP networks to peers (public keys)."""

    __slots__ = ("_v4", "_v6", "memo")

    def __init__(self) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self.memo: dict[bytes, bytes | None] = {}

    def remember(self, address: bytes) -> bytes | None:
        """``lookup`` of a packed address, kept in ``memo`` (while it has room)."""
        memo = self.memo  # before the lookup: an answer from an older table goes to a dict no longer read
        peer = self.lookup(address)
        if len(memo) < MEMO_MAX:
            memo[address] = peer
        return peer

    def _family(self, version: int) -> _Family:
        return self._v4 if version == 4 else self._v6

    def insert(self, network: str | Network, peer: bytes) -> None:
        """Route ``network`` (host bits are ignored, as ``wg`` does) to ``peer``."""
        net = ipaddress.ip_network(network, strict=False) if isinstance(network, str) else network
        family = self._family(net.version)
        family.tables.setdefault(net.prefixlen, {})[int(net.network_address)] = peer
        family.reindex()
        self.memo = {}

    def remove(self, network: str | Network) -> None:
        net = ipaddress.ip_network(network, strict=False) if isinstance(network, str) else network
        family = self._family(net.version)
        family.tables.get(net.prefixlen, {}).pop(int(net.network_address), None)
        family.reindex()
        self.memo = {}

    def remove_peer(self, peer: bytes) -> None:
        for family in (self._v4, self._v6):
            for table in family.tables.values():
                for key in [k for k, v in table.items() if v == peer]:
                    del table[key]
            family.reindex()
        self.memo = {}

    def networks_of(self, peer: bytes) -> list[Network]:
        found: list[Network] = []
        for family, cls in ((self._v4, ipaddress.IPv4Network), (self._v6, ipaddress.IPv6Network)):
            for length in sorted(family.tables):
                for address, owner in family.tables[length].items():
                    if owner == peer:
                        found.append(cls((address, length)))
        return found

    def lookup(self, address: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes | None:
        """The peer whose allowed IPs contain ``address`` most specifically (packed bytes, text or object)."""
        if isinstance(address, bytes):
            if len(address) == 4:
                return self._v4.lookup(int.from_bytes(address, "big"))
            if len(address) == 16:
                return self._v6.lookup(int.from_bytes(address, "big"))
            raise ValueError(f"a packed IP address is 4 or 16 bytes, got {len(address)}")
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        return self._family(ip.version).lookup(int(ip))

    def lookup_v4(self, address: int) -> bytes | None:
        """Longest-prefix match of an IPv4 address given as an int (the per-packet path)."""
        return self._v4.lookup(address)

    def lookup_v6(self, address: int) -> bytes | None:
        return self._v6.lookup(address)

    def lookup_destination(self, packet: bytes) -> bytes | None:
        """The peer to send IP ``packet`` to (by destination); raises ProtocolError if malformed."""
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            return self._v4.lookup(int.from_bytes(packet[16:20], "big"))
        if version == 6 and len(packet) >= 40:
            return self._v6.lookup(int.from_bytes(packet[24:40], "big"))
        raise ProtocolError(f"not an IPv4/IPv6 packet (version {version}, {len(packet)} bytes)")

    def lookup_source(self, packet: bytes) -> bytes | None:
        """The peer allowed to send IP ``packet`` (by source); raises ProtocolError if malformed."""
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            return self._v4.lookup(int.from_bytes(packet[12:16], "big"))
        if version == 6 and len(packet) >= 40:
            return self._v6.lookup(int.from_bytes(packet[8:24], "big"))
        raise ProtocolError(f"not an IPv4/IPv6 packet (version {version}, {len(packet)} bytes)")
