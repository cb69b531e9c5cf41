"""A coordinator's readiness under systemd, the branch the real test (tests/integration/test_coord_cluster.py,
caught up once a quorum is back) cannot wait for: not caught up within the wait, it reports started anyway and
says why. Stand-ins for the driver and the read barrier; the manager's socket is real."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from tunnelmesh.coord.raft.messages import ConfState
from tunnelmesh.coord.server import notify_ready
from tunnelmesh.coord.service import RequestFailed

MEMBER = 0x6CC7853D3010BF5A


class _Driver:
    member_id, cluster_id = MEMBER, "c0ffee"

    def __init__(self, conf_state: ConfState) -> None:
        self.conf_state = conf_state
        self.applied_changed = asyncio.Event()


class _Coord:
    def __init__(self, answer: int | None) -> None:
        self.answer = answer

    async def read_barrier(self, timeout: float) -> int:  # noqa: ASYNC109 - the real one's signature
        if self.answer is None:  # no quorum: the barrier gives up at its deadline
            await asyncio.sleep(timeout)
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "read not confirmed (no leader)")
        return self.answer


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    with sock:
        yield sock


def status(sock: socket.socket) -> str:
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
    assert fields["READY"] == "1"
    return fields["STATUS"]


async def test_caught_up_reports_the_index(manager: socket.socket) -> None:
    driver, coord = _Driver(ConfState(voters=(MEMBER,))), _Coord(answer=42)
    await notify_ready(cast(Any, driver), cast(Any, coord), "10.0.0.1:8443", wait=1.0)
    assert status(manager) == (
        "coordinator 6cc7853d3010bf5a of cluster c0ffee serving on 10.0.0.1:8443; caught up to index 42"
    )


@pytest.mark.parametrize("member", [True, False], ids=["no-quorum", "join-not-committed"])
async def test_not_caught_up_in_time_reports_started_anyway_and_why(
    manager: socket.socket, caplog: pytest.LogCaptureFixture, member: bool
) -> None:
    driver = _Driver(ConfState(voters=(MEMBER,) if member else (1, 2, 3)))
    with caplog.at_level(logging.INFO, logger="tunnelmesh.coord.server"):
        await asyncio.wait_for(
            notify_ready(cast(Any, driver), cast(Any, _Coord(answer=None)), "10.0.0.1:8443", wait=0.2), 5
        )
    assert status(manager).endswith(
        "serving on 10.0.0.1:8443; not caught up within 0.2 s (no quorum, or no answer from the leader): "
        "stale reads only until it is"
    )
    assert "event=coordinator_ready caught_up=false" in caplog.text
