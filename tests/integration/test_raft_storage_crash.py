"""``SqliteStorage`` survives ``kill -9`` at any moment: whatever ``save`` acknowledged is there afterwards.

A child process appends batches (occasionally overwriting its uncommitted tail with a higher term, taking a
snapshot and compacting) and prints each acknowledged ``last_index term`` once ``save`` has returned. The
parent SIGKILLs it at a random moment, reopens the data dir with every row verified and checks: every
acknowledged index is present (or covered by the snapshot) with the data it was written with, the log is one
contiguous run of non-decreasing terms, nothing needed truncating. The same data dir goes through every crash,
as a real coordinator's would.

A process crash keeps the page cache, so this proves atomicity and write ordering, not the fsyncs themselves;
power-loss durability rests on ``synchronous=FULL`` (see ``storage.py``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from tunnelmesh.coord.raft.storage import SqliteStorage

ITERATIONS = 8

CHILD = textwrap.dedent(
    """
    import random, sys
    from tunnelmesh.coord.raft.messages import Entry, HardState
    from tunnelmesh.coord.raft.storage import SqliteStorage

    def payload(i, t):
        return f"{i}:{t}:".encode() * (1 + i % 7)

    data_dir, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    s = SqliteStorage.open(data_dir, create=True, cluster_id="crash", member_id=1)
    if s.snapshot().is_empty():
        s.bootstrap([1])
    hs = s.hard_state
    term, last = max(hs.term, s.term(s.last_index())), s.last_index()
    commit = hs.commit
    batches = 0
    while True:
        start = last + 1
        if rng.random() < 0.1 and last - commit > 2:
            term += 1  # a new leader overwrites part of the uncommitted tail
            start = rng.randint(commit + 1, last)
        n = rng.randint(1, 40)
        ents = [Entry(i, term, data=payload(i, term)) for i in range(start, start + n)]
        commit = max(commit, start - 1 - rng.randint(0, 3))
        s.save(HardState(term, 1, commit), ents)
        last = start + n - 1
        print(last, term, flush=True)
        batches += 1
        if batches % 15 == 0 and commit > s.snapshot().index:
            s.create_snapshot(commit, None, b"snapshot@%d" % commit)
            s.compact(max(s.first_index() - 1, commit - 5))
    """
)


def _payload(i: int, t: int) -> bytes:
    return f"{i}:{t}:".encode() * (1 + i % 7)


def _run_and_kill(data_dir: Path, seed: int, delay: float) -> list[tuple[int, int]]:
    """Start the writer, SIGKILL it after ``delay`` seconds; return the (last, term) pairs it acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acks: list[tuple[int, int]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.endswith("\n"):  # a line cut by the kill was never fully acknowledged
                last, term = line.split()
                acks.append((int(last), int(term)))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, f"the writer died on its own:\n{err}"
    return acks


def _check(data_dir: Path, acks: list[tuple[int, int]], ack_snapshot_floor: int) -> int:
    with SqliteStorage.open(data_dir, cluster_id="crash", member_id=1, verify_all=True) as s:
        assert s.truncated_from is None, "kill -9 must never leave a damaged row behind"
        first, last = s.first_index(), s.last_index()
        hs = s.hard_state
        assert hs.commit <= last
        body = s.entries(first, last + 1)
        assert [e.index for e in body] == list(range(first, last + 1)), "the log is not contiguous"
        prev = s.term(first - 1)
        for e in body:
            assert e.term >= prev, f"term decreases at {e.index}"
            assert e.data == _payload(e.index, e.term), f"entry {e.index} holds the wrong data"
            prev = e.term
        snap = s.snapshot()
        assert snap.index >= ack_snapshot_floor
        if snap.index > 1:
            assert snap.data == b"snapshot@%d" % snap.index
        assert snap.index <= last or snap.index == first - 1
        if acks:
            ack_last, ack_term = acks[-1]
            # A shorter log is right only if a later save, killed before it printed its ack, overwrote the
            # uncommitted tail with a higher term (as a new leader does); anything else lost an entry.
            overwritten = last < ack_last and s.term(last) > ack_term
            assert last >= ack_last or overwritten, f"acknowledged index {ack_last} lost: log ends at {last}"
            if first <= ack_last <= last:
                assert s.term(ack_last) >= ack_term, f"acknowledged entry {ack_last} rolled back"
            assert hs.term >= ack_term
        return snap.index


def test_every_acknowledged_entry_survives_kill_9(tmp_path: Path) -> None:
    data_dir = tmp_path / "raft"
    rng = random.Random(int(os.environ.get("TUNNELMESH_CRASH_SEED", "1234")))
    snap_floor = 0
    total_acks = 0
    for it in range(ITERATIONS):
        delay = rng.uniform(0.15, 1.0) if it else 0.8  # the first run gets past start-up for sure
        acks = _run_and_kill(data_dir, seed=rng.randrange(1 << 30), delay=delay)
        if it == 0:
            assert acks, "the writer acknowledged nothing; the test proves nothing"
        total_acks += len(acks)
        snap_floor = _check(data_dir, acks, snap_floor)
    assert total_acks > 50
