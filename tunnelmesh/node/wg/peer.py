"""A configured peer: its keys, endpoint, handshake, keypairs, timers, cookie state and waiting packets.

Plain state with no protocol logic of its own; ``device.py`` drives it (as wireguard-go's ``send.go`` and
``receive.go`` drive ``peer.go``).
"""

from __future__ import annotations

import random
from collections import deque

from .actions import Endpoint
from .constants import MAX_STAGED_PACKETS
from .cookie import CookieGenerator
from .keypair import Keypairs
from .noise import Handshake, StaticIdentity
from .timers import Timers


class Peer:
    __slots__ = (
        "cookie",
        "endpoint",
        "handshake",
        "keypairs",
        "last_handshake",
        "public_key",
        "rx_bytes",
        "staged",
        "timers",
        "tx_bytes",
    )

    def __init__(
        self,
        identity: StaticIdentity,
        public_key: bytes,
        *,
        rng: random.Random,  # timer jitter only
        preshared_key: bytes | None = None,
        endpoint: Endpoint | None = None,
        persistent_keepalive: float = 0.0,
    ) -> None:
        self.public_key = public_key
        self.handshake = Handshake.for_peer(identity, public_key, preshared_key)
        self.cookie = CookieGenerator(public_key)
        self.keypairs = Keypairs()
        self.timers = Timers(rng, persistent_keepalive)
        self.endpoint = endpoint
        # IP packets (b"" for a keepalive) waiting for a usable session; the oldest go first when full.
        self.staged: deque[bytes] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake: float | None = None  # ``now`` of the last completed handshake

    @property
    def persistent_keepalive(self) -> float:
        return self.timers.persistent_keepalive_interval

    def stage(self, packet: bytes) -> bool:
        """Queue ``packet``; False if the queue was full and the oldest packet was dropped for it."""
        overflow = len(self.staged) >= MAX_STAGED_PACKETS
        if overflow:
            self.staged.popleft()
        self.staged.append(packet)
        return not overflow

    def __repr__(self) -> str:
        return f"Peer({self.public_key.hex()[:8]}, endpoint={self.endpoint})"
