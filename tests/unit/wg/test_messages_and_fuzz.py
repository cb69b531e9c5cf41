"""Whitepaper §5.4 message formats; arbitrary bytes never raise anything but ProtocolError and never change
session state (§5.1: "silence is a virtue" — bad input gets no answer and leaves no trace)."""

from __future__ import annotations

import contextlib
import functools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnelmesh.errors import ProtocolError
from tunnelmesh.node.wg.actions import Drop, SendDatagram
from tunnelmesh.node.wg.constants import (
    LABEL_MAC1,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_SIZE,
)
from tunnelmesh.node.wg.crypto import HASH, MAC, TAI64N
from tunnelmesh.node.wg.messages import (
    MessageCookieReply,
    MessageInitiation,
    MessageResponse,
    MessageTransport,
    parse,
)

from .harness import A_TUNNEL, B_TUNNEL, Net, ipv4_packet, session_state

u32 = st.integers(0, 2**32 - 1)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
# Examples that reach Diffie-Hellman cost ~1 ms each on each device.
FUZZ_DH = settings(FUZZ, max_examples=80)


def blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


messages = st.one_of(
    st.builds(MessageInitiation, u32, blob(32), blob(48), blob(28), blob(16), blob(16)),
    st.builds(MessageResponse, u32, u32, blob(32), blob(16), blob(16), blob(16)),
    st.builds(MessageCookieReply, u32, blob(24), blob(32)),
    st.builds(MessageTransport, u32, st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=200)),
)


@given(messages)
def test_5_4_every_message_round_trips_through_bytes(msg: object) -> None:
    data = msg.to_bytes()  # type: ignore[attr-defined]
    assert parse(data) == msg


def test_5_4_message_sizes_are_the_whitepapers() -> None:
    assert (
        len(MessageInitiation(1, bytes(32), bytes(48), bytes(28)).to_bytes())
        == MESSAGE_INITIATION_SIZE
        == 148
    )
    assert len(MessageResponse(1, 2, bytes(32), bytes(16)).to_bytes()) == MESSAGE_RESPONSE_SIZE == 92
    assert len(MessageCookieReply(1, bytes(24), bytes(32)).to_bytes()) == MESSAGE_COOKIE_REPLY_SIZE == 64


@given(st.binary(max_size=300))
def test_5_4_parse_of_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse(data)


def test_5_4_reserved_bytes_must_be_zero() -> None:
    data = bytearray(MessageCookieReply(1, bytes(24), bytes(32)).to_bytes())
    data[1] = 1
    try:
        parse(bytes(data))
    except ProtocolError as e:
        assert "unknown WireGuard message type" in str(e)
    else:
        raise AssertionError("non-zero reserved bytes must not parse")


def test_5_4_tai64n_is_big_endian_seconds_since_1970_plus_2_62_plus_10_and_whitened_nanoseconds() -> None:
    stamp = TAI64N(1_700_000_000.5)
    seconds, nanos = struct.unpack(">QI", stamp)
    assert seconds == 0x400000000000000A + 1_700_000_000
    assert nanos == 500_000_000 & ~0xFFFFFF
    assert TAI64N(1.0) < TAI64N(1.02) < TAI64N(2.0)


@functools.cache
def _established() -> tuple[Net, list[bytes]]:
    """A live session and the datagrams that built it (shared: the tests prove it never changes)."""
    net = Net()
    net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL))
    net.run()
    net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL))
    net.run()
    return net, [d for _, d in net.wire]


def _assert_inert(data: bytes, *, under_load: bool = False) -> None:
    net, _ = _established()
    for dev in (net.a, net.b):
        before = session_state(dev)
        dev.under_load = under_load
        try:
            actions = dev.receive(net.now + 1.0, ("203.0.113.9", 9), data)
        finally:
            dev.under_load = False
        assert all(isinstance(a, Drop) or (under_load and isinstance(a, SendDatagram)) for a in actions), (
            actions
        )
        assert sum(isinstance(a, Drop) for a in actions) == 1
        assert session_state(dev) == before


@FUZZ
@given(st.binary(max_size=300))
def test_5_1_arbitrary_datagrams_are_dropped_without_changing_session_state(data: bytes) -> None:
    _assert_inert(data)


@FUZZ
@given(st.sampled_from([1, 2, 3, 4]), st.integers(0, 2**32 - 1), st.binary(max_size=200), st.booleans())
def test_5_1_well_typed_garbage_is_dropped_without_changing_session_state(
    kind: int, receiver: int, body: bytes, under_load: bool
) -> None:
    net, _ = _established()
    # Use a live receiver index half of the time so the garbage reaches the keypairs and handshakes.
    live = net.b.index_table.indexes() + net.a.index_table.indexes()
    index = live[receiver % len(live)] if receiver % 2 else receiver
    size = {1: MESSAGE_INITIATION_SIZE, 2: MESSAGE_RESPONSE_SIZE, 3: MESSAGE_COOKIE_REPLY_SIZE}.get(kind)
    head = struct.pack("<II", kind, index)
    data = (head + body)[:size] if size else head + body
    if size:
        data = data.ljust(size, b"\0")
    _assert_inert(data, under_load=under_load)


@FUZZ_DH
@given(st.data())
def test_5_1_bit_flipped_genuine_datagrams_are_dropped_without_changing_session_state(
    data: st.DataObject,
) -> None:
    _net, wire = _established()
    original = data.draw(st.sampled_from(wire))
    flips = data.draw(st.lists(st.integers(0, len(original) * 8 - 1), min_size=1, max_size=3, unique=True))
    mutated = bytearray(original)
    for bit in flips:
        mutated[bit // 8] ^= 1 << (bit % 8)
    _assert_inert(bytes(mutated), under_load=data.draw(st.booleans()))


@FUZZ_DH
@given(st.binary(min_size=MESSAGE_INITIATION_SIZE - 32, max_size=MESSAGE_INITIATION_SIZE - 32))
def test_5_4_4_initiation_with_valid_mac1_but_garbage_inside_changes_nothing(body: bytes) -> None:
    net, _ = _established()
    body = struct.pack("<I", 1) + body[4:]
    data = body + MAC(HASH(LABEL_MAC1, net.b.public_key), body) + bytes(MAC_SIZE)
    _assert_inert(data)
