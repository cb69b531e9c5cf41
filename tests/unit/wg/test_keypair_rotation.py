"""Whitepaper §6.3 / §5.4.6: previous/current/next keypairs, and packets in flight across a rekey."""

from __future__ import annotations

from tunnelmesh.node.wg.actions import DeliverPacket, Drop

from .harness import A_TUNNEL, B_TUNNEL, Net, ipv4_packet


def test_6_3_packets_in_flight_under_the_previous_keypair_still_decrypt_after_a_rekey_by_a() -> None:
    net = Net()
    net.handshake()
    old_b = net.b.peers[net.a.public_key].keypairs.current
    for i in range(5):
        net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"old%d" % i))
    in_flight = net.hold()
    net.now += 6.0
    net.handshake()  # a rekeys; b confirms on a's keepalive: b's old current becomes previous
    peer_b = net.b.peers[net.a.public_key]
    assert peer_b.keypairs.previous is old_b and peer_b.keypairs.current is not old_b
    net.in_flight = in_flight
    net.run()
    assert [p[-4:] for p in net.delivered(net.b)] == [b"old%d" % i for i in range(5)]
    assert not net.drops(net.b)


def test_6_3_packets_in_flight_to_the_initiator_still_decrypt_after_it_rotates() -> None:
    net = Net()
    net.handshake()
    for i in range(3):
        net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL, b"b>a%d" % i))
    in_flight = net.hold()
    net.now += 6.0
    net.handshake()
    net.in_flight = in_flight
    net.run()
    assert len(net.delivered(net.a)) == 3 and not net.drops(net.a)


def test_6_3_responder_keeps_sending_on_current_until_the_next_keypair_is_confirmed() -> None:
    net = Net()
    net.handshake()
    peer_b = net.b.peers[net.a.public_key]
    current = peer_b.keypairs.current
    net.now += 6.0
    net.emit(net.a, net.a.initiate_handshake(net.now, net.b.public_key))
    dst, src, data = net.in_flight.pop(0)
    net.emit(dst, dst.receive(net.now, src, data))
    response = net.hold()
    assert peer_b.keypairs.next is not None and peer_b.keypairs.current is current
    # b still sends under the confirmed keypair, which a keeps as its current until the response arrives.
    net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL, b"during"))
    net.run()
    assert net.delivered(net.a) == [ipv4_packet(B_TUNNEL, A_TUNNEL, b"during")]
    net.in_flight = response
    net.run()
    assert peer_b.keypairs.current is not current and peer_b.keypairs.previous is current


def test_6_3_a_third_handshake_retires_the_oldest_keypair_and_frees_its_index() -> None:
    net = Net()
    net.handshake()
    first = net.b.peers[net.a.public_key].keypairs.current
    assert first is not None
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"first"))
    stale = net.hold()
    for _ in range(2):
        net.now += 6.0
        net.handshake()
    assert first.local_index not in net.b.index_table
    net.in_flight = stale
    net.run()
    assert [type(a) for a in net.log[id(net.b)][-1:]] == [Drop]
    assert not any(isinstance(a, DeliverPacket) and a.packet.endswith(b"first") for a in net.log[id(net.b)])
    assert len(net.b.index_table) == 2 and len(net.a.index_table) == 2  # previous + current on each side


def test_messages_lost_in_transit_are_counted_across_rotations() -> None:
    """Gaps in a peer's counters are its lost messages: counted live once they can no longer arrive, and all
    of a keypair's gaps once it is retired; the per-peer count never goes down."""
    net = Net()
    net.handshake()
    keypairs = net.b.peers[net.a.public_key].keypairs
    for i in range(10):
        net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"m%d" % i))
    held = net.hold()
    net.in_flight = [m for i, m in enumerate(held) if i not in (3, 7)]  # two lost on the way
    net.run()
    assert len(net.delivered(net.b)) == 8
    assert keypairs.rx_lost() == 0  # still inside the window: they might come late
    seen = [keypairs.rx_lost()]
    for _ in range(2):  # the first keypair goes previous, then is retired
        net.now += 6.0
        net.handshake()
        seen.append(keypairs.rx_lost())
    assert seen[-1] == 2 and seen == sorted(seen)
    assert net.a.peers[net.b.public_key].keypairs.rx_lost() == 0  # a got all b sent (keepalives)
