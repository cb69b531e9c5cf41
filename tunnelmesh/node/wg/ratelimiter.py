"""Per-source-IP token bucket for handshake messages under load (wireguard-go ``ratelimiter/ratelimiter.go``).

Under load, a handshake message that carries a valid mac2 has proved its source address can receive, but a
single address could still make us do Diffie-Hellman as fast as it sends. Each source IP (not port) gets
PACKETS_PER_SECOND with a burst of PACKETS_BURSTABLE, like wireguard-go; idle entries are forgotten after
GARBAGE_COLLECT_TIME.
"""

from __future__ import annotations

from typing import Final

PACKETS_PER_SECOND: Final = 20
PACKETS_BURSTABLE: Final = 5
GARBAGE_COLLECT_TIME: Final = 1.0
_PACKET_COST: Final = 1.0 / PACKETS_PER_SECOND
_MAX_TOKENS: Final = _PACKET_COST * PACKETS_BURSTABLE


class RateLimiter:
    __slots__ = ("_last_gc", "_table")

    def __init__(self) -> None:
        self._table: dict[str, list[float]] = {}  # ip -> [tokens (seconds of credit), last time]
        self._last_gc = 0.0

    def __len__(self) -> int:
        return len(self._table)

    def allow(self, now: float, ip: str) -> bool:
        """Spend one packet's worth of tokens for ``ip``; False if it has none left."""
        if now - self._last_gc > GARBAGE_COLLECT_TIME:
            self._last_gc = now
            for stale in [k for k, (_, last) in self._table.items() if now - last > GARBAGE_COLLECT_TIME]:
                del self._table[stale]
        entry = self._table.get(ip)
        if entry is None:
            self._table[ip] = [_MAX_TOKENS - _PACKET_COST, now]
            return True
        tokens = min(entry[0] + max(now - entry[1], 0.0), _MAX_TOKENS)
        entry[1] = now
        if tokens > _PACKET_COST:
            entry[0] = tokens - _PACKET_COST
            return True
        entry[0] = tokens
        return False
