"""The whitepaper's cryptographic primitives (§5.4): HASH, MAC, HMAC, KDFn, AEAD, XAEAD, DH and TAI64N.

BLAKE2s comes from ``hashlib``, X25519 and XChaCha20-Poly1305 from PyNaCl, ChaCha20-Poly1305 from
``cryptography``. Failures to authenticate or to agree on a key raise :class:`ProtocolError`. These are used
by the handshake; the per-packet path in ``keypair.py`` calls ``cryptography`` directly.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tunnelmesh.errors import ProtocolError

from .constants import KEY_SIZE, MAC_SIZE

_NONCE: Final = struct.Struct("<IQ")  # 32 zero bits, then the 64-bit little-endian counter (§5.4.6)
_TAI64N: Final = struct.Struct(">QI")
# TAI64 labels the second 2**62 + 10 (the TAI-UTC offset in 1972), as wireguard-go's tai64n package does.
_TAI64_BASE: Final = 0x400000000000000A
# wireguard-go rounds the nanoseconds down to ~16 ms so a timestamp does not leak a precise clock.
_WHITENER_MASK: Final = 0x1000000 - 1


def HASH(*parts: bytes) -> bytes:
    """BLAKE2s-256 of the concatenation of ``parts``."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def MAC(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 128-bit output."""
    return hashlib.blake2s(data, key=key, digest_size=MAC_SIZE).digest()


def HMAC(key: bytes, data: bytes) -> bytes:
    """HMAC over BLAKE2s-256 (RFC 2104, 64-byte block)."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def KDF1(key: bytes, data: bytes) -> bytes:
    """HKDF with BLAKE2s: one 32-byte output."""
    t0 = HMAC(key, data)
    return HMAC(t0, b"\x01")


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """HKDF with BLAKE2s: two 32-byte outputs."""
    t0 = HMAC(key, data)
    t1 = HMAC(t0, b"\x01")
    t2 = HMAC(t0, t1 + b"\x02")
    return t1, t2


def KDF3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """HKDF with BLAKE2s: three 32-byte outputs."""
    t0 = HMAC(key, data)
    t1 = HMAC(t0, b"\x01")
    t2 = HMAC(t0, t1 + b"\x02")
    t3 = HMAC(t0, t2 + b"\x03")
    return t1, t2, t3


def aead_nonce(counter: int) -> bytes:
    """The 96-bit ChaCha20-Poly1305 nonce for ``counter``."""
    return _NONCE.pack(0, counter)


def AEAD(key: bytes, counter: int, plaintext: bytes, auth_text: bytes) -> bytes:
    """ChaCha20-Poly1305 seal."""
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(0, counter), plaintext, auth_text)


def AEAD_open(key: bytes, counter: int, ciphertext: bytes, auth_text: bytes) -> bytes:
    """ChaCha20-Poly1305 open; raises :class:`ProtocolError` if the tag does not verify."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(0, counter), ciphertext, auth_text)
    except InvalidTag:
        raise ProtocolError("AEAD authentication failed") from None


def XAEAD(key: bytes, nonce: bytes, plaintext: bytes, auth_text: bytes) -> bytes:
    """XChaCha20-Poly1305 seal (24-byte nonce), used for cookie replies."""
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, auth_text, nonce, key)


def XAEAD_open(key: bytes, nonce: bytes, ciphertext: bytes, auth_text: bytes) -> bytes:
    """XChaCha20-Poly1305 open; raises :class:`ProtocolError` if the tag does not verify."""
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, auth_text, nonce, key)
    except nacl.exceptions.CryptoError:
        raise ProtocolError("XAEAD authentication failed") from None


def clamp_private_key(raw: bytes) -> bytes:
    """Clamp 32 random bytes into an X25519 private key (as ``wg genkey`` does)."""
    if len(raw) != KEY_SIZE:
        raise ValueError(f"an X25519 private key is {KEY_SIZE} bytes, got {len(raw)}")
    key = bytearray(raw)
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def DH_PUBKEY(private_key: bytes) -> bytes:
    """The X25519 public key of ``private_key``."""
    return nacl.bindings.crypto_scalarmult_base(private_key)


def DH(private_key: bytes, public_key: bytes) -> bytes:
    """X25519; raises :class:`ProtocolError` for a low-order public key (an all-zero shared secret)."""
    try:
        shared = nacl.bindings.crypto_scalarmult(private_key, public_key)
    except nacl.exceptions.RuntimeError:
        raise ProtocolError("X25519 produced an all-zero shared secret (low-order public key)") from None
    if not any(shared):  # libsodium already refuses this; checked again because interop depends on it
        raise ProtocolError("X25519 produced an all-zero shared secret (low-order public key)")
    return shared


def TAI64N(unix_time: float) -> bytes:
    """The 12-byte TAI64N label of a wall-clock time, whitened like wireguard-go's."""
    seconds = int(unix_time // 1)
    nanoseconds = int((unix_time - seconds) * 1e9) & ~_WHITENER_MASK
    return _TAI64N.pack(_TAI64_BASE + seconds, nanoseconds)
