"""Whitepaper §5.4.6 (transport data messages) and §2 (cryptokey routing on receive)."""

from __future__ import annotations

import struct

import pytest

from tunnelmesh.node.wg.actions import DeliverPacket, DropReason
from tunnelmesh.node.wg.constants import MESSAGE_KEEPALIVE_SIZE, MESSAGE_TRANSPORT_TYPE
from tunnelmesh.node.wg.keypair import Keypair, padding_size
from tunnelmesh.node.wg.replay import WINDOW_SIZE

from .harness import A_ADDR, A_TUNNEL, B_TUNNEL, Net, ipv4_packet, ipv6_packet, session_state


def established() -> Net:
    net = Net()
    net.handshake()
    return net


def data_to_b(net: Net, count: int) -> list[bytes]:
    """``count`` transport messages from a to b, taken off the wire undelivered."""
    for i in range(count):
        net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, i.to_bytes(4, "big")))
    return [data for _, _, data in net.hold()]


def counter_of(message: bytes) -> int:
    value: int = struct.unpack_from("<Q", message, 8)[0]
    return value


def test_5_4_6_counters_are_64_bit_little_endian_nonces_starting_at_0() -> None:
    net = established()
    messages = data_to_b(net, 3)
    # Counter 0 went out as a's key-confirmation keepalive.
    assert [counter_of(m) for m in messages] == [1, 2, 3]
    assert all(m[:4] == struct.pack("<I", MESSAGE_TRANSPORT_TYPE) for m in messages)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100, 1419, 1420])
def test_5_4_6_plaintext_is_padded_to_a_multiple_of_16_but_not_beyond_the_mtu(size: int) -> None:
    keypair = Keypair(
        bytes(32), bytes(32), is_initiator=True, created=0.0, local_index=1, remote_index=2, mtu=1420
    )
    message = keypair.encrypt(b"\x45" * size)
    padded = len(message) - 16 - 16
    assert padded == min(-(-size // 16) * 16, 1420) if size else padded == 0
    assert padded - size == padding_size(size, 1420)


def test_5_4_6_padding_is_stripped_on_delivery_using_the_ip_length() -> None:
    net = established()
    for packet in (ipv4_packet(A_TUNNEL, B_TUNNEL, b"x" * 7), ipv6_packet("fd00::1", "fd00::2", b"y" * 9)):
        net.send(net.a, packet)
        net.run()
        assert net.delivered(net.b)[-1] == packet


def test_5_4_6_keepalive_is_an_empty_transport_message_and_is_not_delivered() -> None:
    net = established()
    net.emit(net.a, net.a.send_keepalive(net.now, net.b.public_key))
    (message,) = [d for _, _, d in net.in_flight]
    assert len(message) == MESSAGE_KEEPALIVE_SIZE
    net.run()
    assert net.delivered(net.b) == []


def test_5_4_6_replayed_transport_message_is_dropped_and_changes_nothing() -> None:
    net = established()
    (message,) = data_to_b(net, 1)
    assert any(isinstance(a, DeliverPacket) for a in net.inject(net.b, A_ADDR, message))
    before = session_state(net.b)
    actions = net.inject(net.b, A_ADDR, message)
    assert [getattr(a, "reason", None) for a in actions] == [DropReason.REPLAY]
    assert session_state(net.b) == before


def test_5_4_6_reordered_messages_within_the_window_are_all_delivered_once() -> None:
    net = established()
    messages = data_to_b(net, 64)
    order = list(reversed(messages[32:])) + messages[:32][::3] + messages[:32]
    delivered = sum(isinstance(a, DeliverPacket) for m in order for a in net.inject(net.b, A_ADDR, m))
    assert delivered == 64
    assert net.b.drops[DropReason.REPLAY] == len(messages[:32][::3])


def test_5_4_6_window_holds_at_least_2048_messages_and_refuses_older_ones() -> None:
    assert WINDOW_SIZE >= 2048
    net = established()
    peer = net.a.peers[net.b.public_key]
    keypair = peer.keypairs.current
    assert keypair is not None
    old = data_to_b(net, 2)
    keypair.send_counter = 2 + WINDOW_SIZE  # jump ahead without sending thousands of packets
    (newest,) = data_to_b(net, 1)
    net.inject(net.b, A_ADDR, newest)
    inside, too_old = old[1], old[0]  # counters 2 (exactly WINDOW_SIZE behind) and 1 (one more)
    assert any(isinstance(a, DeliverPacket) for a in net.inject(net.b, A_ADDR, inside))
    assert [getattr(a, "reason", None) for a in net.inject(net.b, A_ADDR, too_old)] == [DropReason.REPLAY]


@pytest.mark.parametrize("offset", [0, 4, 8, 15, 16, 40, -1])
def test_5_4_6_tampered_transport_message_is_dropped_and_changes_nothing(offset: int) -> None:
    net = established()
    (message,) = data_to_b(net, 1)
    tampered = bytearray(message)
    tampered[offset] ^= 0x01
    before = session_state(net.b)
    actions = net.inject(net.b, A_ADDR, bytes(tampered))
    reason = {0: DropReason.MALFORMED, 4: DropReason.UNKNOWN_INDEX}.get(offset, DropReason.DECRYPT_FAILURE)
    assert [getattr(a, "reason", None) for a in actions] == [reason]
    assert session_state(net.b) == before
    # The genuine message still goes through afterwards.
    assert any(isinstance(a, DeliverPacket) for a in net.inject(net.b, A_ADDR, message))


def test_2_decrypted_packet_from_a_source_outside_the_peers_allowed_ips_is_dropped() -> None:
    net = established()
    net.send(net.a, ipv4_packet("10.9.9.9", B_TUNNEL))
    net.run()
    assert net.delivered(net.b) == []
    assert net.b.drops[DropReason.ALLOWED_IPS] == 1


def test_5_4_6_endpoint_moves_only_after_an_authenticated_packet_from_the_new_address() -> None:
    net = established()
    (message,) = data_to_b(net, 1)
    roamed = ("198.51.100.7", 4242)
    forged = bytearray(message)
    forged[-1] ^= 1
    net.inject(net.b, roamed, bytes(forged))
    assert net.b.peers[net.a.public_key].endpoint == A_ADDR
    actions = net.inject(net.b, roamed, message)
    assert net.b.peers[net.a.public_key].endpoint == roamed
    assert any(type(a).__name__ == "EndpointChanged" and a.new == roamed for a in actions)  # type: ignore[union-attr]
