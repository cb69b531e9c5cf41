"""A coordinator that cannot listen where it is told (a port in use, an address not on this machine) stops
with one line naming the address, the setting and the OS's reason, exit status 1, and no traceback: real
`tunnelmesh coord` processes on loopback."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.coordlab import coord_argv
from tunnelmesh.hostaddr import bind_problem

FLAGS = ("--listen", "--raft-listen", "--http-listen", "--relay-listen")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def taken() -> Iterator[str]:
    """127.0.0.1:PORT held by a TCP listener and a UDP socket at once (the relay listens on UDP)."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    with tcp, udp:
        yield f"127.0.0.1:{port}"


def _start(tmp_path: Path, flag: str, address: str) -> subprocess.CompletedProcess[str]:
    addresses = {f: f"127.0.0.1:{_free_port()}" for f in FLAGS} | {flag: address}
    argv = [*coord_argv("coord", "--data-dir", str(tmp_path / "c"), "--bootstrap")]
    argv += [x for pair in addresses.items() for x in pair]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("flag", "setting"),
    [
        ("--listen", "the public API: --listen, coord.listen"),
        ("--raft-listen", "the Raft port: --raft-listen, coord.peer_listen"),
        ("--http-listen", "metrics, health: --http-listen, coord.http_listen"),
        ("--relay-listen", "the UDP relay: --relay-listen, coord.relay_listen"),
    ],
)
def test_a_port_in_use_is_one_clear_error(tmp_path: Path, taken: str, flag: str, setting: str) -> None:
    r = _start(tmp_path, flag, taken)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot listen on {taken} ({setting}): ")
    assert "in use" in errors[0].lower(), errors
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]


def test_an_address_not_on_this_machine_is_one_clear_error(tmp_path: Path) -> None:
    address = f"192.0.2.1:{_free_port()}"  # TEST-NET-1: on no interface here
    r = _start(tmp_path, "--listen", address)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        f"error: cannot listen on {address} (the public API: --listen, coord.listen): Cannot assign"
        in r.stderr
    )
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]


def test_bind_problem_asks_the_os(taken: str) -> None:
    port = taken.rpartition(":")[2]
    assert bind_problem(taken) == "Address already in use"
    assert bind_problem(taken, socket.SOCK_DGRAM) == "Address already in use"
    assert bind_problem(f"127.0.0.1:{_free_port()}") == ""
    assert bind_problem(f"192.0.2.1:{port}") == "Cannot assign requested address"
    assert bind_problem(f"[::1]:{_free_port()}") in ("", "Cannot assign requested address")  # no IPv6 lo: ok
    assert bind_problem("host.invalid:80") != ""
