"""The TUN device: open, configure, read and write (super-)packets with their virtio_net_hdr.

Theory: with ``IFF_VNET_HDR`` every read and write carries a 10-byte ``virtio_net_hdr`` in front of the IP
packet (see ``offload.py``). ``TUNSETOFFLOAD`` tells the kernel which offloads we can complete ourselves:

* ``TUN_F_CSUM``  - packets may arrive with a pending TCP/UDP checksum (``NEEDS_CSUM``). Needed by the rest.
* ``TUN_F_TSO4/6`` - TCP super-packets of up to 64 KiB arrive in one read (one syscall per ~45 segments).
* ``TUN_F_USO4/6`` - the same for UDP (Linux 6.2+); detected by trying, since older kernels reject the bits.

Writes take the same header, so the receive path can hand the kernel one coalesced TCP super-packet per batch.
If the kernel refuses ``IFF_VNET_HDR`` the device falls back to plain packets and says why
(``fallback_reason``); the hot path then reads and writes one packet per syscall.

The device file descriptor is non-blocking: the hot path reads until ``read_into`` returns 0 and only then
waits in ``wait_readable`` (one poll per idle period, not per packet), which also keeps shutdown prompt.

Namespaces: a TUN device is created in the network namespace of the *calling thread*, and ``configure`` talks
netlink from the calling thread too. Open and configure from the same thread (tests ``setns`` a helper
thread).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import select
import struct
from collections.abc import Iterable, Sequence

from tunnelmesh.node.errors import DataplaneError
from tunnelmesh.node.offload import (
    VNET_HDR_LEN,
    VNET_HDR_NONE,
    Buffer,
    VirtioNetHdr,
    build_vnet_hdr,
    parse_vnet_hdr,
)

log = logging.getLogger(__name__)

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

_OFFLOAD_NAMES = {
    TUN_F_CSUM: "csum",
    TUN_F_TSO4: "tso4",
    TUN_F_TSO6: "tso6",
    TUN_F_USO4: "uso4",
    TUN_F_USO6: "uso6",
}
IFNAMSIZ = 16
# Largest read: a 64 KiB super-packet plus its header; a smaller buffer would truncate TSO reads.
MAX_READ = VNET_HDR_LEN + 65535 + 256


def _offload_names(bits: int) -> frozenset[str]:
    return frozenset(name for bit, name in _OFFLOAD_NAMES.items() if bits & bit)


class TunDevice:
    """An open TUN device (layer 3, no packet info). Create with ``TunDevice.open``."""

    def __init__(self, fd: int, name: str, vnet_hdr: bool, fallback_reason: str | None = None) -> None:
        self._fd = fd
        self._name = name
        self._vnet_hdr = vnet_hdr
        self._offload_bits = 0
        self._mtu: int | None = None
        self.fallback_reason = fallback_reason
        self._buf = bytearray(MAX_READ)
        self._view = memoryview(self._buf)
        # epoll rather than poll: ``hold_wakeups`` can then mask readability for whoever is waiting.
        self._epoll = select.epoll(1, select.EPOLL_CLOEXEC)
        self._epoll.register(fd, select.EPOLLIN)
        self._held = False
        # Never masked: ``pending`` must see packets while ``hold_wakeups`` hides them from waiters.
        self._probe = select.poll()
        self._probe.register(fd, select.POLLIN)

    # --- lifecycle ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str = "tm%d", *, vnet_hdr: bool = True, offloads: bool = True) -> TunDevice:
        """Create (or attach to) TUN device ``name`` in the calling thread's network namespace.

        ``vnet_hdr=False`` or a kernel that refuses it gives a plain device; ``offloads=False`` keeps the
        header but asks for no offloads (every read is one ordinary packet with complete checksums).
        """
        if len(name.encode()) >= IFNAMSIZ:
            raise DataplaneError(
                f"TUN name {name!r} is longer than {IFNAMSIZ - 1} bytes; choose a shorter name"
            )
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise DataplaneError(
                f"cannot open /dev/net/tun: {exc.strerror}; the node needs CAP_NET_ADMIN and the tun module"
            ) from exc
        reason: str | None = None
        try:
            actual = None
            if vnet_hdr:
                try:
                    actual = _set_iff(fd, name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                except OSError as exc:
                    reason = f"IFF_VNET_HDR refused ({exc.strerror})"
                    if actual is not None:  # the device exists with the header flag: start over plain
                        os.close(fd)
                        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                    actual = None
            else:
                reason = "disabled by configuration"
            if actual is None:
                actual = _set_iff(fd, name, IFF_TUN | IFF_NO_PI)
        except OSError as exc:
            os.close(fd)
            raise DataplaneError(f"cannot create TUN device {name!r}: {exc.strerror}") from exc
        dev = cls(fd, actual, reason is None, reason)
        if reason is not None and vnet_hdr:
            log.warning("event=tun_vnet_hdr_fallback name=%s reason=%r", actual, reason)
        if dev.vnet_hdr:
            # Explicitly, even when none are wanted: a persistent device may still carry an earlier setting.
            dev.set_offloads(csum=offloads, tso=offloads, uso=offloads)
        log.info(
            "event=tun_opened name=%s vnet_hdr=%s offloads=%s",
            actual,
            dev.vnet_hdr,
            ",".join(sorted(dev.offloads)) or "none",
        )
        return dev

    def close(self) -> None:
        if self._fd >= 0:
            self._epoll.close()
            self._probe.unregister(self._fd)
            os.close(self._fd)
            log.info("event=tun_closed name=%s", self._name)
            self._fd = -1

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- introspection --------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def vnet_hdr(self) -> bool:
        """True if reads and writes carry a virtio_net_hdr."""
        return self._vnet_hdr

    @property
    def offloads(self) -> frozenset[str]:
        """Accepted offloads: a subset of {"csum", "tso4", "tso6", "uso4", "uso6"}."""
        return _offload_names(self._offload_bits)

    @property
    def offload_bits(self) -> int:
        return self._offload_bits

    @property
    def mtu(self) -> int | None:
        """The MTU set by ``configure`` (None before)."""
        return self._mtu

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    # --- configuration --------------------------------------------------------------------------------------
    def set_offloads(self, *, csum: bool = True, tso: bool = True, uso: bool = True) -> frozenset[str]:
        """Ask for offloads; USO bits are dropped if the kernel rejects them (Linux < 6.2). Returns what
        stuck."""
        if not self._vnet_hdr:
            raise DataplaneError(f"TUN {self._name}: offloads need IFF_VNET_HDR ({self.fallback_reason})")
        want = 0
        if csum:
            want |= TUN_F_CSUM
            if tso:
                want |= TUN_F_TSO4 | TUN_F_TSO6
            if uso:
                want |= TUN_F_USO4 | TUN_F_USO6
        attempts = [want]
        if want & (TUN_F_USO4 | TUN_F_USO6):
            attempts.append(want & ~(TUN_F_USO4 | TUN_F_USO6))
        if want & ~TUN_F_CSUM:
            attempts.append(TUN_F_CSUM)
        attempts.append(0)
        last: OSError | None = None
        for bits in attempts:
            try:
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, bits)
            except OSError as exc:
                last = exc
                continue
            if bits != want:
                log.info(
                    "event=tun_offload_reduced name=%s wanted=%s got=%s reason=%r",
                    self._name,
                    ",".join(sorted(_offload_names(want))) or "none",
                    ",".join(sorted(_offload_names(bits))) or "none",
                    last.strerror if last else "",
                )
            self._offload_bits = bits
            return self.offloads
        raise DataplaneError(f"TUN {self._name}: TUNSETOFFLOAD failed: {last}")

    def configure(
        self,
        addresses: Iterable[str] = (),
        *,
        mtu: int | None = None,
        up: bool = True,
        txqueuelen: int | None = None,
    ) -> None:
        """Set addresses ("100.64.0.1/10"), MTU and link state, via netlink from the calling thread's network
        namespace. (Routes through the device are the data plane's business: ``DataPlane._routes``.)"""
        from pyroute2 import IPRoute  # imported here: pyroute2 is heavy and only needed to configure
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=self._name)
                if not found:
                    raise DataplaneError(
                        f"TUN {self._name} is not visible in this thread's network namespace"
                    )
                idx = found[0]
                link: dict[str, object] = {}
                if mtu is not None:
                    link["mtu"] = mtu
                if txqueuelen is not None:
                    link["txqlen"] = txqueuelen
                if link:
                    ipr.link("set", index=idx, **link)
                for a in addresses:
                    iface = ipaddress.ip_interface(a)
                    try:
                        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:  # already there: configuring is idempotent
                            raise
                if up:
                    ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise DataplaneError(f"configuring TUN {self._name} failed: {exc}") from exc
        except ValueError as exc:
            raise DataplaneError(f"configuring TUN {self._name}: bad address: {exc}") from exc
        if mtu is not None:
            self._mtu = mtu
        log.info("event=tun_configured name=%s mtu=%s up=%s", self._name, mtu, up)

    # --- packet I/O -----------------------------------------------------------------------------------------
    def wait_readable(self, timeout: float | None) -> bool:
        """Block until a packet can be read or ``timeout`` seconds pass. Returns True if readable.

        While ``hold_wakeups`` is in effect the device does not count as readable here."""
        try:
            return bool(self._epoll.poll(-1 if timeout is None else max(0.0, timeout), 1))
        except InterruptedError:
            return False

    def hold_wakeups(self, held: bool) -> None:
        """Mask (True) or unmask (False) readability for threads in ``wait_readable``.

        For a thread that writes a packet and reads what the kernel answers itself (an echo reply, a TCP
        ACK): with the mask on, the write does not wake a thread waiting to read, which would only find the
        reply gone and cost a context switch plus a GIL handoff on the writer's critical path. Unmasking
        re-checks readiness (EPOLL_CTL_MOD), so a packet left pending wakes the waiter then; nothing is
        lost. Callers serialise: only one thread may hold and release."""
        if held != self._held and self._fd >= 0:
            self._epoll.modify(self._fd, 0 if held else select.EPOLLIN)
            self._held = held

    def pending(self) -> bool:
        """Whether a packet can be read now (even while ``hold_wakeups`` is in effect). Cheaper than a read
        that finds nothing: that one raises, and building the exception costs more than this syscall."""
        return bool(self._probe.poll(0))

    def read_into(self, buf: bytearray | memoryview) -> int:
        """Read one (super-)packet into ``buf`` (virtio_net_hdr first if ``vnet_hdr``). Returns its length, or
        0 if nothing is pending. ``buf`` should hold ``MAX_READ`` bytes; the kernel truncates otherwise."""
        try:
            return os.readv(self._fd, (buf,))
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise DataplaneError(f"TUN {self._name}: read failed: {exc.strerror}") from exc

    def read(self) -> tuple[VirtioNetHdr | None, memoryview] | None:
        """Read one (super-)packet into the device's own buffer: ``(header or None, packet view)``, or None if
        nothing is pending. The view is valid until the next ``read``."""
        n = self.read_into(self._buf)
        if not n:
            return None
        if not self._vnet_hdr:
            return None, self._view[:n]
        if n < VNET_HDR_LEN:
            raise DataplaneError(f"TUN {self._name}: short read of {n} bytes")
        return parse_vnet_hdr(self._view), self._view[VNET_HDR_LEN:n]

    def write(self, packet: Buffer, vnet: VirtioNetHdr | bytes | None = None) -> int:
        """Write one packet (or a GSO super-packet described by ``vnet``). Returns bytes written, excluding
        the header."""
        hdr = (
            VNET_HDR_NONE
            if vnet is None
            else build_vnet_hdr(vnet)
            if isinstance(vnet, VirtioNetHdr)
            else vnet
        )
        if not self._vnet_hdr:
            if hdr != VNET_HDR_NONE:
                raise DataplaneError(
                    f"TUN {self._name} has no virtio_net_hdr: cannot write offloaded packets"
                )
            return self.write_iov((packet,))
        return self.write_iov((hdr, packet)) - VNET_HDR_LEN

    def writev(self, iov: Sequence[Buffer]) -> int:
        """Write one packet given as buffers; with ``vnet_hdr`` the first must be the 10-byte header. This is
        the
        form ``offload.coalesce`` returns. On a device without the header, a leading plain header is
        skipped."""
        if not self._vnet_hdr:
            if iov and len(iov[0]) == VNET_HDR_LEN and bytes(iov[0]) == VNET_HDR_NONE:
                iov = iov[1:]
            elif iov and len(iov[0]) == VNET_HDR_LEN:
                raise DataplaneError(
                    f"TUN {self._name} has no virtio_net_hdr: cannot write offloaded packets"
                )
        return self.write_iov(iov)

    def write_iov(self, iov: Sequence[Buffer]) -> int:
        """Write one packet given as buffers, exactly as given (the virtio_net_hdr first on a device that has
        one). Returns bytes written, or 0 if the queue was full (dropped, like a NIC)."""
        try:
            return os.writev(self._fd, iov)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                return 0  # queue full: drop, like a NIC; TCP retransmits
            raise DataplaneError(f"TUN {self._name}: write failed: {exc.strerror}") from exc


def _set_iff(fd: int, name: str, flags: int) -> str:
    ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)
    res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    return res[:IFNAMSIZ].rstrip(b"\0").decode()
