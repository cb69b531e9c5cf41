"""`tunnelmesh dataplane reload` (and SIGHUP): a running `up` takes its file's peer changes live, as
`wg syncconf` does, without disturbing the sessions of peers that stayed; a file that does not parse, or that
changes what a running interface cannot take, is refused with nothing applied. Real processes: TunnelMesh
`up` in one netlab host, two Debian wireguard-go peers in two others.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.dataplane_helpers import (
    WG_PORT,
    PeerSpec,
    TmNode,
    WgGoNode,
    genkey,
    ping,
    wg_quick_text,
)
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates network namespaces and runs wireguard-go"
    ),
    pytest.mark.timeout(120),
]

TM_IP, W1_IP, W2_IP, GONE_IP = "10.71.0.1", "10.71.0.2", "10.71.0.3", "10.71.0.99"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab


def test_reload_applies_peer_changes_and_keeps_the_other_sessions(lab: Lab, tmp_path: Path) -> None:
    lan = lab.lan("l", "10.70.0.0/24")
    h_tm, h_w1, h_w2 = lab.host("tm", lan), lab.host("w1", lan), lab.host("w2", lan)
    tm = TmNode(h_tm, f"tmr{lab.id}", tmp_path, tmp_path / "run")
    w1, w2 = WgGoNode(h_w1, f"wa{lab.id}", tmp_path), WgGoNode(h_w2, f"wb{lab.id}", tmp_path)
    for node, ip in ((w1, W1_IP), (w2, W2_IP)):
        node.up(f"{ip}/24", [PeerSpec(tm.pub, f"{TM_IP}/32", f"{h_tm.ip}:{WG_PORT}")])
    _, gone = genkey()
    p1 = PeerSpec(w1.pub, f"{W1_IP}/32", f"{h_w1.ip}:{WG_PORT}")
    p2 = PeerSpec(w2.pub, f"{W2_IP}/32", f"{h_w2.ip}:{WG_PORT}")
    tm.up(f"{TM_IP}/24", [p1, PeerSpec(gone, f"{GONE_IP}/32")])
    conf = tmp_path / f"{tm.iface}.conf"

    def write(peers: list[PeerSpec], address: str = f"{TM_IP}/24", extra: str = "") -> None:
        conf.write_text(wg_quick_text(tm.key, address, peers) + extra)

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "reload", tm.iface],
            env=tm.env,
            capture_output=True,
            text=True,
            timeout=70,
        )

    def peers() -> dict[str, dict[str, object]]:
        return {str(p["public_key"]): p for p in tm.show()["peers"]}

    ping(h_tm, W1_IP)
    session = peers()[w1.pub]["latest_handshake"]
    assert session

    # W1 gets a keepalive, the peer nobody runs goes, W2 comes.
    write([PeerSpec(w1.pub, f"{W1_IP}/32", f"{h_w1.ip}:{WG_PORT}", keepalive=25), p2])
    out = reload()
    assert out.returncode == 0, out.stderr
    assert "1 peer(s) added, 1 removed, 1 changed, 0 unchanged" in out.stdout
    assert f"changed: {w1.pub} (PersistentKeepalive)" in out.stdout
    assert f"added:   {w2.pub}" in out.stdout and f"removed: {gone}" in out.stdout
    now = peers()
    assert set(now) == {w1.pub, w2.pub}
    assert now[w1.pub]["persistent_keepalive"] == 25
    ping(h_tm, W2_IP)  # the added peer: its route and session
    ping(h_tm, W1_IP)
    assert peers()[w1.pub]["latest_handshake"] == session  # W1's session went on: no new handshake

    # Refused, nothing applied: a file that does not parse; an [Interface] change.
    before = peers()
    write([p1], extra="\n[Peer]\nPublicKey = not-a-key\n")
    bad = reload()
    assert bad.returncode == 1 and f"{conf}:" in bad.stderr and "PublicKey" in bad.stderr
    write([p1], address="10.71.0.7/24")
    moved = reload()
    assert moved.returncode == 1
    assert "Address changed, which a running interface cannot take; nothing was applied" in moved.stderr
    assert peers().keys() == before.keys()
    assert "event=config_reload_refused" in (tm.proc.log_text() if tm.proc else "")

    # SIGHUP does the same as `reload`: W2 goes.
    write([PeerSpec(w1.pub, f"{W1_IP}/32", f"{h_w1.ip}:{WG_PORT}", keepalive=25)])
    assert tm.proc is not None
    tm.proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while set(peers()) != {w1.pub} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(peers()) == {w1.pub}
    assert "event=config_reloaded" in tm.proc.log_text()
    ping(h_tm, W1_IP)
    assert peers()[w1.pub]["latest_handshake"] == session


def test_a_service_manager_hears_ready_reloading_and_stopping(lab: Lab, tmp_path: Path) -> None:
    """Under systemd (``Type=notify``): READY=1 only once the interface is up with its address and answers
    `show`; each reload (SIGHUP, `reload`, refused or not) is framed by RELOADING=1 (with MONOTONIC_USEC) and
    READY=1; `down` sends STOPPING=1; with WatchdogSec the watchdog is pinged meanwhile. The manager's socket
    is a real datagram socket, as systemd binds it."""
    lan = lab.lan("l", "10.70.0.0/24")
    host = lab.host("tm", lan)
    tm = TmNode(host, f"tms{lab.id}", tmp_path, tmp_path / "run")
    _, k1 = genkey()
    _, k2 = genkey()
    conf = tmp_path / f"{tm.iface}.conf"
    conf.write_text(wg_quick_text(tm.key, f"{TM_IP}/24", [PeerSpec(k1, f"{W1_IP}/32")]))
    conf.chmod(0o600)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(20)

        watchdog_pings = 0

        def heard() -> dict[str, str]:
            """The next notification; the watchdog's pings in between are counted."""
            nonlocal watchdog_pings
            while (data := manager.recv(4096).decode()) == "WATCHDOG=1":
                watchdog_pings += 1
            return dict(line.split("=", 1) for line in data.split("\n"))

        tm.proc = host.spawn(
            [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)],
            name=f"tm-{tm.iface}-{time.monotonic_ns()}",
            env={**tm.env, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"},
        )
        ready = heard()
        assert ready == {"READY": "1", "STATUS": f"interface {tm.iface} up, 1 peer(s)"}
        addr = host.run(["ip", "-o", "addr", "show", "dev", tm.iface], timeout=10).stdout
        assert f"inet {TM_IP}/24" in addr  # started means usable: addressed, routed, serving `show`
        assert [p["public_key"] for p in tm.show()["peers"]] == [k1]

        conf.write_text(
            wg_quick_text(tm.key, f"{TM_IP}/24", [PeerSpec(k1, f"{W1_IP}/32"), PeerSpec(k2, f"{W2_IP}/32")])
        )
        os.kill(tm.proc.pid, signal.SIGHUP)
        reloading = heard()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert heard() == {"READY": "1", "STATUS": f"interface {tm.iface} up, 2 peer(s)"}

        conf.write_text(wg_quick_text(tm.key, "10.71.9.1/24", []))  # a new Address: refused
        with pytest.raises(AssertionError, match="Address changed"):
            tm.cli("reload", tm.iface)
        assert heard()["RELOADING"] == "1"
        again = heard()
        assert again["READY"] == "1"
        assert again["STATUS"].startswith(
            f"interface {tm.iface} up, 2 peer(s); the last reload was refused: "
        )

        time.sleep(1.5)
        tm.down()
        assert heard() == {"STOPPING": "1", "STATUS": f"taking {tm.iface} down"}
    assert tm.proc.returncode == 0
    assert watchdog_pings >= 3  # WatchdogSec=1: a ping every half second while up
