"""The oracle: our sans-I/O WireGuard core against a stock ``wireguard-go`` over a real UDP socket.

Each test builds a throwaway network namespace holding ``wireguard-go`` (tunnel address 10.77.0.1) and a UDP
socket of ours bound to 127.0.0.1 inside that namespace; our core plays the peer 10.77.0.2. ICMP echo
packets are built by hand, sent through our session, answered by the kernel behind ``wireguard-go`` and
decrypted by us (or the other way round, when ``ping`` inside the namespace makes ``wireguard-go`` initiate).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import random
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunnelmesh.node.wg.actions import (
    Action,
    DeliverPacket,
    Drop,
    DropReason,
    HandshakeCompleted,
    SendDatagram,
)
from tunnelmesh.node.wg.constants import LABEL_MAC1, MAC_SIZE, MESSAGE_INITIATION_SIZE
from tunnelmesh.node.wg.crypto import DH_PUBKEY, HASH, MAC, TAI64N, clamp_private_key
from tunnelmesh.node.wg.device import Device

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates network namespaces and runs wireguard-go"
    ),
]

CLONE_NEWNET = 0x40000000
WG_ADDRESS = "10.77.0.1"
OUR_ADDRESS = "10.77.0.2"
WG_ADDRESS6 = "fd77::1"
OUR_ADDRESS6 = "fd77::2"
STEP_DEADLINE = 10.0  # seconds for any one exchange; every socket read has a much shorter timeout


def run(*args: str, netns: str | None = None, timeout: float = 10.0) -> str:
    cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def wg_pubkey(private_key: str) -> str:
    result = subprocess.run(["wg", "pubkey"], input=private_key, capture_output=True, text=True, timeout=10)
    result.check_returncode()
    return result.stdout.strip()


# -- hand-built ICMP -----------------------------------------------------------------------------------------


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(src: str, dst: str, ident: int, seq: int, payload: bytes, *, reply: bool = False) -> bytes:
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        secrets.randbelow(0xFFFF),
        0x4000,  # don't fragment
        64,
        1,  # ICMP
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + icmp


@dataclass(frozen=True, slots=True)
class Echo:
    src: str
    dst: str
    reply: bool
    ident: int
    seq: int
    payload: bytes


def parse_icmp_echo(packet: bytes) -> Echo | None:
    """The echo request/reply in ``packet``, or None; asserts checksums are right when it is one."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[9] != 1:
        return None
    total = struct.unpack("!H", packet[2:4])[0]
    assert total == len(packet), "padding must have been removed"
    assert inet_checksum(packet[:20]) == 0, "IPv4 header checksum"
    icmp = packet[20:]
    if icmp[0] not in (0, 8):
        return None
    assert inet_checksum(icmp) == 0, "ICMP checksum"
    ident, seq = struct.unpack("!HH", icmp[4:8])
    return Echo(
        socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), icmp[0] == 0, ident, seq, icmp[8:]
    )


def icmp6_echo(src: str, dst: str, ident: int, seq: int, payload: bytes, *, reply: bool = False) -> bytes:
    source, destination = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    icmp = struct.pack("!BBHHH", 129 if reply else 128, 0, 0, ident, seq) + payload
    pseudo = source + destination + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(pseudo + icmp)) + icmp[4:]
    return struct.pack("!IHBB", 6 << 28, len(icmp), 58, 64) + source + destination + icmp


def parse_icmp6_echo(packet: bytes) -> Echo | None:
    if len(packet) < 48 or packet[0] >> 4 != 6 or packet[6] != 58:
        return None
    assert struct.unpack("!H", packet[4:6])[0] + 40 == len(packet), "padding must have been removed"
    icmp = packet[40:]
    if icmp[0] not in (128, 129):
        return None
    pseudo = packet[8:40] + struct.pack("!I3xB", len(icmp), 58)
    assert inet_checksum(pseudo + icmp) == 0, "ICMPv6 checksum"
    ident, seq = struct.unpack("!HH", icmp[4:8])
    src = socket.inet_ntop(socket.AF_INET6, packet[8:24])
    dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
    return Echo(src, dst, icmp[0] == 129, ident, seq, icmp[8:])


# -- the namespace, wireguard-go and our socket --------------------------------------------------------------


def socket_in_netns(netns: str) -> socket.socket:
    """A UDP socket on 127.0.0.1 inside ``netns``; setns() runs in a helper thread so ours stays put."""
    result: dict[str, object] = {}

    def enter_and_bind() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            result["sock"] = sock
        except BaseException as e:
            result["error"] = e
        finally:
            os.close(fd)

    thread = threading.Thread(target=enter_and_bind, name=f"setns-{netns}")
    thread.start()
    thread.join(timeout=5)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    sock = result["sock"]
    assert isinstance(sock, socket.socket)
    return sock


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@dataclass
class WireguardGo:
    netns: str
    ifname: str
    public_key: bytes
    port: int
    workdir: Path

    def set(self, *args: str) -> None:
        run("wg", "set", self.ifname, *args, netns=self.netns)

    def show(self, what: str) -> str:
        return run("wg", "show", self.ifname, what, netns=self.netns)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"tmwg{secrets.token_hex(4)}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "link", "set", "lo", "up", netns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def wireguard_go(netns: str, tmp_path: Path) -> Iterator[WireguardGo]:
    ifname = f"tmwg{secrets.token_hex(4)}"
    log = (tmp_path / "wireguard-go.log").open("w")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "wireguard-go", "-f", ifname],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "debug"},
    )
    try:
        control = Path(f"/var/run/wireguard/{ifname}.sock")
        deadline = time.monotonic() + 5
        while not control.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"wireguard-go did not start: {(tmp_path / 'wireguard-go.log').read_text()}"
                )
            time.sleep(0.02)
        private_key = run("wg", "genkey").strip()
        public_key = base64.b64decode(wg_pubkey(private_key))
        # Cross-check our X25519 against wg's own idea of the public key.
        assert DH_PUBKEY(base64.b64decode(private_key)) == public_key
        (tmp_path / "wg.key").write_text(private_key + "\n")
        port = 20000 + secrets.randbelow(20000)
        run(
            "wg",
            "set",
            ifname,
            "listen-port",
            str(port),
            "private-key",
            str(tmp_path / "wg.key"),
            netns=netns,
        )
        run("ip", "addr", "add", f"{WG_ADDRESS}/24", "dev", ifname, netns=netns)
        run("ip", "-6", "addr", "add", f"{WG_ADDRESS6}/64", "dev", ifname, "nodad", netns=netns)
        run("ip", "link", "set", ifname, "up", netns=netns)
        yield WireguardGo(netns, ifname, public_key, port, tmp_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        with contextlib.suppress(FileNotFoundError):
            Path(f"/var/run/wireguard/{ifname}.sock").unlink()


# -- driving our core ----------------------------------------------------------------------------------------


@dataclass
class OurNode:
    device: Device
    sock: socket.socket
    wg_endpoint: tuple[str, int]
    log: list[Action]

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            self.log.append(action)
            if isinstance(action, SendDatagram):
                self.sock.sendto(action.data, action.endpoint)

    def pump_until(
        self, done: Callable[[list[Action]], bool], deadline: float = STEP_DEADLINE
    ) -> list[Action]:
        """Feed datagrams and ticks to the core until ``done(actions so far)``; fail at the deadline."""
        seen: list[Action] = []
        end = time.monotonic() + deadline
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                summary = [type(a).__name__ + (f"({a.reason})" if isinstance(a, Drop) else "") for a in seen]
                raise AssertionError(f"deadline of {deadline}s passed; actions seen: {summary}")
            self.sock.settimeout(min(0.05, remaining))
            actions: list[Action] = []
            try:
                data, src = self.sock.recvfrom(65535)
                actions += self.device.receive(time.monotonic(), src, data)
            except TimeoutError:
                pass
            actions += self.device.tick(time.monotonic())
            self.carry_out(actions)
            seen += actions
            if done(seen):
                return seen


def delivered_echoes(actions: list[Action]) -> list[Echo]:
    echoes = []
    for action in actions:
        if isinstance(action, DeliverPacket):
            echo = parse_icmp_echo(action.packet) or parse_icmp6_echo(action.packet)
            if echo is not None:
                echoes.append(echo)
    return echoes


def make_node(wg: WireguardGo, psk: bytes | None) -> OurNode:
    private_key = clamp_private_key(secrets.token_bytes(32))
    device = Device(
        private_key,
        rng=random.SystemRandom(),
        timestamp=lambda: TAI64N(time.time()),
    )
    sock = socket_in_netns(wg.netns)
    wg_endpoint = ("127.0.0.1", wg.port)
    device.add_peer(
        wg.public_key,
        preshared_key=psk,
        endpoint=wg_endpoint,
        allowed_ips=[f"{WG_ADDRESS}/32", f"{WG_ADDRESS6}/128"],
    )
    our_port = sock.getsockname()[1]
    args = [
        "peer",
        b64(device.public_key),
        "allowed-ips",
        f"{OUR_ADDRESS}/32,{OUR_ADDRESS6}/128",
        "endpoint",
        f"127.0.0.1:{our_port}",
    ]
    if psk is not None:
        (wg.workdir / "psk").write_text(b64(psk) + "\n")
        args += ["preshared-key", str(wg.workdir / "psk")]
    wg.set(*args)
    return OurNode(device, sock, wg_endpoint, [])


def ping_through(node: OurNode, seq: int, *, ipv6: bool = False) -> Echo:
    """Send an ICMP echo request to wireguard-go's address through our session; return the decrypted reply."""
    payload = secrets.token_bytes(37)  # odd length: exercises padding to 16 on both sides
    ident = secrets.randbelow(0xFFFF)
    ours, theirs = (OUR_ADDRESS6, WG_ADDRESS6) if ipv6 else (OUR_ADDRESS, WG_ADDRESS)
    request = (icmp6_echo if ipv6 else icmp_echo)(ours, theirs, ident, seq, payload)
    peer = node.device.route(request)
    assert peer is not None
    node.carry_out(node.device.send(time.monotonic(), peer, request))

    def got_reply(actions: list[Action]) -> bool:
        return any(e.reply and e.ident == ident and e.seq == seq for e in delivered_echoes(actions))

    actions = node.pump_until(got_reply)
    reply = next(e for e in delivered_echoes(actions) if e.reply and e.ident == ident)
    assert reply == Echo(theirs, ours, True, ident, seq, payload)
    return reply


PSK_CASES = [pytest.param(None, id="no-psk"), pytest.param(secrets.token_bytes(32), id="psk")]


@pytest.mark.parametrize("psk", PSK_CASES)
def test_we_initiate_and_ping_through_wireguard_go(wireguard_go: WireguardGo, psk: bytes | None) -> None:
    """§5.4.2–§5.4.6: our initiation, their response, our keepalive/data, their data back."""
    node = make_node(wireguard_go, psk)
    try:
        ping_through(node, seq=1)
        assert any(isinstance(a, HandshakeCompleted) and a.initiator for a in node.log)
        # More data on the same session, then wireguard-go's own view of the session.
        for seq in range(2, 5):
            ping_through(node, seq=seq)
        ping_through(node, seq=5, ipv6=True)
        handshakes = wireguard_go.show("latest-handshakes").split()
        assert handshakes[0] == b64(node.device.public_key) and int(handshakes[1]) > 0
        # §6.3 rekey: a second handshake; wireguard-go rotates to it on our first packet, we keep going.
        peer = node.device.peers[wireguard_go.public_key]
        old = peer.keypairs.current
        peer.handshake.last_sent_handshake = None  # skip the REKEY_TIMEOUT rate limit for the test
        time.sleep(
            0.05
        )  # TAI64N is whitened to ~17 ms: an earlier initiation would be a replay to wireguard-go
        node.carry_out(node.device.initiate_handshake(time.monotonic(), wireguard_go.public_key))
        node.pump_until(lambda seen: sum(isinstance(a, HandshakeCompleted) for a in node.log) == 2)
        assert peer.keypairs.previous is old and peer.keypairs.current is not old
        ping_through(node, seq=6)
        assert not any(isinstance(a, Drop) for a in node.log), [a for a in node.log if isinstance(a, Drop)]
    finally:
        node.sock.close()


@pytest.mark.parametrize("psk", PSK_CASES)
def test_wireguard_go_initiates_and_pings_us(wireguard_go: WireguardGo, psk: bytes | None) -> None:
    """§5.4.2–§5.4.3 as responder: wireguard-go initiates (a ping to our address), we answer its echo."""
    node = make_node(wireguard_go, psk)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", wireguard_go.netns, "ping", "-c", "1", "-W", "8", OUR_ADDRESS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        actions = node.pump_until(lambda seen: any(not e.reply for e in delivered_echoes(seen)))
        assert any(isinstance(a, HandshakeCompleted) and not a.initiator for a in actions)
        request = next(e for e in delivered_echoes(actions) if not e.reply)
        assert (request.src, request.dst) == (WG_ADDRESS, OUR_ADDRESS)
        reply = icmp_echo(OUR_ADDRESS, WG_ADDRESS, request.ident, request.seq, request.payload, reply=True)
        node.carry_out(node.device.send(time.monotonic(), wireguard_go.public_key, reply))
        out, _ = ping.communicate(timeout=STEP_DEADLINE)
        assert ping.returncode == 0, out
        # And our direction over the session wireguard-go started.
        ping_through(node, seq=7)
        assert not any(isinstance(a, Drop) for a in node.log), [a for a in node.log if isinstance(a, Drop)]
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait(timeout=5)
        node.sock.close()


def test_cookie_reply_we_send_under_load_is_honoured_by_wireguard_go(wireguard_go: WireguardGo) -> None:
    """§5.4.7: under load we answer wireguard-go's initiation with a cookie reply; its retry carries a mac2
    made with our cookie, which we verify before doing any Diffie-Hellman."""
    node = make_node(wireguard_go, None)
    node.device.under_load = True
    ping = subprocess.Popen(
        ["ip", "netns", "exec", wireguard_go.netns, "ping", "-c", "3", "-i", "0.5", "-w", "12", OUR_ADDRESS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        actions = node.pump_until(lambda seen: any(isinstance(a, HandshakeCompleted) for a in seen), 12.0)
        cookie_drops = [a for a in actions if isinstance(a, Drop) and a.reason is DropReason.COOKIE_SENT]
        assert cookie_drops, "the first initiation must have been answered with a cookie reply"
        assert node.device.drops[DropReason.COOKIE_SENT] >= 1
        # The data path works over the session that began with a cookie exchange.
        node.device.under_load = False
        ping_through(node, seq=9)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait(timeout=5)
        node.sock.close()


def test_wireguard_go_cookie_reply_is_consumed_and_used(wireguard_go: WireguardGo) -> None:
    """§5.4.7 the other way: a burst of junk initiations (valid mac1 only, from another socket) puts
    wireguard-go under load; our initiation then gets a cookie reply, which we decrypt and use for mac2 on the
    retry, which wireguard-go (still under load) accepts."""
    node = make_node(wireguard_go, None)
    junk_sock = socket_in_netns(wireguard_go.netns)
    mac1_key = HASH(LABEL_MAC1, wireguard_go.public_key)
    peer = node.device.peers[wireguard_go.public_key]

    def junk_initiation() -> bytes:
        body = struct.pack("<I", 1) + secrets.token_bytes(MESSAGE_INITIATION_SIZE - 4 - 2 * MAC_SIZE)
        return body + MAC(mac1_key, body) + bytes(MAC_SIZE)

    junk = [junk_initiation() for _ in range(64)]

    def cookie_responses(to: socket.socket) -> int:
        log = (wireguard_go.workdir / "wireguard-go.log").read_text()
        return log.count(
            f"Sending cookie response for denied handshake message for 127.0.0.1:{to.getsockname()[1]}"
        )

    def under_load(then: Callable[[], None]) -> None:
        # wireguard-go is under load while >= 128 handshakes are queued, and for one second after; its socket
        # buffer drops part of the burst, so send our message a moment later, inside that second.
        for i in range(3000):
            junk_sock.sendto(junk[i % 64], node.wg_endpoint)
        time.sleep(0.02)
        then()

    try:
        under_load(
            lambda: node.carry_out(node.device.initiate_handshake(time.monotonic(), wireguard_go.public_key))
        )
        node.pump_until(
            lambda seen: peer.cookie.has_cookie or any(isinstance(a, HandshakeCompleted) for a in seen)
        )
        if not peer.cookie.has_cookie:
            pytest.skip("wireguard-go was not under load when our initiation arrived (host too fast)")
        assert not any(isinstance(a, HandshakeCompleted) for a in node.log)
        # Our retry comes REKEY_TIMEOUT (+ jitter) later, with mac2; put wireguard-go under load again first.
        retry_at = peer.timers.retransmit_handshake_at
        assert retry_at is not None
        time.sleep(max(0.0, retry_at - time.monotonic()))
        junk_cookies_before = cookie_responses(junk_sock)
        under_load(lambda: node.carry_out(node.device.tick(time.monotonic())))
        node.pump_until(lambda seen: any(isinstance(a, HandshakeCompleted) for a in seen))
        assert cookie_responses(junk_sock) > junk_cookies_before, "wireguard-go was under load for our retry"
        assert cookie_responses(node.sock) == 1, "our retry carried a valid mac2: no second cookie reply"
        ping_through(node, seq=11)
    finally:
        junk_sock.close()
        node.sock.close()
