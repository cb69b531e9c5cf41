"""The service-manager notification protocol (sd_notify(3)), against a real datagram socket as systemd binds
it: a path, or a name in the abstract namespace (``@``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunnelmesh import sdnotify


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A listening socket in place of systemd's, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with sock:
        yield sock


def fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_and_stopping_reach_the_manager(manager: socket.socket) -> None:
    assert sdnotify.ready("interface tm0 up, 2 peer(s)")
    assert fields(manager) == {"READY": "1", "STATUS": "interface tm0 up, 2 peer(s)"}
    assert sdnotify.stopping("taking tm0 down\nnow")  # a newline would start a new assignment
    assert fields(manager) == {"STOPPING": "1", "STATUS": "taking tm0 down now"}


def test_reloading_carries_the_monotonic_time_notify_reload_needs(manager: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading("reloading tm0.conf")
    got = fields(manager)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert got["RELOADING"] == "1" and got["STATUS"] == "reloading tm0.conf"
    assert before <= int(got["MONOTONIC_USEC"]) <= after


def test_an_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tunnelmesh-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_without_a_manager_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready("up")


@pytest.mark.parametrize("value", ["{tmp}/nobody-listens", "relative/path"])
def test_a_manager_that_cannot_be_reached_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value.format(tmp=tmp_path))
    with caplog.at_level(logging.WARNING, logger="tunnelmesh.sdnotify"):
        assert not sdnotify.ready("up")
    assert "event=sd_notify_failed" in caplog.text


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),  # half of WatchdogSec=30
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_the_unit_s_timeout(env: dict[str, str], interval: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == interval


async def test_the_watchdog_stops_pinging_while_its_loop_is_stuck(manager: socket.socket) -> None:
    manager.setblocking(False)

    def pings() -> int:
        n = 0
        while True:
            try:
                assert manager.recv(64) == b"WATCHDOG=1"
            except BlockingIOError:
                return n
            n += 1

    task = asyncio.create_task(sdnotify.watchdog(0.05))
    await asyncio.sleep(0.3)
    assert pings() >= 3
    time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop is stuck, nothing runs its tasks
    assert pings() == 0
    await asyncio.sleep(0.15)
    assert pings() >= 1
    task.cancel()
