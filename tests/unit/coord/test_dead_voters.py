"""Which voter a leader may remove to let a waiting learner take its place (``coord.dead_voter_timeout``).
The whole path with real coordinators (kill -9 a voter, a new one joins and replaces it) is
tests/integration/test_coord_join.py."""

from __future__ import annotations

import pytest

from tunnelmesh.coord.service import dead_voter_to_remove

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
