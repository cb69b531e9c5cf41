"""Whitepaper §6 (timers and stateless UX): rekey, reject, retransmission, keepalives, zeroing keys."""

from __future__ import annotations

import itertools
import random

import pytest

from tunnelmesh.node.wg.actions import DropReason, HandshakeGaveUp, KeysZeroed
from tunnelmesh.node.wg.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_KEEPALIVE_SIZE,
    MESSAGE_TRANSPORT_TYPE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)
from tunnelmesh.node.wg.crypto import DH_PUBKEY, clamp_private_key
from tunnelmesh.node.wg.device import Device
from tunnelmesh.node.wg.timers import TimerAction, Timers

from .harness import A_TUNNEL, B_TUNNEL, Net, ipv4_packet


def established(**kwargs: float) -> Net:
    net = Net(**kwargs)  # type: ignore[arg-type]
    net.handshake()
    return net


def keepalives(net: Net, direction: str) -> list[bytes]:
    return [d for d in net.sent(direction, MESSAGE_TRANSPORT_TYPE) if len(d) == MESSAGE_KEEPALIVE_SIZE]


def test_6_1_constants_are_the_whitepapers() -> None:
    assert REKEY_AFTER_MESSAGES == 2**60
    assert REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    assert (REKEY_AFTER_TIME, REJECT_AFTER_TIME, REKEY_ATTEMPT_TIME) == (120, 180, 90)
    assert (REKEY_TIMEOUT, KEEPALIVE_TIMEOUT) == (5, 10)
    assert MAX_TIMER_HANDSHAKES == 18


def test_6_2_initiator_rekeys_when_sending_after_rekey_after_time() -> None:
    net = established()
    net.now += REKEY_AFTER_TIME - 1
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)) == 1
    net.now += 2
    old = net.a.peers[net.b.public_key].keypairs.current
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    net.run()
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)) == 2
    assert net.a.peers[net.b.public_key].keypairs.current is not old
    assert len(net.delivered(net.b)) == 2  # the packet went out on the old session while rekeying


def test_6_2_responder_does_not_rekey_on_time_when_sending() -> None:
    net = established()
    net.now += REKEY_AFTER_TIME + 1
    net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL))
    assert net.sent("b>a", MESSAGE_INITIATION_TYPE) == []


def test_6_2_initiator_rehandshakes_when_receiving_on_a_session_near_reject_after_time() -> None:
    net = established()
    net.now += REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT + 1
    net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL))
    net.run()
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)) == 2


def test_6_2_rekey_after_messages() -> None:
    net = established()
    keypair = net.a.peers[net.b.public_key].keypairs.current
    assert keypair is not None
    keypair.send_counter = REKEY_AFTER_MESSAGES + 1
    net.now += REKEY_TIMEOUT  # at most one initiation per REKEY_TIMEOUT
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)) == 2


def test_6_2_no_message_is_sent_under_a_keypair_past_reject_after_messages() -> None:
    net = established()
    keypair = net.a.peers[net.b.public_key].keypairs.current
    assert keypair is not None
    keypair.send_counter = REJECT_AFTER_MESSAGES
    net.lose = lambda direction, data: True
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    assert len(net.sent("a>b", MESSAGE_TRANSPORT_TYPE)) == 1  # only the handshake keepalive, long ago
    assert list(net.a.peers[net.b.public_key].staged) == [ipv4_packet(A_TUNNEL, B_TUNNEL)]


def test_6_2_after_reject_after_time_nothing_is_sent_or_accepted_under_the_old_keypair() -> None:
    net = established()
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"late"))
    (late,) = net.hold()
    net.now += REJECT_AFTER_TIME + 1
    net.lose = lambda direction, data: True
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"queued"))
    # Queued behind a new handshake instead of being sent on the dead keypair.
    assert [d[0] for _, d in net.wire[-1:]] == [MESSAGE_INITIATION_TYPE]
    assert list(net.a.peers[net.b.public_key].staged) == [ipv4_packet(A_TUNNEL, B_TUNNEL, b"queued")]
    actions = net.inject(net.b, late[1], late[2])
    assert [getattr(a, "reason", None) for a in actions] == [DropReason.KEY_EXPIRED]


def test_6_4_lost_initiations_are_retransmitted_every_rekey_timeout_with_jitter_then_given_up() -> None:
    net = Net()
    net.lose = lambda direction, data: True
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    # 1 + 19 tries REKEY_TIMEOUT (+ jitter) apart, then one more REKEY_TIMEOUT to give up (wireguard-go).
    net.advance(REKEY_ATTEMPT_TIME + 4 * REKEY_TIMEOUT, step=0.05)
    times = [
        t for t, (dr, d) in zip(net.wire_times, net.wire, strict=True) if d[0] == MESSAGE_INITIATION_TYPE
    ]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(REKEY_TIMEOUT - 0.06 <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 0.06 for g in gaps), (
        gaps
    )
    assert len(times) == MAX_TIMER_HANDSHAKES + 2  # the first try plus 19 retries
    assert HandshakeGaveUp(net.b.public_key) in net.log[id(net.a)]
    assert net.a.drops[DropReason.HANDSHAKE_GAVE_UP] == 1
    assert not net.a.peers[net.b.public_key].staged


def test_6_5_passive_keepalive_after_receiving_data_with_nothing_to_send() -> None:
    net = established()
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    net.run()
    net.advance(KEEPALIVE_TIMEOUT - 1)
    assert keepalives(net, "b>a") == []
    net.advance(1.5)
    assert len(keepalives(net, "b>a")) == 1
    net.advance(60)
    assert len(keepalives(net, "b>a")) == 1  # one per data received, not a steady beat


def test_6_5_no_passive_keepalive_when_data_went_back_in_time() -> None:
    net = established()
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    net.run()
    net.advance(3)
    net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL))
    net.advance(KEEPALIVE_TIMEOUT + 1)
    assert keepalives(net, "b>a") == []


def test_6_5_sending_data_that_gets_no_answer_starts_a_new_handshake() -> None:
    net = established()
    net.lose = lambda direction, data: direction == "b>a"
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    net.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.5)
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)) == 1
    net.advance(1.0)
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)) == 2


@pytest.mark.parametrize("interval", [25.0, 5.0])
def test_wg8_persistent_keepalive_is_sent_every_interval_without_traffic(interval: float) -> None:
    net = established(a_keepalive=interval)
    net.advance(0.5)  # the keepalive sent as soon as one is configured
    start = len(keepalives(net, "a>b"))
    net.advance(interval * 4 + 0.5, step=0.25)
    assert len(keepalives(net, "a>b")) - start == 4
    assert net.delivered(net.b) == []


def test_wg8_configuring_a_persistent_keepalive_starts_a_session_without_any_traffic() -> None:
    net = Net(a_keepalive=25.0)
    net.advance(0.5)
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)) == 1
    assert net.b.peers[net.a.public_key].keypairs.current is not None  # confirmed by the staged keepalive
    assert net.delivered(net.b) == []


def test_6_zero_key_material_after_three_times_reject_after_time() -> None:
    net = established()
    net.advance(REJECT_AFTER_TIME * 3 + 1, step=5)
    assert KeysZeroed(net.b.public_key) in net.log[id(net.a)]
    assert net.a.peers[net.b.public_key].keypairs.current is None
    assert len(net.a.index_table) == 0 and len(net.b.index_table) == 0


def test_6_timers_poll_reports_and_disarms_due_timers() -> None:
    timers = Timers(random.Random(0), persistent_keepalive_interval=0)
    timers.on_handshake_initiated(0.0)
    timers.on_data_received(0.0)
    assert timers.poll(4.99) == []
    assert timers.poll(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX) == [TimerAction.RETRY_HANDSHAKE_INITIATION]
    assert timers.poll(KEEPALIVE_TIMEOUT) == [TimerAction.SEND_KEEPALIVE]
    assert timers.poll(1e9) == []
    assert timers.next_deadline() is None


class _Recording(random.Random):
    """Counts draws of floats (timer jitter: ``uniform``) and of bits (keys, indexes: ``randbytes``)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.floats = self.bits = 0

    def random(self) -> float:
        self.floats += 1
        return super().random()

    def getrandbits(self, k: int) -> int:
        self.bits += 1
        return super().getrandbits(k)


def test_6_timer_jitter_comes_from_jitter_rng_and_keys_from_rng() -> None:
    """Jitter needs no secrecy (the shell passes a plain PRNG and saves a getrandom per send); ephemeral keys,
    indexes and cookie secrets still come from ``rng`` only."""
    keys, jitter = _Recording(1), _Recording(2)
    a = Device(clamp_private_key(bytes(range(32))), rng=keys, timestamp=lambda: bytes(12), jitter_rng=jitter)
    peer = a.add_peer(DH_PUBKEY(clamp_private_key(bytes(range(1, 33)))), endpoint=("192.0.2.2", 51820))
    assert peer.timers.rng is jitter
    a.initiate_handshake(0.0, peer.public_key)
    assert jitter.floats >= 1 and jitter.bits == 0  # the retransmission's jitter
    assert keys.bits >= 1 and keys.floats == 0  # the ephemeral key and the local index
