"""The UDP socket wrapper over loopback: GSO sends and GRO receives carry exactly the datagrams sent.

Loopback keeps a GSO send as one super-datagram all the way to a receiver with ``UDP_GRO`` on, so these tests
see the real cmsg paths; with the features off they see the plain ones. No root needed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tunnelmesh.node.errors import DataplaneError
from tunnelmesh.node.udp import Address, UdpSocket


def receive(sock: UdpSocket, count: int, timeout: float = 5.0) -> tuple[list[bytes], int]:
    """Datagrams until ``count`` arrived: (datagrams, recvmsg entries that carried more than one)."""
    got: list[bytes] = []
    trains = 0
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        batch = sock.recv_batch()
        if not batch:
            sock.wait_readable(0.1)
        for _addr, dgrams in batch:
            trains += len(dgrams) > 1
            got += [bytes(d) for d in dgrams]
    return got, trains


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pair(host: str) -> Iterator[tuple[UdpSocket, UdpSocket]]:
    with UdpSocket.bind(host, 0) as tx, UdpSocket.bind(host, 0) as rx:
        yield tx, rx


def test_gso_send_and_gro_receive_carry_the_same_datagrams(pair: tuple[UdpSocket, UdpSocket]) -> None:
    tx, rx = pair
    assert tx.gso and rx.gro, "this kernel has UDP GSO/GRO (Linux 5.0+)"
    # One GSO run (40 equal sizes plus a shorter tail), then growing sizes that must go one by one.
    dgrams = (
        [bytes([i]) * 1200 for i in range(40)] + [b"t" * 300] + [bytes([i]) * (100 + i) for i in range(5)]
    )
    calls = tx.send_batch(dgrams, rx.local_address)
    assert calls == 1 + 5
    got, trains = receive(rx, len(dgrams))
    assert got == dgrams
    assert trains >= 1, "GRO should have handed over at least one train of datagrams"


def test_send_batch_splits_at_64_segments_and_the_size_limit(pair: tuple[UdpSocket, UdpSocket]) -> None:
    tx, rx = pair
    small = [i.to_bytes(2, "big") * 50 for i in range(150)]
    assert tx.send_batch(small, rx.local_address) == 3  # 64 + 64 + 22
    big = [bytes([i]) * 1400 for i in range(60)]  # 84 KB: over one send's 64 KiB
    assert tx.send_batch(big, rx.local_address) == 2
    got, _ = receive(rx, len(small) + len(big))
    assert got == small + big


def test_plain_fallback_sends_one_by_one(host: str) -> None:
    with UdpSocket.bind(host, 0, gso=False, gro=False) as tx, UdpSocket.bind(host, 0, gro=False) as rx:
        assert not tx.gso and tx.gso_fallback_reason
        dgrams = [bytes([i]) * 1000 for i in range(10)]
        assert tx.send_batch(dgrams, rx.local_address) == 10
        tx.send_gso(dgrams[:3], 1000, rx.local_address)  # split in userspace
        got, trains = receive(rx, 13)
        assert got == dgrams + dgrams[:3]
        assert trains == 0


def test_buffers_are_raised_and_bad_addresses_are_our_error() -> None:
    with UdpSocket.bind("127.0.0.1", 0, bufsize=1 << 20) as s:
        snd, rcv = s.buffer_sizes
        assert snd >= 1 << 20 or rcv >= 212992  # capped by rmem_max when not root
    with pytest.raises(DataplaneError, match="not an IP address"):
        UdpSocket.bind("localhost", 0)
    with UdpSocket.bind("127.0.0.1", 0) as a, pytest.raises(DataplaneError):
        UdpSocket.bind("127.0.0.1", a.local_address[1])


def test_a_dual_stack_socket_talks_to_ipv4_peers() -> None:
    with UdpSocket.bind("::", 0) as dual, UdpSocket.bind("127.0.0.1", 0) as v4:
        dual.send_batch([b"a" * 500] * 3, ("127.0.0.1", v4.local_address[1]))
        got, _ = receive(v4, 3)
        assert got == [b"a" * 500] * 3
        v4.send(b"back", ("127.0.0.1", dual.local_address[1]))
        (src, (dgram,)), *_ = _wait_batch(dual)
        assert bytes(dgram) == b"back" and src[0] == "::ffff:127.0.0.1"


def _wait_batch(sock: UdpSocket) -> list[tuple[Address, list[memoryview]]]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        batch = sock.recv_batch()
        if batch:
            return batch
        sock.wait_readable(0.1)
    raise AssertionError("nothing received")


def test_recv_batch_max_calls_and_drained(pair: tuple[UdpSocket, UdpSocket]) -> None:
    """``max_calls=1`` takes one receive and leaves the rest queued (not drained); a full batch that hits
    EAGAIN says ``drained``, so the data plane can wait instead of asking again."""
    tx, rx = pair
    sizes = (100, 200, 300)  # different sizes: GRO cannot merge them, one recvmsg each
    for n in sizes:
        tx.send(bytes([n % 251]) * n, rx.local_address)
    deadline = time.monotonic() + 5
    while not rx.wait_readable(0.1) and time.monotonic() < deadline:
        pass
    time.sleep(0.05)  # loopback delivers synchronously; this only absorbs scheduling on a loaded host
    first = rx.recv_batch(max_calls=1)
    assert [len(d) for _a, ds in first for d in ds] == [100]
    assert not rx.drained
    rest = rx.recv_batch()
    assert [len(d) for _a, ds in rest for d in ds] == [200, 300]
    assert rx.drained
    assert rx.recv_batch() == [] and rx.drained
