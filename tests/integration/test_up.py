"""`tunnelmesh up` / `down` / `service install` as a user runs them, on a "machine" that is a netlab host (so
the real host is untouched): real coordinator and node daemons, a real TUN device, a second machine joining
with the printed command."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunnelmesh.cli.up_cmd import tunnelmesh_argv
from tunnelmesh.netlab import Host, Lab
from tunnelmesh.netlab.procfs import process_start_time

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
]

ROOT = Path(__file__).resolve().parents[2]
JOIN_LINE = re.compile(r"tunnelmesh join (\S+) --token (tmj_\S+)")
IFACE = "tmup0"


def tm(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tunnelmesh.cli.main import main; main()", *args]


@pytest.fixture
def lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab


def run(host: Host, tmp_path: Path, *args: str, timeout: float = 150.0, check: bool = True):  # type: ignore[no-untyped-def]
    env = {"TUNNELMESH_PROFILE": str(tmp_path / "profile.json"), "PYTHONPATH": str(ROOT)}
    env["TUNNELMESH_RUN_DIR"] = str(tmp_path / "run")  # the node's control socket: not the host's /run
    return host.run(tm(*args), timeout=timeout, check=check, env=env)


def pid_of(data_dir: Path, what: str) -> int:
    pid, start = (int(x) for x in (data_dir / "run" / f"{what}.pid").read_text().split())
    assert process_start_time(pid) == start, f"{what} daemon (pid {pid}) is not running"
    return pid


def test_up_is_one_command_rerun_is_safe_down_stops_and_up_restarts(lab: Lab, tmp_path: Path) -> None:
    lan = lab.lan("lan", "10.61.0.0/24")
    m1 = lab.host("m1", lan)
    d = tmp_path / "tm"

    first = run(m1, tmp_path, "up", "--data-dir", str(d), "--interface", IFACE)
    join = JOIN_LINE.search(first.stdout)
    assert join, first.stdout + first.stderr
    assert join.group(1) == f"{m1.ip}:8443"  # the machine's reachable address, not 0.0.0.0 or loopback
    coord_pid, node_pid = pid_of(d, "coord"), pid_of(d, "node")
    assert (tmp_path / "profile.json").stat().st_mode & 0o777 == 0o600
    assert (d / "join-token").stat().st_mode & 0o777 == 0o600
    assert "mesh ip 100." in first.stdout
    m1.run(["ip", "link", "show", IFACE])  # the node's TUN device exists

    # Re-running changes nothing: same daemons, same token, same node.
    again = run(m1, tmp_path, "up", "--data-dir", str(d))
    assert "already running" in again.stderr
    assert JOIN_LINE.search(again.stdout).group(2) == join.group(2)  # type: ignore[union-attr]
    assert (pid_of(d, "coord"), pid_of(d, "node")) == (coord_pid, node_pid)

    # The admin profile `up` wrote is enough for the admin CLI.
    listed = run(m1, tmp_path, "nodes", "list")
    assert "m1" in listed.stdout or IFACE in listed.stdout or "100." in listed.stdout, listed.stdout

    # A second machine joins with exactly the printed command and reaches the first over the mesh.
    m2 = lab.host("m2", lan)
    cmd = JOIN_LINE.search(first.stdout).group(0).split()[1:]  # type: ignore[union-attr]
    m2_node = m2.spawn(
        tm(*cmd, "--interface", "tmup1", "--state-dir", str(tmp_path / "m2"), "--name", "m2"),
        name="join",
        env={"PYTHONPATH": str(ROOT), "TUNNELMESH_RUN_DIR": str(tmp_path / "run")},
    )
    m1_ip = first.stdout.split("mesh ip ")[1].split()[0]
    deadline = time.monotonic() + 60
    while m2.run(["ping", "-c1", "-W1", m1_ip], check=False).returncode != 0:
        assert m2_node.running, m2_node.log_text()[-2000:]
        assert time.monotonic() < deadline, (
            f"m2 cannot ping m1's mesh ip {m1_ip}:\n{m2_node.log_text()[-2000:]}"
        )
        time.sleep(0.5)
    m2_node.stop()

    # New flags while the mesh runs: refused, with what to do, and nothing changes.
    moved = run(m1, tmp_path, "up", "--data-dir", str(d), "--listen", "0.0.0.0:9443", check=False)
    assert moved.returncode == 1 and "tunnelmesh down" in moved.stderr, moved.stderr
    assert '"0.0.0.0:8443"' in (d / "up.json").read_text()

    # A revoked token is never printed again: the next `up` creates a new one.
    token_id = json.loads((d / "join-token").read_text())["token_id"]
    run(m1, tmp_path, "tokens", "revoke", token_id)

    # down stops both daemons (and the TUN device goes with the node) and keeps the state.
    stopped = run(m1, tmp_path, "down", "--data-dir", str(d))
    assert f"stopped (pid {node_pid})" in stopped.stdout and f"stopped (pid {coord_pid})" in stopped.stdout
    assert process_start_time(coord_pid) is None and process_start_time(node_pid) is None
    assert m1.run(["ip", "link", "show", IFACE], check=False).returncode != 0
    assert (d / "coord" / "raft").is_dir() and (d / "node" / "node.json").is_file()
    assert "not running" in run(m1, tmp_path, "down", "--data-dir", str(d)).stdout  # idempotent

    # up again restarts from the state: same mesh, same node identity (mesh IP); a new token (revoked above).
    restarted = run(m1, tmp_path, "up", "--data-dir", str(d))
    assert "restarting" in restarted.stderr
    new_token = JOIN_LINE.search(restarted.stdout).group(2)  # type: ignore[union-attr]
    assert new_token != join.group(2) and token_id not in new_token
    assert restarted.stdout.split("mesh ip ")[1].split()[0] == m1_ip

    run(m1, tmp_path, "down", "--data-dir", str(d), "--purge")
    assert not d.exists()
    assert not (tmp_path / "profile.json").exists()  # it pointed at the mesh that is gone


def test_up_refuses_a_bad_listen_address_and_creates_nothing(tmp_path: Path) -> None:
    r = subprocess.run(
        tm("up", "--data-dir", str(tmp_path / "tm"), "--listen", "8443"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 1
    assert "--listen '8443': expected host:port, e.g. 0.0.0.0:8443" in r.stderr
    assert not (tmp_path / "tm").exists()


def test_service_install_writes_units_with_the_same_arguments(tmp_path: Path) -> None:
    d = tmp_path / "tm"
    d.mkdir()
    (d / "up.json").write_text('{"listen": "0.0.0.0:9443", "advertise": "192.0.2.7", "interface": "tmsvc0"}')
    dry = subprocess.run(
        tm("service", "install", "--data-dir", str(d), "--unit-dir", str(tmp_path / "units"), "--dry-run"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert not (tmp_path / "units").exists()  # a dry run writes nothing
    assert "tunnelmesh-coord.service" in dry.stdout and "tunnelmesh-node.service" in dry.stdout
    exec_lines = [line for line in dry.stdout.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_lines) == 2
    coord_line, node_line = exec_lines
    assert f"coord --data-dir {d / 'coord'} --listen 0.0.0.0:9443 --advertise-host 192.0.2.7" in coord_line
    assert "--bootstrap" in coord_line  # nothing bootstrapped yet in this data dir
    assert f"node --state-dir {d / 'node'} --interface tmsvc0" in node_line
    assert "tmj_" not in dry.stdout  # no secret in world-readable unit files
    assert "systemctl enable --now tunnelmesh-coord.service tunnelmesh-node.service" in dry.stdout

    subprocess.run(
        tm("service", "install", "--data-dir", str(d), "--unit-dir", str(tmp_path / "units")),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    written = (tmp_path / "units" / "tunnelmesh-coord.service").read_text()
    assert coord_line in written and "[Install]" in written
    units = [tmp_path / "units" / name for name in ("tunnelmesh-coord.service", "tunnelmesh-node.service")]
    for unit in units:  # started once ready (see sdnotify): `systemctl start` and rolling restarts wait
        assert "Type=notify\n" in unit.read_text(), unit
    # systemd's own parser (no systemd needed to run): any setting it does not know is a warning on stderr.
    verify = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


def test_the_dataplane_unit_in_the_docs_passes_systemd_s_checks(tmp_path: Path) -> None:
    """docs/dataplane.md's `tunnelmesh-dataplane@.service`, as a user would install it (the executable put
    where this machine has it): systemd's parser accepts every line."""
    text = (ROOT / "docs" / "dataplane.md").read_text()
    block = re.search(r"```ini\n(\[Unit\]\nDescription=TunnelMesh data plane %i\n.*?)```", text, re.S)
    assert block is not None, "the unit is gone from docs/dataplane.md"
    assert "Type=notify\n" in block.group(1) and "ExecReload=" in block.group(1)
    unit = tmp_path / "tunnelmesh-dataplane@tm0.service"
    unit.write_text(block.group(1).replace("/usr/local/bin/tunnelmesh", shlex.join(tunnelmesh_argv())))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
