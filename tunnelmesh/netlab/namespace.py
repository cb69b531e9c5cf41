"""Named network namespaces: create, enter from one thread, find their processes, delete.

Namespaces are the `ip netns` kind: a bind mount at /run/netns/<name>, so `ip -n`, `ip netns exec` and
`nft` work on them too. Entering is per thread (`setns(2)` on the calling thread only): Python 3.11 has no
`os.setns`, so libc's is called through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tunnelmesh.netlab.commands import run_tool
from tunnelmesh.netlab.errors import NetlabError
from tunnelmesh.netlab.procfs import process_start_time

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def create(name: str) -> None:
    """Create an empty namespace with loopback up. Interfaces added later get no IPv6: netlab is IPv4-only,
    and this keeps DAD and router solicitations off the virtual wires. Loopback keeps ::1."""
    run_tool(["ip", "netns", "add", name])
    with entered(name):
        write_sysctl("net.ipv6.conf.default.disable_ipv6", "1")
    run_tool(["ip", "-n", name, "link", "set", "lo", "up"])


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetlabError(f"setns({what}) failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread (only) into namespace `name` for the duration of the block.

    Sockets created inside stay in that namespace after the block ends; threads and subprocesses started
    inside are born in it.
    """
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetlabError(
            f"cannot open network namespace {name!r} at {netns_path(name)}: {exc.strerror}"
        ) from exc
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, name)
            try:
                yield
            finally:
                # If this fails the thread stays in the wrong namespace: better to raise than to go on.
                _setns(home, "back to the original namespace")
        finally:
            os.close(home)
    finally:
        os.close(target)


def write_sysctl(key: str, value: str) -> None:
    """Write a sysctl in the calling thread's network namespace (/proc/sys/net follows the thread)."""
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        path.write_text(value)
    except OSError as exc:
        raise NetlabError(f"cannot set sysctl {key}={value}: {exc.strerror}") from exc


def pids_in(names: Iterable[str]) -> dict[str, list[int]]:
    """Processes (thread-group leaders) whose network namespace is one of `names`, keyed by name.

    Matching is by the namespace inode, the same test `ip netns pids` does, but one /proc scan covers many
    namespaces. The calling process is never listed even if one of its threads sits in a namespace.
    """
    inodes: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(netns_path(name))
        except FileNotFoundError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    found: dict[str, list[int]] = {name: [] for name in inodes.values()}
    if not inodes:
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        owner = inodes.get((st.st_dev, st.st_ino))
        if owner is not None:
            found[owner].append(int(entry.name))
    return found


def kill_all_in(names: Iterable[str], *, timeout: float = 3.0) -> list[int]:
    """SIGKILL every process living in `names` and wait (bounded) until they are dead; returns the pids."""
    names = list(names)
    victims = {pid: process_start_time(pid) for pids in pids_in(names).values() for pid in pids}
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        for pid in victims:
            # Our own children would stay zombies until reaped; others are reaped by their parent or init.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        # A dying process leaves its namespace before it is dead: wait for the processes themselves.
        alive = [pid for pid, started in victims.items() if started and process_start_time(pid) == started]
        if not alive:
            return list(victims)
        if time.monotonic() >= deadline:
            raise NetlabError(f"processes {alive} in {', '.join(names)} survived SIGKILL for {timeout:g}s")
        time.sleep(0.01)


def delete(names: Iterable[str]) -> None:
    """Kill the processes in the namespaces, then remove them. Missing namespaces are skipped."""
    names = [n for n in names if exists(n)]
    if not names:
        return
    errors: list[str] = []
    try:
        kill_all_in(names)
    except NetlabError as exc:  # delete anyway: the namespaces go once the stragglers die
        errors.append(str(exc))
    for name in names:
        done = run_tool(["ip", "netns", "delete", name], check=False)
        if done.returncode != 0 and exists(name):
            errors.append(f"`ip netns delete {name}`: {done.stderr.strip()}")
    if errors:
        raise NetlabError("could not fully remove network namespaces: " + "; ".join(errors))
