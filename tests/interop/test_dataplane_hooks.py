"""wg-quick's PreUp/PostUp/PreDown/PostDown commands in `tunnelmesh dataplane up` (a real process in a netlab
host): run in order around the interface's life with ``%i`` replaced; an `up` that fails once the interface
exists (a failing PostUp, a metrics port in use) takes the interface down again and fails with one line."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.dataplane_helpers import ROOT, TmNode, genkey, wg_quick_text
from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.topology import Host

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.timeout(60),
]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab.host("a", lab.lan("l", "10.67.0.0/24"))


def _exists(log: Path, stage: str) -> str:
    """A hook line that records whether interface %i exists when it runs."""
    probe = "$(ip link show %i >/dev/null 2>&1 && echo exists || echo absent)"
    return f"{stage} = echo {stage} %i {probe} >> {log}"


def test_hooks_run_in_order_around_the_interface(host: Host, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    node = TmNode(host, f"tmh{host.name}{os.getpid() % 10000}", tmp_path, tmp_path / "run")
    node.up(
        "10.67.1.1/24",
        [],
        interface=[
            _exists(log, "PreUp"),
            f"PostUp = echo PostUp %i $(ip -o addr show %i | grep -c 10.67.1.1/24) >> {log}",
            f"PostUp = echo second PostUp >> {log}",
            _exists(log, "PreDown"),
            _exists(log, "PostDown"),
        ],
    )
    i = node.iface
    # Before the device exists; once it is up and addressed; in file order.
    assert log.read_text().splitlines() == [f"PreUp {i} absent", f"PostUp {i} 1", "second PostUp"]
    node.down()
    assert node.proc is not None and node.proc.returncode == 0
    assert log.read_text().splitlines()[3:] == [f"PreDown {i} exists", f"PostDown {i} absent"]


def test_a_failing_post_up_takes_the_interface_down_and_fails(host: Host, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    iface = f"tmf{os.getpid() % 10000}"
    conf = tmp_path / f"{iface}.conf"
    key, _ = genkey()
    conf.write_text(
        wg_quick_text(key, "10.67.2.1/24", [], interface=["PostUp = exit 3", _exists(log, "PostDown")])
    )
    conf.chmod(0o600)
    proc = host.spawn(
        [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)],
        name=f"tm-{iface}",
        env={"TUNNELMESH_RUN_DIR": str(tmp_path / "run"), "PYTHONPATH": str(ROOT)},
    )
    assert proc.wait(30) == 1
    assert "error: PostUp `exit 3` exited with status 3" in proc.log_text()
    assert host.run(["ip", "link", "show", iface], check=False).returncode != 0  # taken down again
    assert not log.exists()  # the down hooks belong to an interface that came up (as with wg-quick)


def test_a_metrics_port_in_use_takes_the_interface_down_and_fails(host: Host, tmp_path: Path) -> None:
    iface = f"tmm{os.getpid() % 10000}"
    conf = tmp_path / f"{iface}.conf"
    key, _ = genkey()
    conf.write_text(wg_quick_text(key, "10.67.3.1/24", []))
    conf.chmod(0o600)
    with host.enter():
        taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        argv = [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)]
        proc = host.spawn(
            [*argv, "--metrics", address],
            name=f"tm-{iface}",
            env={"TUNNELMESH_RUN_DIR": str(tmp_path / "run"), "PYTHONPATH": str(ROOT)},
        )
        assert proc.wait(30) == 1
    out = proc.log_text()
    assert f"error: cannot listen on {address} (--metrics): Address already in use" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    assert host.run(["ip", "link", "show", iface], check=False).returncode != 0  # taken down again
