"""Whitepaper §5.4.6: the sliding replay window (RFC 6479 bitmap blocks), checked against a plain model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.node.wg.constants import REJECT_AFTER_MESSAGES
from tunnelmesh.node.wg.replay import BLOCK_BIT_LOG, BLOCK_BITS, RING_BLOCKS, WINDOW_SIZE, ReplayFilter


def model_accepts(seen: set[int], highest: int, counter: int) -> bool:
    if counter >= REJECT_AFTER_MESSAGES or counter in seen:
        return False
    return not (counter <= highest and highest - counter > WINDOW_SIZE)


counters = st.lists(
    st.one_of(
        st.integers(0, 3 * WINDOW_SIZE), st.integers(REJECT_AFTER_MESSAGES - 5, REJECT_AFTER_MESSAGES + 5)
    ),
    max_size=300,
)


@settings(max_examples=300, database=None)
@given(counters)
def test_5_4_6_window_accepts_exactly_what_a_set_based_model_accepts(sequence: list[int]) -> None:
    replay = ReplayFilter()
    seen: set[int] = set()
    highest = 0
    for counter in sequence:
        expected = model_accepts(seen, highest, counter)
        assert replay.would_accept(counter, REJECT_AFTER_MESSAGES) == expected
        assert replay.validate_counter(counter, REJECT_AFTER_MESSAGES) == expected, counter
        if expected:
            seen.add(counter)
            highest = max(highest, counter)


def test_5_4_6_window_is_at_least_2048_and_a_big_jump_forgets_old_counters() -> None:
    assert WINDOW_SIZE >= 2048
    replay = ReplayFilter()
    assert replay.validate_counter(5, REJECT_AFTER_MESSAGES)
    assert replay.validate_counter(10 * WINDOW_SIZE, REJECT_AFTER_MESSAGES)
    assert not replay.validate_counter(5, REJECT_AFTER_MESSAGES)
    assert replay.validate_counter(9 * WINDOW_SIZE, REJECT_AFTER_MESSAGES)
    assert not replay.validate_counter(9 * WINDOW_SIZE, REJECT_AFTER_MESSAGES)


def test_6_2_counter_at_reject_after_messages_is_refused() -> None:
    replay = ReplayFilter()
    assert not replay.validate_counter(REJECT_AFTER_MESSAGES, REJECT_AFTER_MESSAGES)
    assert replay.validate_counter(REJECT_AFTER_MESSAGES - 1, REJECT_AFTER_MESSAGES)


@settings(max_examples=300, database=None)
@given(counters)
def test_lost_counts_exactly_the_counters_that_can_no_longer_arrive(sequence: list[int]) -> None:
    """A counter that never validated is a lost message once its block left the ring (the window can no
    longer take it); the count only grows. A dropped keypair's gaps below its highest counter are all lost."""
    replay = ReplayFilter()
    seen: set[int] = set()
    before = 0
    for counter in sequence:
        if replay.validate_counter(counter, REJECT_AFTER_MESSAGES):
            seen.add(counter)
        highest = max(seen, default=0)
        gone = max(0, (highest >> BLOCK_BIT_LOG) - (RING_BLOCKS - 1)) * BLOCK_BITS  # the oldest block's first
        assert replay.lost() == gone - sum(1 for c in seen if c < gone)
        assert replay.lost() >= before
        before = replay.lost()
        assert replay.lost_at_end() == (highest + 1 - len(seen) if seen else 0)


def test_lost_ignores_reordering_within_the_window_and_counts_gaps_once_they_leave_it() -> None:
    replay = ReplayFilter()
    missing = set(range(50, 3 * WINDOW_SIZE, 100))  # 1 % lost in transit
    late = list(range(1000, 1010))  # reordered: they arrive 5000 counters late, still inside the window
    for counter in range(3 * WINDOW_SIZE):
        if counter in missing or counter in late:
            continue
        assert replay.validate_counter(counter, REJECT_AFTER_MESSAGES)
        if counter == 6000:
            for c in late:
                assert replay.validate_counter(c, REJECT_AFTER_MESSAGES)
    gone = ((3 * WINDOW_SIZE - 1) >> BLOCK_BIT_LOG) - (RING_BLOCKS - 1)
    assert replay.lost() == sum(1 for c in missing if c < gone * BLOCK_BITS)
    assert 0 < replay.lost() < len(missing)  # the newest gaps may still arrive
    assert replay.lost_at_end() == len(missing)
