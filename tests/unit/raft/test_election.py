"""Pre-vote (thesis §9.6), check-quorum and the leader lease (§6.2 / §4.2.3)."""

from __future__ import annotations

from tunnelmesh.coord.raft.messages import Message, MessageType, StateType

from .harness import Network, new_raft, read_messages

M = MessageType


def _net(n: int = 3, **cfg: object) -> Network:
    peers = list(range(1, n + 1))
    return Network(*[new_raft(i, peers, **cfg) for i in peers])  # type: ignore[arg-type]


def test_prevote_partitioned_node_does_not_inflate_its_term() -> None:
    nt = _net(pre_vote=True)
    nt.hup(1)
    assert nt.peers[1].state == StateType.LEADER
    nt.isolate(3)
    for _ in range(5):
        nt.hup(3)
    r3 = nt.peers[3]
    assert r3.state == StateType.PRE_CANDIDATE
    assert r3.term == 1, "pre-candidates never bump their term"
    nt.recover()
    nt.propose(1)  # the leader's append brings node 3 back as a follower
    assert r3.state == StateType.FOLLOWER
    assert nt.peers[1].state == StateType.LEADER
    assert nt.peers[1].term == 1


def test_without_prevote_a_rejoining_node_disrupts_the_leader() -> None:
    nt = _net(pre_vote=False)
    nt.hup(1)
    nt.isolate(3)
    for _ in range(3):
        nt.hup(3)
    assert nt.peers[3].term == 4
    nt.recover()
    nt.hup(3)  # term 5 vote request deposes the leader (its log is behind, so nobody wins yet)
    assert nt.peers[1].state != StateType.LEADER or nt.peers[1].term == 5


def test_prevote_wins_then_real_election_in_next_term() -> None:
    nt = _net(pre_vote=True)
    nt.hup(1)
    r1 = nt.peers[1]
    assert r1.state == StateType.LEADER
    assert r1.term == 1
    assert {m.type for m in nt.delivered} >= {M.PRE_VOTE, M.PRE_VOTE_RESP, M.VOTE, M.VOTE_RESP}


def test_prevote_rejected_when_candidate_log_is_behind() -> None:
    nt = _net(pre_vote=True)
    nt.hup(1)
    nt.isolate(3)
    nt.propose(1)
    nt.recover()
    nt.peers[1].become_follower(1, 0)  # leaderless, but nodes 1 and 2 have the newer entry
    nt.peers[2].become_follower(1, 0)
    nt.hup(3)
    assert nt.peers[3].state == StateType.FOLLOWER, "pre-vote lost: node 3 is behind"
    assert nt.peers[3].term == 1


def test_check_quorum_leader_steps_down_without_quorum_contact() -> None:
    et = 10
    nt = _net(check_quorum=True, election=et)
    nt.hup(1)
    r1 = nt.peers[1]
    assert r1.state == StateType.LEADER
    nt.isolate(1)
    for _ in range(2 * et + 1):
        r1.tick()
        read_messages(r1)
    assert r1.state == StateType.FOLLOWER
    assert r1.lead == 0


def test_check_quorum_leader_stays_while_followers_respond() -> None:
    et = 10
    nt = _net(check_quorum=True, election=et)
    nt.hup(1)
    r1 = nt.peers[1]
    for _ in range(5 * et):
        r1.tick()
        nt.send(*read_messages(r1))
    assert r1.state == StateType.LEADER


def test_leader_lease_followers_ignore_disruptive_vote_requests() -> None:
    nt = _net(check_quorum=True)
    nt.hup(1)
    r2 = nt.peers[2]
    assert r2.lead == 1
    # Node 3 campaigns at a higher term while node 2 heard from the leader recently: node 2 ignores it.
    r2.step(Message(M.VOTE, frm=3, to=2, term=5, index=10, log_term=5))
    assert r2.term == 1
    assert read_messages(r2) == []
    # Once the lease expires (an election timeout without the leader), the request is considered.
    for _ in range(r2.election_timeout):
        r2.election_elapsed += 1
    r2.step(Message(M.VOTE, frm=3, to=2, term=5, index=10, log_term=5))
    assert r2.term == 5
    (m,) = read_messages(r2)
    assert (m.type, m.reject) == (M.VOTE_RESP, False)


def test_stale_leader_learns_newer_term_from_append_response() -> None:
    nt = _net(check_quorum=True)
    nt.hup(1)
    r1 = nt.peers[1]
    nt.isolate(1)
    r2 = nt.peers[2]
    nt.peers[3].election_elapsed = nt.peers[3].election_timeout  # node 3's lease on node 1 expired
    nt.hup(2)
    assert r2.state == StateType.LEADER and r2.term == 2
    nt.recover()
    r1.become_leader()  # still believes it leads term 1
    r1.msgs.clear()
    nt.send(Message(M.BEAT, frm=1, to=1))
    assert r1.state == StateType.FOLLOWER
    assert r1.term == 2


def test_single_node_becomes_leader_immediately() -> None:
    r = new_raft(1, [1])
    for _ in range(2 * r.election_timeout):
        r.tick()
    assert r.state == StateType.LEADER
