"""The durable Raft log store: term, vote, log, snapshot and member identity in one SQLite database.

Theory of operation
-------------------
``SqliteStorage`` implements ``storage_api.LogStore`` with the same semantics as ``MemoryStorage`` (the
contract tests run against both). The driver persists each ``Ready`` with ONE call,
``save(hard_state, entries, snapshot)``: one SQLite transaction, fsynced before it returns, so "persist, then
send" holds across ``kill -9`` and power loss.

Durability: WAL mode with ``synchronous=FULL``. In WAL mode ``NORMAL`` syncs the WAL only at checkpoints, so a
commit that already returned can roll back after a power loss; a Raft node that voted or acknowledged in
between would break its promise (two leaders in a term, a lost committed entry). ``FULL`` fsyncs the WAL on
every commit. SQLite makes each transaction atomic (WAL frames are checksummed and a transaction counts only
once its commit frame is intact), so a write torn by a crash simply never happened. ``save(..., sync=False)``
(for a ``Ready`` with ``must_sync`` false: only the commit index moved) skips that fsync; the next synced
commit makes it durable too.

Corruption: each entry row carries a CRC32 of (index, term, type, data); the hard-state, log-start and
snapshot rows carry their own CRC, and the snapshot file's CRC is in its row. SQLite does not detect flipped
bits inside a page, a filesystem that lies or a hand-edited database; these checks do. On open (always the
tail, every row with ``verify_all``) the first bad or missing entry row is handled by where it lies relative
to the persisted commit index ``c``:

* index > c: the entry was never known to be committed here. The log is truncated from that row with a warning
  (``event=raft_log_truncated``); the leader re-sends what is missing. Caveat: if that entry had been
  acknowledged, the leader may have counted this node towards a quorum, so a node that lost acknowledged
  entries should not vote until it has caught up again; ``truncated_from`` tells the driver this happened.
* index <= c: committed data is damaged. Opening fails with ``StorageCorruptError`` naming the file and index:
  silently dropping it could lose a committed write or apply garbage. Recovery is an operator decision (remove
  the member, wipe the data dir, rejoin as a new member with a new storage id).

Damaged hard-state / log-start / snapshot rows, a missing or damaged snapshot file, decreasing terms, rows at
or below the log start and a commit index past the last entry are always refused. ``entries()`` re-checks
every CRC it reads, so damage in the unverified committed range is still never applied.

Identity: the ``identity`` row holds the cluster id, this member's id and a random ``storage_id`` made when
the data dir was created. A wiped data dir gets a new storage id, which lets the membership layer refuse a
member that rejoins under its old id after losing its votes. A data dir is locked (``flock``) by the process
that opened it.

Snapshots: the latest snapshot's data lives in ``snapshot-<index>-<term>.snap`` next to the database, written
to a temporary file, fsynced, renamed and the directory fsynced BEFORE the transaction that points to it; the
previous file is removed after that commit and files no row references (a crash in between) are removed on
open.

Hot path: ``last_index``/``first_index`` read attributes, ``term(i)`` reads a list of term runs (one run per
term, O(1) for the last run, a bisect otherwise), ``entries(lo, hi, max_size)`` is one primary-key range query
that stops reading once ``max_size`` is reached. Methods are serialized by a lock; the driver may call
``save`` from a worker thread. After a write fails (disk full, I/O error) the store refuses further writes: an
fsync that failed once cannot be trusted (PostgreSQL's "fsyncgate"), so the node must restart and reopen.

Compaction past the latest snapshot's index is allowed (as in ``MemoryStorage``/etcd) but logged: unless the
state machine is durable on its own, the entries between the snapshot and the compaction point cannot be
replayed after a restart.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tunnelmesh.coord.raft.errors import (
    CompactedError,
    RaftError,
    SnapOutOfDateError,
    UnavailableError,
)
from tunnelmesh.coord.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
    entry_size,
)
from tunnelmesh.fsutil import fsync_dir, write_all_synced

log = logging.getLogger(__name__)

DB_NAME = "raft.db"
LOCK_NAME = "raft.lock"
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_SUFFIX = ".snap"
# "TMRF" in the SQLite header's application_id: tells our database apart from any other SQLite file.
APPLICATION_ID = 0x544D5246
SCHEMA_VERSION = 1
TAIL_VERIFY_ROWS = 1024
"""Committed rows checked on every open on top of all uncommitted ones (``verify_all`` checks every row)."""
JOURNAL_SIZE_LIMIT = 64 << 20  # a WAL grown by a large compaction shrinks back after the next checkpoint

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1
_ENTRY_HEADER = struct.Struct(">QQB")
_U64X2 = struct.Struct(">QQ")
_U64X3 = struct.Struct(">QQQ")
_ENTRY_TYPES = {int(t): t for t in EntryType}
_Row = tuple[int, int, int, bytes, int]  # an entries row: idx, term, type, data, crc

_SCHEMA = """
CREATE TABLE identity (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    storage_id TEXT NOT NULL,
    cluster_id TEXT,
    member_id INTEGER,
    created_unix_ms INTEGER NOT NULL
);
CREATE TABLE hard_state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    term INTEGER NOT NULL,
    vote INTEGER NOT NULL,
    commit_index INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TABLE log_start (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    idx INTEGER NOT NULL,
    term INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TABLE snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    idx INTEGER NOT NULL,
    term INTEGER NOT NULL,
    conf TEXT NOT NULL,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    data_crc INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TABLE entries (
    idx INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    type INTEGER NOT NULL,
    data BLOB NOT NULL,
    crc INTEGER NOT NULL
);
"""


class StorageCorruptError(RaftError):
    """The data dir holds damaged or inconsistent Raft state; the node must not start (or continue) on it.

    Deliberately not a ``StorageError``: the core catches those as recoverable (compacted, unavailable).
    """


class StorageIOError(RaftError):
    """The store could not read or write its files (disk full, I/O error, closed); restart and reopen."""


class DataDirError(RaftError):
    """The data dir is missing, in use, not ours, or belongs to another cluster or member."""


@dataclass(frozen=True, slots=True)
class StorageIdentity:
    """Who this data dir belongs to. ``storage_id`` is random per data-dir incarnation (new after a wipe)."""

    storage_id: str
    cluster_id: str | None
    member_id: int | None


# -- checksums and encodings ---------------------------------------------------------------------------------


def entry_crc(index: int, term: int, type_: int, data: bytes) -> int:
    """CRC32 of an entry row: covers its position as well as its payload, so a renumbered row fails too."""
    return zlib.crc32(data, zlib.crc32(_ENTRY_HEADER.pack(index, term, type_)))


def _hard_state_crc(term: int, vote: int, commit: int) -> int:
    return zlib.crc32(_U64X3.pack(term, vote, commit))


def _log_start_crc(index: int, term: int) -> int:
    return zlib.crc32(_U64X2.pack(index, term))


def _snapshot_row_crc(index: int, term: int, conf: str, file: str, size: int, data_crc: int) -> int:
    head = _U64X2.pack(index, term) + _U64X2.pack(size, data_crc)
    return zlib.crc32(f"{conf}\0{file}".encode(), zlib.crc32(head))


def _to_i64(v: int) -> int:
    """Store a uint64 (node ids may use all 64 bits) in SQLite's signed INTEGER."""
    if not 0 <= v < _U64:
        raise RaftError(f"value {v} does not fit in 64 bits")
    return v - _U64 if v > _I64_MAX else v


def _from_i64(v: int) -> int:
    return v + _U64 if v < 0 else v


def _encode_conf(cs: ConfState) -> str:
    return json.dumps({"voters": list(cs.voters), "learners": list(cs.learners)}, separators=(",", ":"))


def _decode_conf(text: str) -> ConfState:
    obj = json.loads(text)
    return ConfState(
        voters=tuple(int(v) for v in obj["voters"]), learners=tuple(int(v) for v in obj["learners"])
    )


def _snapshot_file_name(index: int, term: int) -> str:
    return f"{SNAPSHOT_PREFIX}{index:020d}-{term:020d}{SNAPSHOT_SUFFIX}"


def _write_file_durably(directory: Path, name: str, data: bytes) -> None:
    """temp + fsync + rename + fsync(dir): after a crash the file holds exactly ``data`` or does not exist."""
    tmp = directory / (name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all_synced(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
    fsync_dir(directory)


# -- the in-memory shape of the log --------------------------------------------------------------------------


@dataclass(slots=True)
class _Shape:
    """What ``term``/``first_index``/``last_index`` answer from memory: the dummy position, the last index
    and the log's term runs (``starts[k]`` is the first position of term ``terms[k]``; ``starts[0]`` is the
    dummy)."""

    offset: int
    last: int
    starts: list[int]
    terms: list[int]

    def copy(self) -> _Shape:
        return _Shape(self.offset, self.last, list(self.starts), list(self.terms))

    def term(self, i: int) -> int:
        if i < self.offset:
            raise CompactedError(f"term of {i} requested but the log is compacted up to {self.offset}")
        if i > self.last:
            raise UnavailableError(f"term of {i} requested but the last index is {self.last}")
        if i >= self.starts[-1]:
            return self.terms[-1]
        return self.terms[bisect.bisect_right(self.starts, i) - 1]

    def truncate_after(self, i: int) -> None:
        """Forget positions > ``i`` (``i`` >= offset)."""
        k = bisect.bisect_right(self.starts, i)
        del self.starts[k:]
        del self.terms[k:]
        self.last = i

    def compact_to(self, i: int) -> None:
        k = bisect.bisect_right(self.starts, i) - 1
        self.starts = [i, *self.starts[k + 1 :]]
        self.terms = self.terms[k:]
        self.offset = i


class SqliteStorage:
    """A durable ``LogStore``. Create with ``SqliteStorage.open(data_dir, ...)``; close with ``close()``."""

    def __init__(
        self,
        data_dir: Path,
        conn: sqlite3.Connection,
        lock_fd: int,
        identity: StorageIdentity,
        hard_state: HardState,
        snapshot: Snapshot,
        shape: _Shape,
        truncated_from: int | None,
    ) -> None:
        """Use ``open``; this only assembles an already verified store."""
        self.data_dir = data_dir
        self.db_path = data_dir / DB_NAME
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd = lock_fd
        self._identity = identity
        self._hard_state = hard_state
        self._snapshot = snapshot
        self._shape = shape
        self._mutex = threading.RLock()
        self._failed: str | None = None
        self.truncated_from = truncated_from
        """Set when ``open`` truncated an uncommitted tail: the first index it removed."""

    # -- opening ---------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        create: bool = False,
        cluster_id: str | None = None,
        member_id: int | None = None,
        verify_all: bool = False,
    ) -> SqliteStorage:
        """Open (or with ``create``, create) the store in ``data_dir``, verify it and lock the directory.

        ``cluster_id``/``member_id``, when given, must match the stored identity (they are recorded if the
        store has none yet). Raises ``DataDirError`` for a missing/foreign/busy data dir or an identity
        mismatch and ``StorageCorruptError`` when committed state is damaged.
        """
        t0 = time.monotonic()
        path = Path(data_dir)
        if not path.exists():
            if not create:
                raise DataDirError(
                    f"raft data dir {path} does not exist; point the coordinator at its data dir, or open "
                    "with create=True to start a new member"
                )
            path.mkdir(parents=True, mode=0o700)
            fsync_dir(path.parent)
        elif not path.is_dir():
            raise DataDirError(f"raft data dir {path} exists but is not a directory")
        lock_fd = _lock_data_dir(path)
        conn: sqlite3.Connection | None = None
        try:
            db_path = path / DB_NAME
            if not db_path.exists() and not create:
                raise DataDirError(
                    f"raft data dir {path} has no {DB_NAME}; it was never initialized (open with create=True "
                    "to start a new member) or its contents were removed"
                )
            if not db_path.exists():
                # Created here, not by SQLite, so the log (it holds tokens and keys) is private: SQLite
                # gives the -wal and -shm files the database file's permissions.
                os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            conn = _connect(db_path)
            created = _ensure_schema(conn, db_path, create)
            if created:
                fsync_dir(path)
            store = cls._load(path, conn, lock_fd, cluster_id, member_id, verify_all)
            store._remove_orphan_snapshot_files()
        except BaseException:
            if conn is not None:
                conn.close()
            os.close(lock_fd)
            raise
        ident = store.identity
        log.info(
            "event=raft_storage_opened path=%s created=%s storage_id=%s cluster_id=%s member_id=%s "
            "first_index=%d last_index=%d term=%d commit=%d snapshot_index=%d verify_all=%s duration_ms=%.1f",
            db_path,
            created,
            ident.storage_id,
            ident.cluster_id,
            f"{ident.member_id:x}" if ident.member_id is not None else None,
            store.first_index(),
            store.last_index(),
            store._hard_state.term,
            store._hard_state.commit,
            store._snapshot.index,
            verify_all,
            (time.monotonic() - t0) * 1000,
        )
        return store

    @classmethod
    def _load(
        cls,
        path: Path,
        conn: sqlite3.Connection,
        lock_fd: int,
        cluster_id: str | None,
        member_id: int | None,
        verify_all: bool,
    ) -> SqliteStorage:
        db_path = path / DB_NAME
        identity = _check_identity(conn, db_path, cluster_id, member_id)

        row = conn.execute("SELECT term, vote, commit_index, crc FROM hard_state WHERE id = 0").fetchone()
        if row is None:
            raise StorageCorruptError(f"{db_path}: the hard state row is missing")
        term, vote, commit = row[0], _from_i64(row[1]), row[2]
        if _hard_state_crc(term, vote, commit) != row[3]:
            raise StorageCorruptError(
                f"{db_path}: the hard state (term/vote/commit) fails its checksum; this member cannot know "
                "whom it voted for. Remove it from the cluster, wipe its data dir and rejoin as a new member"
            )
        hs = HardState(term=term, vote=vote, commit=commit)

        row = conn.execute("SELECT idx, term, crc FROM log_start WHERE id = 0").fetchone()
        if row is None or _log_start_crc(row[0], row[1]) != row[2]:
            raise StorageCorruptError(
                f"{db_path}: the log start row (compaction point) is missing or damaged"
            )
        offset, offset_term = row[0], row[1]

        snap = _load_snapshot(conn, path)
        truncated_from = _verify_entries(conn, db_path, offset, hs.commit, verify_all)
        shape = _load_shape(conn, db_path, offset, offset_term)
        if hs.commit > shape.last:
            raise StorageCorruptError(
                f"{db_path}: the commit index {hs.commit} is past the last log entry {shape.last}: committed "
                f"entries {shape.last + 1}..{hs.commit} are missing. Remove this member, wipe its data dir "
                "and rejoin as a new member"
            )
        return cls(path, conn, lock_fd, identity, hs, snap, shape, truncated_from)

    # -- Storage (read side) ---------------------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.metadata.conf_state

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        with self._mutex:
            shape = self._shape
            if lo <= shape.offset:
                raise CompactedError(
                    f"entries [{lo}, {hi}) requested but the log is compacted up to {shape.offset}"
                )
            if hi > shape.last + 1:
                raise UnavailableError(f"entries [{lo}, {hi}) requested but the last index is {shape.last}")
            if lo >= hi:
                return []
            out: list[Entry] = []
            size = 0
            cur = self._db().execute(
                "SELECT idx, term, type, data, crc FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (lo, hi),
            )
            pack, crc32, types = _ENTRY_HEADER.pack, zlib.crc32, _ENTRY_TYPES
            try:
                for idx, term, type_, data, crc in cur:
                    # Every row is re-checked: damage outside the range verified at open is never applied.
                    if (
                        idx != lo + len(out)
                        or crc32(data, crc32(pack(idx, term, type_))) != crc
                        or type_ not in types
                    ):
                        self._corrupt_read(lo + len(out))
                    e = Entry(idx, term, types[type_], data)
                    if max_size is not None:
                        size += entry_size(e)
                        if out and size > max_size:
                            return out
                    out.append(e)
            except sqlite3.Error as exc:
                raise StorageIOError(f"{self.db_path}: reading entries [{lo}, {hi}) failed: {exc}") from exc
            finally:
                cur.close()  # an unfinished statement would hold a read transaction and stall checkpoints
            if len(out) != hi - lo:
                self._corrupt_read(lo + len(out))
            return out

    def term(self, i: int) -> int:
        s = self._shape
        if s.starts[-1] <= i <= s.last:  # the hot path: an index in the last term
            return s.terms[-1]
        return s.term(i)

    def first_index(self) -> int:
        return self._shape.offset + 1

    def last_index(self) -> int:
        return self._shape.last

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- identity --------------------------------------------------------------------------------------------

    @property
    def identity(self) -> StorageIdentity:
        return self._identity

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def assign_identity(self, cluster_id: str, member_id: int) -> None:
        """Record the cluster and member id of a store created before they were known (a joining member).

        Idempotent; refuses to change an identity already recorded.
        """
        with self._mutex:
            cur = self._identity
            if (cur.cluster_id, cur.member_id) == (cluster_id, member_id):
                return
            _check_identity_values(self.db_path, cur, cluster_id, member_id)
            with self._transaction("assigning the identity"):
                self._db().execute(
                    "UPDATE identity SET cluster_id = ?, member_id = ? WHERE id = 0",
                    (cluster_id, _to_i64(member_id)),
                )
            self._identity = StorageIdentity(cur.storage_id, cluster_id, member_id)
            log.info(
                "event=raft_storage_identity_assigned path=%s cluster_id=%s member_id=%x",
                self.db_path,
                cluster_id,
                member_id,
            )

    # -- LogStore (driver side) ------------------------------------------------------------------------------

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
        *,
        sync: bool = True,
    ) -> None:
        """Persist one ``Ready`` in one transaction: ``snapshot`` (replaces the log), then ``entries``
        (truncating any suffix they overwrite), then ``hard_state``. All of it is stored or none of it;
        durable when it returns unless ``sync`` is false (pass ``rd.must_sync``; a snapshot always syncs)."""
        with self._mutex:
            if snapshot is not None and snapshot.is_empty():
                snapshot = None
            if hard_state is None and not entries and snapshot is None:
                return
            # Plan everything against a copy first: the in-memory shape changes only after the commit.
            shape = self._shape
            snap_file: str | None = None
            if snapshot is not None:
                self._check_snapshot_newer(snapshot.index)
                shape = _Shape(snapshot.index, snapshot.index, [snapshot.index], [snapshot.term])
            plan = _plan_append(shape, entries) if entries else None
            if plan is not None:
                shape = plan[1]
            self._check_writable()
            if snapshot is not None:
                snap_file = self._write_snapshot_file(snapshot)
            try:
                with self._transaction("saving a Ready", sync=sync or snapshot is not None) as db:
                    if snapshot is not None and snap_file is not None:
                        self._sql_replace_log_with_snapshot(db, snapshot, snap_file)
                    if plan is not None:
                        self._sql_append(db, plan[0], plan[2])
                    if hard_state is not None:
                        self._sql_set_hard_state(db, hard_state)
            except BaseException:
                # After a failed COMMIT the row may still reach the disk: keep the file, ``open`` cleans up.
                if snap_file is not None and self._failed is None:
                    self._discard_file(snap_file)
                raise
            old_snap = self._snapshot
            self._shape = shape
            if hard_state is not None:
                self._hard_state = hard_state
            if snapshot is not None:
                self._snapshot = snapshot
                self._remove_snapshot_file(old_snap)

    def set_hard_state(self, hs: HardState) -> None:
        self.save(hs)

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        self.save(None, entries)

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log with ``snap`` (as etcd: the core only hands over snapshots it needs)."""
        with self._mutex:
            self._check_snapshot_newer(snap.index)
            if snap.is_empty():
                raise RaftError("cannot apply an empty snapshot (index 0)")
            self.save(None, (), snap)

    def create_snapshot(self, index: int, conf_state: ConfState | None, data: bytes) -> Snapshot:
        """Record the application's snapshot at ``index`` (<= the applied index); the log is left as it is."""
        with self._mutex:
            self._check_snapshot_newer(index)
            if index > self._shape.last:
                raise RaftError(f"snapshot at {index} is past the last index {self._shape.last}")
            term = self._shape.term(index)  # CompactedError below the log start: we no longer know its term
            conf = conf_state if conf_state is not None else self._snapshot.metadata.conf_state
            snap = Snapshot(SnapshotMetadata(index=index, term=term, conf_state=conf), bytes(data))
            self._check_writable()
            snap_file = self._write_snapshot_file(snap)
            try:
                with self._transaction(f"recording the snapshot at {index}") as db:
                    self._sql_put_snapshot_row(db, snap, snap_file)
            except BaseException:
                if self._failed is None:
                    self._discard_file(snap_file)
                raise
            old = self._snapshot
            self._snapshot = snap
            self._remove_snapshot_file(old)
            log.info(
                "event=raft_snapshot_created path=%s index=%d term=%d size=%d",
                self.data_dir,
                index,
                term,
                len(snap.data),
            )
            return snap

    def compact(self, compact_index: int) -> None:
        """Drop entries up to ``compact_index``, which becomes the new log start (dummy)."""
        with self._mutex:
            shape = self._shape
            if compact_index <= shape.offset:
                raise CompactedError(
                    f"cannot compact to {compact_index}: already compacted up to {shape.offset}"
                )
            if compact_index > shape.last:
                raise RaftError(f"cannot compact to {compact_index}: past the last index {shape.last}")
            if compact_index > self._snapshot.index:
                log.warning(
                    "event=raft_compact_past_snapshot path=%s compact_index=%d snapshot_index=%d",
                    self.db_path,
                    compact_index,
                    self._snapshot.index,
                )
            term = shape.term(compact_index)
            self._check_writable()
            with self._transaction(f"compacting to {compact_index}") as db:
                db.execute("DELETE FROM entries WHERE idx <= ?", (compact_index,))
                db.execute(
                    "UPDATE log_start SET idx = ?, term = ?, crc = ? WHERE id = 0",
                    (compact_index, term, _log_start_crc(compact_index, term)),
                )
            new = shape.copy()
            new.compact_to(compact_index)
            self._shape = new

    def bootstrap(self, voters: Sequence[int], learners: Sequence[int] = ()) -> None:
        """Make this empty store a founding member's, exactly like ``MemoryStorage.bootstrap``: a snapshot at
        index 1, term 1 carrying the initial membership, and ``HardState(term=1, commit=1)``."""
        with self._mutex:
            if self._shape.last != 0 or self._hard_state != HardState() or not self._snapshot.is_empty():
                raise RaftError(
                    f"{self.db_path}: cannot bootstrap a store that already holds Raft state "
                    f"(last index {self._shape.last}, term {self._hard_state.term})"
                )
            conf = ConfState(voters=tuple(sorted(voters)), learners=tuple(sorted(learners)))
            self.save(HardState(term=1, vote=0, commit=1), (), Snapshot(SnapshotMetadata(1, 1, conf)))

    def close(self) -> None:
        with self._mutex:
            if self._conn is None:
                return
            try:
                self._conn.close()
            finally:
                self._conn = None
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> SqliteStorage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._shape
        return f"SqliteStorage({self.data_dir}, first={s.offset + 1}, last={s.last}, hs={self._hard_state})"

    # -- internals -------------------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageIOError(f"{self.db_path}: the store is closed")
        return self._conn

    def _check_writable(self) -> None:
        self._db()
        if self._failed is not None:
            raise StorageIOError(
                f"{self.db_path}: an earlier write failed ({self._failed}); a failed fsync cannot be retried "
                "safely, so this store accepts no more writes: restart the coordinator"
            )

    def _check_snapshot_newer(self, index: int) -> None:
        if index <= self._snapshot.index:
            raise SnapOutOfDateError(
                f"snapshot at {index} is not newer than the stored {self._snapshot.index}"
            )

    @contextlib.contextmanager
    def _transaction(self, what: str, *, sync: bool = True) -> Iterator[sqlite3.Connection]:
        self._check_writable()
        db = self._db()
        try:
            if not sync:
                db.execute("PRAGMA synchronous = NORMAL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            finally:
                if not sync:
                    db.execute("PRAGMA synchronous = FULL")
        except sqlite3.IntegrityError as exc:
            raise StorageCorruptError(f"{self.db_path}: {what} hit an inconsistent row: {exc}") from exc
        except sqlite3.Error as exc:
            self._failed = f"{what}: {exc}"
            log.error(
                "event=raft_storage_write_failed path=%s what=%r error=%r", self.db_path, what, str(exc)
            )
            raise StorageIOError(f"{self.db_path}: {what} failed: {exc}") from exc

    def _sql_append(self, db: sqlite3.Connection, rows: list[_Row], truncate_from: int | None) -> None:
        if truncate_from is not None:
            db.execute("DELETE FROM entries WHERE idx >= ?", (truncate_from,))
        db.executemany("INSERT INTO entries (idx, term, type, data, crc) VALUES (?, ?, ?, ?, ?)", rows)

    def _sql_set_hard_state(self, db: sqlite3.Connection, hs: HardState) -> None:
        db.execute(
            "UPDATE hard_state SET term = ?, vote = ?, commit_index = ?, crc = ? WHERE id = 0",
            (hs.term, _to_i64(hs.vote), hs.commit, _hard_state_crc(hs.term, hs.vote, hs.commit)),
        )

    def _sql_replace_log_with_snapshot(self, db: sqlite3.Connection, snap: Snapshot, file: str) -> None:
        db.execute("DELETE FROM entries")
        db.execute(
            "UPDATE log_start SET idx = ?, term = ?, crc = ? WHERE id = 0",
            (snap.index, snap.term, _log_start_crc(snap.index, snap.term)),
        )
        self._sql_put_snapshot_row(db, snap, file)

    def _sql_put_snapshot_row(self, db: sqlite3.Connection, snap: Snapshot, file: str) -> None:
        conf = _encode_conf(snap.metadata.conf_state)
        data_crc = zlib.crc32(snap.data)
        size = len(snap.data)
        db.execute(
            "INSERT OR REPLACE INTO snapshot (id, idx, term, conf, file, size, data_crc, crc) "
            "VALUES (0, ?, ?, ?, ?, ?, ?, ?)",
            (
                snap.index,
                snap.term,
                conf,
                file,
                size,
                data_crc,
                _snapshot_row_crc(snap.index, snap.term, conf, file, size, data_crc),
            ),
        )

    def _write_snapshot_file(self, snap: Snapshot) -> str:
        name = _snapshot_file_name(snap.index, snap.term)
        try:
            _write_file_durably(self.data_dir, name, snap.data)
        except OSError as exc:
            raise StorageIOError(f"{self.data_dir / name}: writing the snapshot failed: {exc}") from exc
        return name

    def _discard_file(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self.data_dir / name).unlink()

    def _remove_snapshot_file(self, snap: Snapshot) -> None:
        """Remove the file of a snapshot no row points to any more (``open`` removes any orphan too)."""
        if snap.is_empty():
            return
        name = _snapshot_file_name(snap.index, snap.term)
        if name != _snapshot_file_name(self._snapshot.index, self._snapshot.term):
            self._discard_file(name)

    def _remove_orphan_snapshot_files(self) -> None:
        keep = (
            None
            if self._snapshot.is_empty()
            else _snapshot_file_name(self._snapshot.index, self._snapshot.term)
        )
        removed = False
        for p in self.data_dir.iterdir():
            if (
                p.name.startswith(SNAPSHOT_PREFIX)
                and p.name != keep
                and (p.name.endswith(SNAPSHOT_SUFFIX) or p.name.endswith(SNAPSHOT_SUFFIX + ".tmp"))
            ):
                log.info("event=raft_snapshot_orphan_removed path=%s", p)
                self._discard_file(p.name)
                removed = True
        if removed:
            fsync_dir(self.data_dir)

    def _corrupt_read(self, index: int) -> None:
        raise StorageCorruptError(
            f"{self.db_path}: log entry {index} is missing or fails its checksum; refusing to use it. "
            "Stop this coordinator and reopen with verify_all=True to find the damage"
        )


# -- opening helpers -----------------------------------------------------------------------------------------


def _lock_data_dir(path: Path) -> int:
    lock_path = path / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DataDirError(
                f"raft data dir {path} is in use by another process (pid {holder}, lock {lock_path}); "
                "two coordinators must never share a data dir"
            ) from None
        raise DataDirError(f"cannot lock raft data dir {path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _connect(db_path: Path) -> sqlite3.Connection:
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per Ready.
        conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise DataDirError(f"{db_path}: SQLite refused WAL mode (got {mode!r}); is the filesystem local?")
        # FULL, not NORMAL: in WAL mode NORMAL can lose acknowledged commits on power loss (module docstring).
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    except sqlite3.DatabaseError as exc:
        raise StorageCorruptError(f"{db_path}: not a readable SQLite database: {exc}") from exc
    return conn


def _ensure_schema(conn: sqlite3.Connection, db_path: Path, create: bool) -> bool:
    """Check the database is ours and current; initialize an empty one when ``create`` (then return True)."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StorageCorruptError(f"{db_path}: not a readable SQLite database: {exc}") from exc
    if app_id == 0 and version == 0 and tables == 0:
        if not create:
            raise DataDirError(f"{db_path} is empty (initialization never finished); open with create=True")
        conn.execute("BEGIN IMMEDIATE")
        for stmt in _SCHEMA.split(";"):  # not executescript(): it would commit the pending transaction first
            if stmt.strip():
                conn.execute(stmt)
        conn.execute(
            "INSERT INTO identity (id, storage_id, cluster_id, member_id, created_unix_ms) "
            "VALUES (0, ?, NULL, NULL, ?)",
            (uuid.uuid4().hex, int(time.time() * 1000)),
        )
        conn.execute("INSERT INTO hard_state VALUES (0, 0, 0, 0, ?)", (_hard_state_crc(0, 0, 0),))
        conn.execute("INSERT INTO log_start VALUES (0, 0, 0, ?)", (_log_start_crc(0, 0),))
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
        log.info("event=raft_storage_created path=%s", db_path)
        return True
    if app_id != APPLICATION_ID:
        raise DataDirError(
            f"{db_path} is an SQLite database but not a TunnelMesh Raft store (application_id {app_id:#x}); "
            "point the coordinator at its own data dir"
        )
    if version != SCHEMA_VERSION:
        raise DataDirError(
            f"{db_path} has schema version {version}; this TunnelMesh understands version {SCHEMA_VERSION}"
        )
    return False


def _check_identity(
    conn: sqlite3.Connection, db_path: Path, cluster_id: str | None, member_id: int | None
) -> StorageIdentity:
    row = conn.execute("SELECT storage_id, cluster_id, member_id FROM identity WHERE id = 0").fetchone()
    if row is None:
        raise StorageCorruptError(f"{db_path}: the identity row is missing")
    stored = StorageIdentity(row[0], row[1], None if row[2] is None else _from_i64(row[2]))
    _check_identity_values(db_path, stored, cluster_id, member_id)
    if (cluster_id is not None and stored.cluster_id is None) or (
        member_id is not None and stored.member_id is None
    ):
        new_cluster = stored.cluster_id if stored.cluster_id is not None else cluster_id
        new_member = stored.member_id if stored.member_id is not None else member_id
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE identity SET cluster_id = ?, member_id = ? WHERE id = 0",
            (new_cluster, None if new_member is None else _to_i64(new_member)),
        )
        conn.execute("COMMIT")
        stored = StorageIdentity(stored.storage_id, new_cluster, new_member)
    return stored


def _check_identity_values(
    db_path: Path, stored: StorageIdentity, cluster_id: str | None, member_id: int | None
) -> None:
    if cluster_id is not None and stored.cluster_id is not None and cluster_id != stored.cluster_id:
        raise DataDirError(
            f"{db_path} belongs to cluster {stored.cluster_id!r}, not {cluster_id!r}; "
            "use a fresh data dir to join this cluster"
        )
    if member_id is not None and stored.member_id is not None and member_id != stored.member_id:
        raise DataDirError(
            f"{db_path} belongs to member {stored.member_id:x} of cluster {stored.cluster_id!r}, not member "
            f"{member_id:x}; a member id is tied to its data dir"
        )


def _load_snapshot(conn: sqlite3.Connection, path: Path) -> Snapshot:
    db_path = path / DB_NAME
    row = conn.execute(
        "SELECT idx, term, conf, file, size, data_crc, crc FROM snapshot WHERE id = 0"
    ).fetchone()
    if row is None:
        return Snapshot()
    index, term, conf, file, size, data_crc, crc = row
    if _snapshot_row_crc(index, term, conf, file, size, data_crc) != crc:
        raise StorageCorruptError(f"{db_path}: the snapshot metadata row fails its checksum")
    file_path = path / file
    try:
        data = file_path.read_bytes()
    except OSError as exc:
        raise StorageCorruptError(
            f"{file_path}: the snapshot at index {index} cannot be read ({exc}); the log before it is "
            "compacted away, so this member cannot restore its state: wipe the data dir and rejoin as a "
            "new member"
        ) from exc
    if len(data) != size or zlib.crc32(data) != data_crc:
        raise StorageCorruptError(
            f"{file_path}: the snapshot at index {index} is damaged ({len(data)} bytes, expected {size}, "
            "or a checksum mismatch); wipe the data dir and rejoin as a new member"
        )
    return Snapshot(SnapshotMetadata(index=index, term=term, conf_state=_decode_conf(conf)), data)


def _verify_entries(
    conn: sqlite3.Connection, db_path: Path, offset: int, commit: int, verify_all: bool
) -> int | None:
    """Check the entry rows; truncate a damaged uncommitted tail. Returns the first index truncated."""
    below = conn.execute("SELECT count(*) FROM entries WHERE idx <= ?", (offset,)).fetchone()[0]
    if below:
        raise StorageCorruptError(
            f"{db_path}: {below} entry rows at or below the log start {offset} (compaction did not finish "
            "atomically or the log start row is wrong)"
        )
    lo = offset + 1
    verify_from = lo if verify_all else max(lo, commit + 1 - TAIL_VERIFY_ROWS)
    if verify_from > lo:
        # Unverified committed prefix: just make sure no row is missing.
        n = conn.execute("SELECT count(*) FROM entries WHERE idx < ?", (verify_from,)).fetchone()[0]
        if n != verify_from - lo:
            gap = _first_missing(conn, lo)
            raise StorageCorruptError(
                f"{db_path}: committed log entry {gap} is missing (commit index {commit}); refusing to "
                "start. Remove this member, wipe its data dir and rejoin as a new member"
            )
    first_bad: int | None = None
    reason = ""
    expected = verify_from
    cur = conn.execute(
        "SELECT idx, term, type, data, crc FROM entries WHERE idx >= ? ORDER BY idx", (verify_from,)
    )
    try:
        for idx, term, type_, data, crc in cur:
            if idx != expected:
                first_bad, reason = expected, "missing"
                break
            if entry_crc(idx, term, type_, data) != crc or type_ not in _ENTRY_TYPES:
                first_bad, reason = idx, "checksum_mismatch"
                break
            expected += 1
    finally:
        cur.close()  # before the truncating write below
    if first_bad is None:
        return None
    if first_bad <= commit:
        what = "is missing" if reason == "missing" else "fails its checksum"
        raise StorageCorruptError(
            f"{db_path}: committed log entry {first_bad} {what} (commit index {commit}); refusing to start "
            "rather than apply or drop committed data. Remove this member, wipe its data dir and rejoin as a "
            "new member"
        )
    last = conn.execute("SELECT max(idx) FROM entries").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM entries WHERE idx >= ?", (first_bad,))
    conn.execute("COMMIT")
    log.warning(
        "event=raft_log_truncated path=%s from_index=%d last_index_before=%d commit=%d reason=%s",
        db_path,
        first_bad,
        last,
        commit,
        reason,
    )
    return first_bad


def _first_missing(conn: sqlite3.Connection, lo: int) -> int:
    row = conn.execute(
        "SELECT a.idx + 1 FROM entries a LEFT JOIN entries b ON b.idx = a.idx + 1 "
        "WHERE b.idx IS NULL ORDER BY a.idx LIMIT 1"
    ).fetchone()
    first = conn.execute("SELECT min(idx) FROM entries").fetchone()[0]
    if first is None or first > lo:
        return lo
    return int(row[0]) if row is not None else lo


def _load_shape(conn: sqlite3.Connection, db_path: Path, offset: int, offset_term: int) -> _Shape:
    """Build the term runs in one grouped scan, checking the log is contiguous and terms never decrease."""
    shape = _Shape(offset, offset, [offset], [offset_term])
    expect = offset + 1
    for term, first, last, count in conn.execute(
        "SELECT term, min(idx), max(idx), count(*) FROM entries GROUP BY term ORDER BY min(idx)"
    ):
        if first != expect or count != last - first + 1 or term < shape.terms[-1]:
            raise StorageCorruptError(
                f"{db_path}: the log is not a contiguous run of non-decreasing terms around index "
                f"{expect} (term {term} spans {first}..{last} in {count} rows); reopen with verify_all=True "
                "to locate the damage"
            )
        if term != shape.terms[-1]:
            shape.starts.append(first)
            shape.terms.append(term)
        expect = last + 1
    shape.last = expect - 1
    return shape


def _plan_append(shape: _Shape, entries: Sequence[Entry]) -> tuple[list[_Row], _Shape, int | None] | None:
    """Validate an append against ``shape`` like ``MemoryStorage.append``; None when it changes nothing.

    Returns the rows to insert, the resulting shape and the first index whose old rows must be deleted. One
    pass over the batch: this is the hot path of every ``Ready``.
    """
    first = shape.offset + 1
    if entries[-1].index < first:
        return None  # everything is already compacted away
    ents = entries[first - entries[0].index :] if first > entries[0].index else entries
    start = ents[0].index
    if start > shape.last + 1:
        raise RaftError(f"missing log entry: last index {shape.last}, appended at {start}")
    new = shape.copy()
    new.truncate_after(start - 1)
    starts, terms = new.starts, new.terms
    run_term = terms[-1]
    pack, crc32 = _ENTRY_HEADER.pack, zlib.crc32
    rows: list[_Row] = []
    expect = start
    for e in ents:
        idx, term, data, type_ = e.index, e.term, e.data, int(e.type)
        if idx != expect:
            raise RaftError(f"appended entries are not contiguous: index {idx} where {expect} was expected")
        if term != run_term:
            if term < run_term:
                raise RaftError(f"appended entry {idx} has term {term} below the preceding term {run_term}")
            starts.append(idx)
            terms.append(term)
            run_term = term
        rows.append((idx, term, type_, data, crc32(data, crc32(pack(idx, term, type_)))))
        expect += 1
    new.last = expect - 1
    return rows, new, (start if start <= shape.last else None)
