"""The storage contract (``storage_api``), checked against ``MemoryStorage`` and ``SqliteStorage`` alike,
then what only the durable store promises: reopen, one transaction per ``Ready``, damaged rows, identity and
locking.

Contract cases follow etcd's ``storage_test.go``; each test names the rule of ``storage_api`` it checks. Most
use the log "dummy at (3, 3), entries 4 and 5 (terms 4 and 5)", built through the public API.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tunnelmesh.coord.raft import storage as storage_mod
from tunnelmesh.coord.raft.core import Config
from tunnelmesh.coord.raft.errors import CompactedError, RaftError, SnapOutOfDateError, UnavailableError
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
    entry_size,
)
from tunnelmesh.coord.raft.rawnode import RawNode
from tunnelmesh.coord.raft.storage import (
    DataDirError,
    SqliteStorage,
    StorageCorruptError,
    StorageIOError,
    entry_crc,
)
from tunnelmesh.coord.raft.storage_api import LogStore

CS = ConfState(voters=(1, 2, 3))


def ent(index: int, term: int, data: bytes | None = None) -> Entry:
    return Entry(index, term, EntryType.NORMAL, data if data is not None else f"e{index}t{term}".encode())


def ents(*pairs: tuple[int, int]) -> list[Entry]:
    return [ent(i, t) for i, t in pairs]


def stored(s: LogStore) -> list[tuple[int, int]]:
    """The log as (index, term) pairs, dummy first, read through the public API."""
    first, last = s.first_index(), s.last_index()
    body = s.entries(first, last + 1) if last >= first else []
    return [(first - 1, s.term(first - 1)), *((e.index, e.term) for e in body)]


# -- the contract, for both implementations ------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], LogStore]]:
    opened: list[SqliteStorage] = []

    def make() -> LogStore:
        if request.param == "memory":
            return MemoryStorage()
        s = SqliteStorage.open(tmp_path / f"store{len(opened)}", create=True)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(new_store: Callable[[], LogStore]) -> LogStore:
    """dummy (3, 3); entries (4, 4), (5, 5)."""
    s = new_store()
    s.apply_snapshot(Snapshot(SnapshotMetadata(3, 3, CS)))
    s.append(ents((4, 4), (5, 5)))
    return s


def test_fresh_store_is_empty(new_store: Callable[[], LogStore]) -> None:
    """A fresh log: dummy at index 0 term 0, first index 1, last index 0, no snapshot, zero hard state."""
    s = new_store()
    assert (s.first_index(), s.last_index(), s.term(0)) == (1, 0, 0)
    assert s.initial_state() == (HardState(), ConfState())
    assert s.snapshot().is_empty()
    with pytest.raises(UnavailableError):
        s.term(1)
    assert s.entries(1, 1) == []


@pytest.mark.parametrize(
    ("i", "want"),
    [(2, CompactedError), (3, 3), (4, 4), (5, 5), (6, UnavailableError)],
)
def test_term(store: LogStore, i: int, want: int | type[Exception]) -> None:
    """term(i): CompactedError below the dummy, the snapshot's term at it, UnavailableError past the last."""
    if isinstance(want, int):
        assert store.term(i) == want
    else:
        with pytest.raises(want):
            store.term(i)


_S4, _S5, _S6 = (entry_size(ent(i, i)) for i in (4, 5, 6))


@pytest.mark.parametrize(
    ("lo", "hi", "max_size", "want"),
    [
        (2, 6, None, CompactedError),  # lo precedes the first index
        (3, 4, None, CompactedError),  # lo is the dummy itself
        (4, 5, None, [4]),
        (4, 6, None, [4, 5]),
        (4, 7, None, [4, 5, 6]),
        (4, 7, 0, [4]),  # always at least one entry
        (4, 7, _S4 + _S5, [4, 5]),
        (4, 7, _S4 + _S5 + _S6 // 2, [4, 5]),
        (4, 7, _S4 + _S5 + _S6 - 1, [4, 5]),
        (4, 7, _S4 + _S5 + _S6, [4, 5, 6]),
        (5, 5, None, []),
        (4, 8, None, UnavailableError),  # hi past last_index() + 1
    ],
)
def test_entries(
    store: LogStore, lo: int, hi: int, max_size: int | None, want: list[int] | type[Exception]
) -> None:
    """entries(lo, hi, max_size) returns [lo, hi) within max_size bytes but at least one entry."""
    store.append([ent(6, 6)])
    if isinstance(want, list):
        got = store.entries(lo, hi, max_size)
        assert got == [ent(i, i) for i in want]
    else:
        with pytest.raises(want):
            store.entries(lo, hi, max_size)


def test_first_and_last_index(store: LogStore) -> None:
    """first_index() is the dummy + 1, last_index() the last entry, through appends and compaction."""
    assert (store.first_index(), store.last_index()) == (4, 5)
    store.append([ent(6, 5)])
    assert (store.first_index(), store.last_index()) == (4, 6)
    store.compact(4)
    assert (store.first_index(), store.last_index()) == (5, 6)


@pytest.mark.parametrize(
    ("i", "want"),
    [(2, CompactedError), (3, CompactedError), (4, [(4, 4), (5, 5)]), (5, [(5, 5)]), (6, RaftError)],
)
def test_compact(store: LogStore, i: int, want: list[tuple[int, int]] | type[Exception]) -> None:
    """compact(i) makes i the new dummy; CompactedError at or below the current dummy, an error past the
    last index."""
    if isinstance(want, list):
        store.compact(i)
        assert stored(store) == want
        with pytest.raises(CompactedError):
            store.term(i - 1)
        with pytest.raises(CompactedError):
            store.entries(i, i + 1)
    else:
        with pytest.raises(want):
            store.compact(i)
        assert stored(store) == [(3, 3), (4, 4), (5, 5)]


@pytest.mark.parametrize(
    ("i", "want"),
    [(4, (4, 4)), (5, (5, 5)), (3, SnapOutOfDateError), (6, RaftError)],
)
def test_create_snapshot(store: LogStore, i: int, want: tuple[int, int] | type[Exception]) -> None:
    """create_snapshot(i) takes i's term and keeps the log; not newer than the stored snapshot or past the
    last index: error."""
    conf = ConfState(voters=(1, 2), learners=(3,))
    if isinstance(want, tuple):
        snap = store.create_snapshot(i, conf, b"state")
        assert snap == Snapshot(SnapshotMetadata(*want, conf), b"state")
        assert store.snapshot() == snap
        assert stored(store) == [(3, 3), (4, 4), (5, 5)]
        assert store.initial_state()[1] == conf
    else:
        with pytest.raises(want):
            store.create_snapshot(i, conf, b"state")


def test_create_snapshot_of_a_compacted_index_is_refused(store: LogStore) -> None:
    """Compacted past the stored snapshot: an index in between has lost its term and cannot be snapshotted."""
    store.compact(5)
    with pytest.raises(CompactedError):
        store.create_snapshot(4, None, b"state")


def test_create_snapshot_without_conf_state_keeps_the_previous_one(store: LogStore) -> None:
    store.create_snapshot(4, None, b"a")
    assert store.snapshot().metadata.conf_state == CS
    with pytest.raises(SnapOutOfDateError):
        store.create_snapshot(4, None, b"b")
    store.create_snapshot(5, None, b"b")
    store.compact(5)
    assert store.snapshot() == Snapshot(SnapshotMetadata(5, 5, CS), b"b")
    assert stored(store) == [(5, 5)]


@pytest.mark.parametrize(
    ("appended", "want"),
    [
        (ents((4, 4), (5, 5)), [(3, 3), (4, 4), (5, 5)]),  # already there
        (ents((3, 3), (4, 6), (5, 6)), [(3, 3), (4, 6), (5, 6)]),  # overwrite from 4
        (ents((3, 3), (4, 4), (5, 5), (6, 5)), [(3, 3), (4, 4), (5, 5), (6, 5)]),
        (ents((2, 3), (3, 3), (4, 5)), [(3, 3), (4, 5)]),  # the compacted prefix is ignored
        (ents((1, 1), (2, 2)), [(3, 3), (4, 4), (5, 5)]),  # entirely compacted: nothing happens
        (ents((4, 5)), [(3, 3), (4, 5)]),  # truncating overwrite
        (ents((6, 5)), [(3, 3), (4, 4), (5, 5), (6, 5)]),  # plain append
    ],
)
def test_append(store: LogStore, appended: list[Entry], want: list[tuple[int, int]]) -> None:
    """append truncates any existing suffix that the new entries overwrite."""
    store.append(appended)
    assert stored(store) == want
    body = store.entries(store.first_index(), store.last_index() + 1)
    assert [e.data for e in body] == [f"e{i}t{t}".encode() for i, t in want[1:]]


def test_append_with_a_gap_is_refused(store: LogStore) -> None:
    with pytest.raises(RaftError, match="missing log entry"):
        store.append([ent(7, 5)])
    assert stored(store) == [(3, 3), (4, 4), (5, 5)]


def test_apply_snapshot(store: LogStore) -> None:
    """apply_snapshot replaces the whole log with the snapshot's dummy; an older snapshot is refused."""
    snap = Snapshot(SnapshotMetadata(7, 6, ConfState(voters=(1, 4))), b"remote")
    store.apply_snapshot(snap)
    assert store.snapshot() == snap
    assert stored(store) == [(7, 6)]
    assert store.initial_state()[1] == ConfState(voters=(1, 4))
    with pytest.raises(CompactedError):
        store.entries(7, 8)
    with pytest.raises(SnapOutOfDateError):
        store.apply_snapshot(Snapshot(SnapshotMetadata(7, 6)))
    with pytest.raises(SnapOutOfDateError):
        store.apply_snapshot(Snapshot(SnapshotMetadata(5, 5)))
    store.append([ent(8, 6)])
    assert stored(store) == [(7, 6), (8, 6)]


def test_hard_state(store: LogStore) -> None:
    hs = HardState(term=9, vote=2**64 - 1, commit=5)  # node ids may use all 64 bits
    store.set_hard_state(hs)
    assert store.initial_state() == (hs, CS)


def test_random_operations_match_memory_storage(tmp_path: Path) -> None:
    """Differential check: a random mix of writes leaves both stores answering every read identically,
    and the durable one still does after a reopen."""
    rng = random.Random(7)
    mem = MemoryStorage()
    sql = SqliteStorage.open(tmp_path / "d", create=True)
    term, snap_at = 1, 0

    def both(op: str, *args: Any) -> None:
        results: list[type[RaftError] | None] = []
        for s in (mem, sql):
            try:
                getattr(s, op)(*args)
                results.append(None)
            except RaftError as exc:
                results.append(type(exc))
        assert results[0] == results[1], (op, args, results)

    for _ in range(150):
        last = mem.last_index()
        r = rng.random()
        if r < 0.55:
            start = rng.randint(max(1, last - 4), last + 1)
            term += rng.random() < 0.3
            both("append", [ent(i, term) for i in range(start, start + rng.randint(1, 6))])
        elif r < 0.7 and last > snap_at:
            snap_at = rng.randint(snap_at + 1, last)
            both("create_snapshot", snap_at, None, rng.randbytes(20))
        elif r < 0.85:
            both("compact", rng.randint(mem.first_index() - 1, min(last, snap_at) + 1))
        elif r < 0.9:
            term += 1
            snap_at = last + rng.randint(1, 3)
            both("apply_snapshot", Snapshot(SnapshotMetadata(snap_at, term, CS), b"s"))
        else:
            both("set_hard_state", HardState(term, rng.randint(0, 3), min(last, rng.randint(0, last + 1))))
        assert stored(sql) == stored(mem)
        assert sql.snapshot() == mem.snapshot()
        assert sql.initial_state() == mem.initial_state()
    body = mem.entries(mem.first_index(), mem.last_index() + 1)
    sql.close()
    with SqliteStorage.open(tmp_path / "d") as again:
        assert stored(again) == stored(mem)
        assert again.entries(again.first_index(), again.last_index() + 1) == body
        assert again.snapshot() == mem.snapshot()
        assert again.initial_state() == mem.initial_state()


# -- the durable store ---------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "raft"


def _fill(d: Path, last: int, commit: int, **kw: Any) -> None:
    """A closed store in ``d``: bootstrap snapshot at 1, entries 2..last of term 2, hard state committed at
    ``commit``."""
    with SqliteStorage.open(d, create=True, **kw) as s:
        s.bootstrap([1, 2, 3])
        s.save(HardState(2, 1, commit), [ent(i, 2) for i in range(2, last + 1)])


def _sql(d: Path, statement: str, *params: Any) -> None:
    """Edit the database behind the store's back, as a damaged disk would."""
    conn = sqlite3.connect(d / storage_mod.DB_NAME)
    with conn:
        conn.execute(statement, params)
    conn.close()


def test_reopen_sees_everything(data_dir: Path) -> None:
    with SqliteStorage.open(data_dir, create=True, cluster_id="mesh-a", member_id=7) as s:
        s.bootstrap([7, 8, 9])
        s.save(HardState(3, 8, 6), [ent(i, 2 if i < 5 else 3) for i in range(2, 11)])
        s.create_snapshot(6, None, b"app state at 6")
        s.compact(4)
        ident = s.identity
    with SqliteStorage.open(data_dir, cluster_id="mesh-a", member_id=7) as s:
        assert s.identity == ident
        assert s.initial_state() == (HardState(3, 8, 6), ConfState(voters=(7, 8, 9)))
        assert stored(s) == [(4, 2), *((i, 3) for i in range(5, 11))]
        assert s.entries(5, 11) == [ent(i, 3) for i in range(5, 11)]
        assert s.snapshot() == Snapshot(
            SnapshotMetadata(6, 3, ConfState(voters=(7, 8, 9))), b"app state at 6"
        )
        assert s.truncated_from is None
        snap_files = sorted(p.name for p in data_dir.glob("snapshot-*"))
        assert snap_files == [storage_mod._snapshot_file_name(6, 3)]


def test_save_persists_snapshot_entries_and_hard_state_in_one_transaction(data_dir: Path) -> None:
    with SqliteStorage.open(data_dir, create=True) as s:
        snap = Snapshot(SnapshotMetadata(10, 4, CS), b"from leader")
        s.save(HardState(4, 2, 10), ents((9, 4), (10, 4), (11, 4), (12, 4)), snap)
        assert stored(s) == [(10, 4), (11, 4), (12, 4)]
        # A bad batch changes nothing, not even the hard state of the same call.
        with pytest.raises(RaftError, match="not contiguous"):
            s.save(HardState(5, 0, 12), ents((13, 5), (15, 5)))
        with pytest.raises(RaftError, match="below the preceding term"):
            s.save(HardState(5, 0, 12), ents((13, 3)))
        assert s.initial_state()[0] == HardState(4, 2, 10)
    with SqliteStorage.open(data_dir) as s:
        assert s.initial_state() == (HardState(4, 2, 10), CS)
        assert stored(s) == [(10, 4), (11, 4), (12, 4)]
        assert s.snapshot() == snap


def test_unsynced_save_is_still_stored(data_dir: Path) -> None:
    """``sync=False`` (a Ready without must_sync) skips the fsync, not the write."""
    with SqliteStorage.open(data_dir, create=True) as s:
        s.save(HardState(1, 0, 0), ents((1, 1), (2, 1)))
        s.save(HardState(1, 0, 2), sync=False)
        assert s._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # back to FULL
    with SqliteStorage.open(data_dir) as s:
        assert s.initial_state()[0] == HardState(1, 0, 2)


def test_database_runs_in_wal_mode_with_full_sync(data_dir: Path) -> None:
    with SqliteStorage.open(data_dir, create=True) as s:
        db = s._db()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_bootstrap_matches_memory_storage(data_dir: Path) -> None:
    with SqliteStorage.open(data_dir, create=True) as s:
        s.bootstrap([3, 1, 2])
        mem = MemoryStorage.bootstrap([3, 1, 2])
        assert s.initial_state() == mem.initial_state()
        assert stored(s) == stored(mem)
        assert s.snapshot() == mem.snapshot()
        with pytest.raises(RaftError, match="already holds Raft state"):
            s.bootstrap([1])


# -- damaged rows --------------------------------------------------------------------------------------------


def test_corrupt_last_row_beyond_commit_is_truncated(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(data_dir, last=10, commit=6)
    _sql(data_dir, "UPDATE entries SET data = X'00' WHERE idx = 10")
    with caplog.at_level(logging.WARNING), SqliteStorage.open(data_dir) as s:
        assert s.truncated_from == 10
        assert s.last_index() == 9
        assert s.entries(2, 10) == [ent(i, 2) for i in range(2, 10)]
    assert "event=raft_log_truncated" in caplog.text
    assert "from_index=10" in caplog.text
    assert "reason=checksum_mismatch" in caplog.text


def test_bad_crc_beyond_commit_truncates_from_the_first_bad_row(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(data_dir, last=10, commit=6)
    _sql(data_dir, "UPDATE entries SET crc = crc + 1 WHERE idx = 8")
    with caplog.at_level(logging.WARNING), SqliteStorage.open(data_dir) as s:
        assert (s.truncated_from, s.last_index()) == (8, 7)
        s.append([ent(8, 3)])  # the leader re-sends; the store works as before
    with SqliteStorage.open(data_dir) as s:
        assert stored(s)[-2:] == [(7, 2), (8, 3)]
        assert s.truncated_from is None
    assert "from_index=8" in caplog.text


def test_missing_row_beyond_commit_is_truncated(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fill(data_dir, last=10, commit=6)
    _sql(data_dir, "DELETE FROM entries WHERE idx = 9")
    with caplog.at_level(logging.WARNING), SqliteStorage.open(data_dir) as s:
        assert (s.truncated_from, s.last_index()) == (9, 8)
    assert "reason=missing" in caplog.text


@pytest.mark.parametrize("index", [6, 4])
def test_corrupt_committed_row_refuses_to_open(data_dir: Path, index: int) -> None:
    _fill(data_dir, last=10, commit=6)
    _sql(data_dir, "UPDATE entries SET data = X'00' WHERE idx = ?", index)
    with pytest.raises(StorageCorruptError) as err:
        SqliteStorage.open(data_dir)
    msg = str(err.value)
    assert str(data_dir / "raft.db") in msg
    assert f"entry {index} fails its checksum" in msg
    assert "commit index 6" in msg


def test_missing_committed_row_refuses_to_open(data_dir: Path) -> None:
    _fill(data_dir, last=10, commit=6)
    _sql(data_dir, "DELETE FROM entries WHERE idx = 5")
    with pytest.raises(StorageCorruptError, match="entry 5 is missing"):
        SqliteStorage.open(data_dir)


def test_deep_committed_damage_is_found_by_verify_all_and_never_read(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the tail is checked on a normal open; ``verify_all`` checks every row, and ``entries`` re-checks
    each row it reads, so damage in the unchecked range is still never applied."""
    monkeypatch.setattr(storage_mod, "TAIL_VERIFY_ROWS", 2)
    _fill(data_dir, last=20, commit=15)
    _sql(data_dir, "UPDATE entries SET data = X'00' WHERE idx = 5")
    with SqliteStorage.open(data_dir) as s:
        assert s.entries(6, 21) == [ent(i, 2) for i in range(6, 21)]
        with pytest.raises(StorageCorruptError, match="entry 5 is missing or fails its checksum"):
            s.entries(2, 10)
    with pytest.raises(StorageCorruptError, match="entry 5 fails its checksum"):
        SqliteStorage.open(data_dir, verify_all=True)


def test_deep_missing_committed_row_refuses_to_open(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_mod, "TAIL_VERIFY_ROWS", 2)
    _fill(data_dir, last=20, commit=15)
    _sql(data_dir, "DELETE FROM entries WHERE idx = 5")
    with pytest.raises(StorageCorruptError, match="entry 5 is missing"):
        SqliteStorage.open(data_dir)


def test_decreasing_terms_refuse_to_open(data_dir: Path) -> None:
    """A row rewritten with a valid checksum but an impossible term is still caught."""
    _fill(data_dir, last=10, commit=10)
    _sql(data_dir, "UPDATE entries SET term = 1, crc = ? WHERE idx = 7", entry_crc(7, 1, 0, ent(7, 2).data))
    with pytest.raises(StorageCorruptError, match="non-decreasing terms"):
        SqliteStorage.open(data_dir)


def test_corrupt_hard_state_refuses_to_open(data_dir: Path) -> None:
    _fill(data_dir, last=5, commit=3)
    _sql(data_dir, "UPDATE hard_state SET vote = 3")
    with pytest.raises(StorageCorruptError, match=r"hard state .* fails its checksum"):
        SqliteStorage.open(data_dir)


def test_commit_past_the_log_refuses_to_open(data_dir: Path) -> None:
    _fill(data_dir, last=5, commit=5)
    _sql(data_dir, "DELETE FROM entries WHERE idx >= 4")
    with pytest.raises(StorageCorruptError, match=r"committed entries 4\.\.5 are missing"):
        SqliteStorage.open(data_dir)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_snapshot_file_refuses_to_open(data_dir: Path, damage: str) -> None:
    with SqliteStorage.open(data_dir, create=True) as s:
        s.bootstrap([1])
        s.append(ents((2, 1), (3, 1)))
        s.create_snapshot(3, None, b"0123456789")
    path = data_dir / storage_mod._snapshot_file_name(3, 1)
    if damage == "flip":
        path.write_bytes(b"0123456780")
    elif damage == "truncate":
        path.write_bytes(b"01234")
    else:
        path.unlink()
    with pytest.raises(StorageCorruptError, match=str(path)):
        SqliteStorage.open(data_dir)


@pytest.mark.parametrize("tear", ["truncate", "flip"])
def test_a_torn_wal_tail_drops_exactly_the_unfinished_ready(
    data_dir: Path, tmp_path: Path, tear: str
) -> None:
    """Power lost in the middle of a commit: SQLite ignores WAL frames after the first bad one, so the last
    Ready disappears as a whole (entries and hard state together) and the store opens on the previous one."""
    with SqliteStorage.open(data_dir, create=True) as s:
        s.bootstrap([1])
        for i in range(2, 7):
            s.save(HardState(2, 1, i - 1), [ent(i, 2)])
        # Snapshot the files as a crash would leave them: the WAL still holds the transactions.
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for f in data_dir.iterdir():
            if f.name != "raft.db-shm":
                (crashed / f.name).write_bytes(f.read_bytes())
    wal = crashed / "raft.db-wal"
    raw = bytearray(wal.read_bytes())
    if tear == "truncate":
        del raw[-1000:]
    else:
        raw[-2000] ^= 0xFF
    wal.write_bytes(bytes(raw))
    with SqliteStorage.open(crashed, verify_all=True) as s:
        assert s.truncated_from is None
        assert stored(s) == [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2)]
        assert s.initial_state()[0] == HardState(2, 1, 4)


def test_reads_are_consistent_while_another_thread_saves(data_dir: Path) -> None:
    """The driver may persist from a worker thread while the core reads on the event loop's thread."""
    errors: list[BaseException] = []
    with SqliteStorage.open(data_dir, create=True) as s:

        def writer() -> None:
            try:
                for b in range(60):
                    s.save(HardState(2, 1, 0), [ent(i, 2) for i in range(b * 5 + 1, b * 5 + 6)], sync=False)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        while t.is_alive():
            last = s.last_index()
            if last:
                got = s.entries(max(1, last - 7), last + 1)
                assert [e.index for e in got] == list(range(max(1, last - 7), last + 1))
                assert s.term(last) == 2
        t.join()
        assert not errors
        assert s.last_index() == 300


def test_orphan_snapshot_files_are_removed_on_open(data_dir: Path) -> None:
    """A crash between writing a snapshot file and committing its row leaves a file nobody references."""
    _fill(data_dir, last=5, commit=5)
    (data_dir / storage_mod._snapshot_file_name(4, 2)).write_bytes(b"never committed")
    (data_dir / (storage_mod._snapshot_file_name(5, 2) + ".tmp")).write_bytes(b"half written")
    with SqliteStorage.open(data_dir) as s:
        assert s.snapshot().index == 1
    assert sorted(p.name for p in data_dir.glob("snapshot-*")) == [storage_mod._snapshot_file_name(1, 1)]


def test_not_a_database_or_not_ours(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "raft.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageCorruptError, match="not a readable SQLite database"):
        SqliteStorage.open(data_dir)
    (data_dir / "raft.db").unlink()
    conn = sqlite3.connect(data_dir / "raft.db")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(DataDirError, match="not a TunnelMesh Raft store"):
        SqliteStorage.open(data_dir)


def test_a_failed_write_poisons_the_store(data_dir: Path) -> None:
    """After a failed commit (fsync error, disk full) nothing is retried on the same handle."""

    class FailingCommit:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self._conn = conn
            self.in_transaction = False

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            cur = self._conn.execute(sql, *args)
            self.in_transaction = self._conn.in_transaction
            return cur

        def executemany(self, sql: str, rows: Any) -> Any:
            return self._conn.executemany(sql, rows)

    s = SqliteStorage.open(data_dir, create=True)
    real = s._conn
    assert real is not None
    s._conn = FailingCommit(real)  # type: ignore[assignment]
    with pytest.raises(StorageIOError, match="disk I/O error"):
        s.save(HardState(1, 1, 0), ents((1, 1)))
    assert (s.last_index(), s.initial_state()[0]) == (0, HardState())
    s._conn = real
    with pytest.raises(StorageIOError, match="accepts no more writes"):
        s.save(HardState(1, 1, 0), ents((1, 1)))
    s.close()


def test_closed_store_refuses_calls(data_dir: Path) -> None:
    s = SqliteStorage.open(data_dir, create=True)
    s.append(ents((1, 1)))
    s.close()
    s.close()  # idempotent
    with pytest.raises(StorageIOError, match="closed"):
        s.entries(1, 2)
    with pytest.raises(StorageIOError, match="closed"):
        s.append(ents((2, 1)))


# -- identity and ownership ----------------------------------------------------------------------------------


def test_missing_data_dir_without_create_is_refused(data_dir: Path) -> None:
    with pytest.raises(DataDirError, match=f"{data_dir} does not exist"):
        SqliteStorage.open(data_dir)
    data_dir.mkdir()
    with pytest.raises(DataDirError, match=r"has no raft\.db"):
        SqliteStorage.open(data_dir)


def test_other_cluster_or_member_is_refused(data_dir: Path) -> None:
    _fill(data_dir, last=3, commit=3, cluster_id="mesh-a", member_id=0xAB)
    with pytest.raises(DataDirError, match="belongs to cluster 'mesh-a', not 'mesh-b'"):
        SqliteStorage.open(data_dir, cluster_id="mesh-b", member_id=0xAB)
    with pytest.raises(DataDirError, match=r"belongs to member ab .* not member ac"):
        SqliteStorage.open(data_dir, cluster_id="mesh-a", member_id=0xAC)
    with SqliteStorage.open(data_dir, cluster_id="mesh-a", member_id=0xAB) as s:
        assert (s.identity.cluster_id, s.identity.member_id) == ("mesh-a", 0xAB)


def test_storage_id_is_new_for_every_incarnation(data_dir: Path, tmp_path: Path) -> None:
    """A wiped data dir is a new incarnation: same cluster and member id, different storage id."""
    with SqliteStorage.open(data_dir, create=True, cluster_id="c", member_id=1) as s:
        first = s.identity.storage_id
    with SqliteStorage.open(data_dir, create=True, cluster_id="c", member_id=1) as s:
        assert s.identity.storage_id == first  # create=True on an existing store just opens it
    data_dir.rename(tmp_path / "wiped")
    with SqliteStorage.open(data_dir, create=True, cluster_id="c", member_id=1) as s:
        assert s.identity.storage_id != first
        assert len(s.identity.storage_id) == 32


def test_identity_assigned_after_creation(data_dir: Path) -> None:
    """A joining member creates its store before it learns its member id."""
    with SqliteStorage.open(data_dir, create=True, cluster_id="c") as s:
        assert s.identity.member_id is None
        s.assign_identity("c", 2**64 - 5)
        s.assign_identity("c", 2**64 - 5)  # idempotent
        with pytest.raises(DataDirError, match="belongs to member"):
            s.assign_identity("c", 9)
    with SqliteStorage.open(data_dir) as s:
        assert (s.identity.cluster_id, s.identity.member_id) == ("c", 2**64 - 5)


def test_a_data_dir_is_used_by_one_process_at_a_time(data_dir: Path) -> None:
    with (
        SqliteStorage.open(data_dir, create=True),
        pytest.raises(DataDirError, match="in use by another process"),
    ):
        SqliteStorage.open(data_dir)
    SqliteStorage.open(data_dir).close()  # the lock goes with the store


def test_raw_node_runs_on_the_durable_store_and_restarts_from_it(data_dir: Path) -> None:
    """The driver's loop: one ``save`` per Ready before anything is sent or applied; after a restart the core
    reloads term, vote and log from the store, re-delivers the committed entries and keeps its vote."""
    applied: list[bytes] = []

    def drive(rn: RawNode, s: SqliteStorage) -> None:
        while rn.has_ready():
            rd = rn.ready()
            s.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)
            applied.extend(e.data for e in rd.committed_entries if e.data)
            rn.advance(rd)

    with SqliteStorage.open(data_dir, create=True, cluster_id="c", member_id=1) as s:
        s.bootstrap([1])
        rn = RawNode(Config(id=1), s, random.Random(1))
        rn.campaign()
        drive(rn, s)
        for k in range(5):
            rn.propose(b"cmd%d" % k)
            drive(rn, s)
        hs = s.hard_state
    assert applied == [b"cmd%d" % k for k in range(5)]
    assert (hs.term, hs.vote, hs.commit) == (2, 1, 7)
    applied.clear()
    with SqliteStorage.open(data_dir, cluster_id="c", member_id=1) as s:
        rn = RawNode(Config(id=1, applied=2), s, random.Random(2))
        assert (rn.raft.term, rn.raft.vote) == (2, 1)
        drive(rn, s)
        assert applied == [b"cmd%d" % k for k in range(5)]


def test_entry_crc_covers_position_and_payload() -> None:
    base = entry_crc(5, 2, 0, b"x")
    assert len({base, entry_crc(6, 2, 0, b"x"), entry_crc(5, 3, 0, b"x"), entry_crc(5, 2, 1, b"x")}) == 4
    assert entry_crc(5, 2, 0, b"y") != base
    assert base == zlib.crc32(b"x", zlib.crc32((5).to_bytes(8, "big") + (2).to_bytes(8, "big") + b"\0"))
