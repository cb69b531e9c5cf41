"""The oracle, end to end: a `tunnelmesh dataplane up` node and Debian's wireguard-go + wg, in a netlab.

Both run as real processes on two hosts of one LAN with real TUN devices. Each side initiates in turn (only
the initiator knows the other's endpoint, so the responder cannot start first), with and without a
preshared key; ping and a 20 MB TCP stream (SHA-256 checked) cross the tunnel both ways; and the session
recovers when wireguard-go restarts with a new process and a fresh handshake.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.dataplane_helpers import WG_PORT, PeerSpec, TmNode, WgGoNode, genpsk, ping, tcp_transfer
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates network namespaces and runs wireguard-go"
    ),
    pytest.mark.timeout(120),
]

TM_IP, WG_IP = "10.66.0.1", "10.66.0.2"
STREAM = 20 * 1024 * 1024


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab


def _pair(lab: Lab, tmp_path: Path, *, tm_initiates: bool, psk: bool) -> tuple[TmNode, WgGoNode]:
    lan = lab.lan("l", "10.65.0.0/24")
    h_tm, h_wg = lab.host("tm", lan), lab.host("wg", lan)
    tm = TmNode(h_tm, f"tm{lab.id}", tmp_path, tmp_path / "run")
    wgo = WgGoNode(h_wg, f"wg{lab.id}", tmp_path)
    shared = genpsk() if psk else None
    wgo.up(
        f"{WG_IP}/24",
        [PeerSpec(tm.pub, f"{TM_IP}/32", None if tm_initiates else f"{h_tm.ip}:{WG_PORT}", shared)],
    )
    tm.up(
        f"{TM_IP}/24",
        [PeerSpec(wgo.pub, f"{WG_IP}/32", f"{h_wg.ip}:{WG_PORT}" if tm_initiates else None, shared)],
    )
    return tm, wgo


@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
@pytest.mark.parametrize(
    "tm_initiates", [True, False], ids=["tunnelmesh-initiates", "wireguard-go-initiates"]
)
def test_handshake_ping_and_tcp_both_ways(lab: Lab, tmp_path: Path, tm_initiates: bool, psk: bool) -> None:
    tm, wgo = _pair(lab, tmp_path, tm_initiates=tm_initiates, psk=psk)
    initiator, responder_ip = (tm.host, WG_IP) if tm_initiates else (wgo.host, TM_IP)
    ping(initiator, responder_ip)
    peer = tm.peer(wgo.pub)
    assert peer["latest_handshake"] is not None and peer["handshakes"] >= 1
    assert peer["endpoint"] == f"{wgo.host.ip}:{WG_PORT}"  # learned from the authenticated handshake
    assert peer["preshared_key"] is psk
    assert wgo.latest_handshake() > 0
    # The other direction uses the same session.
    ping(tm.host if not tm_initiates else wgo.host, TM_IP if tm_initiates else WG_IP)
    tcp_transfer(lab, tm.host, wgo.host, WG_IP, STREAM, port=7001)
    tcp_transfer(lab, wgo.host, tm.host, TM_IP, STREAM, port=7002)
    peer = tm.peer(wgo.pub)
    assert peer["rx_bytes"] > STREAM and peer["tx_bytes"] > STREAM
    drops = tm.show()["drops"]
    assert drops["decrypt_failure"] == 0 and drops["replay"] == 0 and drops["allowed_ips"] == 0, drops


def test_session_survives_wireguard_go_restart(lab: Lab, tmp_path: Path) -> None:
    tm, wgo = _pair(lab, tmp_path, tm_initiates=False, psk=True)
    ping(wgo.host, TM_IP)
    ping(tm.host, WG_IP)
    before = tm.peer(wgo.pub)["handshakes"]
    wgo.restart()  # a new process: its sessions are gone, so our current keypair is useless to it
    # The restarted wireguard-go initiates as soon as it has something to send; we answer as responder and
    # switch to the new session on its first transport message.
    ping(wgo.host, TM_IP, count=3, deadline=15)
    ping(tm.host, WG_IP)
    deadline = time.monotonic() + 10
    while tm.peer(wgo.pub)["handshakes"] <= before:
        assert time.monotonic() < deadline, "no new handshake after the wireguard-go restart"
        time.sleep(0.2)
    tcp_transfer(lab, tm.host, wgo.host, WG_IP, 4 * 1024 * 1024)
