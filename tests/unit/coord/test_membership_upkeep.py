"""The leader's view of its members: which voter it may remove to let a waiting learner take its place
(``coord.dead_voter_timeout``), and which members count as healthy. The whole path with real coordinators
(kill -9 a voter, a new one joins and replaces it; ``cluster status``) is tests/integration/test_coord_join.py
and tests/integration/test_coord_cluster.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.coord.raft.driver import DriverOptions, PeerStatus
from tunnelmesh.coord.raft.messages import ConfChange, ConfChangeType, ConfState, StateType
from tunnelmesh.coord.service import Coordinator, dead_voter_to_remove

LEADER, A, B, C, D = 1, 2, 3, 4, 5


@pytest.mark.parametrize(
    ("voters", "silent", "expected"),
    [
        # Three voters, one silent past the timeout: it goes (the other two still make a quorum of two).
        ([LEADER, A, B], {A: 0.1, B: 301.0}, B),
        # Silent, but not for long enough yet: nobody goes.
        ([LEADER, A, B], {A: 0.1, B: 299.0}, None),
        # Nobody silent.
        ([LEADER, A, B], {A: 0.1, B: 0.2}, None),
        # Two of three silent: the leader alone is no quorum, so no membership change could commit anyway.
        ([LEADER, A, B], {A: 400.0, B: 500.0}, None),
        # Five voters, two silent: the longest silent goes first (three live of four left: a quorum).
        ([LEADER, A, B, C, D], {A: 0.1, B: 310.0, C: 900.0, D: 0.3}, C),
        # Five voters, three silent: no quorum.
        ([LEADER, A, B, C, D], {A: 400.0, B: 310.0, C: 900.0, D: 0.3}, None),
        # A single voter (the leader) has nobody to replace.
        ([LEADER], {}, None),
    ],
)
def test_only_a_long_silent_voter_goes_and_only_while_the_live_ones_keep_a_quorum(
    voters: list[int], silent: dict[int, float], expected: int | None
) -> None:
    assert dead_voter_to_remove(voters, silent, 300.0) == expected


def test_a_zero_timeout_never_removes_anyone() -> None:
    assert dead_voter_to_remove([LEADER, A, B], {A: 0.1, B: 10_000.0}, 0.0) is None


class _Driver:
    """The slice of ``Driver`` the membership upkeep reads: a leader whose peers stay silent."""

    def __init__(self) -> None:
        self.opts = DriverOptions()  # election timeout 1 s
        self.member_id = LEADER
        self.is_leader = True
        self.conf_state = ConfState(voters=(LEADER, A, B), learners=(C,))
        self.proposed: list[ConfChange] = []
        self.transport = SimpleNamespace(set_handler=lambda _handler: None)
        self.registry = SimpleNamespace(members={})

    def caught_up_learners(self, _max_lag: int) -> list[int]:
        return list(self.conf_state.learners)

    def status(self) -> SimpleNamespace:
        # A answers; B was never heard from by this leader (it died before this leader took office). C
        # answered 50 ms ago, but Raft's recent_active is clear: the leader's quorum check just reset it.
        peers = {
            A: PeerStatus(A, 10, True, 0.05),
            B: PeerStatus(B, 0, False, None),
            C: PeerStatus(C, 10, False, 0.05),
        }
        return SimpleNamespace(
            member_id=LEADER,
            leader_id=LEADER,
            role=StateType.LEADER,
            commit=10,
            conf_state=self.conf_state,
            peers=peers,
            members={},
        )

    async def propose_conf_change(self, cc: ConfChange, _timeout: float) -> int:
        self.proposed.append(cc)
        voters = [v for v in self.conf_state.voters if v != cc.node_id]
        if cc.type == ConfChangeType.ADD_NODE:
            voters.append(cc.node_id)
        learners = tuple(m for m in self.conf_state.learners if m != cc.node_id)
        self.conf_state = ConfState(voters=tuple(voters), learners=learners)
        return len(self.proposed)


async def test_a_voter_never_heard_from_counts_as_silent_from_when_this_leader_took_office() -> None:
    driver = _Driver()
    member = raft_pb2.Member(member_id=LEADER)
    coord = Coordinator(driver, self_member=member, join_bundle=None, max_voters=3, dead_voter_timeout=1.0)  # type: ignore[arg-type]
    loop = asyncio.create_task(coord.membership_loop())
    try:
        await asyncio.sleep(0.7)
        assert driver.proposed == []  # leading for 0.3-0.6 s: B is not silent long enough yet
        async with asyncio.timeout(5):
            while driver.conf_state.learners:  # noqa: ASYNC110 - the upkeep loop runs every 0.3 s
                await asyncio.sleep(0.05)
        # B went (after it had been silent for the timeout), and the next round promoted the learner instead.
        assert driver.proposed == [
            ConfChange(ConfChangeType.REMOVE_NODE, B),
            ConfChange(ConfChangeType.ADD_NODE, C),
        ]
        assert driver.conf_state == ConfState(voters=(LEADER, A, C))
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


def test_healthy_means_answered_the_leader_within_an_election_timeout() -> None:
    member = raft_pb2.Member(member_id=LEADER)
    coord = Coordinator(_Driver(), self_member=member, join_bundle=None, max_voters=3)  # type: ignore[arg-type]
    health = {m.member_id: m.healthy for m in coord.members_proto()}
    assert health == {
        "0000000000000001": True,
        "0000000000000002": True,
        "0000000000000003": False,
        "0000000000000004": True,
    }
