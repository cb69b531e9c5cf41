"""Whitepaper §5.4.2–§5.4.5 (the handshake), §5.1 (replay of initiations) and §5.2 (pre-shared key mode)."""

from __future__ import annotations

import secrets

import pytest

from tunnelmesh.node.wg.actions import DropReason, EndpointChanged, HandshakeCompleted, SendDatagram
from tunnelmesh.node.wg.constants import (
    CONSTRUCTION,
    IDENTIFIER,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_KEEPALIVE_SIZE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_RESPONSE_TYPE,
    MESSAGE_TRANSPORT_TYPE,
)
from tunnelmesh.node.wg.noise import INITIAL_CHAIN_KEY, INITIAL_HASH, HandshakeState

from .harness import A_ADDR, A_TUNNEL, B_TUNNEL, Net, ipv4_packet, session_state


def test_5_4_construction_and_identifier_strings_are_the_whitepapers() -> None:
    assert CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    # Known values (wireguard-go device/noise-protocol.go computes the same at init).
    assert INITIAL_CHAIN_KEY.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert INITIAL_HASH.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


@pytest.mark.parametrize("psk", [None, secrets.token_bytes(32)], ids=["no-psk", "psk"])
def test_5_4_2_to_5_4_5_handshake_round_trips_between_two_devices(psk: bytes | None) -> None:
    net = Net(psk=psk)
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"first"))
    net.run()
    assert len(net.sent("a>b", MESSAGE_INITIATION_TYPE)[0]) == MESSAGE_INITIATION_SIZE
    assert len(net.sent("b>a", MESSAGE_RESPONSE_TYPE)[0]) == MESSAGE_RESPONSE_SIZE
    # The queued packet goes out once the response is in; b learns a's endpoint from the initiation.
    assert net.delivered(net.b) == [ipv4_packet(A_TUNNEL, B_TUNNEL, b"first")]
    assert EndpointChanged(net.a.public_key, None, A_ADDR) in net.log[id(net.b)]
    assert HandshakeCompleted(net.b.public_key, initiator=True) in net.log[id(net.a)]
    assert HandshakeCompleted(net.a.public_key, initiator=False) in net.log[id(net.b)]
    # Both directions work and both sides now hold exactly one current keypair.
    net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL, b"back"))
    net.run()
    assert net.delivered(net.a) == [ipv4_packet(B_TUNNEL, A_TUNNEL, b"back")]
    for dev in (net.a, net.b):
        (peer,) = dev.peers.values()
        assert peer.keypairs.current is not None and peer.keypairs.next is None
        assert peer.handshake.state is HandshakeState.ZEROED
    assert not net.drops(net.a) and not net.drops(net.b)


def test_5_4_3_responder_confirms_with_a_keepalive_when_nothing_is_queued() -> None:
    net = Net()
    net.handshake()
    keepalives = [d for d in net.sent("a>b", MESSAGE_TRANSPORT_TYPE) if len(d) == MESSAGE_KEEPALIVE_SIZE]
    assert len(keepalives) == 1
    peer = net.b.peers[net.a.public_key]
    assert peer.keypairs.current is not None and peer.keypairs.next is None


def test_5_4_3_responder_keypair_waits_as_next_until_the_first_data_packet() -> None:
    net = Net()
    net.emit(net.a, net.a.initiate_handshake(net.now, net.b.public_key))
    dst, src, data = net.in_flight.pop(0)
    net.emit(dst, dst.receive(net.now, src, data))  # b consumes the initiation and answers
    (response,) = net.hold()
    peer = net.b.peers[net.a.public_key]
    assert peer.keypairs.next is not None and peer.keypairs.current is None
    next_keypair = peer.keypairs.next
    # The response reaches a, whose keepalive is b's key confirmation.
    net.in_flight.append(response)
    net.run()
    assert peer.keypairs.current is next_keypair and peer.keypairs.next is None


def test_5_2_mismatched_preshared_keys_never_complete_a_handshake() -> None:
    net = Net(psk=secrets.token_bytes(32), b_psk=secrets.token_bytes(32))
    net.handshake()
    assert net.b.drops[DropReason.DECRYPT_FAILURE] == 0
    # b accepts the initiation (the psk enters only at the response) but a cannot authenticate the response.
    assert net.a.drops[DropReason.DECRYPT_FAILURE] == 1
    assert net.a.peers[net.b.public_key].keypairs.current is None


def test_5_4_2_initiation_from_an_unknown_static_key_is_dropped() -> None:
    net = Net()
    stranger = Net(seed=99)
    stranger.a.peers.clear()
    stranger.a.add_peer(net.b.public_key, endpoint=("192.0.2.1", 51820))
    before = session_state(net.b)
    initiation = stranger.a.initiate_handshake(stranger.now, net.b.public_key)[0]
    assert isinstance(initiation, SendDatagram)
    actions = net.b.receive(net.now, A_ADDR, initiation.data)
    assert [a.reason for a in actions if hasattr(a, "reason")] == [DropReason.UNKNOWN_PEER]
    assert session_state(net.b) == before


def test_5_1_replayed_initiation_is_rejected_and_changes_nothing() -> None:
    net = Net()
    net.handshake()
    initiation = net.sent("a>b", MESSAGE_INITIATION_TYPE)[0]
    net.now += 1.0  # well past the flood limit: only the timestamp can reject it
    before = session_state(net.b)
    actions = net.inject(net.b, A_ADDR, initiation)
    assert [getattr(a, "reason", None) for a in actions] == [DropReason.REPLAYED_INITIATION]
    assert session_state(net.b) == before


def test_5_1_initiations_faster_than_50_per_second_are_flood_rejected() -> None:
    net = Net()
    net.handshake()
    net.now += 6.0  # past REKEY_TIMEOUT so a may initiate again
    net.emit(net.a, net.a.initiate_handshake(net.now, net.b.public_key))
    net.run()
    net.now += 0.018  # > 16.8 ms: the whitened timestamp is newer, yet within 1/50 s
    net.a.peers[net.b.public_key].handshake.last_sent_handshake = None
    net.emit(net.a, net.a.initiate_handshake(net.now, net.b.public_key))
    before = session_state(net.b)
    net.run()
    assert net.b.drops[DropReason.FLOODED_INITIATION] == 1
    assert session_state(net.b) == before


def test_5_4_3_response_to_a_handshake_we_did_not_start_is_dropped() -> None:
    net = Net()
    net.handshake()
    response = net.sent("b>a", MESSAGE_RESPONSE_TYPE)[0]
    before = session_state(net.a)
    actions = net.inject(net.a, ("192.0.2.2", 51821), response)
    assert [getattr(a, "reason", None) for a in actions] == [DropReason.UNKNOWN_INDEX]
    assert session_state(net.a) == before


def test_5_4_simultaneous_initiations_settle_on_a_working_session() -> None:
    net = Net()
    net.b.peers[net.a.public_key].endpoint = A_ADDR
    net.emit(net.a, net.a.initiate_handshake(net.now, net.b.public_key))
    net.emit(net.b, net.b.initiate_handshake(net.now, net.a.public_key))
    net.run()
    # Both responses hit a handshake that was overwritten; the jittered retries sort it out.
    net.advance(30, step=0.01)
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"x"))
    net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL, b"y"))
    net.run()
    assert ipv4_packet(A_TUNNEL, B_TUNNEL, b"x") in net.delivered(net.b)
    assert ipv4_packet(B_TUNNEL, A_TUNNEL, b"y") in net.delivered(net.a)


def test_5_2_rotating_the_preshared_key_on_both_sides_keeps_handshakes_working() -> None:
    net = Net(psk=secrets.token_bytes(32))
    net.handshake()
    new_psk = secrets.token_bytes(32)
    net.a.update_peer(net.b.public_key, preshared_key=new_psk)
    net.b.update_peer(net.a.public_key, preshared_key=new_psk)
    net.now += 6.0
    net.handshake()
    assert sum(isinstance(a, HandshakeCompleted) for a in net.log[id(net.a)]) == 2
    net.b.update_peer(net.a.public_key, allowed_ips=["10.0.0.0/24"])
    net.send(net.a, ipv4_packet("10.0.0.77", B_TUNNEL))
    net.run()
    assert net.delivered(net.b) == [ipv4_packet("10.0.0.77", B_TUNNEL)]
    assert not net.drops(net.a) and not net.drops(net.b)
