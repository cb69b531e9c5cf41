"""The data plane's packet I/O, for real: two namespaces, a TUN device in each, joined by UDP over veth.

A plain forwarder (no crypto) in the test process moves packets both ways - TUN read -> segment -> UDP GSO
send -> UDP GRO receive -> coalesce -> TUN write - and real kernel TCP, ping and a byte-exact bulk transfer
check the result. The offload run must actually use super-packets, GSO sends and coalesced writes (counters),
and the receiving kernel must count no TCP checksum errors: that is the proof it accepts our coalesced writes.
The same transfer runs on the plain path (no virtio_net_hdr, no GSO/GRO), in the negotiated skip-checksum
mode, and with TUN TSO off (the kernel segments; we still batch sends and coalesce writes).

Needs root. Namespaces are named ``tmio<hex>...`` and removed in the fixture's ``finally``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from tunnelmesh.node import tun as tun_mod
from tunnelmesh.node.errors import DataplaneError, OffloadError
from tunnelmesh.node.offload import (
    VNET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    Buffer,
    coalesce,
    parse_vnet_hdr,
    segment,
)
from tunnelmesh.node.tun import MAX_READ, TunDevice
from tunnelmesh.node.udp import Address, UdpSocket

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces and TUN devices"),
    pytest.mark.timeout(90),
]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

VETH_A, VETH_B = "192.168.77.1", "192.168.77.2"
TUN_A, TUN_B = "10.77.0.1", "10.77.0.2"
TUN6_A, TUN6_B = "fd77::1", "fd77::2"
PORT = 51820
TUN_MTU = 1420
TX_READS = 16  # TUN reads per transmit batch
TX_BATCH = 64  # datagrams per transmit batch (UDP GSO carries up to 64 per send)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has joined network namespace ``ns`` (Python 3.11 has no os.setns).

    TUN devices, sockets and netlink sessions created there belong to ``ns``; their file descriptors keep
    working from any thread afterwards."""
    box: dict[str, object] = {}

    def target() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({ns}): {os.strerror(err)}")
        finally:
            os.close(fd)
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def sh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout)


@dataclass
class Stats:
    super_reads: int = 0  # GSO super-packets read from a TUN
    uso_reads: int = 0  # ... of which UDP (USO)
    tun_reads: int = 0
    segments: int = 0  # IP packets sent over UDP
    gso_sends: int = 0  # sendmsg calls that carried more than one datagram
    udp_sends: int = 0  # all send syscalls
    datagrams: int = 0  # datagrams received (after GRO split)
    gro_receives: int = 0  # recvmsg calls that returned more than one datagram
    coalesced_writes: int = 0  # TUN writes carrying a merged super-packet
    tun_writes: int = 0
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, tuple[float, float]] = field(default_factory=dict)  # (user, system) s per thread


@dataclass
class Side:
    ns: str
    tun: TunDevice
    udp: UdpSocket
    peer: Address


class Forwarder:
    """Moves packets TUN <-> UDP for the given sides: a transmit and a receive thread per side."""

    def __init__(self, *sides: Side, offload: bool, skip_csum: bool = False) -> None:
        """``offload``: coalesce on receive (needs virtio_net_hdr); ``skip_csum``: the negotiated mode."""
        self.stats = Stats()
        self.offload = offload
        self.skip_csum = skip_csum
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._guard, args=(loop, s), name=f"{kind}-{s.ns}", daemon=True)
            for s in sides
            for kind, loop in (("tx", self._tx), ("rx", self._rx))
        ]

    def __enter__(self) -> Forwarder:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _guard(self, loop: Callable[[Side], None], side: Side) -> None:
        name = threading.current_thread().name
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        try:
            loop(side)
        except Exception as exc:  # recorded and asserted on by the test
            self.stats.errors.append(f"{name}: {exc!r}")
        finally:
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
            self.stats.cpu_s[name] = (round(user, 2), round(system, 2))

    def _tx(self, side: Side) -> None:
        """Drain the TUN (up to TX_READS reads into a pool of buffers), then send the batch: equal-sized runs
        go out as one GSO send each. Super-packets are batched by the kernel already; plain reads by us."""
        st, tun, udp, peer, stop = self.stats, side.tun, side.udp, side.peer, self._stop
        payload_csum = not self.skip_csum
        pool = [bytearray(MAX_READ) for _ in range(TX_READS)]
        views = [memoryview(b) for b in pool]
        vnet = tun.vnet_hdr
        while not stop.is_set():
            batch: list[Buffer] = []
            for buf, view in zip(pool, views, strict=True):
                n = tun.read_into(buf)
                if not n:
                    break
                st.tun_reads += 1
                if not vnet:
                    batch.append(view[:n])
                    continue
                if view[1]:  # gso_type: a super-packet
                    st.super_reads += 1
                    st.uso_reads += view[1] == VNET_HDR_GSO_UDP_L4
                try:
                    batch += segment(parse_vnet_hdr(view), view[VNET_HDR_LEN:n], payload_csum=payload_csum)
                except OffloadError as exc:
                    st.errors.append(f"segment: {exc}")
                if len(batch) >= TX_BATCH:
                    break
            if not batch:
                tun.wait_readable(0.05)
                continue
            st.segments += len(batch)
            calls = udp.send_batch(batch, peer)
            st.udp_sends += calls
            if calls < len(batch):
                st.gso_sends += 1

    def _rx(self, side: Side) -> None:
        st, tun, udp, stop = self.stats, side.tun, side.udp, self._stop
        merge = self.offload and tun.vnet_hdr
        partial = self.skip_csum
        while not stop.is_set():
            batch = udp.recv_batch()
            if not batch:
                udp.wait_readable(0.05)
                continue
            pkts: list[memoryview] = []
            for _addr, dgrams in batch:
                if len(dgrams) > 1:
                    st.gro_receives += 1
                pkts.extend(dgrams)
            st.datagrams += len(pkts)
            if merge:
                for iov in coalesce(pkts, partial_csum_peer=partial):
                    if len(iov) > 2:
                        st.coalesced_writes += 1
                    tun.writev(iov)
                    st.tun_writes += 1
            else:
                for p in pkts:
                    tun.write(p)
                    st.tun_writes += 1


@dataclass
class Topology:
    a: Side
    b: Side


@contextlib.contextmanager
def netns_pair() -> Iterator[tuple[str, str]]:
    """Two fresh namespaces ``tmio<hex>a``/``b`` joined by a veth pair; removed on exit whatever happens."""
    tag = uuid.uuid4().hex[:8]
    ns_a, ns_b = f"tmio{tag}a", f"tmio{tag}b"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        va, vb = f"tmva{tag[:6]}", f"tmvb{tag[:6]}"
        sh("ip", "link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb, "netns", ns_b)
        sh("ip", "-n", ns_a, "addr", "add", f"{VETH_A}/24", "dev", va)
        sh("ip", "-n", ns_b, "addr", "add", f"{VETH_B}/24", "dev", vb)
        sh("ip", "-n", ns_a, "link", "set", va, "up")
        sh("ip", "-n", ns_b, "link", "set", vb, "up")
        yield ns_a, ns_b
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    with netns_pair() as pair:
        yield pair


def make_topology(ns_a: str, ns_b: str, *, offload: bool, tso: bool = True) -> Topology:
    """A TUN and a UDP socket in each namespace. ``offload=False``: plain TUN, no GSO/GRO. ``tso=False``:
    TUN keeps its virtio_net_hdr (coalesced writes work); the kernel segments and checksums what we read."""
    tag = ns_a[4:12]

    def side(ns: str, tun_ip: str, tun6: str, veth_ip: str, peer_ip: str, name: str) -> Side:
        tun = TunDevice.open(name, vnet_hdr=offload, offloads=offload)
        try:
            tun.configure([f"{tun_ip}/24", f"{tun6}/64"], mtu=TUN_MTU, txqueuelen=1000)
            if offload and not tso:
                tun.set_offloads(csum=False)
            udp = UdpSocket.bind(veth_ip, PORT, gso=offload, gro=offload)
        except BaseException:
            tun.close()
            raise
        return Side(ns, tun, udp, (peer_ip, PORT))

    a = in_netns(ns_a, lambda: side(ns_a, TUN_A, TUN6_A, VETH_A, VETH_B, f"tmta{tag[:6]}"))
    try:
        b = in_netns(ns_b, lambda: side(ns_b, TUN_B, TUN6_B, VETH_B, VETH_A, f"tmtb{tag[:6]}"))
    except BaseException:
        a.tun.close()
        a.udp.close()
        raise
    return Topology(a, b)


def close_topology(topo: Topology) -> None:
    for s in (topo.a, topo.b):
        s.udp.close()
        s.tun.close()


# Server: accept one connection, hash everything until EOF, print "<bytes> <sha256>".
SERVER = textwrap.dedent(
    """
    import hashlib, socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    h = hashlib.sha256(); n = 0; buf = bytearray(1 << 20)
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        h.update(memoryview(buf)[:k]); n += k
    print(n, h.hexdigest(), flush=True)
    """
)
# Client: send `size` bytes of seeded pseudo-random data, print "<bytes> <sha256>".
CLIENT = textwrap.dedent(
    """
    import hashlib, random, socket, sys
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    block = random.Random(7).randbytes(1 << 20)
    h = hashlib.sha256(); sent = 0
    c = socket.create_connection((host, port), timeout=30)
    while sent < size:
        chunk = memoryview(block)[: min(len(block), size - sent)]
        c.sendall(chunk); h.update(chunk); sent += len(chunk)
        block = block[7:] + block[:7]  # vary the data so a misplaced segment cannot hash the same
    c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
    print(sent, h.hexdigest(), flush=True)
    """
)


def tcp_transfer(ns_a: str, ns_b: str, dst: str, size: int, port: int = 5201) -> tuple[str, str, float]:
    """Send ``size`` bytes from ns A to ``dst`` in ns B over TCP: (client line, server line, seconds)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, sys.executable, "-c", SERVER, dst, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        client = subprocess.run(
            ["ip", "netns", "exec", ns_a, sys.executable, "-c", CLIENT, dst, str(port), str(size)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - t0
        assert client.returncode == 0, client.stderr
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        return client.stdout.strip(), out.strip(), elapsed
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# UDP GSO sender: 32 datagrams of 1000 bytes in one sendmsg, so a TUN with USO hands us one super-packet.
USO_SENDER = textwrap.dedent(
    """
    import socket, struct, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = b"".join(bytes([i]) * 1000 for i in range(32))
    s.sendmsg([data], [(17, 103, struct.pack("=H", 1000))], 0, (sys.argv[1], 9999))
    """
)


def udp_gso_roundtrip(ns_a: str, ns_b: str, dst: str) -> list[bytes]:
    """Send one UDP GSO train from ns A to ``dst`` in ns B; return the datagrams ns B's socket received."""

    def receiver() -> list[bytes]:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
            rx.bind((dst, 9999))
            rx.settimeout(5)
            sh("ip", "netns", "exec", ns_a, sys.executable, "-c", USO_SENDER, dst)
            got: list[bytes] = []
            while len(got) < 32:
                got.append(rx.recv(4096))
            return got

    return in_netns(ns_b, receiver)


def tcp_csum_errors(ns: str) -> int:
    snmp = sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").stdout.splitlines()
    tcp = [line.split() for line in snmp if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("InCsumErrors")])


def ping(ns: str, dst: str) -> None:
    sh("ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "3", dst)


def expected_digest(size: int) -> str:
    import random

    block = random.Random(7).randbytes(1 << 20)
    h = hashlib.sha256()
    sent = 0
    while sent < size:
        chunk = block[: min(len(block), size - sent)]
        h.update(chunk)
        sent += len(chunk)
        block = block[7:] + block[:7]
    return h.hexdigest()


SIZE = 50 * 1000 * 1000
SIZE6 = 10 * 1000 * 1000


# mode: (virtio_net_hdr + GSO/GRO + coalescing, TUN TSO reads, skip payload checksums)
MODES = {
    "offload": (True, True, False),
    "offload-skip-csum": (True, True, True),
    "kernel-seg": (True, False, False),
    "plain": (False, False, False),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_forwarder_carries_tcp_and_ping(namespaces: tuple[str, str], mode: str) -> None:
    ns_a, ns_b = namespaces
    offload, tso, skip_csum = MODES[mode]
    topo = make_topology(ns_a, ns_b, offload=offload, tso=tso)
    try:
        if offload:
            assert topo.a.tun.vnet_hdr, topo.a.tun.fallback_reason
            assert topo.a.udp.gso and topo.a.udp.gro
            assert topo.a.tun.offloads >= {"csum", "tso4", "tso6"} if tso else not topo.a.tun.offloads
        else:
            assert not topo.a.tun.vnet_hdr and not topo.a.udp.gso and not topo.a.udp.gro
        with Forwarder(topo.a, topo.b, offload=offload, skip_csum=skip_csum) as fwd:
            ping(ns_a, TUN_B)
            ping(ns_a, TUN6_B)
            client, server, secs = tcp_transfer(ns_a, ns_b, TUN_B, SIZE)
            assert client == server == f"{SIZE} {expected_digest(SIZE)}"
            client6, server6, secs6 = tcp_transfer(ns_a, ns_b, TUN6_B, SIZE6, port=5202)
            assert client6 == server6 == f"{SIZE6} {expected_digest(SIZE6)}"
            assert udp_gso_roundtrip(ns_a, ns_b, TUN_B) == [bytes([i]) * 1000 for i in range(32)]
        st = fwd.stats
        mbps, mbps6 = SIZE * 8 / secs / 1e6, SIZE6 * 8 / secs6 / 1e6
        print(f"\n{mode}: IPv4 {mbps:.0f} Mbit/s, IPv6 {mbps6:.0f} Mbit/s; {st}")
        assert not st.errors
        assert tcp_csum_errors(ns_b) == 0 and tcp_csum_errors(ns_a) == 0
        if offload:
            if tso:
                assert st.super_reads > 0, "TUN never handed us a TSO super-packet"
                if "uso4" in topo.a.tun.offloads:
                    assert st.uso_reads > 0, "TUN never handed us a USO super-packet"
            else:
                assert st.super_reads == 0
            assert st.gso_sends > 0, "no UDP GSO send carried more than one datagram"
            assert st.gro_receives > 0, "no UDP GRO receive carried more than one datagram"
            assert st.coalesced_writes > 0, "no coalesced super-packet was written to a TUN"
            assert st.tun_writes < st.datagrams, "coalescing must reduce the number of TUN writes"
        else:
            assert st.super_reads == st.gso_sends == st.gro_receives == st.coalesced_writes == 0
    finally:
        close_topology(topo)


def test_tun_introspection_and_errors(namespaces: tuple[str, str]) -> None:
    ns_a, _ = namespaces

    def check() -> None:
        with TunDevice.open("tmtx%d") as tun:
            assert tun.name.startswith("tmtx")
            assert tun.vnet_hdr and "tso4" in tun.offloads
            assert tun.read() is None  # non-blocking; a link that is down has nothing pending
            assert not tun.wait_readable(0.01)
            tun.configure(["10.78.0.1/24"], mtu=1300)
            assert tun.mtu == 1300
            assert tun.set_offloads(csum=True, tso=False, uso=False) == frozenset({"csum"})
            with pytest.raises(DataplaneError):
                tun.configure(["not-an-address"])
        with TunDevice.open("tmty%d", vnet_hdr=False) as plain:
            assert not plain.vnet_hdr and plain.offloads == frozenset()
            assert plain.fallback_reason == "disabled by configuration"
            with pytest.raises(DataplaneError):
                plain.set_offloads()
        with pytest.raises(DataplaneError, match="longer than"):
            TunDevice.open("x" * 20)

    in_netns(ns_a, check)


def test_hold_wakeups_masks_a_waiting_reader_until_released(namespaces: tuple[str, str]) -> None:
    """The data plane's rx thread masks the TUN device while it writes and reads the kernel's answer itself:
    a thread waiting in ``wait_readable`` must not wake for a packet that arrives meanwhile, and must wake
    (nothing lost) as soon as the mask is released. ``pending`` (how that thread asks whether the kernel
    answered) sees the packet through the mask."""
    ns_a, _ = namespaces

    def setup() -> tuple[TunDevice, socket.socket]:
        tun = TunDevice.open("tmth%d")
        # No IPv6 on this device: router solicitations and MLD reports would be readable noise.
        sh("ip", "netns", "exec", ns_a, "sysctl", "-q", "-w", f"net.ipv6.conf.{tun.name}.disable_ipv6=1")
        tun.configure(["10.79.0.1/24"], mtu=1400)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return tun, sock

    tun, sock = in_netns(ns_a, setup)
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: tun.wait_readable(10) and woke.set(), daemon=True)
    try:
        while tun.read() is not None:  # anything the link sent while coming up
            pass
        assert not tun.wait_readable(0)
        assert not tun.pending()
        tun.hold_wakeups(True)
        waiter.start()
        sock.sendto(b"masked", ("10.79.0.2", 9))  # routed into the TUN device: now pending there
        assert not tun.wait_readable(0.05), "readability must be masked while held"
        assert tun.pending(), "pending must see through the mask"
        assert not woke.wait(0.3), "the waiting thread woke while the mask was held"
        tun.hold_wakeups(False)
        assert woke.wait(5), "releasing the mask must wake the waiting thread"
        assert tun.wait_readable(0)
        got = tun.read()
        assert got is not None and got[1].tobytes().endswith(b"masked")
        assert not tun.pending()
    finally:
        tun.hold_wakeups(False)
        if waiter.is_alive():
            waiter.join(5)
        sock.close()
        tun.close()


def test_kernel_refusals_degrade_cleanly_with_a_logged_reason(
    namespaces: tuple[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An older kernel rejects USO bits (Linux < 6.2) or the virtio_net_hdr itself: the device keeps working
    with less, and says why."""
    ns_a, _ = namespaces
    real_ioctl = fcntl.ioctl

    def no_uso(fd: int, request: int, arg: object = 0) -> object:
        if request == tun_mod.TUNSETOFFLOAD and isinstance(arg, int) and arg & tun_mod.TUN_F_USO4:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_ioctl(fd, request, arg)  # type: ignore[call-overload]

    def no_vnet(fd: int, request: int, arg: object = 0) -> object:
        if request == tun_mod.TUNSETVNETHDRSZ:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_ioctl(fd, request, arg)  # type: ignore[call-overload]

    caplog.set_level(logging.INFO, logger="tunnelmesh.node.tun")
    monkeypatch.setattr(fcntl, "ioctl", no_uso)
    with in_netns(ns_a, lambda: TunDevice.open("tmtu%d")) as tun:
        assert tun.vnet_hdr and tun.offloads == frozenset({"csum", "tso4", "tso6"})
    assert "event=tun_offload_reduced" in caplog.text
    monkeypatch.setattr(fcntl, "ioctl", no_vnet)
    with in_netns(ns_a, lambda: TunDevice.open("tmtv%d")) as tun:
        assert not tun.vnet_hdr and tun.offloads == frozenset()
        assert tun.fallback_reason is not None and "IFF_VNET_HDR refused" in tun.fallback_reason
    assert "event=tun_vnet_hdr_fallback" in caplog.text
