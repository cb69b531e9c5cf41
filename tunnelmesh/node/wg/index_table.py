"""The receiver index table (§5.4.2, wireguard-go ``indextable.go``).

Every handshake we take part in gets a random 32-bit local index, which the peer echoes as "receiver" in its
response, cookie replies and transport messages. When the handshake completes, the same index is handed over
to the keypair it produced, so a transport message is routed by one dict lookup. Indexes come from the
injected RNG and never collide with a live one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .keypair import Keypair
    from .peer import Peer


@dataclass(slots=True)
class IndexEntry:
    """What a local index points at: a peer's in-progress handshake (``keypair is None``) or a keypair."""

    peer: Peer
    keypair: Keypair | None = None


class IndexTable:
    __slots__ = ("_entries", "_rng")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._entries: dict[int, IndexEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, index: int) -> bool:
        return index in self._entries

    def new_index_for_handshake(self, peer: Peer) -> int:
        """A fresh random index pointing at ``peer``'s handshake."""
        while True:
            index = self._rng.getrandbits(32)
            if index not in self._entries:
                self._entries[index] = IndexEntry(peer)
                return index

    def swap_index_for_keypair(self, index: int, keypair: Keypair) -> None:
        """Point ``index`` (a completed handshake's) at the keypair it produced."""
        entry = self._entries.get(index)
        if entry is not None:
            entry.keypair = keypair

    def lookup(self, index: int) -> IndexEntry | None:
        return self._entries.get(index)

    def delete(self, index: int) -> None:
        self._entries.pop(index, None)

    def indexes(self) -> list[int]:
        return list(self._entries)
