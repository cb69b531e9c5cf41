"""The four WireGuard messages (§5.4.2–§5.4.7): frozen dataclasses, ``parse`` and ``to_bytes``.

Every message starts with a little-endian uint32 whose low byte is the type and whose three high bytes are
reserved zeros; like wireguard-go we read the whole uint32, so non-zero reserved bytes mean "unknown type".
Types 1–3 have fixed sizes; a transport message is a 16-byte header plus at least a 16-byte tag.
Every malformed input raises :class:`ProtocolError` and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from tunnelmesh.errors import ProtocolError

from .constants import (
    COOKIE_NONCE_SIZE,
    KEY_SIZE,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_RESPONSE_TYPE,
    MESSAGE_TRANSPORT_MIN_SIZE,
    MESSAGE_TRANSPORT_TYPE,
    TAG_SIZE,
    TIMESTAMP_SIZE,
)

_TYPE: Final = struct.Struct("<I")
# type, sender, ephemeral, encrypted static, encrypted timestamp, mac1, mac2
_INITIATION: Final = struct.Struct(f"<II{KEY_SIZE}s{KEY_SIZE + TAG_SIZE}s{TIMESTAMP_SIZE + TAG_SIZE}s16s16s")
# type, sender, receiver, ephemeral, encrypted nothing, mac1, mac2
_RESPONSE: Final = struct.Struct(f"<III{KEY_SIZE}s{TAG_SIZE}s16s16s")
# type, receiver, nonce, encrypted cookie
_COOKIE_REPLY: Final = struct.Struct(f"<II{COOKIE_NONCE_SIZE}s{MAC_SIZE + TAG_SIZE}s")
# type, receiver, counter
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")

assert _INITIATION.size == MESSAGE_INITIATION_SIZE
assert _RESPONSE.size == MESSAGE_RESPONSE_SIZE
assert _COOKIE_REPLY.size == MESSAGE_COOKIE_REPLY_SIZE

_ZERO_MAC: Final = bytes(MAC_SIZE)


@dataclass(frozen=True, slots=True)
class MessageInitiation:
    """Type 1, 148 bytes: the initiator's first handshake message."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = _ZERO_MAC
    mac2: bytes = _ZERO_MAC

    def to_bytes(self) -> bytes:
        return _INITIATION.pack(
            MESSAGE_INITIATION_TYPE,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class MessageResponse:
    """Type 2, 92 bytes: the responder's handshake message."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = _ZERO_MAC
    mac2: bytes = _ZERO_MAC

    def to_bytes(self) -> bytes:
        return _RESPONSE.pack(
            MESSAGE_RESPONSE_TYPE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class MessageCookieReply:
    """Type 3, 64 bytes: an encrypted cookie sent instead of a handshake response under load."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def to_bytes(self) -> bytes:
        return _COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY_TYPE, self.receiver, self.nonce, self.encrypted_cookie)


@dataclass(frozen=True, slots=True)
class MessageTransport:
    """Type 4: an encrypted (padded) IP packet; an empty plaintext is a keepalive."""

    receiver: int
    counter: int
    encrypted_packet: bytes

    def to_bytes(self) -> bytes:
        return (
            TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT_TYPE, self.receiver, self.counter) + self.encrypted_packet
        )


Message = MessageInitiation | MessageResponse | MessageCookieReply | MessageTransport


def message_type(data: bytes) -> int:
    """The message type (the first four bytes as a little-endian uint32); raises if shorter than that."""
    if len(data) < _TYPE.size:
        raise ProtocolError(f"datagram of {len(data)} bytes is too short to carry a WireGuard message type")
    value: int = _TYPE.unpack_from(data)[0]
    return value


def parse(data: bytes) -> Message:
    """Parse one datagram into a message; raises :class:`ProtocolError` on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    kind = message_type(data)
    size = len(data)
    if kind == MESSAGE_TRANSPORT_TYPE:
        if size < MESSAGE_TRANSPORT_MIN_SIZE:
            raise ProtocolError(
                f"transport message of {size} bytes is shorter than {MESSAGE_TRANSPORT_MIN_SIZE}"
            )
        _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        return MessageTransport(receiver, counter, data[TRANSPORT_HEADER.size :])
    if kind == MESSAGE_INITIATION_TYPE:
        _expect_size(kind, size, MESSAGE_INITIATION_SIZE)
        _, sender, ephemeral, static, timestamp, mac1, mac2 = _INITIATION.unpack(data)
        return MessageInitiation(sender, ephemeral, static, timestamp, mac1, mac2)
    if kind == MESSAGE_RESPONSE_TYPE:
        _expect_size(kind, size, MESSAGE_RESPONSE_SIZE)
        _, sender, receiver, ephemeral, nothing, mac1, mac2 = _RESPONSE.unpack(data)
        return MessageResponse(sender, receiver, ephemeral, nothing, mac1, mac2)
    if kind == MESSAGE_COOKIE_REPLY_TYPE:
        _expect_size(kind, size, MESSAGE_COOKIE_REPLY_SIZE)
        _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
        return MessageCookieReply(receiver, nonce, cookie)
    raise ProtocolError(f"unknown WireGuard message type 0x{kind:08x} (first four bytes, little-endian)")


def _expect_size(kind: int, size: int, expected: int) -> None:
    if size != expected:
        raise ProtocolError(f"message type {kind} must be {expected} bytes, got {size}")
