"""Majority quorum math: which index a quorum has replicated and whether an election is won.

Single-server membership changes (one voter added or removed per committed change) keep any two consecutive
configurations' majorities overlapping, so a plain majority over the current voters is enough; there are no
joint configurations. An empty voter set commits everything and wins every vote (etcd's convention, so that a
node with no configuration never blocks on a quorum it cannot have).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

INFINITE_INDEX = 2**63 - 1


class VoteResult(enum.Enum):
    PENDING = 0
    LOST = 1
    WON = 2


def majority(n: int) -> int:
    """The size of the smallest majority of ``n`` voters."""
    return n // 2 + 1


class MajorityConfig:
    __slots__ = ("voters",)

    def __init__(self, voters: Iterable[int] = ()) -> None:
        self.voters: frozenset[int] = frozenset(voters)

    def __len__(self) -> int:
        return len(self.voters)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.voters

    def __repr__(self) -> str:
        return "(" + " ".join(str(v) for v in sorted(self.voters)) + ")"

    def committed_index(self, match: Mapping[int, int]) -> int:
        """The largest index that a majority of voters has acknowledged (missing voters count as 0)."""
        n = len(self.voters)
        if n == 0:
            return INFINITE_INDEX
        if n == 1:
            (only,) = self.voters
            return match.get(only, 0)
        acked = sorted((match.get(v, 0) for v in self.voters), reverse=True)
        return acked[majority(n) - 1]

    def vote_result(self, votes: Mapping[int, bool]) -> VoteResult:
        """WON once a majority granted, LOST once a majority can no longer be reached, PENDING otherwise."""
        n = len(self.voters)
        if n == 0:
            return VoteResult.WON
        granted = rejected = 0
        for v in self.voters:
            vote = votes.get(v)
            if vote is None:
                continue
            if vote:
                granted += 1
            else:
                rejected += 1
        q = majority(n)
        if granted >= q:
            return VoteResult.WON
        if n - rejected >= q:
            return VoteResult.PENDING
        return VoteResult.LOST
