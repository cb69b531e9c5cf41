"""Follower progress and flow control: probe / replicate / snapshot states and the inflight window."""

from __future__ import annotations

import pytest

from tunnelmesh.coord.raft.errors import RaftError
from tunnelmesh.coord.raft.messages import Entry, Message, MessageType
from tunnelmesh.coord.raft.progress import Inflights, Progress, ProgressState

from .harness import new_raft, read_messages

M = MessageType


def test_inflights_window_by_count() -> None:
    inf = Inflights(3)
    for i in (1, 2, 3):
        inf.add(i, 10)
    assert inf.full()
    with pytest.raises(RaftError):
        inf.add(4, 10)
    inf.free_le(2)
    assert len(inf) == 1 and inf.bytes == 10
    inf.free_le(1)  # stale ack frees nothing
    assert len(inf) == 1
    inf.free_first_one()
    assert len(inf) == 0 and not inf.full()


def test_inflights_window_by_bytes() -> None:
    inf = Inflights(100, max_bytes=250)
    inf.add(1, 100)
    inf.add(2, 100)
    assert not inf.full()
    inf.add(3, 100)
    assert inf.full()
    inf.free_le(1)
    assert not inf.full()


def _pr(state: ProgressState, match: int = 3, next_index: int = 5) -> Progress:
    pr = Progress(match, next_index, Inflights(4))
    if state == ProgressState.REPLICATE:
        pr.become_replicate()
        pr.next = next_index
    elif state == ProgressState.SNAPSHOT:
        pr.become_snapshot(10)
    return pr


def test_probe_pauses_after_one_append_and_resumes_on_ack() -> None:
    pr = _pr(ProgressState.PROBE)
    assert not pr.is_paused()
    pr.sent_entries(6, 100)
    assert pr.is_paused()
    assert pr.next == 5  # probing does not advance next optimistically
    assert pr.maybe_update(6)
    assert not pr.is_paused()


def test_replicate_advances_next_optimistically_until_window_full() -> None:
    pr = _pr(ProgressState.REPLICATE, match=3, next_index=4)
    for last in (5, 7, 9, 11):
        assert not pr.is_paused()
        pr.sent_entries(last, 10)
    assert pr.next == 12
    assert pr.is_paused()
    pr.maybe_update(7)
    pr.inflights.free_le(7)
    assert not pr.is_paused()


def test_snapshot_state_is_always_paused() -> None:
    assert _pr(ProgressState.SNAPSHOT).is_paused()


@pytest.mark.parametrize(
    ("state", "match", "next_index", "rejected", "hint", "want_ok", "want_next"),
    [
        (ProgressState.REPLICATE, 5, 10, 5, 5, False, 10),  # stale: rejected <= match
        (ProgressState.REPLICATE, 5, 10, 9, 9, True, 6),  # back to match + 1
        (ProgressState.PROBE, 0, 10, 5, 5, False, 10),  # stale: not the probe we sent (next-1)
        (ProgressState.PROBE, 0, 10, 9, 9, True, 9),
        (ProgressState.PROBE, 0, 10, 9, 2, True, 3),  # the hint skips ahead
        (ProgressState.PROBE, 0, 2, 1, 0, True, 1),
    ],
)
def test_maybe_decr_to(
    state: ProgressState,
    match: int,
    next_index: int,
    rejected: int,
    hint: int,
    want_ok: bool,
    want_next: int,
) -> None:
    pr = _pr(state, match, next_index)
    assert pr.maybe_decr_to(rejected, hint) == want_ok
    assert pr.next == want_next


def test_become_probe_after_snapshot_resumes_after_it() -> None:
    pr = _pr(ProgressState.SNAPSHOT, match=1)
    pr.become_probe()
    assert pr.state == ProgressState.PROBE and pr.next == 11


def test_leader_pipelines_appends_up_to_the_inflight_limit() -> None:
    r = new_raft(1, [1, 2], max_inflight_msgs=3)
    r.become_candidate()
    r.become_leader()
    read_messages(r)
    r.prs.progress[2].become_replicate()
    msgs = []
    for i in range(5):
        r.step(Message(M.PROP, frm=1, entries=(Entry(0, 0, data=b"%d" % i),)))
        msgs += [m for m in read_messages(r) if m.type == M.APP]  # one Ready per proposal
    assert len(msgs) == 3, "only three appends may be in flight"
    # One ack frees a slot and the leader immediately sends everything outstanding in one batch.
    r.step(Message(M.APP_RESP, frm=2, to=1, term=r.term, index=msgs[0].index + len(msgs[0].entries)))
    more = [m for m in read_messages(r) if m.type == M.APP]
    assert len(more) == 1
    assert [e.data for e in more[0].entries] == [b"3", b"4"]


def test_leader_batches_by_max_entries_per_message() -> None:
    r = new_raft(1, [1, 2], max_entries_per_msg=2, max_inflight_msgs=100)
    r.become_candidate()
    r.become_leader()
    read_messages(r)
    pr = r.prs.progress[2]
    pr.match = 0
    pr.become_replicate()
    r.raft_log.append([Entry(i, r.term, data=b"x") for i in range(2, 7)])
    r.step(Message(M.APP_RESP, frm=2, to=1, term=r.term, index=0))  # stale but fine: triggers nothing
    r._send_append(2)
    while r._maybe_send_append(2, False):
        pass
    sizes = [len(m.entries) for m in read_messages(r) if m.type == M.APP]
    assert sizes == [2, 2, 2]


def test_heartbeat_response_unblocks_a_full_window() -> None:
    r = new_raft(1, [1, 2], max_inflight_msgs=1)
    r.become_candidate()
    r.become_leader()
    read_messages(r)
    r.prs.progress[2].become_replicate()
    r.step(Message(M.PROP, frm=1, entries=(Entry(0, 0, data=b"a"),)))
    r.step(Message(M.PROP, frm=1, entries=(Entry(0, 0, data=b"b"),)))
    assert sum(m.type == M.APP for m in read_messages(r)) == 1
    r.step(Message(M.HEARTBEAT_RESP, frm=2, to=1, term=r.term))
    assert sum(m.type == M.APP for m in read_messages(r)) == 1


def test_rejection_moves_replicating_follower_back_to_probe() -> None:
    r = new_raft(1, [1, 2])
    r.become_candidate()
    r.become_leader()
    read_messages(r)
    pr = r.prs.progress[2]
    pr.become_replicate()
    r.step(Message(M.PROP, frm=1, entries=(Entry(0, 0, data=b"a"),)))
    read_messages(r)
    r.step(Message(M.APP_RESP, frm=2, to=1, term=r.term, index=2, reject=True, reject_hint=0))
    assert pr.state == ProgressState.PROBE
    (m,) = read_messages(r)
    assert (m.type, m.index) == (M.APP, 0)


def test_proposals_between_two_readies_travel_in_one_append_per_follower() -> None:
    r = new_raft(1, [1, 2, 3])
    r.become_candidate()
    r.become_leader()
    read_messages(r)
    for pr in r.prs.progress.values():
        pr.become_replicate()
    for i in range(10):
        r.step(Message(M.PROP, frm=1, entries=(Entry(0, 0, data=b"%d" % i),)))
    msgs = read_messages(r)
    assert sorted((m.to, len(m.entries)) for m in msgs) == [(2, 11), (3, 11)]
