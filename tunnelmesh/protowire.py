"""Hand-assembled protobuf wire encoding, for the places that splice cached, already-encoded parts into a
message instead of re-serializing it (state snapshots, config views, WatchConfig responses)."""

from __future__ import annotations

from google.protobuf.message import Message


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(number: int, payload: Message | bytes) -> bytes:
    """One length-delimited field (tag, length, bytes): how protobuf encodes a message-typed field, a
    repeated element or a string; a message is serialized deterministically."""
    if not isinstance(payload, bytes):
        payload = payload.SerializeToString(deterministic=True)
    return varint(number << 3 | 2) + varint(len(payload)) + payload
