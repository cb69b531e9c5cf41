"""RelayHub decisions with a controlled clock: bindings, expiry, transports, rate limits, and fuzzed input.

The hub is driven through its real entry points (``handle_udp`` / ``handle_ws``) with recording stand-ins for
the UDP transport and the WebSocket connection; the real sockets are exercised by
tests/integration/test_relay.py.
"""

from __future__ import annotations

import secrets
import time

import nacl.public
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.coord import relay

A_ADDR = ("198.18.0.10", 40000)
B_ADDR = ("198.18.0.11", 40001)


class FakeUdp:
    """Records what the hub sends on its UDP socket."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class FakeWs:
    transport = "ws"

    def __init__(self, accept: bool = True) -> None:
        self.frames: list[bytes] = []
        self.accept = accept

    def send(self, frame: bytes) -> bool:
        if self.accept:
            self.frames.append(frame)
        return self.accept


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_ns = time.time_ns()

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_ns += int(seconds * 1e9)


def make_hub(nodes: set[bytes], clock: Clock, **kw: float) -> relay.RelayHub:
    return relay.RelayHub(
        relay.generate_key(),
        nodes.__contains__,
        registry=None,
        monotonic=lambda: clock.mono,
        wall_ns=lambda: clock.wall_ns,
        **kw,  # type: ignore[arg-type]
    )


def hello(hub: relay.RelayHub, key: nacl.public.PrivateKey, clock: Clock) -> bytes:
    clock.wall_ns += 1  # strictly newer than the last one
    return relay.encode_hello(key, hub.public_key, secrets.token_bytes(relay.NONCE_LEN), clock.wall_ns)


def setup_pair() -> tuple[relay.RelayHub, Clock, FakeUdp, nacl.public.PrivateKey, nacl.public.PrivateKey]:
    a, b = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    clock = Clock()
    hub = make_hub({bytes(a.public_key), bytes(b.public_key)}, clock)
    udp = FakeUdp()
    hub.handle_udp(hello(hub, a, clock), A_ADDR, udp)  # type: ignore[arg-type]
    hub.handle_udp(hello(hub, b, clock), B_ADDR, udp)  # type: ignore[arg-type]
    assert [addr for _, addr in udp.sent] == [A_ADDR, B_ADDR], "both hellos acknowledged"
    udp.sent.clear()
    return hub, clock, udp, a, b


def test_data_is_forwarded_between_bound_keys_with_the_source_key_and_the_payload_untouched() -> None:
    hub, _, udp, a, b = setup_pair()
    payload = b"\x04" + secrets.token_bytes(200)
    hub.handle_udp(relay.encode_data(bytes(b.public_key), payload), A_ADDR, udp)  # type: ignore[arg-type]
    assert udp.sent == [(relay.encode_data(bytes(a.public_key), payload), B_ADDR)]
    assert hub.counters.packets == {"udp": 1} and hub.counters.bytes == {"udp": len(payload)}


def test_a_binding_expires_60s_after_the_last_hello_or_data() -> None:
    hub, clock, udp, a, b = setup_pair()
    to_b = relay.encode_data(bytes(b.public_key), b"\x04x")
    to_a = relay.encode_data(bytes(a.public_key), b"\x04y")
    clock.advance(50)
    hub.handle_udp(to_b, A_ADDR, udp)  # type: ignore[arg-type]  # data refreshes a's binding
    clock.advance(20)  # a: 20 s since its data; b: 70 s since its hello
    hub.handle_udp(to_a, B_ADDR, udp)  # type: ignore[arg-type]
    hub.handle_udp(to_b, A_ADDR, udp)  # type: ignore[arg-type]
    assert len(udp.sent) == 1, "only the first frame (b still bound) was forwarded"
    assert hub.dropped("unbound_sender") == 1 and hub.dropped("unknown_destination") == 1
    assert set(hub.bindings()) == {bytes(a.public_key)}


def test_unbound_senders_and_unknown_destinations_are_dropped_and_counted() -> None:
    hub, _, udp, a, _ = setup_pair()
    stranger = nacl.public.PrivateKey.generate()
    hub.handle_udp(relay.encode_data(bytes(a.public_key), b"\x04z"), ("198.18.0.99", 1), udp)  # type: ignore[arg-type]
    hub.handle_udp(relay.encode_data(bytes(stranger.public_key), b"\x04z"), A_ADDR, udp)  # type: ignore[arg-type]
    assert udp.sent == []
    assert hub.dropped("unbound_sender") == 1 and hub.dropped("unknown_destination") == 1


def test_traffic_to_a_key_leaves_on_the_binding_it_used_last() -> None:
    hub, clock, udp, a, b = setup_pair()
    ws = FakeWs()
    bound = hub.handle_ws(hello(hub, a, clock), ws, None)
    assert (
        bound == bytes(a.public_key) and ws.frames and relay.frame_type(ws.frames[0]) == relay.RELAY_HELLO_ACK
    )
    ws.frames.clear()
    to_a = relay.encode_data(bytes(a.public_key), b"\x04w")
    clock.advance(1)
    hub.handle_udp(to_a, B_ADDR, udp)  # type: ignore[arg-type]
    assert len(ws.frames) == 1 and udp.sent == [], "a's WebSocket hello came last"
    clock.advance(1)
    hub.handle_udp(relay.encode_data(bytes(b.public_key), b"\x04v"), A_ADDR, udp)  # type: ignore[arg-type]
    udp.sent.clear()
    hub.handle_udp(to_a, B_ADDR, udp)  # type: ignore[arg-type]
    assert [addr for _, addr in udp.sent] == [A_ADDR], "a then sent over UDP: answers follow"
    hub.unbind(bytes(a.public_key), ws)  # the connection closes
    assert hub.binding_counts() == {"udp": 2, "ws": 0}


def test_a_full_websocket_queue_drops_without_counting_a_forward() -> None:
    hub, clock, udp, a, _ = setup_pair()
    ws = FakeWs(accept=False)
    hub.handle_ws(hello(hub, a, clock), ws, None)
    hub.handle_udp(relay.encode_data(bytes(a.public_key), b"\x04q"), B_ADDR, udp)  # type: ignore[arg-type]
    assert hub.counters.packets.get("ws", 0) == 0


def test_a_nat_reusing_an_address_for_another_key_ends_the_old_binding() -> None:
    hub, clock, udp, a, b = setup_pair()
    hub.handle_udp(hello(hub, b, clock), A_ADDR, udp)  # type: ignore[arg-type]  # b now appears at a's old address
    assert hub.bindings() == {bytes(b.public_key): "udp"}
    udp.sent.clear()
    hub.handle_udp(relay.encode_data(bytes(a.public_key), b"\x04r"), A_ADDR, udp)  # type: ignore[arg-type]
    assert udp.sent == [] and hub.dropped("unknown_destination") == 1


def test_reflection_is_rate_limited_per_source_ip() -> None:
    clock = Clock()
    hub = make_hub(set(), clock, rate=10.0, burst=20.0)
    udp = FakeUdp()
    req = relay.encode_reflect_request(bytes(relay.TXID_LEN))
    for _ in range(25):
        hub.handle_udp(req, A_ADDR, udp)  # type: ignore[arg-type]
    hub.handle_udp(req, B_ADDR, udp)  # type: ignore[arg-type]  # another source is unaffected
    assert len(udp.sent) == 21 and hub.dropped("rate_limited") == 5
    clock.advance(1.0)
    for _ in range(15):
        hub.handle_udp(req, A_ADDR, udp)  # type: ignore[arg-type]
    assert len(udp.sent) == 31, "10 tokens came back in a second"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([*range(0x20, 0x30), None]))
def test_arbitrary_bytes_never_raise_and_get_no_answer_unless_a_valid_reflect(
    data: bytes, t: int | None
) -> None:
    clock = Clock()
    key = nacl.public.PrivateKey.generate()
    hub = make_hub({bytes(key.public_key)}, clock)
    frame = data if t is None else bytes((t, 0, 0, 0)) + data
    udp = FakeUdp()
    hub.handle_udp(frame, A_ADDR, udp)  # type: ignore[arg-type]
    ws = FakeWs()
    assert hub.handle_ws(frame, ws, None) is None
    valid_reflect = len(frame) == relay.REFLECT_REQUEST_LEN and frame[:4] == b"\x20\0\0\0"
    assert len(udp.sent) == (1 if valid_reflect else 0)
    assert ws.frames == []
    assert hub.bindings() == {}
