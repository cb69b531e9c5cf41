"""Majority math: committed index and vote results."""

from __future__ import annotations

import pytest

from tunnelmesh.coord.raft.quorum import INFINITE_INDEX, MajorityConfig, VoteResult, majority


@pytest.mark.parametrize(("n", "q"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_majority(n: int, q: int) -> None:
    assert majority(n) == q


@pytest.mark.parametrize(
    ("voters", "match", "want"),
    [
        ([], {}, INFINITE_INDEX),
        ([1], {1: 7}, 7),
        ([1], {}, 0),
        ([1, 2, 3], {1: 5, 2: 3, 3: 1}, 3),
        ([1, 2, 3], {1: 5, 2: 5}, 5),
        ([1, 2, 3], {1: 5}, 0),  # missing voters count as 0
        ([1, 2, 3, 4], {1: 4, 2: 3, 3: 2, 4: 1}, 2),
        ([1, 2, 3, 4, 5], {1: 9, 2: 8, 3: 7, 4: 1, 5: 1}, 7),
        ([1, 2, 3], {1: 5, 2: 5, 9: 100}, 5),  # non-voters (learners) don't count
    ],
)
def test_committed_index(voters: list[int], match: dict[int, int], want: int) -> None:
    assert MajorityConfig(voters).committed_index(match) == want


@pytest.mark.parametrize(
    ("voters", "votes", "want"),
    [
        ([], {}, VoteResult.WON),
        ([1], {}, VoteResult.PENDING),
        ([1], {1: True}, VoteResult.WON),
        ([1], {1: False}, VoteResult.LOST),
        ([1, 2, 3], {1: True}, VoteResult.PENDING),
        ([1, 2, 3], {1: True, 2: True}, VoteResult.WON),
        ([1, 2, 3], {1: True, 2: False}, VoteResult.PENDING),
        ([1, 2, 3], {1: True, 2: False, 3: False}, VoteResult.LOST),
        ([1, 2, 3, 4], {1: True, 2: True}, VoteResult.PENDING),
        ([1, 2, 3, 4], {1: True, 2: False, 3: False}, VoteResult.LOST),
        ([1, 2, 3], {4: True, 5: True}, VoteResult.PENDING),  # votes from non-voters are ignored
    ],
)
def test_vote_result(voters: list[int], votes: dict[int, bool], want: VoteResult) -> None:
    assert MajorityConfig(voters).vote_result(votes) == want
