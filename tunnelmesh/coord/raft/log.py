"""The Raft log as the core sees it: persisted entries (``Storage``) followed by not-yet-persisted ones
(``Unstable``).

Indexes: ``first_index() - 1`` is the dummy position covered by the latest snapshot; ``committed`` is the
highest index known to be replicated on a quorum; ``applied`` the highest index the application has applied
(``applied <= committed <= last_index()``). Everything here is O(1) or O(entries touched); nothing scans the
log.
"""

from __future__ import annotations

from tunnelmesh.coord.raft.errors import CompactedError, RaftError, StorageError, UnavailableError
from tunnelmesh.coord.raft.memory_storage import limit_size
from tunnelmesh.coord.raft.messages import Entry, Snapshot
from tunnelmesh.coord.raft.storage_api import Storage


class Unstable:
    """Entries (and possibly a snapshot) the driver has not yet persisted. ``entries[i]`` has index ``offset +
    i``."""

    __slots__ = ("entries", "offset", "snapshot")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        if self.snapshot is not None:
            return self.snapshot.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.index
        return None

    def maybe_term(self, i: int) -> int | None:
        if i < self.offset:
            if self.snapshot is not None and self.snapshot.index == i:
                return self.snapshot.term
            return None
        k = i - self.offset
        if k >= len(self.entries):
            if not self.entries and self.snapshot is not None and self.snapshot.index == i:
                return self.snapshot.term
            return None
        return self.entries[k].term

    def stable_to(self, i: int, t: int) -> None:
        """Entries up to ``(i, t)`` were persisted; drop them unless they were overwritten meanwhile."""
        k = i - self.offset
        if k < 0 or k >= len(self.entries) or self.entries[k].term != t:
            return
        del self.entries[: k + 1]
        self.offset = i + 1

    def stable_snap_to(self, i: int) -> None:
        if self.snapshot is not None and self.snapshot.index == i:
            self.snapshot = None

    def restore(self, snap: Snapshot) -> None:
        self.offset = snap.index + 1
        self.entries = []
        self.snapshot = snap

    def truncate_and_append(self, ents: list[Entry] | tuple[Entry, ...]) -> None:
        after = ents[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif after <= self.offset:
            # Replace everything unstable; the storage truncates its own suffix when these are appended.
            self.offset = after
            self.entries = list(ents)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(ents)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    __slots__ = ("applied", "committed", "max_next_ents_size", "storage", "unstable")

    def __init__(self, storage: Storage, max_next_ents_size: int | None = None) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        self.committed = first - 1
        self.applied = first - 1
        self.max_next_ents_size = max_next_ents_size

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, len(unstable)={len(self.unstable.entries)})"
        )

    # -- indexes and terms -----------------------------------------------------------------------------------

    def first_index(self) -> int:
        snap = self.unstable.snapshot
        return snap.metadata.index + 1 if snap is not None else self.storage.first_index()

    def last_index(self) -> int:
        u = self.unstable
        if u.entries:
            return u.offset + len(u.entries) - 1
        if u.snapshot is not None:
            return u.snapshot.metadata.index
        return self.storage.last_index()

    def term(self, i: int) -> int:
        """The term of entry ``i``; 0 past the end; ``CompactedError`` below the dummy index."""
        t = self.unstable.maybe_term(i)
        if t is not None:
            return t
        dummy = self.first_index() - 1
        if i < dummy:
            raise CompactedError(f"term of {i} requested but the log is compacted up to {dummy}")
        if i > self.last_index():
            return 0
        try:
            return self.storage.term(i)
        except UnavailableError:
            return 0

    def zero_term_on_compacted(self, i: int) -> int:
        try:
            return self.term(i)
        except CompactedError:
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, i: int, t: int) -> bool:
        try:
            return self.term(i) == t
        except CompactedError:
            return False

    def is_up_to_date(self, lasti: int, term: int) -> bool:
        """§5.4.1: a candidate's log ending at ``(lasti, term)`` is at least as up-to-date as ours."""
        last_term = self.last_term()
        return term > last_term or (term == last_term and lasti >= self.last_index())

    # -- appending -------------------------------------------------------------------------------------------

    def maybe_append(self, index: int, log_term: int, committed: int, ents: tuple[Entry, ...]) -> int | None:
        """Follower side of AppendEntries: returns the last new index, or ``None`` if ``(index, log_term)``
        does not match our log (the leader must back up)."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        ci = self.find_conflict(ents)
        if ci:
            if ci <= self.committed:
                raise RaftError(f"entry {ci} conflicts with committed entry (committed={self.committed})")
            self.append(ents[ci - (index + 1) :])
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, ents: list[Entry] | tuple[Entry, ...]) -> int:
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise RaftError(
                f"appending after {after} would overwrite committed entries up to {self.committed}"
            )
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    def find_conflict(self, ents: tuple[Entry, ...] | list[Entry]) -> int:
        """The index of the first entry of ``ents`` that is new or conflicts with ours; 0 if all are
        present."""
        last = self.last_index()
        for e in ents:
            if e.index > last or not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= ``index`` whose term is <= ``term`` (fast log backtracking, etcd's hint)."""
        last = self.last_index()
        if index > last:
            return index
        while True:
            try:
                t = self.term(index)
            except StorageError:
                break
            if t <= term:
                break
            index -= 1
        return index

    # -- reading ---------------------------------------------------------------------------------------------

    def unstable_entries(self) -> list[Entry]:
        return self.unstable.entries

    def entries(self, i: int, max_size: int | None = None, max_count: int | None = None) -> list[Entry]:
        last = self.last_index()
        if i > last:
            return []
        hi = last + 1
        if max_count is not None and hi - i > max_count:
            hi = i + max_count
        return self.slice(i, hi, max_size)

    def slice(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``; raises ``CompactedError`` if ``lo`` was compacted away."""
        if lo > hi:
            raise RaftError(f"invalid slice {lo} > {hi}")
        fi = self.first_index()
        if lo < fi:
            raise CompactedError(f"entries from {lo} requested but the first index is {fi}")
        if hi > self.last_index() + 1:
            raise RaftError(f"slice [{lo}, {hi}) out of bound [{fi}, {self.last_index()}]")
        if lo == hi:
            return []
        off = self.unstable.offset
        if hi <= off:
            return self.storage.entries(lo, hi, max_size)
        if lo >= off:
            return limit_size(self.unstable.slice(lo, hi), max_size)
        stored = self.storage.entries(lo, off, max_size)
        if len(stored) < off - lo:  # the size limit cut the stored part short
            return stored
        return limit_size(stored + self.unstable.slice(off, hi), max_size)

    def next_committed_entries(self) -> list[Entry]:
        off = max(self.applied + 1, self.first_index())
        if self.committed + 1 > off:
            return self.slice(off, self.committed + 1, self.max_next_ents_size)
        return []

    def has_next_committed_entries(self) -> bool:
        return self.committed + 1 > max(self.applied + 1, self.first_index())

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    def has_pending_snapshot(self) -> bool:
        return self.unstable.snapshot is not None

    # -- committing and applying -----------------------------------------------------------------------------

    def commit_to(self, tocommit: int) -> None:
        if self.committed < tocommit:
            if self.last_index() < tocommit:
                raise RaftError(f"commit index {tocommit} is past the last index {self.last_index()}")
            self.committed = tocommit

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """§5.4.2: advance the commit index only to an entry of the current term."""
        if max_index > self.committed and self.zero_term_on_compacted(max_index) == term:
            self.commit_to(max_index)
            return True
        return False

    def applied_to(self, i: int) -> None:
        if i == 0:
            return
        if i > self.committed or i < self.applied:
            raise RaftError(f"applied index {i} is out of range [{self.applied}, {self.committed}]")
        self.applied = i

    def stable_to(self, i: int, t: int) -> None:
        self.unstable.stable_to(i, t)

    def stable_snap_to(self, i: int) -> None:
        self.unstable.stable_snap_to(i)

    def restore(self, snap: Snapshot) -> None:
        self.committed = snap.index
        self.unstable.restore(snap)
