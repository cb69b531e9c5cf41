"""Protocol constants, named as in the WireGuard whitepaper (§5.4, §6.1) and wireguard-go ``constants.go``.

Times are float seconds because the core takes ``now`` as float seconds of a monotonic clock.
"""

from __future__ import annotations

from typing import Final

# §5.4: the Noise construction and WireGuard's identifier, hashed into the initial chaining key and hash.
CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

# §6.1: limits on a session's lifetime.
REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
KEEPALIVE_TIMEOUT: Final = 10.0

# wireguard-go: retransmissions before giving up (REKEY_ATTEMPT_TIME / REKEY_TIMEOUT) and the jitter added to
# REKEY_TIMEOUT so that two peers do not retry in lockstep.
MAX_TIMER_HANDSHAKES: Final = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
REKEY_TIMEOUT_JITTER_MAX: Final = 0.334

# §5.4.7: the responder's cookie secret rotates, and an initiator's cookie expires, after two minutes.
COOKIE_REFRESH_TIME: Final = 120.0
# wireguard-go: at most one initiation per peer per 1/50 s is consumed (timestamps are whitened to ~16 ms).
HANDSHAKE_INITIATION_RATE: Final = 1.0 / 50

# §5.4.6: transport plaintext is zero-padded to a multiple of 16 bytes (never beyond the MTU).
PADDING_MULTIPLE: Final = 16
# wireguard-go: packets waiting for a session, per peer; the oldest are dropped first.
MAX_STAGED_PACKETS: Final = 128

# §5.4: message types (the first byte; the next three are reserved zeros, so the first four bytes read as a
# little-endian uint32 equal the type).
MESSAGE_INITIATION_TYPE: Final = 1
MESSAGE_RESPONSE_TYPE: Final = 2
MESSAGE_COOKIE_REPLY_TYPE: Final = 3
MESSAGE_TRANSPORT_TYPE: Final = 4

KEY_SIZE: Final = 32
MAC_SIZE: Final = 16
TAG_SIZE: Final = 16
TIMESTAMP_SIZE: Final = 12
COOKIE_NONCE_SIZE: Final = 24

MESSAGE_INITIATION_SIZE: Final = 148
MESSAGE_RESPONSE_SIZE: Final = 92
MESSAGE_COOKIE_REPLY_SIZE: Final = 64
MESSAGE_TRANSPORT_HEADER_SIZE: Final = 16
MESSAGE_TRANSPORT_MIN_SIZE: Final = MESSAGE_TRANSPORT_HEADER_SIZE + TAG_SIZE  # a keepalive
MESSAGE_KEEPALIVE_SIZE: Final = MESSAGE_TRANSPORT_MIN_SIZE
