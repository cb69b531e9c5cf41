"""Leadership transfer (thesis §3.10): catch the transferee up, MsgTimeoutNow, no proposals meanwhile,
abort."""

from __future__ import annotations

import pytest

from tunnelmesh.coord.raft.errors import ProposalDropped
from tunnelmesh.coord.raft.messages import Entry, Message, MessageType, StateType

from .harness import Network, new_raft, read_messages

M = MessageType


def _net(**cfg: object) -> Network:
    peers = [1, 2, 3]
    return Network(*[new_raft(i, peers, **cfg) for i in peers])  # type: ignore[arg-type]


@pytest.mark.parametrize("check_quorum", [False, True])
def test_transfer_to_up_to_date_follower(check_quorum: bool) -> None:
    nt = _net(check_quorum=check_quorum)
    nt.hup(1)
    nt.send(Message(M.TRANSFER_LEADER, frm=2, to=1))
    assert nt.peers[2].state == StateType.LEADER
    assert nt.peers[1].state == StateType.FOLLOWER
    assert nt.peers[1].lead == 2
    assert nt.peers[2].term == 2
    assert M.TIMEOUT_NOW in {m.type for m in nt.delivered}


def test_transfer_catches_up_a_lagging_transferee_first() -> None:
    nt = _net()
    nt.hup(1)
    nt.isolate(3)
    nt.propose(1)
    nt.recover()
    nt.ignore(M.APP)  # keep node 3 behind while the transfer is requested
    nt.send(Message(M.TRANSFER_LEADER, frm=3, to=1))
    r1 = nt.peers[1]
    assert r1.lead_transferee == 3
    assert r1.state == StateType.LEADER
    nt.recover()
    nt.send(Message(M.HEARTBEAT_RESP, frm=3, to=1, term=r1.term))  # triggers the catch-up append
    assert nt.peers[3].state == StateType.LEADER
    assert r1.lead_transferee == 0


def test_leader_rejects_proposals_during_transfer() -> None:
    nt = _net()
    nt.hup(1)
    nt.isolate(3)
    nt.send(Message(M.TRANSFER_LEADER, frm=3, to=1))
    with pytest.raises(ProposalDropped, match="leadership is being transferred"):
        nt.peers[1].step(Message(M.PROP, frm=1, entries=(Entry(0, 0, data=b"x"),)))


def test_transfer_aborts_after_an_election_timeout() -> None:
    nt = _net()
    nt.hup(1)
    nt.isolate(3)
    r1 = nt.peers[1]
    nt.send(Message(M.TRANSFER_LEADER, frm=3, to=1))
    assert r1.lead_transferee == 3
    for _ in range(r1.election_timeout):
        r1.tick()
        read_messages(r1)
    assert r1.lead_transferee == 0
    assert r1.state == StateType.LEADER
    r1.step(Message(M.PROP, frm=1, entries=(Entry(0, 0, data=b"x"),)))  # accepted again


@pytest.mark.parametrize("target", [1, 9])
def test_transfer_to_self_or_non_member_is_ignored(target: int) -> None:
    nt = _net()
    nt.hup(1)
    nt.send(Message(M.TRANSFER_LEADER, frm=target, to=1))
    assert nt.peers[1].state == StateType.LEADER
    assert nt.peers[1].lead_transferee == 0


def test_transfer_request_to_follower_is_forwarded_to_leader() -> None:
    nt = _net()
    nt.hup(1)
    nt.send(Message(M.TRANSFER_LEADER, frm=3, to=2))
    assert nt.peers[3].state == StateType.LEADER


def test_transfer_overrides_leader_lease_with_check_quorum() -> None:
    nt = _net(check_quorum=True, pre_vote=True)
    nt.hup(1)
    nt.send(Message(M.TRANSFER_LEADER, frm=3, to=1))
    assert nt.peers[3].state == StateType.LEADER
    assert nt.peers[3].term == 2


def test_second_transfer_to_different_node_replaces_the_first() -> None:
    nt = _net()
    nt.hup(1)
    nt.isolate(3)
    nt.send(Message(M.TRANSFER_LEADER, frm=3, to=1))
    assert nt.peers[1].lead_transferee == 3
    nt.send(Message(M.TRANSFER_LEADER, frm=2, to=1))
    assert nt.peers[2].state == StateType.LEADER
