"""Persistent keepalive, observed on the wire: an idle TunnelMesh peer configured with
`PersistentKeepalive = 1` sends an empty transport message (WireGuard's keepalive: 32 bytes, type 4) about
every second, and an idle peer without it sends none (its one passive keepalive comes 10 s after the last
reply, after the window).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.interop.dataplane_helpers import WG_PORT, PeerSpec, TmNode, ping
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.timeout(120),
]

ETH_P_IP = 0x0800
KEEPALIVE_SIZE = 32  # 16-byte transport header + 16-byte AEAD tag, no payload
IDLE_WINDOW = 5.0


def _keepalives_by_source(sniffer: socket.socket, seconds: float) -> Counter[str]:
    """Count WireGuard keepalives (UDP to WG_PORT, 32-byte payload of type 4) per source address."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pkt = sniffer.recv(2048)
        except TimeoutError:
            continue
        ihl = (pkt[0] & 0x0F) * 4
        if pkt[9] != socket.IPPROTO_UDP:
            continue
        _, dport, length, _ = struct.unpack_from("!HHHH", pkt, ihl)
        payload = pkt[ihl + 8 : ihl + length]
        if dport == WG_PORT and len(payload) == KEEPALIVE_SIZE and payload[0] == 4:
            seen[socket.inet_ntoa(pkt[12:16])] += 1
    return seen


def test_persistent_keepalive_is_sent_while_idle_and_only_when_configured(tmp_path: Path) -> None:
    tmp = tmp_path
    tun = {"a": "10.73.0.1", "b": "10.73.0.2", "c": "10.73.0.3"}
    with Lab(log_dir=tmp / "netlab") as lab:
        lan = lab.lan("l", "10.72.0.0/24")
        hosts = {name: lab.host(name, lan) for name in tun}
        nodes = {name: TmNode(h, f"tm{lab.id}{name}", tmp, tmp / "run") for name, h in hosts.items()}
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        a.up(f"{tun['a']}/24", [PeerSpec(b.pub, f"{tun['b']}/32", f"{b.host.ip}:{WG_PORT}", keepalive=1)])
        c.up(f"{tun['c']}/24", [PeerSpec(b.pub, f"{tun['b']}/32", f"{b.host.ip}:{WG_PORT}")])
        b.up(f"{tun['b']}/24", [PeerSpec(a.pub, f"{tun['a']}/32"), PeerSpec(c.pub, f"{tun['c']}/32")])
        try:
            ping(a.host, tun["b"], count=2)
            ping(c.host, tun["b"], count=2)
            # The window starts now and ends well before the passive keepalive that follows the pings
            # (WireGuard's KEEPALIVE_TIMEOUT, 10 s after the last reply): an idle peer without a persistent
            # keepalive sends nothing in it.
            with b.host.enter():
                sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
            with sniffer:
                sniffer.bind(("eth0", ETH_P_IP))
                sniffer.settimeout(0.5)
                seen = _keepalives_by_source(sniffer, IDLE_WINDOW)
        finally:
            for node in nodes.values():
                node.down()
    assert seen[a.host.ip] >= IDLE_WINDOW - 2, f"a (keepalive 1 s) sent {seen[a.host.ip]} keepalives: {seen}"
    assert seen[a.host.ip] <= IDLE_WINDOW + 2, f"a sent keepalives too often: {seen}"
    assert seen[c.host.ip] == 0, f"c (no persistent keepalive) sent keepalives while idle: {seen}"
