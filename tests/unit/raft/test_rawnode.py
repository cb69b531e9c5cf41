"""RawNode and the Ready contract: what must be persisted before messages go out, restart from storage."""

from __future__ import annotations

import random

import pytest

from tunnelmesh.coord.raft.core import Config
from tunnelmesh.coord.raft.errors import NotLeader, RaftError
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import (
    ConfChange,
    ConfChangeType,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    SoftState,
    StateType,
)
from tunnelmesh.coord.raft.rawnode import RawNode

M = MessageType


def handle(rn: RawNode, s: MemoryStorage, rd: Ready) -> None:
    if rd.snapshot is not None:
        s.apply_snapshot(rd.snapshot)
    s.append(rd.entries)
    if rd.hard_state is not None:
        s.set_hard_state(rd.hard_state)
    for e in rd.committed_entries:
        if e.type == EntryType.CONF_CHANGE:
            rn.apply_conf_change(ConfChange.decode(e.data))
    rn.advance(rd)


def test_single_node_elects_itself_and_commits_proposals() -> None:
    s = MemoryStorage.bootstrap([1])
    rn = RawNode(Config(id=1), s, random.Random(1))
    rn.campaign()
    rd = rn.ready()
    assert rd.soft_state == SoftState(1, StateType.LEADER)
    assert rd.hard_state == HardState(term=2, vote=1, commit=2)
    assert [(e.index, e.term) for e in rd.entries] == [(2, 2)]
    assert rd.must_sync
    handle(rn, s, rd)
    assert rn.propose(b"hello") == (3, 2)
    rd = rn.ready()
    assert [e.data for e in rd.entries] == [b"hello"]
    assert [e.data for e in rd.committed_entries] == [b"hello"]
    handle(rn, s, rd)
    assert not rn.has_ready()
    assert rn.status().applied == 3


def test_vote_and_its_response_come_in_the_same_ready_so_the_vote_is_persisted_before_sending() -> None:
    s = MemoryStorage.bootstrap([1, 2, 3])
    rn = RawNode(Config(id=2, check_quorum=False, pre_vote=False), s)
    rn.step(Message(M.VOTE, frm=1, to=2, term=2, index=1, log_term=1))
    rd = rn.ready()
    assert rd.hard_state == HardState(term=2, vote=1, commit=1)
    assert [(m.type, m.reject) for m in rd.messages] == [(M.VOTE_RESP, False)]
    assert rd.must_sync
    # Crash before persisting: the vote was never sent, and the restarted node has not voted.
    rn2 = RawNode(Config(id=2, check_quorum=False, pre_vote=False), s)
    assert rn2.raft.vote == 0
    # Persist, then crash and restart: the vote survives, so a second candidate is refused.
    handle(rn, s, rd)
    rn3 = RawNode(Config(id=2, check_quorum=False, pre_vote=False), s)
    assert (rn3.raft.term, rn3.raft.vote) == (2, 1)
    rn3.step(Message(M.VOTE, frm=3, to=2, term=2, index=1, log_term=1))
    assert [(m.type, m.reject) for m in rn3.ready().messages] == [(M.VOTE_RESP, True)]


def test_appended_entries_and_ack_come_in_the_same_ready() -> None:
    s = MemoryStorage.bootstrap([1, 2, 3])
    rn = RawNode(Config(id=2), s)
    from tunnelmesh.coord.raft.messages import Entry

    rn.step(
        Message(M.APP, frm=1, to=2, term=2, index=1, log_term=1, entries=(Entry(2, 2, data=b"x"),), commit=1)
    )
    rd = rn.ready()
    assert [e.index for e in rd.entries] == [2]
    assert [(m.type, m.index) for m in rd.messages] == [(M.APP_RESP, 2)]
    handle(rn, s, rd)
    assert s.last_index() == 2
    assert rn.raft.raft_log.unstable_entries() == []


def test_restart_redelivers_committed_but_unapplied_entries() -> None:
    s = MemoryStorage.bootstrap([1])
    rn = RawNode(Config(id=1), s)
    rn.campaign()
    handle(rn, s, rn.ready())
    rn.propose(b"a")
    rn.propose(b"b")
    handle(rn, s, rn.ready())
    restarted = RawNode(Config(id=1, applied=2), s)
    rd = restarted.ready()
    assert [e.data for e in rd.committed_entries] == [b"a", b"b"]
    assert rd.hard_state is None, "unchanged since load"


def test_propose_on_follower_raises_not_leader() -> None:
    s = MemoryStorage.bootstrap([1, 2, 3])
    rn = RawNode(Config(id=2), s)
    with pytest.raises(NotLeader) as exc:
        rn.propose(b"x")
    assert exc.value.leader_id == 0
    rn.step(Message(M.HEARTBEAT, frm=3, to=2, term=2))
    with pytest.raises(NotLeader) as exc:
        rn.propose(b"x")
    assert exc.value.leader_id == 3


def test_local_messages_cannot_be_stepped_from_network() -> None:
    rn = RawNode(Config(id=1), MemoryStorage.bootstrap([1, 2, 3]))
    with pytest.raises(RaftError):
        rn.step(Message(M.HUP, frm=1, to=1))


def test_config_validation() -> None:
    with pytest.raises(RaftError, match="election_tick"):
        RawNode(Config(id=1, election_tick=1, heartbeat_tick=1), MemoryStorage())
    with pytest.raises(RaftError, match="id must be"):
        RawNode(Config(id=0), MemoryStorage())


def test_conf_change_through_rawnode() -> None:
    s = MemoryStorage.bootstrap([1])
    rn = RawNode(Config(id=1), s)
    rn.campaign()
    handle(rn, s, rn.ready())
    rn.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 2))
    handle(rn, s, rn.ready())
    st = rn.status()
    assert st.conf_state.learners == (2,)
    assert 2 in st.progress


def test_stepping_between_ready_and_advance_keeps_newer_unstable_entries() -> None:
    from tunnelmesh.coord.raft.messages import Entry

    s = MemoryStorage.bootstrap([1, 2, 3])
    rn = RawNode(Config(id=2), s)
    rn.step(Message(M.APP, frm=1, to=2, term=2, index=1, log_term=1, entries=(Entry(2, 2, data=b"old"),)))
    rd = rn.ready()
    # While the driver persists rd, a new leader overwrites index 2 (it was never committed).
    rn.step(Message(M.APP, frm=3, to=2, term=3, index=1, log_term=1, entries=(Entry(2, 3, data=b"new"),)))
    handle(rn, s, rd)
    assert rn.raft.raft_log.unstable_entries() == [Entry(2, 3, data=b"new")]
    rd2 = rn.ready()
    assert rd2.entries == (Entry(2, 3, data=b"new"),)
    assert rd2.hard_state is not None and rd2.hard_state.term == 3
    handle(rn, s, rd2)
    assert s.entries(2, 3) == [Entry(2, 3, data=b"new")]
