"""The Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s handshake as WireGuard uses it (whitepaper §5.4.2–§5.4.5).

Theory of operation
-------------------
One :class:`Handshake` per peer holds everything that changes during a handshake. This module owns every
transition of it and does not know which role it plays beyond what the state says; the device decides when
to call which step, and supplies what this module must not produce itself: ephemeral private keys, TAI64N
timestamps, local indexes and ``now``.

The steps and the state each requires (the :data:`TRANSITIONS` table)::

    create_initiation   any state            -> INITIATION_CREATED   (initiator; message 1)
    consume_initiation  any state            -> INITIATION_CONSUMED  (responder; message 1 arrives)
    create_response     INITIATION_CONSUMED  -> RESPONSE_CREATED     (responder; message 2)
    consume_response    INITIATION_CREATED   -> RESPONSE_CONSUMED    (initiator; message 2 arrives)
    derive_keys         RESPONSE_CREATED     -> ZEROED  (responder's transport keys: recv, send)
                        RESPONSE_CONSUMED    -> ZEROED  (initiator's transport keys: send, recv)

Both sides start from ``C = HASH(CONSTRUCTION)``, ``H = HASH(C || IDENTIFIER)``, mix in the responder's static
key, and then mirror each other's ``mixHash``/``mixKey`` calls, so the chaining key ``C`` ends up equal on
both sides and ``H`` authenticates the whole transcript. The pre-shared key (32 zero bytes when none is
configured) enters last, through KDF3, which is what makes the pattern "psk2".

Consuming a message is all-or-nothing: every check (decryption, peer lookup, TAI64N replay, flood rate, state)
runs on local variables first, and the :class:`Handshake` is written only once everything passed. A message
that fails raises :class:`HandshakeRejected` (a :class:`ProtocolError`) and leaves no trace.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tunnelmesh.errors import ProtocolError

from .actions import DropReason, HandshakeRejected
from .constants import CONSTRUCTION, HANDSHAKE_INITIATION_RATE, IDENTIFIER, KEY_SIZE, TIMESTAMP_SIZE
from .crypto import AEAD, DH, DH_PUBKEY, HASH, KDF1, KDF2, KDF3, AEAD_open
from .messages import MessageInitiation, MessageResponse

INITIAL_CHAIN_KEY: Final = HASH(CONSTRUCTION)
INITIAL_HASH: Final = HASH(INITIAL_CHAIN_KEY, IDENTIFIER)
ZERO_PSK: Final = bytes(KEY_SIZE)
_ZERO_TIMESTAMP: Final = bytes(TIMESTAMP_SIZE)


class HandshakeState(enum.Enum):
    ZEROED = "zeroed"
    INITIATION_CREATED = "initiation_created"
    INITIATION_CONSUMED = "initiation_consumed"
    RESPONSE_CREATED = "response_created"
    RESPONSE_CONSUMED = "response_consumed"


class Step(enum.Enum):
    CREATE_INITIATION = "create_initiation"
    CONSUME_INITIATION = "consume_initiation"
    CREATE_RESPONSE = "create_response"
    CONSUME_RESPONSE = "consume_response"
    DERIVE_KEYS = "derive_keys"


_ANY: Final = tuple(HandshakeState)
TRANSITIONS: Final[dict[tuple[HandshakeState, Step], HandshakeState]] = {
    **{(s, Step.CREATE_INITIATION): HandshakeState.INITIATION_CREATED for s in _ANY},
    **{(s, Step.CONSUME_INITIATION): HandshakeState.INITIATION_CONSUMED for s in _ANY},
    (HandshakeState.INITIATION_CONSUMED, Step.CREATE_RESPONSE): HandshakeState.RESPONSE_CREATED,
    (HandshakeState.INITIATION_CREATED, Step.CONSUME_RESPONSE): HandshakeState.RESPONSE_CONSUMED,
    (HandshakeState.RESPONSE_CREATED, Step.DERIVE_KEYS): HandshakeState.ZEROED,
    (HandshakeState.RESPONSE_CONSUMED, Step.DERIVE_KEYS): HandshakeState.ZEROED,
}


def _next_state(state: HandshakeState, step: Step) -> HandshakeState:
    try:
        return TRANSITIONS[(state, step)]
    except KeyError:
        raise HandshakeRejected(
            DropReason.INVALID_STATE, f"{step.value} is not allowed in handshake state {state.value}"
        ) from None


@dataclass(frozen=True, slots=True)
class StaticIdentity:
    """Our long-term X25519 key pair."""

    private_key: bytes
    public_key: bytes

    @classmethod
    def from_private_key(cls, private_key: bytes) -> StaticIdentity:
        if len(private_key) != KEY_SIZE:
            raise ValueError(f"a WireGuard private key is {KEY_SIZE} bytes, got {len(private_key)}")
        return cls(private_key, DH_PUBKEY(private_key))


@dataclass(slots=True)
class Handshake:
    """Per-peer handshake state (wireguard-go ``Handshake``)."""

    remote_static: bytes
    precomputed_static_static: bytes
    preshared_key: bytes = ZERO_PSK
    state: HandshakeState = HandshakeState.ZEROED
    hash: bytes = b""
    chaining_key: bytes = b""
    local_ephemeral: bytes = b""
    remote_ephemeral: bytes = b""
    local_index: int = 0
    remote_index: int = 0
    # Replay and flood protection of initiations from this peer (§5.1, wireguard-go).
    last_timestamp: bytes = _ZERO_TIMESTAMP
    last_initiation_consumption: float | None = None
    # wireguard-go: never send more than one initiation per REKEY_TIMEOUT.
    last_sent_handshake: float | None = None

    @classmethod
    def for_peer(
        cls, identity: StaticIdentity, remote_static: bytes, preshared_key: bytes | None
    ) -> Handshake:
        if len(remote_static) != KEY_SIZE:
            raise ValueError(f"a WireGuard public key is {KEY_SIZE} bytes, got {len(remote_static)}")
        psk = ZERO_PSK if preshared_key is None else preshared_key
        if len(psk) != KEY_SIZE:
            raise ValueError(f"a WireGuard pre-shared key is {KEY_SIZE} bytes, got {len(psk)}")
        try:
            ss = DH(identity.private_key, remote_static)
        except ProtocolError:
            ss = bytes(KEY_SIZE)  # a low-order peer key: every handshake with it will be refused
        return cls(remote_static=remote_static, precomputed_static_static=ss, preshared_key=psk)

    def zero(self) -> None:
        """Forget the in-progress handshake (keeps replay/flood history, as wireguard-go does)."""
        self.state = HandshakeState.ZEROED
        self.hash = self.chaining_key = self.local_ephemeral = self.remote_ephemeral = b""
        self.local_index = self.remote_index = 0


def create_initiation(
    identity: StaticIdentity, hs: Handshake, *, ephemeral_private: bytes, timestamp: bytes, local_index: int
) -> MessageInitiation:
    """Message 1 (§5.4.2), without macs. ``local_index`` must already be registered for this peer."""
    new_state = _next_state(hs.state, Step.CREATE_INITIATION)
    if not any(hs.precomputed_static_static):
        raise HandshakeRejected(DropReason.UNKNOWN_PEER, "peer public key is invalid (low order)")
    h = HASH(INITIAL_HASH, hs.remote_static)
    ephemeral = DH_PUBKEY(ephemeral_private)
    c = KDF1(INITIAL_CHAIN_KEY, ephemeral)
    h = HASH(h, ephemeral)
    c, k = KDF2(c, DH(ephemeral_private, hs.remote_static))
    encrypted_static = AEAD(k, 0, identity.public_key, h)
    h = HASH(h, encrypted_static)
    c, k = KDF2(c, hs.precomputed_static_static)
    encrypted_timestamp = AEAD(k, 0, timestamp, h)
    h = HASH(h, encrypted_timestamp)

    hs.state = new_state
    hs.hash, hs.chaining_key, hs.local_ephemeral = h, c, ephemeral_private
    hs.remote_ephemeral = b""
    hs.local_index = local_index
    return MessageInitiation(local_index, ephemeral, encrypted_static, encrypted_timestamp)


def consume_initiation(
    identity: StaticIdentity,
    msg: MessageInitiation,
    now: float,
    lookup: Callable[[bytes], Handshake | None],
) -> Handshake:
    """Verify message 1 (§5.4.2) and record it in the sending peer's handshake, which is returned."""
    h = HASH(HASH(INITIAL_HASH, identity.public_key), msg.ephemeral)
    c = KDF1(INITIAL_CHAIN_KEY, msg.ephemeral)
    c, k = KDF2(c, DH(identity.private_key, msg.ephemeral))
    try:
        remote_static = AEAD_open(k, 0, msg.encrypted_static, h)
    except ProtocolError:
        raise HandshakeRejected(DropReason.DECRYPT_FAILURE, "initiation static key did not decrypt") from None
    h = HASH(h, msg.encrypted_static)

    hs = lookup(remote_static)
    if hs is None:
        raise HandshakeRejected(
            DropReason.UNKNOWN_PEER, f"initiation from unknown peer {remote_static.hex()}"
        )
    new_state = _next_state(hs.state, Step.CONSUME_INITIATION)
    if not any(hs.precomputed_static_static):
        raise HandshakeRejected(DropReason.UNKNOWN_PEER, "peer public key is invalid (low order)")
    c, k = KDF2(c, hs.precomputed_static_static)
    try:
        timestamp = AEAD_open(k, 0, msg.encrypted_timestamp, h)
    except ProtocolError:
        raise HandshakeRejected(DropReason.DECRYPT_FAILURE, "initiation timestamp did not decrypt") from None
    h = HASH(h, msg.encrypted_timestamp)

    # §5.1: a timestamp that is not newer than the last one is a replay; wireguard-go also refuses more than
    # one initiation per HANDSHAKE_INITIATION_RATE because timestamps are whitened to ~16 ms.
    if timestamp <= hs.last_timestamp:
        raise HandshakeRejected(
            DropReason.REPLAYED_INITIATION, "initiation timestamp is not newer than the last"
        )
    last = hs.last_initiation_consumption
    if last is not None and now - last <= HANDSHAKE_INITIATION_RATE:
        raise HandshakeRejected(DropReason.FLOODED_INITIATION, "initiations arrive faster than 50 per second")

    hs.state = new_state
    hs.hash, hs.chaining_key = h, c
    hs.remote_index = msg.sender
    hs.remote_ephemeral = msg.ephemeral
    hs.last_timestamp = timestamp
    if last is None or now > last:
        hs.last_initiation_consumption = now
    return hs


def create_response(hs: Handshake, *, ephemeral_private: bytes, local_index: int) -> MessageResponse:
    """Message 2 (§5.4.3), without macs, answering the initiation consumed into ``hs``."""
    new_state = _next_state(hs.state, Step.CREATE_RESPONSE)
    ephemeral = DH_PUBKEY(ephemeral_private)
    h = HASH(hs.hash, ephemeral)
    c = KDF1(hs.chaining_key, ephemeral)
    c = KDF1(c, DH(ephemeral_private, hs.remote_ephemeral))
    c = KDF1(c, DH(ephemeral_private, hs.remote_static))
    c, tau, k = KDF3(c, hs.preshared_key)
    h = HASH(h, tau)
    encrypted_nothing = AEAD(k, 0, b"", h)
    h = HASH(h, encrypted_nothing)

    hs.state = new_state
    hs.hash, hs.chaining_key, hs.local_ephemeral = h, c, ephemeral_private
    hs.local_index = local_index
    return MessageResponse(local_index, hs.remote_index, ephemeral, encrypted_nothing)


def consume_response(identity: StaticIdentity, hs: Handshake, msg: MessageResponse) -> None:
    """Verify message 2 (§5.4.3) against the initiation we sent and record it in ``hs``."""
    new_state = _next_state(hs.state, Step.CONSUME_RESPONSE)
    h = HASH(hs.hash, msg.ephemeral)
    c = KDF1(hs.chaining_key, msg.ephemeral)
    c = KDF1(c, DH(hs.local_ephemeral, msg.ephemeral))
    c = KDF1(c, DH(identity.private_key, msg.ephemeral))
    c, tau, k = KDF3(c, hs.preshared_key)
    h = HASH(h, tau)
    try:
        AEAD_open(k, 0, msg.encrypted_nothing, h)
    except ProtocolError:
        raise HandshakeRejected(DropReason.DECRYPT_FAILURE, "response did not authenticate") from None
    h = HASH(h, msg.encrypted_nothing)

    hs.state = new_state
    hs.hash, hs.chaining_key = h, c
    hs.remote_index = msg.sender


def derive_keys(hs: Handshake) -> tuple[bytes, bytes, bool]:
    """Transport keys ``(send, receive, is_initiator)`` (§5.4.5); zeroes the handshake's secrets."""
    new_state = _next_state(hs.state, Step.DERIVE_KEYS)
    first, second = KDF2(hs.chaining_key, b"")
    is_initiator = hs.state is HandshakeState.RESPONSE_CONSUMED
    send, receive = (first, second) if is_initiator else (second, first)
    hs.state = new_state
    hs.hash = hs.chaining_key = hs.local_ephemeral = hs.remote_ephemeral = b""
    return send, receive, is_initiator
