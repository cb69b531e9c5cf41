"""Whitepaper §5.3 / §5.4.4 / §5.4.7: mac1, mac2 and cookie replies under load, end to end."""

from __future__ import annotations

import random

from tunnelmesh.node.wg.actions import DropReason, HandshakeCompleted
from tunnelmesh.node.wg.constants import (
    COOKIE_REFRESH_TIME,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
    MESSAGE_INITIATION_TYPE,
)
from tunnelmesh.node.wg.cookie import CookieChecker, CookieGenerator
from tunnelmesh.node.wg.messages import MessageInitiation, parse
from tunnelmesh.node.wg.ratelimiter import RateLimiter

from .harness import A_ADDR, A_TUNNEL, B_TUNNEL, Net, ipv4_packet, session_state


def test_5_4_7_under_load_the_responder_sends_a_cookie_and_the_retry_with_mac2_succeeds() -> None:
    net = Net()
    net.b.under_load = True
    peer_b = net.b.peers[net.a.public_key]
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"queued"))
    net.run()
    # b did no Diffie-Hellman: its handshake for a is untouched; a got a 64-byte cookie reply.
    (reply,) = net.sent("b>a", MESSAGE_COOKIE_REPLY_TYPE)
    assert len(reply) == MESSAGE_COOKIE_REPLY_SIZE
    assert peer_b.handshake.last_initiation_consumption is None and peer_b.keypairs.current is None
    assert net.b.drops[DropReason.COOKIE_SENT] == 1
    assert net.a.peers[net.b.public_key].cookie.has_cookie
    first = net.sent("a>b", MESSAGE_INITIATION_TYPE)[0]
    assert first[-MAC_SIZE:] == bytes(MAC_SIZE)
    # §6.6: the initiator does not retry at once but on its REKEY_TIMEOUT retransmission, now with mac2.
    net.advance(6.0, step=0.1)
    retry = net.sent("a>b", MESSAGE_INITIATION_TYPE)[1]
    assert retry[-MAC_SIZE:] != bytes(MAC_SIZE)
    assert any(isinstance(a, HandshakeCompleted) for a in net.log[id(net.a)])
    assert net.delivered(net.b) == [ipv4_packet(A_TUNNEL, B_TUNNEL, b"queued")]
    assert net.b.drops[DropReason.COOKIE_SENT] == 1


def test_5_4_7_a_cookie_is_bound_to_the_source_address() -> None:
    net = Net()
    net.b.under_load = True
    net.handshake()  # a now holds a cookie for A_ADDR
    net.advance(6.0, step=0.1)
    assert net.a.peers[net.b.public_key].keypairs.current is not None
    # The same valid-mac2 initiation from another address earns a cookie reply, not a response.
    net.now += 10
    net.a.peers[net.b.public_key].handshake.last_sent_handshake = None
    (initiation,) = [a for a in net.a.initiate_handshake(net.now, net.b.public_key)]
    before = session_state(net.b)
    actions = net.b.receive(net.now, ("198.51.100.1", 1), initiation.data)  # type: ignore[union-attr]
    assert DropReason.COOKIE_SENT in [getattr(a, "reason", None) for a in actions]
    assert session_state(net.b) == before


def test_5_4_4_mac1_is_checked_before_anything_else() -> None:
    net = Net()
    (initiation,) = net.a.initiate_handshake(net.now, net.b.public_key)
    data = bytearray(initiation.data)  # type: ignore[union-attr]
    data[-MAC_SIZE - 1] ^= 1
    actions = net.b.receive(net.now, A_ADDR, bytes(data))
    assert [getattr(a, "reason", None) for a in actions] == [DropReason.BAD_MAC1]


def test_5_4_7_cookie_reply_that_does_not_decrypt_is_dropped() -> None:
    net = Net()
    net.b.under_load = True
    net.emit(net.a, net.a.initiate_handshake(net.now, net.b.public_key))
    dst, src, data = net.in_flight.pop(0)
    net.emit(dst, dst.receive(net.now, src, data))
    ((_, src, reply),) = net.hold()
    tampered = reply[:-1] + bytes([reply[-1] ^ 1])
    before = session_state(net.a)
    actions = net.a.receive(net.now, src, tampered)
    assert [getattr(a, "reason", None) for a in actions] == [DropReason.BAD_COOKIE]
    assert session_state(net.a) == before


def test_5_4_7_cookie_expires_after_cookie_refresh_time() -> None:
    rng = random.Random(3)
    responder_key = rng.randbytes(32)
    checker = CookieChecker(responder_key)
    generator = CookieGenerator(responder_key)
    msg = MessageInitiation(7, bytes(32), bytes(48), bytes(28)).to_bytes()
    with_macs = generator.add_macs(msg, 0.0)
    reply = checker.create_reply(with_macs, 7, A_ADDR, 0.0, rng)
    generator.consume_reply(reply, 1.0)
    assert checker.check_mac2(generator.add_macs(msg, 2.0), A_ADDR, 2.0)
    stale = generator.add_macs(msg, 1.0 + COOKIE_REFRESH_TIME + 1)
    assert parse(stale).mac2 == bytes(MAC_SIZE)  # type: ignore[union-attr]
    assert not checker.check_mac2(with_macs, A_ADDR, COOKIE_REFRESH_TIME + 1)


def test_5_3_under_load_each_source_ip_gets_20_handshakes_per_second_with_a_burst_of_5() -> None:
    limiter = RateLimiter()
    assert [limiter.allow(0.0, "192.0.2.1") for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow(0.0, "192.0.2.2")  # other addresses have their own bucket
    assert not limiter.allow(0.04, "192.0.2.1")
    assert limiter.allow(0.06, "192.0.2.1")  # one packet's worth (50 ms) came back
    limiter.allow(10.0, "198.51.100.1")
    assert len(limiter) == 1  # idle entries were collected


def test_5_3_device_under_load_rate_limits_handshakes_that_carry_a_valid_mac2() -> None:
    net = Net()
    net.b.under_load = True
    net.handshake()  # cookie reply: a now holds a cookie
    peer_a = net.a.peers[net.b.public_key]
    assert peer_a.cookie.has_cookie
    for _ in range(15):
        net.now += 0.021  # past the 1/50 s flood limit (and the ~17 ms timestamp granularity), above 20/s
        peer_a.handshake.last_sent_handshake = None
        net.emit(net.a, net.a.initiate_handshake(net.now, net.b.public_key))
        net.run()
    assert net.b.drops[DropReason.RATE_LIMITED] >= 1
