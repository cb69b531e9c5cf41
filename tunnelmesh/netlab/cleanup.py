"""Lab ownership records and removal of labs whose owner is gone.

Every lab writes /run/tunnelmesh-netlab/<labid>.json before it creates anything. The record names the
owner process (pid, its start time so a reused pid is not mistaken for the owner, and its pid namespace so
a pid from another container is never judged). Namespaces are found by name (`tm<labid>-*`,
`tm<labid>_*`), so a lab is cleaned completely even if it crashed halfway through building.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelmesh.netlab import namespace
from tunnelmesh.netlab.errors import NetlabError
from tunnelmesh.netlab.procfs import process_start_time

log = logging.getLogger(__name__)

STATE_DIR = Path(os.environ.get("TUNNELMESH_NETLAB_STATE_DIR", "/run/tunnelmesh-netlab"))
# "tm" + 6 hex digits + "-<node>" (a node) or "_sw" (the lab's switch); node names never contain "_".
NETNS_PATTERN = re.compile(r"^tm(?P<lab>[0-9a-f]{6})[-_]")


@dataclass(frozen=True, slots=True)
class LabRecord:
    """What `list_labs` knows about one lab, from its state file and /run/netns."""

    lab_id: str
    owner_pid: int | None
    owner_alive: bool | None  # None: cannot tell (no state file, or owner in another pid namespace)
    created: float | None
    namespaces: tuple[str, ...]
    state_file: Path | None
    log_dir: Path | None


def _own_pid_namespace() -> str:
    return os.readlink("/proc/self/ns/pid")


def state_path(lab_id: str) -> Path:
    return STATE_DIR / f"{lab_id}.json"


def reserve_lab(log_dir: Path | None, owns_log_dir: bool) -> str:
    """Pick an unused lab id and record this process as its owner (created exclusively: ids never clash)."""
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    pid = os.getpid()
    record = {
        "lab_id": "",
        "owner_pid": pid,
        "owner_start_time": process_start_time(pid),
        "owner_pidns": _own_pid_namespace(),
        "created": time.time(),
        "log_dir": str(log_dir) if log_dir else None,
        "owns_log_dir": owns_log_dir,
    }
    taken = {m.group("lab") for m in map(NETNS_PATTERN.match, _netns_names()) if m}
    for _ in range(100):
        lab_id = secrets.token_hex(3)
        if lab_id in taken:
            continue
        record["lab_id"] = lab_id
        try:
            fd = os.open(state_path(lab_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return lab_id
    raise NetlabError(f"could not find a free lab id in {STATE_DIR} after 100 tries")


def release_lab(lab_id: str) -> None:
    """Forget a lab whose namespaces are gone."""
    with contextlib.suppress(FileNotFoundError):
        state_path(lab_id).unlink()


def _netns_names() -> list[str]:
    try:
        return sorted(os.listdir(namespace.NETNS_DIR))
    except FileNotFoundError:
        return []


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _owner_alive(record: dict[str, Any]) -> bool | None:
    pid = record.get("owner_pid")
    if not isinstance(pid, int):
        return None
    if record.get("owner_pidns") != _own_pid_namespace():
        return None  # that pid means another process here: never judge it
    started = process_start_time(pid)
    return started is not None and started == record.get("owner_start_time")


def lab_namespaces(lab_id: str) -> list[str]:
    return [n for n in _netns_names() if (m := NETNS_PATTERN.match(n)) and m.group("lab") == lab_id]


def list_labs() -> list[LabRecord]:
    """Every netlab lab on this machine: those with a state file and those that only left namespaces."""
    by_lab: dict[str, list[str]] = {}
    for name in _netns_names():
        if m := NETNS_PATTERN.match(name):
            by_lab.setdefault(m.group("lab"), []).append(name)
    state_files = {p.stem: p for p in STATE_DIR.glob("*.json")} if STATE_DIR.is_dir() else {}
    records = []
    for lab_id in sorted(set(by_lab) | set(state_files)):
        path = state_files.get(lab_id)
        data = _read_state(path) if path else None
        data = data or {}
        log_dir, owner_pid, created = data.get("log_dir"), data.get("owner_pid"), data.get("created")
        records.append(
            LabRecord(
                lab_id=lab_id,
                owner_pid=owner_pid if isinstance(owner_pid, int) else None,
                owner_alive=_owner_alive(data) if data else None,
                created=float(created) if isinstance(created, int | float) else None,
                namespaces=tuple(by_lab.get(lab_id, ())),
                state_file=path,
                log_dir=Path(log_dir) if isinstance(log_dir, str) else None,
            )
        )
    return records


def destroy_lab(lab_id: str) -> None:
    """Remove a lab's namespaces (killing their processes), its temporary log directory and state file."""
    namespace.delete(lab_namespaces(lab_id))
    data = _read_state(state_path(lab_id))
    if data and data.get("owns_log_dir") and data.get("log_dir"):
        shutil.rmtree(data["log_dir"], ignore_errors=True)
    release_lab(lab_id)


def clean_leftovers(all: bool = False) -> list[str]:
    """Remove labs whose owner process has died; with `all=True`, every netlab lab, live or not.

    Labs whose owner cannot be judged (no state file, or an owner in another pid namespace) are left alone
    unless `all` is set. Returns the ids of the labs removed.
    """
    removed: list[str] = []
    failures: list[str] = []
    for record in list_labs():
        if record.owner_alive is not False and not all:
            continue
        if record.owner_pid == os.getpid() and record.owner_alive:
            # all=True from inside a lab owner would pull the floor from under it; its own close() does this.
            continue
        try:
            destroy_lab(record.lab_id)
        except NetlabError as exc:
            failures.append(str(exc))
            continue
        log.info(
            "event=netlab_leftover_removed lab=%s owner_pid=%s namespaces=%d",
            record.lab_id,
            record.owner_pid,
            len(record.namespaces),
        )
        removed.append(record.lab_id)
    if failures:
        raise NetlabError("clean-up incomplete: " + "; ".join(failures))
    return removed
