"""Transport keypairs (§5.4.6) and the previous/current/next rotation (§6.1, wireguard-go ``keypair.go``).

A :class:`Keypair` is the per-packet hot path: :meth:`Keypair.encrypt` turns an IP packet into a whole type-4
message and :meth:`Keypair.decrypt` turns a type-4 message back into the padded plaintext. Each holds its
``cryptography`` ChaCha20Poly1305 objects for its lifetime, so a packet costs one AEAD call, one struct pack
and one concatenation. They raise on failure (rare) rather than allocate result objects per packet (common).
Thread use: one thread at a time may call ``encrypt`` and one (possibly another) ``decrypt`` on a keypair; the
counter and the replay window are not locked.

:class:`Keypairs` implements the rotation rules: an initiator's new keypair becomes *current* as soon as the
response is consumed; a responder's new keypair waits as *next* until the first transport message arrives
under it (key confirmation), and only then becomes current, the old current becoming *previous* so that
packets still in flight under it decrypt.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import MESSAGE_TRANSPORT_TYPE, PADDING_MULTIPLE, REJECT_AFTER_MESSAGES
from .messages import TRANSPORT_HEADER
from .replay import ReplayFilter

_NONCE: Final = struct.Struct("<IQ")
_COUNTER: Final = struct.Struct("<Q")
_PAD: Final = bytes(PADDING_MULTIPLE)
_HEADER_SIZE: Final = TRANSPORT_HEADER.size


class KeypairExhausted(Exception):
    """The keypair has sent REJECT_AFTER_MESSAGES messages and must not send more."""


class ReplayedCounter(Exception):
    """An authenticated transport message whose counter was already seen or is too old."""


def padding_size(packet_size: int, mtu: int) -> int:
    """Zero bytes to append to a plaintext of ``packet_size`` (wireguard-go ``calculatePaddingSize``)."""
    last_unit = packet_size
    if mtu == 0:
        return -last_unit % PADDING_MULTIPLE
    if last_unit > mtu:
        last_unit %= mtu
    padded = min(last_unit + (-last_unit % PADDING_MULTIPLE), mtu)
    return max(padded - last_unit, 0)


class Keypair:
    """One direction-pair of transport keys with its counters and replay window."""

    __slots__ = (
        "_open",
        "_seal",
        "created",
        "is_initiator",
        "local_index",
        "mtu",
        "remote_index",
        "replay",
        "send_counter",
    )

    def __init__(
        self,
        send_key: bytes,
        receive_key: bytes,
        *,
        is_initiator: bool,
        created: float,
        local_index: int,
        remote_index: int,
        mtu: int = 0,
    ) -> None:
        self._seal = ChaCha20Poly1305(send_key).encrypt
        self._open = ChaCha20Poly1305(receive_key).decrypt
        self.is_initiator = is_initiator
        self.created = created
        self.local_index = local_index
        self.remote_index = remote_index
        self.mtu = mtu
        self.send_counter = 0
        self.replay = ReplayFilter()

    def encrypt(self, packet: bytes | bytearray) -> bytes:
        """The type-4 message carrying ``packet`` (empty for a keepalive), padded to a multiple of 16."""
        counter = self.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            raise KeypairExhausted("keypair used for REJECT_AFTER_MESSAGES messages")
        self.send_counter = counter + 1
        size = len(packet)
        if size % PADDING_MULTIPLE:
            packet = packet + _PAD[: padding_size(size, self.mtu)]
        return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT_TYPE, self.remote_index, counter) + self._seal(
            _NONCE.pack(0, counter), packet, None
        )

    def decrypt(self, message: bytes) -> bytes:
        """The padded plaintext of type-4 ``message`` addressed to this keypair.

        Raises ``cryptography.exceptions.InvalidTag`` if it does not authenticate and :class:`ReplayedCounter`
        if it authenticates but was seen before or is outside the window. The caller has already matched the
        receiver index and checked the minimum length.
        """
        counter: int = _COUNTER.unpack_from(message, 8)[0]
        plaintext: bytes = self._open(_NONCE.pack(0, counter), memoryview(message)[_HEADER_SIZE:], None)
        if not self.replay.validate_counter(counter, REJECT_AFTER_MESSAGES):
            raise ReplayedCounter(counter)
        return plaintext


class Keypairs:
    """A peer's previous, current and next keypairs."""

    __slots__ = ("_lost_reported", "current", "lost_retired", "next", "previous")

    def __init__(self) -> None:
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.lost_retired = 0  # messages the dropped keypairs never received (ReplayFilter.lost_at_end)
        self._lost_reported = 0

    def rx_lost(self) -> int:
        """Messages from the peer that never arrived intact, over every keypair so far. Monotonic: the live
        keypairs' windows may be read while the receive thread moves them, so a dip is never reported."""
        live = sum(k.replay.lost() for k in (self.previous, self.current, self.next) if k is not None)
        self._lost_reported = max(self._lost_reported, self.lost_retired + live)
        return self._lost_reported

    def _retire(self, dropped: list[Keypair]) -> list[Keypair]:
        self.lost_retired += sum(k.replay.lost_at_end() for k in dropped)
        return dropped

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Install a freshly derived keypair; returns the keypairs dropped (to free their indexes)."""
        dropped: list[Keypair] = []
        if keypair.is_initiator:
            if self.next is not None:
                # A responder session that was never confirmed: it becomes previous, current is dropped.
                if self.current is not None:
                    dropped.append(self.current)
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            if self.next is not None:
                dropped.append(self.next)
            if self.previous is not None:
                dropped.append(self.previous)
            self.next = keypair
            self.previous = None
        return self._retire(dropped)

    def received_with(self, keypair: Keypair) -> tuple[bool, Keypair | None]:
        """Note a transport message received under ``keypair``.

        Returns ``(confirmed, dropped)``: ``confirmed`` is True if ``keypair`` was *next* and is now current
        (key confirmation of a responder session); ``dropped`` is the keypair pushed out of *previous*.
        """
        if keypair is not self.next:
            return False, None
        dropped = self.previous
        self.previous = self.current
        self.current = keypair
        self.next = None
        if dropped is not None:
            self._retire([dropped])
        return True, dropped

    def clear(self) -> list[Keypair]:
        """Forget every keypair; returns them (to free their indexes)."""
        dropped = [k for k in (self.previous, self.current, self.next) if k is not None]
        self.previous = self.current = self.next = None
        return self._retire(dropped)

    def all(self) -> list[Keypair]:
        return [k for k in (self.previous, self.current, self.next) if k is not None]
