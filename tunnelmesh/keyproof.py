"""Proof that a node holds the private key of the public key it registers (``RegisterRequest.key_proof``).

A public key is public: without a proof, anyone holding the same reusable join token could register another
node's key again and receive a fresh node token for it (a takeover, or at least a denial of service). X25519
keys cannot sign, so, as WireGuard and the relay hello do, the node proves possession with a NaCl ``Box``
(X25519 + XSalsa20-Poly1305) from its key to the coordinator's relay key: only the holders of either private
key can make a box that opens, and the coordinator holds the other one. The proof is 80 bytes::

    nonce(24) || Box(node_private, coordinator_public).encrypt(
        u64 BE unix-ns timestamp || SHA-256("tunnelmesh-register-v1" || public_key || join_token_id
                                            || coordinator_id), nonce).ciphertext      # 8 + 32 + 16 tag

The digest binds the proof to the registered key, the join token and the coordinator, so it cannot be used
with another token or on another coordinator; the timestamp bounds how long a captured proof stays useful
(``WINDOW_S``; it travels inside TLS anyway). ``make``/``verify`` are pure (time is passed in);
``register`` is the one-call client helper (GetServerInfo, then Register with a proof, on one channel).
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import time
from typing import Any, Final

import nacl.exceptions
import nacl.public

from tunnelmesh.api.v1 import node_pb2
from tunnelmesh.errors import ProtocolError

CONTEXT: Final = b"tunnelmesh-register-v1"
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
_U64: Final = struct.Struct(">Q")
DIGEST_LEN: Final = 32
PROOF_LEN: Final = NONCE_LEN + _U64.size + DIGEST_LEN + 16  # Poly1305 tag
WINDOW_S: Final = 300.0  # accepted distance between the proof's timestamp and the verifier's clock

# KeyProofError.reason values (also the `reason` label of the coordinator's refusal metric).
MALFORMED: Final = "malformed"
FORGED: Final = "forged"
STALE: Final = "stale"
WRONG_BINDING: Final = "wrong_binding"


class KeyProofError(ProtocolError):
    """A key proof that does not verify; ``reason`` is one of MALFORMED, FORGED, STALE, WRONG_BINDING."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _digest(public_key: bytes, join_token_id: str, coordinator_id: str) -> bytes:
    # Plain concatenation is unambiguous: the key (32 bytes) and the token id (12 hex digits) have fixed
    # lengths, and the coordinator id comes last.
    return hashlib.sha256(CONTEXT + public_key + join_token_id.encode() + coordinator_id.encode()).digest()


def make(
    node_private: bytes,
    coordinator_public: bytes,
    *,
    public_key: bytes,
    join_token_id: str,
    coordinator_id: str,
    now_ns: int,
    nonce: bytes | None = None,
) -> bytes:
    """The key proof of ``node_private`` (whose public half is ``public_key``) for the coordinator whose relay
    key is ``coordinator_public``. ``nonce`` is random unless given (tests)."""
    if len(node_private) != KEY_LEN or len(coordinator_public) != KEY_LEN:
        raise ValueError(f"keys must be {KEY_LEN} bytes")
    nonce = secrets.token_bytes(NONCE_LEN) if nonce is None else nonce
    box = nacl.public.Box(nacl.public.PrivateKey(node_private), nacl.public.PublicKey(coordinator_public))
    plain = _U64.pack(now_ns) + _digest(public_key, join_token_id, coordinator_id)
    return nonce + box.encrypt(plain, nonce).ciphertext


def verify(
    proof: bytes,
    coordinator_private: bytes,
    *,
    public_key: bytes,
    join_token_id: str,
    coordinator_id: str,
    now_ns: int,
    window_s: float = WINDOW_S,
) -> None:
    """Returns if ``proof`` was made by the holder of ``public_key``'s private key for exactly these fields
    within ``window_s`` of ``now_ns``; raises KeyProofError otherwise (never anything else)."""
    if len(proof) != PROOF_LEN:
        raise KeyProofError(MALFORMED, f"key_proof must be {PROOF_LEN} bytes, got {len(proof)}")
    if len(public_key) != KEY_LEN:
        raise KeyProofError(MALFORMED, f"public_key must be {KEY_LEN} bytes, got {len(public_key)}")
    try:
        box = nacl.public.Box(nacl.public.PrivateKey(coordinator_private), nacl.public.PublicKey(public_key))
        plain = box.decrypt(proof[NONCE_LEN:], proof[:NONCE_LEN])
    except nacl.exceptions.CryptoError:
        raise KeyProofError(
            FORGED,
            "key_proof does not open with this key pair: it was not made with the private key of public_key "
            "(or for another coordinator's relay key)",
        ) from None
    stamp = _U64.unpack_from(plain)[0]
    skew = (stamp - now_ns) / 1e9
    if abs(skew) > window_s:
        raise KeyProofError(
            STALE,
            f"key_proof timestamp is {skew:+.0f} s from the coordinator's clock (window +-{window_s:.0f} s): "
            "make a fresh proof (timestamp it with GetServerInfo's server_time)",
        )
    if not secrets.compare_digest(plain[_U64.size :], _digest(public_key, join_token_id, coordinator_id)):
        raise KeyProofError(
            WRONG_BINDING,
            "key_proof was made for another public key, join token or coordinator id than this request's",
        )


def prove(
    request: node_pb2.RegisterRequest,
    node_private: bytes,
    server: node_pb2.GetServerInfoResponse,
    *,
    now_ns: int | None = None,
) -> node_pb2.RegisterRequest:
    """A copy of ``request`` with key_proof and coordinator_id for the coordinator ``server`` describes,
    timestamped with the server's clock when it sent one (a node's own clock may be off)."""
    from tunnelmesh.tokens import JoinToken, TokenError  # parse the id exactly as the coordinator does

    try:
        join_token_id = JoinToken.parse(request.join_token).token_id
    except TokenError:
        join_token_id = ""  # the coordinator refuses the token itself, with a clearer error than ours
    info = server.coordinator
    if len(info.relay_public_key) != KEY_LEN or not info.id:
        raise ProtocolError(
            f"coordinator {info.api_address or '?'} announced no relay key / id in GetServerInfo: it cannot "
            "verify a key proof"
        )
    if now_ns is None:
        ts = server.server_time
        now_ns = ts.seconds * 1_000_000_000 + ts.nanos if server.HasField("server_time") else time.time_ns()
    out = node_pb2.RegisterRequest()
    out.CopyFrom(request)
    out.coordinator_id = info.id
    out.key_proof = make(
        node_private,
        info.relay_public_key,
        public_key=request.public_key,
        join_token_id=join_token_id,
        coordinator_id=info.id,
        now_ns=now_ns,
    )
    return out


async def register(
    stub: Any,
    request: node_pb2.RegisterRequest,
    node_private: bytes,
    *,
    timeout: float,  # noqa: ASYNC109 - the gRPC deadline of the two calls
) -> node_pb2.RegisterResponse:
    """GetServerInfo then Register with a key proof, both through ``stub`` (a ``NodeServiceStub`` on one
    channel, so both reach the same coordinator). gRPC errors propagate (``grpc.aio.AioRpcError``)."""
    started = time.monotonic()
    info: node_pb2.GetServerInfoResponse = await stub.GetServerInfo(
        node_pb2.GetServerInfoRequest(), timeout=timeout
    )
    left = max(0.1, timeout - (time.monotonic() - started))
    response: node_pb2.RegisterResponse = await stub.Register(
        prove(request, node_private, info), timeout=left
    )
    return response


__all__ = [
    "FORGED",
    "MALFORMED",
    "PROOF_LEN",
    "STALE",
    "WINDOW_S",
    "WRONG_BINDING",
    "KeyProofError",
    "make",
    "prove",
    "register",
    "verify",
]
