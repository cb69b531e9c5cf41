"""Snapshots: compaction, InstallSnapshot to lagging followers, restore, and snapshot status reporting."""

from __future__ import annotations

from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import (
    ConfState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    StateType,
)
from tunnelmesh.coord.raft.progress import ProgressState

from .harness import Network, new_raft, persist, read_messages, storage_with

M = MessageType
SNAP = Snapshot(SnapshotMetadata(index=11, term=11, conf_state=ConfState((1, 2))), b"state@11")


def _leader_with_compacted_log() -> tuple[object, MemoryStorage]:
    st = MemoryStorage()
    st.apply_snapshot(SNAP)
    r = new_raft(1, [1, 2], storage=st)
    r.become_candidate()
    r.become_leader()
    read_messages(r)
    return r, st


def test_leader_sends_snapshot_when_follower_needs_compacted_entries() -> None:
    r, _ = _leader_with_compacted_log()
    pr = r.prs.progress[2]  # type: ignore[attr-defined]
    pr.next = r.raft_log.first_index() - 1  # type: ignore[attr-defined]
    pr.recent_active = True
    r.step(Message(M.HEARTBEAT_RESP, frm=2, to=1, term=r.term))  # type: ignore[attr-defined]
    msgs = read_messages(r)  # type: ignore[arg-type]
    snaps = [m for m in msgs if m.type == M.SNAP]
    assert len(snaps) == 1 and snaps[0].snapshot == SNAP
    assert pr.state == ProgressState.SNAPSHOT and pr.pending_snapshot == 11
    assert pr.is_paused()


def test_snapshot_status_failure_and_finish() -> None:
    for reject, want_next in [(True, 1), (False, 12)]:
        r, _ = _leader_with_compacted_log()
        pr = r.prs.progress[2]  # type: ignore[attr-defined]
        pr.match = 0
        pr.become_snapshot(11)
        r.step(Message(M.SNAP_STATUS, frm=2, to=1, reject=reject))  # type: ignore[attr-defined]
        assert pr.state == ProgressState.PROBE
        assert pr.next == want_next
        assert pr.probe_sent, "wait for a heartbeat response before probing again"


def test_follower_restores_snapshot() -> None:
    r = new_raft(2, [1, 2], storage=storage_with([1, 2]))
    r.step(Message(M.SNAP, frm=1, to=2, term=11, snapshot=SNAP))
    assert r.raft_log.last_index() == 11
    assert r.raft_log.committed == 11
    assert r.raft_log.term(11) == 11
    assert r.prs.conf_state() == ConfState((1, 2))
    (m,) = read_messages(r)
    assert (m.type, m.index) == (M.APP_RESP, 11)
    persist(r)
    assert r.raft_log.storage.snapshot() == SNAP
    assert r.raft_log.first_index() == 12


def test_follower_ignores_snapshot_older_than_its_commit() -> None:
    r = new_raft(2, [1, 2], storage=storage_with([1, 2]))
    r.step(Message(M.SNAP, frm=1, to=2, term=11, snapshot=SNAP))
    persist(r)
    old = Snapshot(SnapshotMetadata(5, 5, ConfState((1, 2))))
    r.step(Message(M.SNAP, frm=1, to=2, term=11, snapshot=old))
    assert r.raft_log.committed == 11
    assert not r.raft_log.has_pending_snapshot()


def test_follower_with_matching_log_only_fast_forwards_commit() -> None:
    from .harness import ents_with_terms

    st = storage_with([1, 2], ents=ents_with_terms(1, 1, 1))
    r = new_raft(2, [1, 2], storage=st)
    r.step(Message(M.SNAP, frm=1, to=2, term=1, snapshot=Snapshot(SnapshotMetadata(2, 1, ConfState((1, 2))))))
    assert r.raft_log.committed == 2
    assert not r.raft_log.has_pending_snapshot()
    assert r.raft_log.last_index() == 3


def test_lagging_follower_catches_up_through_snapshot_end_to_end() -> None:
    nt = Network(None, None, None)
    nt.hup(1)
    nt.isolate(3)
    for i in range(10):
        nt.propose(1, b"v%d" % i)
    lead = nt.peers[1]
    persist(lead)
    st = nt.storage[1]
    lead.raft_log.applied_to(lead.raft_log.committed)
    st.create_snapshot(lead.raft_log.applied, ConfState((1, 2, 3)), b"app")
    st.compact(lead.raft_log.applied)
    nt.recover()
    lead.prs.progress[3].recent_active = True
    nt.send(Message(M.BEAT, frm=1, to=1))
    r3 = nt.peers[3]
    assert r3.raft_log.committed == lead.raft_log.committed
    assert r3.raft_log.unstable.snapshot is not None and r3.raft_log.unstable.snapshot.data == b"app"
    assert lead.prs.progress[3].state == ProgressState.REPLICATE
    assert lead.state == StateType.LEADER
