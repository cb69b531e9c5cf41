"""Per-peer receive loss (`rx_lost` in `dataplane show`): gaps in the counters of a Debian wireguard-go peer's
messages, with netlab dropping a share of them on the link (nftables ``numgen random``), are counted once they
can no longer arrive; a clean link counts none."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.dataplane_helpers import WG_PORT, PeerSpec, TmNode, WgGoNode, ping
from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.topology import Host

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.timeout(120),
]

TM_IP, WG_IP = "10.69.1.1", "10.69.1.2"
# Datagrams through the tunnel, in bursts of 50 every 10 ms (well within what both ends take without drops).
SENDER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(sys.argv[2])):
        s.sendto(b"x" * 64, (sys.argv[1], 9))
        if i % 50 == 49:
            time.sleep(0.01)
    """
)
LOSSY = 20_000
FLUSH = 9_000  # more than the replay window (8128): every earlier gap is final after these


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Lab, TmNode, WgGoNode]]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        lan = lab.lan("l", "10.69.0.0/24")
        tm = TmNode(lab.host("tm", lan), f"tml{lab.id}", tmp_path, tmp_path / "run")
        wgo = WgGoNode(lab.host("wg", lan), f"wgl{lab.id}", tmp_path)
        wgo.up(f"{WG_IP}/24", [PeerSpec(tm.pub, f"{TM_IP}/32")])
        tm.up(f"{TM_IP}/24", [PeerSpec(wgo.pub, f"{WG_IP}/32", f"{wgo.host.ip}:{WG_PORT}")])
        ping(tm.host, WG_IP)  # the handshake: wireguard-go learns where we are
        try:
            yield lab, tm, wgo
        finally:
            tm.down()


def _send(host: Host, count: int, tmp_path: Path) -> None:
    tool = tmp_path / "sender.py"
    tool.write_text(SENDER)
    host.run(["python3", str(tool), TM_IP, str(count)], timeout=60)


def test_messages_dropped_on_the_link_are_counted_as_receive_loss(
    pair: tuple[Lab, TmNode, WgGoNode], tmp_path: Path
) -> None:
    lab, tm, wgo = pair
    _send(wgo.host, FLUSH, tmp_path)  # clean link first: nothing lost
    peer = tm.peer(wgo.pub)
    assert peer["rx_lost"] == 0 and peer["rx_packets"] >= FLUSH
    lab.set_loss(wgo.host, 3, "egress")
    _send(wgo.host, LOSSY, tmp_path)
    lab.set_loss(wgo.host, 0)
    _send(wgo.host, FLUSH, tmp_path)
    peer = tm.peer(wgo.pub)
    # 3 % of 20,000 is 600 (binomial sd ~24); the margin is for the odd handshake or keepalive on the link.
    assert 450 <= peer["rx_lost"] <= 750, peer
    assert peer["rx_packets"] + peer["rx_lost"] >= 2 * FLUSH + LOSSY
    drops = tm.show()["drops"]
    assert drops["decrypt_failure"] == 0 and drops["replay"] == 0, drops
    assert "receive loss: " in tm.cli("show", tm.iface)
