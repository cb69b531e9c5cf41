"""Full tunnel: a peer with ``AllowedIPs = 0.0.0.0/0, ::/0`` takes all traffic, as with wg-quick (wg-quick(8),
``Table``/``FwMark``).

The netlab: client A on a home LAN whose default route is a NAT router R; exit node B on R's WAN, forwarding
into a "data centre" LAN where C lives. C is reachable only behind B (R has no route to it) and routes the
tunnel's addresses back via B. A and B are `tunnelmesh dataplane up` processes. With ``Table = auto`` (the
default) A gets wg-quick's policy routing: ``default dev <iface> table 51820``, the rules ``not fwmark
0xca6c lookup 51820`` and ``lookup main suppress_prefixlength 0``, and its UDP socket marked 0xca6c, so
everything goes through the tunnel except the tunnel's own packets, which still leave through R; and
wg-quick's nftables table (conntrack keeps the mark for B's replies, which strict reverse-path filtering then
accepts; packets for A's tunnel addresses must come through the tunnel).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import nacl.public
import pytest

from tests.interop.dataplane_helpers import WG_PORT, Engine, PeerSpec, TmNode, ping, tcp_transfer
from tunnelmesh.netlab import Lab, namespace
from tunnelmesh.netlab.topology import Host
from tunnelmesh.node.dataplane import PeerConfig
from tunnelmesh.node.routes import nft_table
from tunnelmesh.node.udp import SO_MARK

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces"),
    pytest.mark.timeout(120),
]

TUN_A, TUN_B = "10.91.0.1", "10.91.0.2"
TUN6_A, TUN6_B = "fd00:91::1", "fd00:91::2"
DC6_B, DC6_C = "fd00:93::2", "fd00:93::3"
V6_ROUTE = {4: "", 6: " metric 1024 pref medium"}  # how `ip -6 route` prints the same route
DEFAULT_RULES = ["from all lookup local", "from all lookup main", "from all lookup default"]
SUPPRESS = "from all lookup main suppress_prefixlength 0"
# Receives one UDP datagram and prints the address it came from: who C sees as the sender.
WHO = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", int(sys.argv[1])))
u.settimeout(30)
print(u.recvfrom(64)[1][0], flush=True)
"""
SEND = """
import socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):  # UDP: more in case the first is lost; the receiver reports the first
    u.sendto(b"x", (sys.argv[1], 7090))
    time.sleep(0.2)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab


def rules(host: Host, version: int = 4) -> list[tuple[int, str]]:
    """`ip rule` as (priority, selector and action), in order."""
    out = host.run(["ip", f"-{version}", "rule", "show"]).stdout
    return [(int(m[1]), m[2].strip()) for m in re.finditer(r"^(\d+):\s+(.*)$", out, re.M)]


def routes(host: Host, table: str, version: int = 4) -> list[str]:
    done = host.run(["ip", f"-{version}", "route", "show", "table", table], check=False)
    if "FIB table does not exist" in done.stderr:
        return []
    assert done.returncode == 0, done.stderr
    out = done.stdout
    return [" ".join(line.split()) for line in out.splitlines() if line.strip()]


def tunnel_rules(host: Host, version: int = 4) -> list[str]:
    return [r for _, r in rules(host, version) if r not in DEFAULT_RULES]


def nft_tables(host: Host) -> list[str]:
    """Our nftables tables, as `nft list tables` prints them: ["ip tunnelmesh-tm0", ...]."""
    out = host.run(["nft", "list", "tables"]).stdout
    return [line.split(maxsplit=1)[1] for line in out.splitlines() if " tunnelmesh-" in line]


def strict_rp_filter(host: Host) -> None:
    for iface in ("all", "eth0"):  # eth0: the LAN (the kernel takes the larger of all and the interface's)
        host.run(["sysctl", "-w", f"net.ipv4.conf.{iface}.rp_filter=1"])


class Exit:
    """The full-tunnel netlab: A (client), R (A's NAT router), B (exit node), C (behind B only)."""

    def __init__(self, lab: Lab, tmp_path: Path) -> None:
        home = lab.lan("home", "10.90.1.0/24")
        wan = lab.lan("wan", "10.90.2.0/24")
        dc = lab.lan("dc", "10.90.3.0/24")
        self.a = lab.host("a", home)
        self.r = lab.router("r", wan=wan, lan=home, nat="eim")
        self.b = lab.host("b", wan)
        self.c = lab.host("c", dc)
        lab.attach(self.b, dc)
        self.b_dc = self.b.ip_on(dc)
        self.b.add_ipv6(f"{DC6_B}/64", dc)
        self.c.add_ipv6(f"{DC6_C}/64")
        with self.b.enter():
            namespace.write_sysctl("net.ipv4.ip_forward", "1")
            namespace.write_sysctl("net.ipv6.conf.all.forwarding", "1")
        for host in (self.a, self.b):  # netlab starts interfaces IPv4-only; the TUN devices are dual-stack
            with host.enter():
                namespace.write_sysctl("net.ipv6.conf.default.disable_ipv6", "0")
        self.c.run(["ip", "route", "add", "10.91.0.0/24", "via", self.b_dc])
        self.c.run(["ip", "-6", "route", "add", "fd00:91::/64", "via", DC6_B])
        self.tm_a = TmNode(self.a, f"tma{lab.id}", tmp_path, tmp_path / "run")
        self.tm_b = TmNode(self.b, f"tmb{lab.id}", tmp_path, tmp_path / "run")

    def up(self, interface: tuple[str, ...] = (), allowed: str = "0.0.0.0/0, ::/0") -> None:
        if self.tm_b.proc is None:
            self.tm_b.up(f"{TUN_B}/24, {TUN6_B}/64", [PeerSpec(self.tm_a.pub, f"{TUN_A}/32, {TUN6_A}/128")])
        peer = PeerSpec(self.tm_b.pub, allowed, f"{self.b.ip}:{WG_PORT}")
        self.tm_a.up(f"{TUN_A}/24, {TUN6_A}/64", [peer], interface=interface)


@pytest.fixture
def net(lab: Lab, tmp_path: Path) -> Exit:
    return Exit(lab, tmp_path)


def test_default_route_through_an_exit_node(lab: Lab, net: Exit) -> None:
    """wg-quick(8) Table=auto with a /0: everything goes through the tunnel, the tunnel's own UDP does not."""
    a, c = net.a, net.c
    assert a.run(["ping", "-c1", "-W1", c.ip], check=False).returncode != 0  # only B can reach C
    net.up()
    iface = net.tm_a.iface
    # The rules, in wg-quick's order: main without its default route first, then table 51820 for
    # everything not marked 0xca6c (51820); the tunnel's UDP socket carries that mark.
    for version in (4, 6):
        (suppress, s), (fwmark, f) = [(p, r) for p, r in rules(a, version) if r not in DEFAULT_RULES]
        assert (s, f) == (SUPPRESS, "not from all fwmark 0xca6c lookup 51820")
        assert suppress < fwmark < 32766
        assert routes(a, "51820", version) == [f"default dev {iface} proto static{V6_ROUTE[version]}"]
    assert a.run(["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"]).stdout.strip() == "1"
    assert net.tm_a.show()["fwmark"] == 51820
    assert f"dev {iface} table 51820" in a.run(["ip", "route", "get", c.ip]).stdout
    assert "dev eth0" in a.run(["ip", "route", "get", net.b.ip, "mark", "51820"]).stdout
    assert nft_tables(a) == [f"ip {nft_table(iface)}", f"ip6 {nft_table(iface)}"]

    rx_before = net.tm_b.peer(net.tm_a.pub)["rx_packets"]
    ping(a, c.ip, count=20, deadline=20)  # ~4 s of traffic, every reply back: no routing loop
    ping(a, DC6_C, count=3)
    tcp_transfer(lab, a, c, c.ip, 2 * 1024 * 1024)
    peer_at_b = net.tm_b.peer(net.tm_a.pub)
    assert peer_at_b["rx_packets"] > rx_before + 20 and peer_at_b["handshakes"] >= 1
    # B saw A's encrypted UDP arrive from R's WAN address: it left A through its LAN, not the tunnel.
    assert peer_at_b["endpoint"].startswith(f"{net.r.wan_ip}:")
    # C sees A's tunnel address: the packet crossed the tunnel and B forwarded it.
    who = Path(lab.log_dir) / "who.py"
    who.write_text(WHO)
    sink = c.spawn([sys.executable, str(who), "7090"], name="who")
    c.wait_listening(7090, proto="udp")
    a.run([sys.executable, "-c", SEND, c.ip])
    sink.wait(10)
    assert sink.log_text().split()[-1] == TUN_A

    net.tm_a.down()
    for version in (4, 6):
        assert tunnel_rules(a, version) == []
        assert routes(a, "51820", version) == []
    assert nft_tables(a) == []


@pytest.mark.parametrize(
    ("table", "expect_table"), [("off", None), ("1234", "1234")], ids=["table-off", "table-1234"]
)
def test_explicit_table_or_off_adds_no_rules(net: Exit, table: str, expect_table: str | None) -> None:
    """wg-quick(8): "Table = off" adds no routes at all; a table number puts the routes there and adds no
    rules (that is the user's business); FwMark is still set on the socket."""
    net.up(interface=(f"Table = {table}", "FwMark = 0x1234"), allowed="0.0.0.0/0, 10.99.0.0/16")
    a, iface = net.a, net.tm_a.iface
    assert tunnel_rules(a, 4) == [] and tunnel_rules(a, 6) == []
    ours = [r for r in routes(a, "all") if f"dev {iface}" in r and "proto static" in r]
    if expect_table is None:
        assert ours == []
    else:
        assert sorted(ours) == [
            f"10.99.0.0/16 dev {iface} table 1234 proto static",
            f"default dev {iface} table 1234 proto static",
        ]
    assert net.tm_a.show()["fwmark"] == 0x1234
    assert "fwmark: 0x1234" in net.tm_a.cli("show", iface)
    net.tm_a.down()
    assert routes(a, "1234") == []


def test_restart_after_a_kill_replaces_the_leftover_rules(net: Exit) -> None:
    """A killed process leaves its rules (they outlive the TUN device); the next start removes them first,
    so the rules do not pile up, and `down` leaves nothing. With FwMark set, the table is the fwmark."""
    config = ("FwMark = 4660",)
    net.up(config, allowed="0.0.0.0/0")
    assert tunnel_rules(net.a) == [SUPPRESS, "not from all fwmark 0x1234 lookup 4660"]
    assert net.tm_a.proc is not None
    net.tm_a.proc.kill()
    ours = [f"ip {nft_table(net.tm_a.iface)}"]
    assert len(tunnel_rules(net.a)) == 2 and nft_tables(net.a) == ours  # leftovers
    strict_rp_filter(net.a)  # B's replies pass only through the new process's nftables rules
    net.up(config, allowed="0.0.0.0/0")
    assert net.tm_a.proc is not None
    net.tm_a.proc.wait_for_log(r"event=stale_rule_removed", timeout=5)
    assert tunnel_rules(net.a) == [SUPPRESS, "not from all fwmark 0x1234 lookup 4660"]
    assert nft_tables(net.a) == ours
    ping(net.a, net.c.ip, count=3)
    net.tm_a.down()
    assert tunnel_rules(net.a) == [] and nft_tables(net.a) == []


def test_live_peer_changes_add_and_remove_exactly_their_own_rules(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the Python API: a /0 appearing or going away (add_peer, update_peer, remove_peer) adds or
    removes this engine's rules and route only. A second engine in the same namespace picks the next free
    table (51821, as wg-quick does) and keeps its rules; a user's own rule and route in that table stay."""
    host = lab.host("x", lab.lan("l", "10.92.0.0/24"))
    with host.enter():
        namespace.write_sysctl("net.ipv6.conf.default.disable_ipv6", "0")
    one = Engine(host, "one", lab.id, "10.93.0.1")
    two = Engine(host, "two", lab.id, "10.94.0.1", listen_port=WG_PORT + 1)
    peer1, peer2 = (bytes(nacl.public.PrivateKey.generate().public_key) for _ in range(2))
    exit1 = PeerConfig(peer1, allowed_ips=("0.0.0.0/0",), endpoint=("10.92.0.99", WG_PORT))
    exit2 = PeerConfig(peer2, allowed_ips=("0.0.0.0/0",), endpoint=("10.92.0.99", WG_PORT))
    one.start()
    two.start()
    try:
        with caplog.at_level(logging.INFO, logger="tunnelmesh.node.dataplane"):
            one.add_peer(exit1)
        added = f"event=default_route_added iface={one.plane.name} table=51820 fwmark=0xca6c ip=4"
        assert added in caplog.text and "event=rp_filter_strict" not in caplog.text
        two.add_peer(exit2)
        mine = "not from all fwmark 0xca6c lookup 51820"
        theirs = "not from all fwmark 0xca6d lookup 51821"
        assert tunnel_rules(host) == [SUPPRESS, theirs, SUPPRESS, mine]  # each added before the others
        assert nft_tables(host) == [f"ip {nft_table(one.plane.name)}", f"ip {nft_table(two.plane.name)}"]
        assert mark(two) == 51821 and mark(one) == 51820
        host.run(["ip", "rule", "add", "pref", "100", "from", "192.0.2.1", "lookup", "51821"])
        host.run(["ip", "route", "add", "192.0.2.0/24", "dev", "eth0", "table", "51821"])

        # The /0 goes away (narrowed to a /8): one's rules go, table 51820 empties, the /8 is routed in
        # main and the socket loses its automatic mark; two's rules and the user's rule stay.
        one.plane.update_peer(peer1, allowed_ips=["10.0.0.0/8"])
        assert tunnel_rules(host) == ["from 192.0.2.1 lookup 51821", SUPPRESS, theirs]
        assert routes(host, "51820") == []
        assert f"10.0.0.0/8 dev {one.plane.name} proto static" in routes(host, "main")
        assert mark(one) == 0
        assert nft_tables(host) == [f"ip {nft_table(two.plane.name)}"]
        # Both families back.
        one.plane.update_peer(peer1, allowed_ips=["0.0.0.0/0", "::/0"])
        assert mine in tunnel_rules(host, 4) and tunnel_rules(host, 6) == [SUPPRESS, mine]
        assert routes(host, "51820", 6) == [f"default dev {one.plane.name} proto static{V6_ROUTE[6]}"]
        one.plane.remove_peer(peer1)
        assert tunnel_rules(host, 6) == [] and mine not in tunnel_rules(host)
        one.plane.stop()  # nothing of one's is left to remove
        two.plane.stop()
        assert tunnel_rules(host) == ["from 192.0.2.1 lookup 51821"] and nft_tables(host) == []
        assert routes(host, "51821") == ["192.0.2.0/24 dev eth0 scope link"]
    finally:
        one.plane.stop()
        two.plane.stop()


def test_strict_reverse_path_filtering_passes_with_wg_quicks_nftables_rules(lab: Lab, net: Exit) -> None:
    """wg-quick(8) with a /0 and nft: B's replies come in on A's LAN with a source that routes through the
    tunnel, which rp_filter=1 drops, unless conntrack gives them the tunnel's mark back (``src_valid_mark``:
    the check then uses the main table). And a packet for A's tunnel address must come through the tunnel."""
    a, r = net.a, net.r
    strict_rp_filter(a)
    net.up()
    iface = net.tm_a.iface
    table = nft_table(iface)
    assert nft_tables(a) == [f"ip {table}", f"ip6 {table}"]
    listing = " ".join(a.run(["nft", "list", "table", "ip", table]).stdout.split())
    for rule in (
        f'iifname != "{iface}" ip daddr {TUN_A} fib saddr type != local drop',
        "meta l4proto udp meta mark set ct mark",
        "meta l4proto udp meta mark 0x0000ca6c ct mark set meta mark",
    ):
        assert rule in listing
    assert (
        f'iifname != "{iface}" ip6 daddr {TUN6_A} fib saddr'
        in a.run(["nft", "list", "table", "ip6", table]).stdout
    )
    ping(a, net.c.ip, count=5)
    ping(a, DC6_C, count=3)
    tcp_transfer(lab, a, net.c, net.c.ip, 2 * 1024 * 1024)

    # R (on A's LAN) sends to A's tunnel address: dropped; without the anti-spoofing rule A would answer.
    r.run(["ip", "route", "add", f"{TUN_A}/32", "via", a.ip])
    assert r.run(["ping", "-c2", "-W1", TUN_A], check=False).returncode != 0
    a.run(["nft", "flush", "chain", "ip", table, "preraw"])
    ping(r, TUN_A, count=2)

    # Mutation: without the conntrack mark rules B's replies are dropped again.
    for chain in ("premangle", "postmangle"):
        a.run(["nft", "flush", "chain", "ip", table, chain])
    assert a.run(["ping", "-c3", "-W1", net.c.ip], check=False).returncode != 0

    net.tm_a.down()
    assert nft_tables(a) == [] and tunnel_rules(a) == []


def test_without_nft_the_routing_stays_and_strict_rp_filter_is_reported(
    lab: Lab, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No `nft` on the PATH: the failure is logged, the policy routing stays (it works with rp_filter 0 or 2)
    and, the nftables rules missing, strict reverse-path filtering is reported."""
    host = lab.host("x", lab.lan("l", "10.97.0.0/24"))
    host.run(["sysctl", "-w", "net.ipv4.conf.eth0.rp_filter=1"])
    e = Engine(host, "s", lab.id, "10.98.0.1")
    e.start()
    exit_node = PeerConfig(bytes(32 * [7]), allowed_ips=("0.0.0.0/0",), endpoint=("10.97.0.9", 1))
    try:
        with caplog.at_level(logging.INFO, logger="tunnelmesh.node.dataplane"):
            e.add_peer(exit_node)  # with nft: no warning
            assert f"event=nft_table_added iface={e.plane.name} ip=4" in caplog.text
            assert "event=rp_filter_strict" not in caplog.text
            e.plane.remove_peer(exit_node.public_key)
            assert nft_tables(host) == []
            caplog.clear()
            with monkeypatch.context() as m:
                m.setenv("PATH", str(tmp_path))  # the engine runs nft from this process
                e.add_peer(exit_node)
        (failed,) = [r.message for r in caplog.records if "event=default_route_failed" in r.message]
        assert failed.startswith(f"event=default_route_failed iface={e.plane.name} ip=4 error=")
        assert "nft not found" in failed
        assert f"event=rp_filter_strict iface={e.plane.name} interfaces=eth0 " in caplog.text
        assert len(tunnel_rules(host)) == 2 and nft_tables(host) == []
    finally:
        e.plane.stop()
    assert tunnel_rules(host) == []


def test_the_node_agent_defaults_add_no_rules(lab: Lab) -> None:
    """Mesh mode (defaults, no /0): routes in main as before, no rule, no mark."""
    host = lab.host("x", lab.lan("l", "10.95.0.0/24"))
    e = Engine(host, "m", lab.id, "10.96.0.1")
    e.start()
    try:
        e.add_peer(
            PeerConfig(bytes(32 * [7]), allowed_ips=("10.96.0.2/32",), endpoint=("10.95.0.9", WG_PORT))
        )
        assert tunnel_rules(host) == [] and tunnel_rules(host, 6) == []
        assert f"10.96.0.2 dev {e.plane.name} proto static" in routes(host, "main")
        assert mark(e) == 0
    finally:
        e.plane.stop()


def mark(e: Engine) -> int:
    """The SO_MARK the kernel has on the engine's UDP socket."""
    assert e.plane.udp is not None
    return int(e.plane.udp.socket.getsockopt(socket.SOL_SOCKET, SO_MARK))
