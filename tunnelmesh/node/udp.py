"""The data plane's UDP socket: big buffers, UDP GSO sends and UDP GRO receives, with plain fallbacks.

Theory: a WireGuard data packet is one UDP datagram, so a naive loop pays one syscall per ~1.4 KB. Linux
offers two ways to batch:

* **GSO send** (``UDP_SEGMENT`` cmsg, Linux 4.18+): one ``sendmsg`` carries up to 64 datagrams to one address;
  all are ``gso_size`` long except a possibly shorter last one. The kernel (or the NIC) cuts them apart. Our
  data packets are naturally equal-sized: TSO segments have equal payloads and WireGuard pads to 16 bytes.
* **GRO receive** (``UDP_GRO`` sockopt, Linux 5.0+): the kernel hands us a train of same-sized datagrams from
  one source in one ``recvmsg`` with a ``UDP_GRO`` cmsg giving the segment size; we split by slicing.

Python has no ``sendmmsg``/``recvmmsg``; GSO/GRO is how we batch. Features are detected when the socket is
created; a GSO send that fails with EIO (egress device without checksum offload) turns GSO off for the socket,
logged once, and resends datagram by datagram. Buffers are raised with ``SO_*BUFFORCE`` (root ignores
``net.core.*mem_max``): default buffers drop bursts and cost wireguard-go two thirds of its throughput here.

Addresses: binding ``"::"`` gives one dual-stack socket for IPv4 and IPv6 peers (``bind``'s default, with a
logged fallback to ``"0.0.0.0"`` on a kernel without IPv6). The kernel reports an IPv4 peer as
``::ffff:a.b.c.d``; ``recv_batch`` hands every source out as a plain ``(host, port)`` (``a.b.c.d`` for IPv4,
``fe80::1%2`` for a link-local IPv6 peer: the scope is the interface index, which a reply needs), so a
configured endpoint and the same peer's packets compare equal; sends to plain IPv4 addresses are mapped.

The socket stays blocking for sends (backpressure instead of drops when the queue is full). Batch receives
use ``MSG_DONTWAIT``, so a receive loop drains everything pending before it sleeps; it sleeps either in
``wait_readable`` or, for the data plane, in ``recv_lone(block=True)``, a receive that waits at most the
``SO_RCVTIMEO`` given to ``set_receive_timeout``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from tunnelmesh.node.errors import DataplaneError
from tunnelmesh.node.offload import Buffer
from tunnelmesh.node.wg.actions import Endpoint

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103  # include/uapi/linux/udp.h; not exported by Python 3.11's socket module
UDP_GRO = 104
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_MARK = getattr(socket, "SO_MARK", 36)  # Python 3.12+ exports it
UDP_MAX_SEGMENTS = 64  # kernel limit per GSO send: 64 on older kernels (newer ones allow 128)
DEFAULT_BUFFER = 4 << 20
MAX_DATAGRAM = 65535
RECV_BUFFER = 65536 + 4096

Address = tuple[str, int] | tuple[str, int, int, int]
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)  # socket(AF_INET6) or bind("::") on an IPv4-only kernel

_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_ICMP_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)  # reported for an earlier send
_INT = struct.Struct("=i")


def gso_runs(sizes: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
    """Split datagrams (by size) into GSO runs ``[i, j)``: equal sizes plus at most one shorter last one, at
    most UDP_MAX_SEGMENTS datagrams and ``limit`` bytes each; the kernel segments a run at its first size."""
    n = len(sizes)
    i = 0
    while i < n:
        size = total = sizes[i]
        j = i + 1
        while j < n and j - i < UDP_MAX_SEGMENTS:
            m = sizes[j]
            if m > size or total + m > limit:
                break
            total += m
            j += 1
            if m < size:
                break
        yield i, j
        i = j


class UdpSocket:
    """A bound UDP socket for the data plane. Create with ``UdpSocket.bind``."""

    def __init__(self, sock: socket.socket, *, gso: bool, gro: bool, recv_slots: int = 8) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.gso = gso
        self.gro = gro
        self.family = sock.family
        self.ipv6 = sock.family == socket.AF_INET6  # reaches IPv6 peers (and IPv4 ones, if bound to "::")
        # Largest UDP payload one GSO send may carry: IPv4 total length and IPv6 payload length are 16-bit.
        self._gso_limit = 65507 if sock.family == socket.AF_INET else 65527
        self._slots = [bytearray(RECV_BUFFER) for _ in range(recv_slots)]
        self._views = [memoryview(b) for b in self._slots]
        self._lone_iov = (self._slots[0],)
        self.lone_view = self._views[0]  # where ``recv_lone`` receives
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self.gso_fallback_reason: str | None = None if gso else "UDP_SEGMENT not supported"
        self.drained = False  # the last recv_batch emptied the socket
        self.fwmark = 0

    @classmethod
    def bind(
        cls,
        host: str | None = None,
        port: int = 0,
        *,
        bufsize: int = DEFAULT_BUFFER,
        gso: bool = True,
        gro: bool = True,
        recv_slots: int = 8,
        fwmark: int = 0,
    ) -> UdpSocket:
        """Bind a UDP socket with large buffers and, when the kernel has them and they are asked for, GSO and
        GRO. ``host`` None: every address of both families (dual-stack ``"::"``), or IPv4 only when the kernel
        has no IPv6; an IP literal binds exactly that (IPv6 if it is one). ``recv_slots`` is how many
        ``recvmsg`` calls one ``recv_batch`` may make (each gets its own 64 KiB buffer). ``fwmark``: the
        ``SO_MARK`` of everything sent (0: none), as ``wg set fwmark``."""
        udp: UdpSocket | None = None
        if host is None:
            try:
                udp = cls._open("::", port, bufsize, gso, gro, recv_slots)
            except OSError as exc:
                if exc.errno not in _NO_IPV6:
                    raise DataplaneError(f"cannot bind UDP socket on [::]:{port}: {exc.strerror}") from exc
                log.warning("event=udp_ipv4_only reason=%r", f"no IPv6 in this kernel: {exc.strerror}")
                host = "0.0.0.0"
        if udp is None:
            try:
                udp = cls._open(host or "0.0.0.0", port, bufsize, gso, gro, recv_slots)
            except OSError as exc:
                raise DataplaneError(f"cannot bind UDP socket on [{host}]:{port}: {exc.strerror}") from exc
        try:
            udp.set_mark(fwmark)
        except BaseException:
            udp.close()
            raise
        return udp

    @classmethod
    def _open(cls, host: str, port: int, bufsize: int, gso: bool, gro: bool, recv_slots: int) -> UdpSocket:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            raise DataplaneError(f"UDP bind address {host!r} is not an IP address literal") from exc
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sndbuf, rcvbuf = _raise_buffers(sock, bufsize)
            if family == socket.AF_INET6 and ip.is_unspecified:
                # "::" serves IPv4 peers too (as ::ffff:a.b.c.d), whatever net.ipv6.bindv6only says.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            has_gso = gso and _try_sockopt(sock, UDP_SEGMENT, 0)
            has_gro = gro and _try_sockopt(sock, UDP_GRO, 1)
        except BaseException:
            sock.close()
            raise
        udp = cls(sock, gso=has_gso, gro=has_gro, recv_slots=recv_slots)
        log.info(
            "event=udp_bound addr=%s gso=%s gro=%s sndbuf=%d rcvbuf=%d",
            udp.local_address,
            has_gso,
            has_gro,
            sndbuf,
            rcvbuf,
        )
        return udp

    def set_mark(self, fwmark: int) -> None:
        """Set the ``SO_MARK`` of everything this socket sends (0: none), so policy routing can tell the
        tunnel's own packets from the traffic it carries (docs/dataplane.md, Full tunnel). Needs root."""
        if fwmark == self.fwmark:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        except OSError as exc:
            raise DataplaneError(f"cannot set fwmark {fwmark:#x} on the UDP socket: {exc.strerror}") from exc
        self.fwmark = fwmark
        log.info("event=udp_fwmark addr=%s fwmark=%#x", self.local_address, fwmark)

    @property
    def local_address(self) -> Address:
        addr: Address = self._sock.getsockname()
        return addr

    @property
    def buffer_sizes(self) -> tuple[int, int]:
        """(sndbuf, rcvbuf) as the kernel reports them (twice what was asked: it counts overhead)."""
        return (
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        )

    def fileno(self) -> int:
        return self._fd

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def close(self) -> None:
        if self._fd >= 0:
            self._poll.unregister(self._fd)
            self._sock.close()
            self._fd = -1

    def __enter__(self) -> UdpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- send -----------------------------------------------------------------------------------------------
    def sockaddr(self, addr: Address) -> Address:
        """The form ``sendto`` takes for ``addr``: an IPv4 destination on an IPv6 socket becomes v4-mapped."""
        if self.ipv6 and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return addr

    def received_form(self, endpoint: Endpoint) -> Address | None:
        """The source address ``recv_lone`` reports for datagrams from ``endpoint`` (what ``recvmsg`` says,
        before ``recv_batch``'s clean-up), or None for a form it cannot predict (a link-local scope)."""
        host, port = endpoint
        if not self.ipv6:
            return (host, port)
        if ":" not in host:
            return ("::ffff:" + host, port, 0, 0)
        if "%" in host:
            return None
        try:
            return (ipaddress.IPv6Address(host).compressed, port, 0, 0)
        except ValueError:
            return None

    def send(self, data: Buffer, addr: Address) -> None:
        addr = self.sockaddr(addr)
        try:
            self._sock.sendto(data, addr)
        except OSError as exc:
            raise DataplaneError(f"UDP send to {addr} failed: {exc.strerror}") from exc

    def send_gso(self, bufs: Sequence[Buffer], gso_size: int, addr: Address) -> None:
        """Send the concatenation of ``bufs`` as datagrams of ``gso_size`` bytes (the last may be shorter) in
        one syscall. ``bufs`` may be whole datagrams or pieces (e.g. header and ciphertext): only the byte
        stream matters. Falls back to one ``sendto`` per datagram when GSO is off."""
        if not self.gso:
            self._send_split(bufs, gso_size, addr)
            return
        addr = self.sockaddr(addr)
        try:
            self._sock.sendmsg(bufs, [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", gso_size))], 0, addr)
        except OSError as exc:
            if exc.errno == errno.EIO:
                self.gso = False
                self.gso_fallback_reason = "EIO on GSO send (egress device lacks checksum offload)"
                log.warning(
                    "event=udp_gso_disabled addr=%s reason=%r", self.local_address, self.gso_fallback_reason
                )
                self._send_split(bufs, gso_size, addr)
                return
            raise DataplaneError(f"UDP GSO send to {addr} failed: {exc.strerror}") from exc

    def send_batch(self, datagrams: Sequence[Buffer], addr: Address) -> int:
        """Send datagrams to one address in as few syscalls as possible: runs of equal-sized datagrams (plus
        one shorter tail) go out as one GSO send each. Returns the number of syscalls made."""
        n = len(datagrams)
        addr = self.sockaddr(addr)
        if not self.gso:
            for d in datagrams:
                self.send(d, addr)
            return n
        calls = 0
        for i, j in gso_runs([len(d) for d in datagrams], self._gso_limit):
            if j - i == 1:
                self.send(datagrams[i], addr)
            else:
                self.send_gso(datagrams[i:j], len(datagrams[i]), addr)
            calls += 1
        return calls

    def _send_split(self, bufs: Sequence[Buffer], gso_size: int, addr: Address) -> None:
        data = memoryview(b"".join(bufs)) if len(bufs) != 1 else memoryview(bufs[0])
        for off in range(0, len(data), gso_size):
            self.send(data[off : off + gso_size], addr)

    # --- receive --------------------------------------------------------------------------------------------
    def wait_readable(self, timeout: float | None) -> bool:
        ms = None if timeout is None else max(0, int(timeout * 1000))
        try:
            return bool(self._poll.poll(ms))
        except InterruptedError:
            return False

    def pending(self) -> bool:
        """Whether a datagram can be received now, without the exception of a receive that finds none."""
        return bool(self._poll.poll(0))

    def set_receive_timeout(self, seconds: float) -> None:
        """How long ``recv_lone(block=True)`` waits at most (``SO_RCVTIMEO``; receives that do not block are
        unaffected)."""
        whole = int(seconds)
        self._sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6))
        )

    def recv_lone(
        self, block: bool = False
    ) -> tuple[int, list[tuple[int, int, bytes]], int, tuple[Any, ...]] | None:
        """One ``recvmsg`` into the first buffer (``lone_view``), for a datagram that likely comes alone: its
        raw result ``(size, ancillary data, flags, source)``, or None if nothing came (or only an ICMP error
        for an earlier send). ``block``: wait for one, at most the receive timeout (``set_receive_timeout``;
        none by default). The source is as the kernel reports it (``received_form``); ``entry`` turns the
        result into a ``recv_batch`` entry.

        The receive path's shortcut after idle: sleeping in the receive itself rather than in ``poll`` first
        saves a syscall and a round of Python on the way to the datagram."""
        try:
            return self._sock.recvmsg_into(
                self._lone_iov, _GRO_CMSG_SPACE, 0 if block else socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _ICMP_ERRORS:
                return None
            raise DataplaneError(f"UDP receive failed: {exc.strerror}") from exc

    def entry(
        self, view: memoryview, n: int, anc: list[tuple[int, int, bytes]], flags: int, addr: tuple[Any, ...]
    ) -> tuple[Endpoint, list[memoryview]] | None:
        """One ``recvmsg`` result as a ``recv_batch`` entry: the plain source and the datagrams of a GRO
        train split apart, or None for a truncated one."""
        if flags & socket.MSG_TRUNC:
            log.warning("event=udp_truncated addr=%s bytes=%d", addr, n)
            return None
        if self.ipv6:  # (host, port, flowinfo, scope_id) -> (host, port); once per recvmsg, not per datagram
            host = addr[0]
            if host[:7] == "::ffff:" and "." in host:  # v4-mapped: an IPv4 peer
                addr = (host[7:], addr[1])
            elif addr[3]:  # link-local: replies must leave through the same interface
                addr = (f"{host}%{addr[3]}", addr[1])
            else:
                addr = (host, addr[1])
        seg = 0
        for level, kind, data in anc:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                seg = _INT.unpack_from(data)[0]  # a native int: the size of each coalesced datagram
        if seg and seg < n:
            whole = view[:n]  # slicing clamps the last, shorter datagram
            return (addr[0], addr[1]), [whole[off : off + seg] for off in range(0, n, seg)]
        return (addr[0], addr[1]), [view[:n]]

    def recv_batch(self) -> list[tuple[Endpoint, list[memoryview]]]:
        """Receive everything pending, up to ``recv_slots`` ``recvmsg`` calls, without blocking.

        Returns ``[(source, [datagram, ...]), ...]``: one entry per ``recvmsg``, whose GRO super-datagram is
        already split into datagrams; ``source`` is a plain ``(host, port)`` (see the module comment). Views
        point into the socket's buffers and are valid until the next ``recv_batch``. An empty list means
        nothing was pending. ``drained`` tells whether the socket was found empty (so a loop can go straight
        to ``wait_readable`` instead of asking again: one syscall less per idle transition).
        """
        out: list[tuple[Endpoint, list[memoryview]]] = []
        sock = self._sock
        self.drained = False
        for buf, view in zip(self._slots, self._views, strict=True):
            try:
                n, anc, flags, addr = sock.recvmsg_into((buf,), _GRO_CMSG_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.drained = True
                break
            except OSError as exc:
                if exc.errno in _ICMP_ERRORS:
                    continue  # an ICMP error for an earlier send; not data
                raise DataplaneError(f"UDP receive failed: {exc.strerror}") from exc
            entry = self.entry(view, n, anc, flags, addr)
            if entry is not None:
                out.append(entry)
        return out


def _raise_buffers(sock: socket.socket, size: int) -> tuple[int, int]:
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            # Not root (no CAP_NET_ADMIN): the kernel caps this at net.core.[rw]mem_max.
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    )


def _try_sockopt(sock: socket.socket, opt: int, value: int) -> bool:
    try:
        sock.setsockopt(SOL_UDP, opt, value)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    return True
