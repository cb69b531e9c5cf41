"""Sliding-window replay protection for transport counters (§5.4.6, RFC 6479).

The window is a ring of RING_BLOCKS 64-bit blocks; the newest block is never fully usable, so the window
accepts counters up to WINDOW_SIZE = (RING_BLOCKS - 1) * 64 = 8128 behind the highest seen (WireGuard asks
for at least 2048). Moving forward clears whole blocks instead of shifting a bitmap, so the cost is bounded
by the ring size however far the counter jumps. Same layout as wireguard-go ``replay/replay.go``.

Call :meth:`ReplayFilter.validate_counter` only *after* the packet authenticated: an unauthenticated counter
must never move the window.

Loss: the sender numbers every message of a keypair 0, 1, 2, ... (keepalives too), so a counter that never
validated is a message that did not arrive intact. :meth:`ReplayFilter.lost` counts those whose block has left
the ring (they can no longer be accepted: final, so the count only grows); :meth:`ReplayFilter.lost_at_end`
counts every gap below the highest counter, for a keypair that is being dropped.
"""

from __future__ import annotations

from typing import Final

BLOCK_BIT_LOG: Final = 6
BLOCK_BITS: Final = 1 << BLOCK_BIT_LOG
RING_BLOCKS: Final = 1 << 7
WINDOW_SIZE: Final = (RING_BLOCKS - 1) * BLOCK_BITS
_BLOCK_MASK: Final = RING_BLOCKS - 1
_BIT_MASK: Final = BLOCK_BITS - 1


class ReplayFilter:
    """Accepts each counter at most once, and none too far behind the newest."""

    __slots__ = ("_evicted", "_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * RING_BLOCKS
        self._evicted = 0  # validated counters whose block has left the ring (the rest are its set bits)

    def reset(self) -> None:
        self._last = 0
        self._ring = [0] * RING_BLOCKS
        self._evicted = 0

    def lost(self) -> int:
        """Counters that never validated and no longer can: those below the oldest block in the ring. O(1):
        read at scrape time, under the data plane's lock."""
        gone = max(0, (self._last >> BLOCK_BIT_LOG) - (RING_BLOCKS - 1)) * BLOCK_BITS
        return max(0, gone - self._evicted)

    def lost_at_end(self) -> int:
        """Every counter below the highest accepted one that never validated (none if nothing was). Counts the
        ring's bits: for a keypair being dropped, not for every read."""
        accepted = self._evicted + sum(block.bit_count() for block in self._ring)
        return self._last + 1 - accepted if accepted else 0

    @property
    def last(self) -> int:
        """The highest counter accepted so far."""
        return self._last

    def would_accept(self, counter: int, limit: int) -> bool:
        """Whether :meth:`validate_counter` would accept ``counter``, without changing anything."""
        if counter >= limit:
            return False
        if counter <= self._last and self._last - counter > WINDOW_SIZE:
            return False
        if counter > self._last and (counter >> BLOCK_BIT_LOG) != (self._last >> BLOCK_BIT_LOG):
            return True
        block = self._ring[(counter >> BLOCK_BIT_LOG) & _BLOCK_MASK]
        return not (block >> (counter & _BIT_MASK)) & 1

    def validate_counter(self, counter: int, limit: int) -> bool:
        """Record ``counter``; False if it was seen before, is too old, or is at/above ``limit``."""
        if counter >= limit:
            return False
        ring = self._ring
        index_block = counter >> BLOCK_BIT_LOG
        if counter > self._last:
            current = self._last >> BLOCK_BIT_LOG
            diff = min(index_block - current, RING_BLOCKS)
            for i in range(current + 1, current + diff + 1):  # once per 64 counters in order
                self._evicted += ring[i & _BLOCK_MASK].bit_count()
                ring[i & _BLOCK_MASK] = 0
            self._last = counter
        elif self._last - counter > WINDOW_SIZE:
            return False
        index_block &= _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[index_block]
        if old & bit:
            return False
        ring[index_block] = old | bit
        return True
