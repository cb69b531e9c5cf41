"""ReadIndex linearizable reads (thesis §6.4): heartbeat-confirmed, forwarded by followers, released when
applied."""

from __future__ import annotations

import pytest

from tunnelmesh.coord.raft.core import Config
from tunnelmesh.coord.raft.errors import NotLeader
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import Message, MessageType, ReadState
from tunnelmesh.coord.raft.rawnode import RawNode
from tunnelmesh.coord.raft.read_only import ReadOnlyOption

from .harness import Network, new_raft, read_messages

M = MessageType


def _net(**cfg: object) -> Network:
    peers = [1, 2, 3]
    return Network(*[new_raft(i, peers, **cfg) for i in peers])  # type: ignore[arg-type]


def test_read_index_on_leader_after_heartbeat_quorum() -> None:
    nt = _net()
    nt.hup(1)
    nt.propose(1)
    r1 = nt.peers[1]
    nt.send(Message(M.READ_INDEX, frm=1, to=1, context=b"ctx1"))
    assert r1.read_states == [ReadState(r1.raft_log.committed, b"ctx1")]
    assert r1.raft_log.committed == 2


def test_read_index_needs_a_quorum_of_heartbeat_acks() -> None:
    nt = _net()
    nt.hup(1)
    nt.isolate(1)
    r1 = nt.peers[1]
    nt.send(Message(M.READ_INDEX, frm=1, to=1, context=b"ctx"))
    assert r1.read_states == [], "a partitioned leader must not answer reads"


def test_read_index_needs_acks_from_a_majority_not_just_one_follower() -> None:
    peers = [1, 2, 3, 4, 5]
    nt = Network(*[new_raft(i, peers) for i in peers])
    nt.hup(1)
    r1 = nt.peers[1]
    for n in (3, 4, 5):
        nt.isolate(n)  # the leader still reaches node 2: 2 of 5 voters is not a quorum
    nt.send(Message(M.READ_INDEX, frm=1, to=1, context=b"minority"))
    assert r1.read_states == []
    nt.recover()
    nt.send(Message(M.BEAT, frm=1, to=1))
    assert r1.read_states == [ReadState(1, b"minority")]


def test_read_index_forwarded_from_follower() -> None:
    nt = _net()
    nt.hup(1)
    nt.propose(1)
    nt.send(Message(M.READ_INDEX, frm=2, to=2, context=b"from2"))
    assert nt.peers[2].read_states == [ReadState(2, b"from2")]
    assert nt.peers[1].read_states == []


def test_read_index_waits_for_leader_to_commit_in_its_term() -> None:
    nt = _net()
    nt.ignore(M.APP)
    nt.hup(1)
    r1 = nt.peers[1]
    nt.send(Message(M.READ_INDEX, frm=1, to=1, context=b"early"))
    assert r1.read_states == []
    assert len(r1.pending_read_index_messages) == 1
    nt.recover()
    nt.send(Message(M.BEAT, frm=1, to=1))  # heartbeats -> appends -> commit -> release the read
    assert r1.read_states == [ReadState(1, b"early")]


def test_read_index_on_follower_without_leader_raises_not_leader() -> None:
    r = new_raft(2, [1, 2, 3])
    with pytest.raises(NotLeader):
        r.step(Message(M.READ_INDEX, frm=2, to=2, context=b"x"))


def test_lease_based_read_answers_without_heartbeat_round() -> None:
    nt = _net(check_quorum=True, read_only_option=ReadOnlyOption.LEASE_BASED)
    nt.hup(1)
    r1 = nt.peers[1]
    r1.step(Message(M.READ_INDEX, frm=1, to=1, context=b"lease"))
    assert r1.read_states == [ReadState(1, b"lease")]
    assert read_messages(r1) == []


def test_rawnode_releases_read_state_only_once_applied() -> None:
    s = MemoryStorage.bootstrap([1])
    rn = RawNode(Config(id=1), s)
    rn.campaign()
    rn.read_index(b"r")
    rd = rn.ready()
    # Released together with the committed entries it depends on (applied before reads are served).
    assert rd.read_states == (ReadState(2, b"r"),)
    assert rd.committed_entries[-1].index == 2
    s.append(rd.entries)
    rn.advance(rd)
    # A read whose index is not applied yet stays inside the core.
    rn.raft.read_states.append(ReadState(5, b"later"))
    assert not rn.has_ready()
    rn.propose(b"a")
    rn.propose(b"b")
    rn.propose(b"c")
    rd = rn.ready()
    assert rd.read_states == (ReadState(5, b"later"),)
    assert rd.committed_entries[-1].index == 5
