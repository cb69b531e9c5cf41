"""What the sans-I/O device asks its I/O shell to do, and why it dropped things.

Actions and events are frozen, slotted dataclasses; peers are named by their 32-byte public key and endpoints
are ``(host, port)`` tuples exactly as the shell's UDP socket reports them (plain ``a.b.c.d`` for IPv4 peers;
link-local IPv6 hosts carry their scope as ``fe80::1%<ifindex>``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tunnelmesh.errors import ProtocolError

Endpoint = tuple[str, int]


class DropReason(enum.StrEnum):
    """Why a datagram or packet was dropped; each has a counter in ``Device.drops``."""

    MALFORMED = "malformed"  # wrong size, unknown type, bad IP header inside a transport message
    BAD_MAC1 = "bad_mac1"
    COOKIE_SENT = "cookie_sent"  # under load and no valid mac2: answered with a cookie reply instead
    RATE_LIMITED = "rate_limited"  # under load, valid mac2, but its source IP exceeded 20 handshakes/s
    BAD_COOKIE = "bad_cookie"  # a cookie reply that does not decrypt or matches nothing we sent
    DECRYPT_FAILURE = "decrypt_failure"  # handshake or transport AEAD did not authenticate
    UNKNOWN_PEER = "unknown_peer"  # an initiation from a static key we are not configured with
    UNKNOWN_INDEX = "unknown_index"  # receiver index not in the index table (or of the wrong kind)
    INVALID_STATE = "invalid_state"  # e.g. a response to a handshake we are no longer waiting on
    REPLAY = "replay"  # transport counter seen before or too old
    REPLAYED_INITIATION = "replayed_initiation"  # TAI64N timestamp not newer than the last one
    FLOODED_INITIATION = "flooded_initiation"  # more than one initiation per HANDSHAKE_INITIATION_RATE
    KEY_EXPIRED = "key_expired"  # keypair older than REJECT_AFTER_TIME or out of messages
    ALLOWED_IPS = "allowed_ips"  # inner source address not routed to the sending peer
    NO_ENDPOINT = "no_endpoint"  # something to send to a peer whose address we do not know yet
    STAGED_OVERFLOW = "staged_overflow"  # too many packets waiting for a session
    HANDSHAKE_GAVE_UP = "handshake_gave_up"  # packets flushed after REKEY_ATTEMPT_TIME without a session
    KEYS_ZEROED = "keys_zeroed"  # packets flushed because the peer's keys were zeroed


class HandshakeRejected(ProtocolError):
    """A handshake message that was well-formed but refused; ``reason`` says why."""

    def __init__(self, reason: DropReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send ``data`` in one UDP datagram to ``endpoint``."""

    endpoint: Endpoint
    data: bytes


@dataclass(frozen=True, slots=True)
class DeliverPacket:
    """Write decrypted IP ``packet`` (padding removed, source checked) from ``peer`` to the TUN device."""

    peer: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """Something was dropped (already counted in ``Device.drops``); ``detail`` is for debug logs."""

    reason: DropReason
    peer: bytes | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """An authenticated packet from ``peer`` arrived from a new address, which is now its endpoint."""

    peer: bytes
    old: Endpoint | None
    new: Endpoint


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session with ``peer`` is usable for sending (``initiator``: we sent the initiation)."""

    peer: bytes
    initiator: bool


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    """``peer``'s keys were destroyed (3 × REJECT_AFTER_TIME after the last session was derived)."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    """No handshake with ``peer`` completed within REKEY_ATTEMPT_TIME; its waiting packets were flushed."""

    peer: bytes


Action = (
    SendDatagram | DeliverPacket | Drop | EndpointChanged | HandshakeCompleted | KeysZeroed | HandshakeGaveUp
)
