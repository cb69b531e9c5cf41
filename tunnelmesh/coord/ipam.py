"""Mesh address allocation (IPAM): the lowest free address of a prefix, with quarantine for freed addresses.

Pure and deterministic: no clock (``now`` is an argument, integer nanoseconds), no randomness, no I/O. The
replicated state (``tunnelmesh.coord.state``) owns one ``AddressPool`` per mesh prefix and rebuilds it from
the snapshot (taken = the nodes' addresses, quarantine = ``StateSnapshot.quarantined_addresses``).

An address is *free* at time ``now`` if it lies in the prefix, is not reserved (the IPv4 network and broadcast
addresses, the IPv6 subnet-router anycast address, and any extra reserved addresses), is not taken, and is not
quarantined until after ``now``. ``find_free(now)`` returns the lowest free address and changes nothing
logical, so the state machine can check for exhaustion before it commits anything; ``take``, ``release`` and
``expire`` are the mutations.

Finding the lowest free address must not scan a /10 (4 million addresses). The pool keeps two caches, neither
of which changes the answer:

* ``_cursor``: every address below it is taken, reserved, quarantined, or in ``_holes``. It only ever moves
  past addresses that are not free, so the total scanning work is bounded by the number of addresses handed
  out.
* ``_holes``: a min-heap of addresses that became free again (released without quarantine, or quarantine
  expired). It may hold stale entries (taken again since); they are dropped lazily.

Quarantined addresses whose time has come but which ``expire`` has not processed yet are free too:
``find_free`` considers them, so the answer does not depend on when ``expire`` last ran."""

from __future__ import annotations

import heapq
import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator

from tunnelmesh.errors import TunnelMeshError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Smallest pools we accept: a /30 (two usable IPv4 addresses) and a /126.
MAX_PREFIX_LENGTH = {4: 30, 6: 126}


class IpamError(TunnelMeshError):
    """Misuse of an ``AddressPool`` (taking an address that is not free, releasing one that is not taken)."""


def parse_prefix(text: str) -> IPNetwork:
    """Parses a CIDR prefix strictly (host bits must be zero); raises ``ValueError`` with the reason."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a CIDR prefix with zero host bits ({exc})") from None
    if network.prefixlen > MAX_PREFIX_LENGTH[network.version]:
        raise ValueError(
            f"prefix {text} is too small for a mesh: use at most /{MAX_PREFIX_LENGTH[network.version]}"
        )
    return network


_IPV4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE = re.compile(rf"{_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}")


def canonical_address_version(text: str) -> int | None:
    """4 or 6 if ``text`` is an IP address in the canonical form ``str_of`` writes, else None.

    Replicated validation must not depend on the Python version (``ipaddress`` has changed what it accepts,
    e.g. leading zeros and scope ids), so canonical text is checked with a regex for IPv4, and for IPv6 by
    parsing with ``inet_pton`` and requiring our own formatting to give the same text back.
    """
    if _IPV4_RE.fullmatch(text):
        return 4
    if ":" not in text:
        return None
    try:
        address = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):
        return None
    return 6 if format_ipv6(address) == text else None


def format_ipv6(address: int) -> str:
    """RFC 5952 text form: lowercase hex without leading zeros; the longest run (the first if tied) of two or
    more zero groups becomes "::"."""
    groups = [(address >> shift) & 0xFFFF for shift in range(112, -16, -16)]
    best_start, best_len, start = -1, 1, -1
    for i, group in enumerate([*groups, 1]):  # the sentinel closes a trailing run
        if group == 0:
            if start < 0:
                start = i
        elif start >= 0:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = -1
    if best_start < 0:
        return ":".join(f"{g:x}" for g in groups)
    head = ":".join(f"{g:x}" for g in groups[:best_start])
    tail = ":".join(f"{g:x}" for g in groups[best_start + best_len :])
    return f"{head}::{tail}"


class AddressPool:
    """Allocation state of one prefix. Addresses are handled as integers; ``str_of``/``int_of`` convert."""

    __slots__ = (
        "_cursor",
        "_expiry",
        "_holes",
        "base",
        "first",
        "last",
        "network",
        "quarantine",
        "reserved",
        "taken",
        "top",
    )

    def __init__(self, network: IPNetwork, reserved: Iterable[int] = ()) -> None:
        self.network = network
        self.base = base = int(network.network_address)
        self.top = top = int(network.broadcast_address)
        # Network address (and IPv4 broadcast) are never handed out: hosts treat them specially.
        self.first = base + 1
        self.last = top - 1 if network.version == 4 else top
        self.reserved: frozenset[int] = frozenset(a for a in reserved if base <= a <= top)
        self.taken: set[int] = set()
        # address -> reusable_at (ns). The logical quarantine; ``_expiry`` orders it by time.
        self.quarantine: dict[int, int] = {}
        self._expiry: list[tuple[int, int]] = []
        self._holes: list[int] = []
        self._cursor = self.first

    # -- conversions -----------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.network.version

    def str_of(self, address: int) -> str:
        """Canonical text form. Our own formatter: ``ipaddress`` is slow, and its IPv6 output has changed
        between Python versions (IPv4-mapped addresses), which replicas must never disagree on."""
        if self.version == 4:
            return f"{address >> 24}.{(address >> 16) & 255}.{(address >> 8) & 255}.{address & 255}"
        return format_ipv6(address)

    def int_of(self, text: str) -> int | None:
        """The integer form of ``text`` if it is an address of this pool's prefix in canonical form (as
        ``str_of`` writes it), else None."""
        family = socket.AF_INET if self.version == 4 else socket.AF_INET6
        try:
            address = int.from_bytes(socket.inet_pton(family, text), "big")
        except (OSError, ValueError):
            return None
        if not self.base <= address <= self.top or self.str_of(address) != text:
            return None
        return address

    def contains(self, address: int) -> bool:
        return self.first <= address <= self.last and address not in self.reserved

    # -- queries ---------------------------------------------------------------------------------------------

    def is_free(self, address: int, now: int) -> bool:
        if not self.contains(address) or address in self.taken:
            return False
        reusable_at = self.quarantine.get(address)
        return reusable_at is None or reusable_at <= now

    def find_free(self, now: int) -> int | None:
        """The lowest address free at ``now``, or None if the pool is exhausted. Changes no logical state."""
        holes = self._holes
        while holes and not self.is_free(holes[0], now):
            heapq.heappop(holes)  # stale cache entry: taken again since it was freed
        best = holes[0] if holes else None
        if self._expiry and self._expiry[0][0] <= now:
            # Quarantine over but not yet processed by expire(); rare and short, so a scan is fine.
            for reusable_at, address in self._expiry:
                if (
                    reusable_at <= now
                    and self.quarantine.get(address) == reusable_at
                    and address not in self.taken
                ):
                    best = address if best is None else min(best, address)
        cursor = self._cursor
        taken, quarantine, reserved, last = self.taken, self.quarantine, self.reserved, self.last
        while cursor <= last and (cursor in taken or cursor in quarantine or cursor in reserved):
            cursor += 1  # everything skipped is not free now; quarantined ones come back through _holes
        self._cursor = cursor
        if cursor <= last:
            best = cursor if best is None else min(best, cursor)
        return best

    # -- mutations -------------------------------------------------------------------------------------------

    def expire(self, now: int) -> None:
        """Ends every quarantine that is over at ``now``."""
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            reusable_at, address = heapq.heappop(expiry)
            if self.quarantine.get(address) == reusable_at:
                del self.quarantine[address]
                heapq.heappush(self._holes, address)

    def take(self, address: int, now: int) -> None:
        """Marks ``address`` as allocated; it must be free at ``now``."""
        if not self.is_free(address, now):
            raise IpamError(f"address {self.str_of(address)} is not free in {self.network}")
        self.quarantine.pop(address, None)
        self.taken.add(address)

    def adopt(self, address: int) -> None:
        """Marks ``address`` as allocated while rebuilding from a snapshot."""
        if not self.contains(address) or address in self.taken:
            raise IpamError(f"address {self.str_of(address)} cannot be allocated twice in {self.network}")
        self.taken.add(address)

    def release(self, address: int, reusable_at: int, now: int) -> None:
        """Frees an allocated address; it may be allocated again from ``reusable_at`` on."""
        if address not in self.taken:
            raise IpamError(f"address {self.str_of(address)} is not allocated in {self.network}")
        self.taken.discard(address)
        self.quarantine_until(address, reusable_at, now)

    def quarantine_until(self, address: int, reusable_at: int, now: int) -> None:
        """Puts a free address in quarantine (used by release and when restoring a snapshot)."""
        if reusable_at <= now:
            self.quarantine.pop(address, None)
            heapq.heappush(self._holes, address)
        else:
            self.quarantine[address] = reusable_at
            heapq.heappush(self._expiry, (reusable_at, address))

    def quarantined(self) -> Iterator[tuple[int, int]]:
        """(address, reusable_at) pairs, in address order."""
        for address in sorted(self.quarantine):
            yield address, self.quarantine[address]
