"""mac1, mac2 and cookie replies (§5.4.4, §5.4.7): DoS mitigation for handshake messages.

Every handshake message ends with ``mac1 = MAC(HASH(LABEL_MAC1 || S_receiver_pub), msg[:-32])``, which
proves the sender knows the receiver's public key, and ``mac2 = MAC(cookie, msg[:-16])`` (zeros without a
cookie).
A responder *under load* answers a handshake message lacking a valid mac2 with a cookie reply instead of doing
any Diffie-Hellman: the cookie is ``MAC(R_m, A_m)`` (a secret rotated every COOKIE_REFRESH_TIME, the sender's
address), XAEAD-encrypted under ``HASH(LABEL_COOKIE || S_responder_pub)`` with the message's mac1 as
associated data. The initiator keeps the cookie for COOKIE_REFRESH_TIME and uses it for mac2 on its next try.

:class:`CookieChecker` is the receiving side (one per device), :class:`CookieGenerator` the sending side (one
per peer). Neither reads a clock or a random source: ``now`` and ``rng`` come in as arguments.
"""

from __future__ import annotations

import hmac
import ipaddress
import random

from tunnelmesh.errors import ProtocolError

from .constants import COOKIE_NONCE_SIZE, COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1, MAC_SIZE
from .crypto import HASH, MAC, XAEAD, XAEAD_open
from .messages import MessageCookieReply

Endpoint = tuple[str, int]


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """``A_m``: the packed source IP followed by the big-endian port."""
    host, port = endpoint
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        packed = host.encode()
    return packed + (port & 0xFFFF).to_bytes(2, "big")


class CookieChecker:
    """Verifies mac1/mac2 of handshake messages addressed to us and creates cookie replies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_secret", "_secret_set")

    def __init__(self, local_public_key: bytes) -> None:
        self._mac1_key = HASH(LABEL_MAC1, local_public_key)
        self._cookie_key = HASH(LABEL_COOKIE, local_public_key)
        self._secret = b""
        self._secret_set: float | None = None

    def check_mac1(self, msg: bytes) -> bool:
        """True if ``msg`` (a whole handshake message) carries a valid mac1."""
        smac1 = len(msg) - 2 * MAC_SIZE
        return hmac.compare_digest(MAC(self._mac1_key, msg[:smac1]), msg[smac1 : smac1 + MAC_SIZE])

    def check_mac2(self, msg: bytes, src: Endpoint, now: float) -> bool:
        """True if ``msg`` carries a mac2 made with the cookie we would currently hand ``src``."""
        if self._secret_set is None or now - self._secret_set > COOKIE_REFRESH_TIME:
            return False
        cookie = MAC(self._secret, endpoint_bytes(src))
        smac2 = len(msg) - MAC_SIZE
        return hmac.compare_digest(MAC(cookie, msg[:smac2]), msg[smac2:])

    def create_reply(
        self, msg: bytes, receiver: int, src: Endpoint, now: float, rng: random.Random
    ) -> MessageCookieReply:
        """The cookie reply to handshake message ``msg`` whose sender index is ``receiver``."""
        if self._secret_set is None or now - self._secret_set > COOKIE_REFRESH_TIME:
            self._secret = rng.randbytes(32)
            self._secret_set = now
        cookie = MAC(self._secret, endpoint_bytes(src))
        smac1 = len(msg) - 2 * MAC_SIZE
        nonce = rng.randbytes(COOKIE_NONCE_SIZE)
        encrypted = XAEAD(self._cookie_key, nonce, cookie, msg[smac1 : smac1 + MAC_SIZE])
        return MessageCookieReply(receiver, nonce, encrypted)


class CookieGenerator:
    """Adds mac1/mac2 to handshake messages we send to one peer and consumes that peer's cookie replies."""

    __slots__ = ("_cookie", "_cookie_key", "_cookie_set", "_last_mac1", "_mac1_key")

    def __init__(self, remote_public_key: bytes) -> None:
        self._mac1_key = HASH(LABEL_MAC1, remote_public_key)
        self._cookie_key = HASH(LABEL_COOKIE, remote_public_key)
        self._cookie = b""
        self._cookie_set: float | None = None
        self._last_mac1: bytes | None = None

    @property
    def has_cookie(self) -> bool:
        return self._cookie_set is not None

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """``msg`` (a serialized handshake message) with mac1 and, with a fresh cookie, mac2 filled in."""
        smac1 = len(msg) - 2 * MAC_SIZE
        mac1 = MAC(self._mac1_key, msg[:smac1])
        self._last_mac1 = mac1
        with_mac1 = msg[:smac1] + mac1
        if self._cookie_set is None or now - self._cookie_set > COOKIE_REFRESH_TIME:
            return with_mac1 + bytes(MAC_SIZE)
        return with_mac1 + MAC(self._cookie, with_mac1)

    def consume_reply(self, reply: MessageCookieReply, now: float) -> None:
        """Store the cookie in ``reply``; raises :class:`ProtocolError` if it is not for our last message."""
        if self._last_mac1 is None:
            raise ProtocolError("cookie reply received but no handshake message was sent to that peer")
        cookie = XAEAD_open(self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1)
        self._cookie = cookie
        self._cookie_set = now
