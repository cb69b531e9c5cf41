"""A coordinator whose disk fills up, with real processes and a really full filesystem (a small tmpfs holds
the leader's data dir): it stops with one clear error and no traceback, the other two elect a leader and
carry on, no write fails and no acknowledged write is lost. Started again while the disk is still full, it
refuses with the same advice; once space is freed it starts, rejoins and catches up. Needs root (namespaces,
mount).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.coordlab import CoordLab, coord_argv
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab and mount need root"),
    pytest.mark.timeout(180),
]

DISK_SIZE = "16m"
ADVICE = "Free space on the disk (or repair it), then start it again"


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem says ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """An empty 16 MiB tmpfs where c1's data dir goes."""
    path = tmp_path / "c1"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def test_the_leader_s_disk_fills_up_under_write_load(tmp_path: Path, disk: Path) -> None:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        try:
            _scenario(cl, disk, tmp_path)
        finally:
            for c in cl.coords:  # before the tmpfs goes
                c.stop()


def _scenario(cl: CoordLab, disk: Path, tmp_path: Path) -> None:
    c1, c2, c3 = cl.start_cluster(3)
    assert c1.data_dir == disk
    lead = cl.leader()
    if lead is not c1:
        argv = coord_argv("cluster", "transfer-leader", c1.member_id, "-c", lead.api)
        cl.client.run(argv, timeout=60, env=cl.client_env())
        cl.wait_for(lambda s: s["leader"] == c1.member_id, timeout=15, what="c1 leading")
    out = tmp_path / "writer.json"
    writer = cl.spawn_writer(cl.coords, seconds=6.0, out=out)
    writer.wait_for_log("first write acknowledged", timeout=20)
    time.sleep(1.0)
    _fill(disk / "filler")
    filled_at = time.time()

    assert c1.proc is not None and c1.proc.wait(20) == 1
    log = c1.log()
    assert "event=coordinator_stopped reason=storage_failed" in log, log[-3000:]
    assert "database or disk is full. This coordinator stopped (its Raft store takes no more writes)" in log
    assert ADVICE in log and "Traceback" not in log, log[-3000:]
    st = cl.wait_for(
        lambda s: s["leader"] not in ("", c1.member_id), timeout=10, what="a new leader", via=[c2, c3]
    )
    new = cl.by_member(st["leader"])

    writer.wait(40)
    res = json.loads(out.read_text())
    acks = [k for k, _ in res["acks"]]
    # A write in flight on c1 when it stopped was answered UNAVAILABLE and retried on c2 or c3.
    assert res["failed"] == [], f"writes failed when the leader's disk filled: {res['failed']}"
    after = [k for k, t in res["acks"] if t > filled_at + 1.0]
    assert len(after) > 20, f"writes did not carry on without c1: {len(after)} acks after it stopped"
    assert cl.missing(new, acks) == [], "acknowledged writes were lost"

    # Started again on the still-full disk: refused at once, saying why and what to do.
    c1.start()
    assert c1.proc.wait(30) == 1
    log = c1.log()
    assert "No space left on device; free space on the disk (or repair it)" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    # Space freed: it starts on its data dir, rejoins as a voter and has every acknowledged write.
    (disk / "filler").unlink()
    c1.start()
    c1.wait_serving()
    cl.wait_for(lambda s: s["leader"] and len(s["voters"]) == 3, timeout=20, what="3 voters again")
    assert cl.missing(c1, acks) == []
    assert "error" not in cl.ops(c1, [["put", "after-disk-full", "ok"]])[0]
