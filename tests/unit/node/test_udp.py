"""The UDP socket wrapper over loopback: GSO sends and GRO receives carry exactly the datagrams sent.

Loopback keeps a GSO send as one super-datagram all the way to a receiver with ``UDP_GRO`` on, so these tests
see the real cmsg paths; with the features off they see the plain ones. No root needed.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Iterator

import pytest

from tunnelmesh.node.errors import DataplaneError
from tunnelmesh.node.udp import SO_MARK, UdpSocket
from tunnelmesh.node.wg.actions import Endpoint


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


def test_the_default_socket_is_dual_stack_and_reports_plain_sources() -> None:
    """Sources come back as plain ``(host, port)``: an IPv4 peer as ``a.b.c.d`` (not ``::ffff:a.b.c.d``), so
    it equals the endpoint configured for it; an IPv6 one without flowinfo and scope id."""
    with UdpSocket.bind() as dual, UdpSocket.bind("127.0.0.1", 0) as v4, UdpSocket.bind("::1", 0) as v6:
        assert dual.ipv6 and dual.local_address[0] == "::"
        port = dual.local_address[1]
        v4_addr, v6_addr = ("127.0.0.1", v4.local_address[1]), ("::1", v6.local_address[1])
        dual.send_batch([b"a" * 500] * 3, v4_addr)  # a plain IPv4 destination is mapped
        dual.send_batch([b"b" * 500] * 3, v6_addr)
        assert receive(v4, 3)[0] == [b"a" * 500] * 3
        assert receive(v6, 3)[0] == [b"b" * 500] * 3
        v4.send(b"four", ("127.0.0.1", port))
        assert [(src, bytes(d)) for src, ds in _wait_batch(dual) for d in ds] == [(v4_addr, b"four")]
        v6.send(b"six", ("::1", port))
        assert [(src, bytes(d)) for src, ds in _wait_batch(dual) for d in ds] == [(v6_addr, b"six")]
        # A GRO train from the IPv4 peer: one normalised source for all of it.
        v4.send_batch([b"c" * 1000] * 20, ("127.0.0.1", port))
        got = [(src, bytes(d)) for src, ds in _wait_batch_of(dual, 20) for d in ds]
        assert got == [(v4_addr, b"c" * 1000)] * 20


def test_without_ipv6_the_default_socket_falls_back_to_ipv4(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel booted with ipv6.disable=1 refuses AF_INET6 sockets (EAFNOSUPPORT): the default bind logs
    it and serves IPv4 alone. An explicit "::" is not second-guessed."""
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with caplog.at_level(logging.WARNING), UdpSocket.bind() as s:
        assert not s.ipv6 and s.local_address[0] == "0.0.0.0"
    assert "event=udp_ipv4_only" in caplog.text
    with pytest.raises(DataplaneError, match=r"\[::\]:0: Address family not supported"):
        UdpSocket.bind("::")


def _wait_batch(sock: UdpSocket) -> list[tuple[Endpoint, list[memoryview]]]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        batch = sock.recv_batch()
        if batch:
            return batch
        sock.wait_readable(0.1)
    raise AssertionError("nothing received")


def _wait_batch_of(sock: UdpSocket, count: int) -> list[tuple[Endpoint, list[memoryview]]]:
    out: list[tuple[Endpoint, list[memoryview]]] = []
    deadline = time.monotonic() + 5
    while sum(len(ds) for _s, ds in out) < count and time.monotonic() < deadline:
        batch = sock.recv_batch()
        # Views are valid until the next recv_batch: keep copies.
        out += [(src, [memoryview(bytes(d)) for d in ds]) for src, ds in batch]
        if not batch:
            sock.wait_readable(0.1)
    return out


def test_recv_lone_takes_one_and_a_full_batch_says_drained(
    pair: tuple[UdpSocket, UdpSocket],
) -> None:
    """``recv_lone`` takes one receive and leaves the rest queued; ``entry`` makes it what ``recv_batch``
    would have returned. A batch that hits EAGAIN says ``drained``, so the data plane can wait instead of
    asking again; ``pending`` answers the same question without a receive."""
    tx, rx = pair
    assert not rx.pending() and rx.recv_lone() is None
    sizes = (100, 200, 300)  # different sizes: GRO cannot merge them, one recvmsg each
    for n in sizes:
        tx.send(bytes([n % 251]) * n, rx.local_address)
    deadline = time.monotonic() + 5
    while not rx.wait_readable(0.1) and time.monotonic() < deadline:
        pass
    time.sleep(0.05)  # loopback delivers synchronously; this only absorbs scheduling on a loaded host
    got = rx.recv_lone()
    assert got is not None
    n, anc, flags, addr = got
    source = (tx.local_address[0], tx.local_address[1])
    assert (n, anc, flags) == (100, [], 0) and addr == rx.received_form(source)
    assert bytes(rx.lone_view[:n]) == bytes([100]) * 100
    entry = rx.entry(rx.lone_view, n, anc, flags, addr)
    assert entry is not None and entry[0] == source and [bytes(d) for d in entry[1]] == [bytes([100]) * 100]
    assert rx.pending()
    rest = rx.recv_batch()
    assert [len(d) for _a, ds in rest for d in ds] == [200, 300]
    assert rx.drained and not rx.pending()
    assert rx.recv_batch() == [] and rx.drained


def test_received_form_is_what_a_dual_stack_socket_reports() -> None:
    """The data plane's lone-packet path compares raw sources with ``received_form(endpoint)``: it must be
    exactly what the kernel reports for an IPv4 and an IPv6 peer (else every datagram takes the batch
    path)."""
    with UdpSocket.bind() as dual, UdpSocket.bind("127.0.0.1", 0) as v4, UdpSocket.bind("::1", 0) as v6:
        port = dual.local_address[1]
        for peer, dst in ((v4, ("127.0.0.1", port)), (v6, ("::1", port))):
            peer.send(b"x", dst)
            assert dual.wait_readable(5)
            got = dual.recv_lone()
            assert got is not None
            endpoint = (peer.local_address[0], peer.local_address[1])
            assert got[3] == dual.received_form(endpoint)
        assert dual.received_form(("fe80::1%2", 51820)) is None  # the scope id's form is not predictable


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")
def test_fwmark_marks_the_socket_and_0_clears_it(host: str) -> None:
    """wg(8) fwmark: everything the socket sends carries the mark (policy routing keys on it); 0 is none."""
    with UdpSocket.bind(host, 0, fwmark=0xCA6C) as sock:
        assert sock.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0xCA6C == sock.fwmark
        sock.set_mark(0)
        assert sock.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0 == sock.fwmark
    with UdpSocket.bind(host, 0) as sock:
        assert sock.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
