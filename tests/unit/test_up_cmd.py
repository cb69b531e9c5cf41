"""The pieces of `tunnelmesh up`/`down` that need no network: daemons with pid files (real processes),
settings precedence, systemd units."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunnelmesh.cli.up_cmd import (
    Layout,
    Settings,
    UpError,
    resolve_settings,
    running_pid,
    service_units,
    spawn_daemon,
    stop_daemon,
)
from tunnelmesh.netlab.procfs import process_start_time


def test_a_daemon_outlives_nothing_it_should_not_and_down_escalates_to_sigkill(tmp_path: Path) -> None:
    pid_file, log_file = tmp_path / "run" / "x.pid", tmp_path / "run" / "x.log"
    # A daemon that ignores SIGTERM, and a child of it (the whole session must go).
    script = "trap '' TERM; sleep 300 & echo child=$!; wait"
    pid = spawn_daemon(["sh", "-c", script], pid_file=pid_file, log_file=log_file)
    assert running_pid(pid_file) == pid
    assert os.getsid(pid) == pid  # its own session: the terminal closing does not take it down
    deadline = time.monotonic() + 20
    while not (m := re.search(r"^child=(\d+)$", log_file.read_text(), re.M)):
        assert time.monotonic() < deadline, log_file.read_text()
        time.sleep(0.05)
    child = int(m.group(1))
    stopped = stop_daemon(pid_file, timeout=0.5)
    assert stopped == pid
    assert process_start_time(pid) is None and not pid_file.exists()
    deadline = time.monotonic() + 10  # SIGKILL went to the process group; delivery takes a moment
    while process_start_time(child) is not None:
        assert time.monotonic() < deadline, f"the daemon's child {child} survived"
        time.sleep(0.05)
    assert stop_daemon(pid_file, timeout=0.5) is None  # idempotent


def test_a_pid_file_naming_a_reused_pid_is_not_our_daemon(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = process_start_time(other.pid)
        assert start is not None
        pid_file.write_text(f"{other.pid} {start + 1}\n")  # same pid, another start time: another process
        assert running_pid(pid_file) is None
        assert stop_daemon(pid_file, timeout=0.5) is None
        assert other.poll() is None  # untouched
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


@pytest.mark.parametrize("content", ["", "garbage", "12", "12 x"])
def test_a_malformed_pid_file_means_not_running(tmp_path: Path, content: str) -> None:
    (tmp_path / "x.pid").write_text(content)
    assert running_pid(tmp_path / "x.pid") is None


def test_flags_win_over_the_first_runs_settings_which_win_over_defaults(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "up.json").write_text(
        '{"listen": "0.0.0.0:9443", "advertise": "a.example", "interface": "tmx"}'
    )
    s = resolve_settings(layout, None, None, None)
    assert s == Settings("0.0.0.0:9443", "a.example", "tmx")
    assert s.api_address == "a.example:9443"
    assert resolve_settings(layout, "10.1.2.3:7443", None, "tmy") == Settings(
        "10.1.2.3:7443", "a.example", "tmy"
    )


def test_a_coordinator_bound_to_one_address_is_advertised_at_it(tmp_path: Path) -> None:
    s = resolve_settings(Layout(tmp_path), "10.9.8.7:8443", None, None)
    assert s.advertise == "10.9.8.7" and s.interface == "tunnelmesh0"
    assert Settings("[::]:8443", "fd00::1", "t").api_address == "[fd00::1]:8443"


@pytest.mark.parametrize("listen", ["8443", "host:", "host:port"])
def test_a_bad_listen_address_is_refused_with_the_expected_form(tmp_path: Path, listen: str) -> None:
    with pytest.raises(UpError, match=re.escape("expected host:port, e.g. 0.0.0.0:8443")):
        resolve_settings(Layout(tmp_path), listen, "x", None)


def test_units_bootstrap_only_a_fresh_data_dir_and_hold_no_secret(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    s = Settings("0.0.0.0:8443", "192.0.2.1", "tm0")
    units = service_units(layout, s)
    assert "--bootstrap" in units["tunnelmesh-coord.service"]
    # Started with the coordinator, not after it is ready: the data plane must not wait for a quorum.
    assert "Wants=tunnelmesh-coord.service" in units["tunnelmesh-node.service"]
    assert "After=network-online.target\n" in units["tunnelmesh-node.service"]
    (layout.coord_dir / "raft").mkdir(parents=True)
    assert "--bootstrap" not in service_units(layout, s)["tunnelmesh-coord.service"]
    assert all("--token" not in u for u in units.values())
