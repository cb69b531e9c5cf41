"""RaftLog and Unstable: conflicts, appends, commit, term lookups across storage/unstable/snapshot,
compaction."""

from __future__ import annotations

import pytest

from tunnelmesh.coord.raft.errors import CompactedError, RaftError, UnavailableError
from tunnelmesh.coord.raft.log import RaftLog, Unstable
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import ConfState, Entry, Snapshot, SnapshotMetadata

from .harness import ents_with_terms


def _log(*terms: int) -> RaftLog:
    s = MemoryStorage()
    s.append(ents_with_terms(*terms))
    return RaftLog(s)


@pytest.mark.parametrize(
    ("ents", "want"),
    [
        ([], 0),
        (ents_with_terms(1, 2, 3), 0),  # all present
        (ents_with_terms(2, 3, start=2), 0),
        (ents_with_terms(3, start=3), 0),
        (ents_with_terms(1, 2, 3, 4, 4), 4),  # new entries
        (ents_with_terms(3, 4, 4, start=3), 4),
        (ents_with_terms(4, 4), 1),  # conflicts
        (ents_with_terms(1, 4, 4), 2),
        (ents_with_terms(4, 4, 4, 4, start=3), 3),
    ],
)
def test_find_conflict(ents: list[Entry], want: int) -> None:
    assert _log(1, 2, 3).find_conflict(ents) == want


@pytest.mark.parametrize(
    ("index", "term", "want"),
    [
        (10, 3, 10),  # beyond the last index: unchanged
        (8, 3, 8),
        (8, 2, 4),  # skip the whole term-3 run
        (8, 1, 2),
        (8, 0, 0),
        (3, 2, 3),
        (0, 0, 0),
    ],
)
def test_find_conflict_by_term(index: int, term: int, want: int) -> None:
    log = _log(1, 1, 2, 2, 3, 3, 3, 3)
    assert log.find_conflict_by_term(index, term) == want


@pytest.mark.parametrize(
    ("index", "log_term", "commit", "ents", "want_last", "want_commit", "want_terms"),
    [
        (3, 3, 3, [], 3, 3, [1, 2, 3]),  # heartbeat-like
        (3, 3, 3, [Entry(4, 4)], 4, 3, [1, 2, 3, 4]),
        (3, 3, 4, [Entry(4, 4)], 4, 4, [1, 2, 3, 4]),
        (3, 3, 5, [Entry(4, 4)], 4, 4, [1, 2, 3, 4]),  # commit capped at the last new entry
        (2, 2, 3, [Entry(3, 4)], 3, 3, [1, 2, 4]),  # conflict above the commit index: truncate
        (3, 2, 3, [Entry(4, 4)], None, 1, [1, 2, 3]),  # prev entry does not match
        (4, 4, 3, [], None, 1, [1, 2, 3]),  # prev past the end
    ],
)
def test_maybe_append(
    index: int,
    log_term: int,
    commit: int,
    ents: list[Entry],
    want_last: int | None,
    want_commit: int,
    want_terms: list[int],
) -> None:
    log = _log(1, 2, 3)
    log.commit_to(1)
    assert log.maybe_append(index, log_term, commit, tuple(ents)) == want_last
    assert log.committed == want_commit
    assert [log.term(i) for i in range(1, log.last_index() + 1)] == want_terms


def test_maybe_append_refuses_to_overwrite_committed_entries() -> None:
    log = _log(1, 2, 3)
    log.commit_to(3)
    with pytest.raises(RaftError, match="conflicts with committed"):
        log.maybe_append(1, 1, 3, (Entry(2, 4),))


def test_commit_to_never_decreases_and_never_passes_last_index() -> None:
    log = _log(1, 2, 3)
    log.commit_to(2)
    log.commit_to(1)
    assert log.committed == 2
    with pytest.raises(RaftError):
        log.commit_to(4)


def test_unstable_entries_become_stable_only_if_not_overwritten() -> None:
    log = RaftLog(MemoryStorage())
    log.append(ents_with_terms(1, 1))
    log.append([Entry(2, 2)])  # overwrite index 2 before it was persisted
    log.stable_to(2, 1)  # the driver persisted the old entry 2 (term 1): must not drop the new one
    assert log.unstable_entries() == [Entry(1, 1), Entry(2, 2)]
    log.stable_to(2, 2)
    assert log.unstable_entries() == []
    assert log.unstable.offset == 3


def test_term_lookups_span_snapshot_storage_and_unstable() -> None:
    s = MemoryStorage()
    s.apply_snapshot(Snapshot(SnapshotMetadata(5, 2, ConfState((1,)))))
    s.append(ents_with_terms(2, 3, start=6))
    log = RaftLog(s)
    log.append([Entry(8, 4)])
    assert log.first_index() == 6
    assert log.last_index() == 8
    assert [log.term(i) for i in (5, 6, 7, 8, 9)] == [2, 2, 3, 4, 0]
    with pytest.raises(CompactedError):
        log.term(4)
    assert log.zero_term_on_compacted(4) == 0
    assert log.slice(6, 9) == [Entry(6, 2), Entry(7, 3), Entry(8, 4)]
    with pytest.raises(CompactedError):
        log.slice(5, 7)


def test_restore_from_snapshot_replaces_the_log() -> None:
    log = _log(1, 2, 3)
    snap = Snapshot(SnapshotMetadata(10, 5, ConfState((1, 2))))
    log.restore(snap)
    assert log.committed == 10
    assert log.first_index() == 11
    assert log.last_index() == 10
    assert log.term(10) == 5
    assert log.has_pending_snapshot()
    log.stable_snap_to(10)
    assert not log.has_pending_snapshot()


def test_next_committed_entries_respects_applied_and_size_limit() -> None:
    s = MemoryStorage()
    s.append([Entry(i, 1, data=b"x" * 100) for i in range(1, 6)])
    log = RaftLog(s, max_next_ents_size=250)
    log.commit_to(5)
    assert [e.index for e in log.next_committed_entries()] == [1, 2]  # 2 * 124 bytes fit in 250
    log.applied_to(2)
    assert [e.index for e in log.next_committed_entries()] == [3, 4]
    log.applied_to(5)
    assert not log.has_next_committed_entries()


def test_entries_batching_by_count_and_bytes() -> None:
    s = MemoryStorage()
    s.append([Entry(i, 1, data=b"x" * 100) for i in range(1, 11)])
    log = RaftLog(s)
    log.append([Entry(i, 1, data=b"x" * 100) for i in range(11, 15)])
    assert [e.index for e in log.entries(3, max_count=4)] == [3, 4, 5, 6]
    assert [e.index for e in log.entries(9, max_size=500)] == [9, 10, 11, 12]  # spans storage and unstable
    assert [e.index for e in log.entries(14, max_size=1)] == [14]  # at least one entry
    assert log.entries(15) == []


def test_is_up_to_date() -> None:
    log = _log(1, 2, 3)
    assert log.is_up_to_date(3, 3)
    assert log.is_up_to_date(2, 4)
    assert log.is_up_to_date(4, 3)
    assert not log.is_up_to_date(2, 3)
    assert not log.is_up_to_date(9, 2)


def test_unstable_truncate_and_append() -> None:
    u = Unstable(5)
    u.truncate_and_append(ents_with_terms(1, 1, start=5))
    u.truncate_and_append([Entry(7, 1)])  # directly after
    assert [e.index for e in u.entries] == [5, 6, 7]
    u.truncate_and_append([Entry(6, 2)])  # inside: truncate
    assert [(e.index, e.term) for e in u.entries] == [(5, 1), (6, 2)]
    u.truncate_and_append([Entry(4, 3)])  # before the offset: replace everything
    assert u.offset == 4
    assert [(e.index, e.term) for e in u.entries] == [(4, 3)]


def test_memory_storage_compaction_and_errors() -> None:
    s = MemoryStorage()
    s.append(ents_with_terms(1, 1, 2, 2, 3))
    s.create_snapshot(3, ConfState((1,)), b"state")
    s.compact(3)
    assert s.first_index() == 4
    assert s.last_index() == 5
    assert s.term(3) == 2
    with pytest.raises(CompactedError):
        s.term(2)
    with pytest.raises(CompactedError):
        s.entries(3, 5)
    with pytest.raises(UnavailableError):
        s.entries(4, 7)
    assert s.entries(4, 6) == [Entry(4, 2), Entry(5, 3)]
    s.append([Entry(5, 4), Entry(6, 4)])  # truncates the conflicting suffix
    assert [s.term(i) for i in (4, 5, 6)] == [2, 4, 4]
    assert s.snapshot().metadata == SnapshotMetadata(3, 2, ConfState((1,)))
