"""Single-server membership changes (thesis §4.1-4.3) and learners."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelmesh.coord.raft.errors import ProposalDropped, RaftError
from tunnelmesh.coord.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    StateType,
)

from .harness import Network, new_raft, read_messages, storage_with

M = MessageType
ADD, REMOVE, LEARNER = ConfChangeType.ADD_NODE, ConfChangeType.REMOVE_NODE, ConfChangeType.ADD_LEARNER


def test_conf_change_encoding_roundtrip() -> None:
    cc = ConfChange(LEARNER, 0xDEADBEEF, b"addr=10.0.0.4:7000")
    assert ConfChange.decode(cc.encode()) == cc


@pytest.mark.parametrize(
    ("start", "change", "want"),
    [
        (ConfState((1, 2, 3)), ConfChange(ADD, 4), ConfState((1, 2, 3, 4))),
        (ConfState((1, 2, 3)), ConfChange(LEARNER, 4), ConfState((1, 2, 3), (4,))),
        (ConfState((1, 2, 3), (4,)), ConfChange(ADD, 4), ConfState((1, 2, 3, 4))),  # promote
        (ConfState((1, 2, 3)), ConfChange(LEARNER, 3), ConfState((1, 2), (3,))),  # demote
        (ConfState((1, 2, 3)), ConfChange(REMOVE, 3), ConfState((1, 2))),
        (ConfState((1, 2, 3), (4,)), ConfChange(REMOVE, 4), ConfState((1, 2, 3))),
        (ConfState((1, 2, 3)), ConfChange(ADD, 3), ConfState((1, 2, 3))),  # no-op
        (ConfState((1, 2, 3)), ConfChange(REMOVE, 9), ConfState((1, 2, 3))),
    ],
)
def test_apply_conf_change(start: ConfState, change: ConfChange, want: ConfState) -> None:
    r = new_raft(1, list(start.voters), storage=storage_with(list(start.voters), start.learners))
    assert r.apply_conf_change(change) == want
    assert r.prs.conf_state() == want


def test_only_one_unapplied_conf_change_at_a_time() -> None:
    nt = Network(None, None, None)
    nt.hup(1)
    r1 = nt.peers[1]
    r1.raft_log.applied_to(r1.raft_log.committed)
    cc = Entry(0, 0, EntryType.CONF_CHANGE, ConfChange(LEARNER, 4).encode())
    nt.send(Message(M.PROP, frm=1, to=1, entries=(cc,)))
    assert r1.raft_log.committed == 2
    with pytest.raises(ProposalDropped, match="membership change"):
        r1.step(Message(M.PROP, frm=1, entries=(cc,)))
    r1.raft_log.applied_to(2)  # the first change was applied
    r1.step(Message(M.PROP, frm=1, entries=(cc,)))


def test_new_leader_accepts_conf_change_only_after_its_first_entry_is_applied() -> None:
    nt = Network(None, None, None)
    nt.hup(1)
    r1 = nt.peers[1]
    cc = Entry(0, 0, EntryType.CONF_CHANGE, ConfChange(LEARNER, 4).encode())
    with pytest.raises(ProposalDropped):
        r1.step(Message(M.PROP, frm=1, entries=(cc,)))


def test_learner_receives_log_but_does_not_vote_or_count_for_quorum() -> None:
    peers = [1, 2]
    nodes = [new_raft(i, peers, storage=storage_with(peers, learners=(3,))) for i in peers]
    learner = new_raft(3, peers, storage=storage_with(peers, learners=(3,)))
    nt = Network(*nodes, learner)
    assert learner.is_learner
    for _ in range(3 * learner.election_timeout):
        learner.tick()
    assert learner.state == StateType.FOLLOWER, "learners never campaign"
    assert all(m.type != M.VOTE for m in read_messages(learner))
    nt.hup(1)
    assert nt.peers[1].state == StateType.LEADER
    assert all(not (m.type == M.VOTE and m.to == 3) for m in nt.delivered), "no vote requests to learners"
    nt.propose(1, b"x")
    assert learner.raft_log.committed == nt.peers[1].raft_log.committed == 2
    # With node 2 unreachable, the learner's ack cannot commit anything.
    nt.isolate(2)
    nt.propose(1, b"y")
    assert nt.peers[1].raft_log.committed == 2
    assert learner.raft_log.last_index() == 3


def test_promoted_learner_counts_for_quorum() -> None:
    peers = [1, 2]
    nodes = [new_raft(i, peers, storage=storage_with(peers, learners=(3,))) for i in [1, 2, 3]]
    nt = Network(*nodes)
    nt.hup(1)
    for r in nt.peers.values():
        r.apply_conf_change(ConfChange(ADD, 3))
    assert not nt.peers[3].is_learner
    nt.isolate(2)
    nt.propose(1, b"x")
    assert nt.peers[1].raft_log.committed == 2


def test_removed_leader_steps_down() -> None:
    nt = Network(None, None, None)
    nt.hup(1)
    r1 = nt.peers[1]
    r1.apply_conf_change(ConfChange(REMOVE, 1))
    assert r1.state == StateType.FOLLOWER
    for _ in range(3 * r1.election_timeout):
        r1.tick()
    assert r1.state == StateType.FOLLOWER, "a removed node never campaigns"


def test_removing_a_node_can_commit_pending_entries() -> None:
    nt = Network(None, None, None)
    nt.hup(1)
    nt.isolate(3)
    nt.isolate(2)
    nt.propose(1, b"x")
    r1 = nt.peers[1]
    assert r1.raft_log.committed == 1
    nt.recover()
    nt.isolate(3)
    r1.apply_conf_change(ConfChange(REMOVE, 3))
    r1.apply_conf_change(ConfChange(REMOVE, 2))
    assert r1.raft_log.committed == 2, "a single remaining voter commits on its own"


def test_node_added_as_voter_is_marked_active_for_check_quorum() -> None:
    nt = Network(None, None, None, check_quorum=True)
    nt.hup(1)
    r1 = nt.peers[1]
    r1.apply_conf_change(ConfChange(ADD, 4))
    r1.apply_conf_change(ConfChange(ADD, 5))
    # 5 voters, nodes 4 and 5 not answering yet: the leader must survive one check-quorum round.
    for _ in range(r1.election_timeout):
        r1.tick()
        nt.send(*read_messages(r1))
    assert r1.state == StateType.LEADER


def test_node_with_unapplied_committed_conf_change_does_not_campaign() -> None:
    st = storage_with([1, 2, 3])
    st.append([Entry(1, 1, EntryType.CONF_CHANGE, ConfChange(REMOVE, 1).encode())])
    r = new_raft(1, [1, 2, 3], storage=st)
    r.raft_log.commit_to(1)
    r.step(Message(M.HUP, frm=1))
    assert r.state == StateType.FOLLOWER
    r.raft_log.applied_to(1)
    r.step(Message(M.HUP, frm=1))
    assert r.state == StateType.CANDIDATE


@given(st.binary(max_size=64))
def test_conf_change_decode_raises_only_raft_error_on_arbitrary_bytes(data: bytes) -> None:
    try:
        cc = ConfChange.decode(data)
    except RaftError:
        return
    assert ConfChange.decode(cc.encode()) == cc


@given(st.sampled_from(list(ConfChangeType)), st.integers(1, 2**64 - 1), st.binary(max_size=32))
def test_conf_change_roundtrip(kind: ConfChangeType, node_id: int, ctx: bytes) -> None:
    cc = ConfChange(kind, node_id, ctx)
    assert ConfChange.decode(cc.encode()) == cc
