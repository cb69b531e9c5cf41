"""Whitepaper §5.4.6: the sliding replay window (RFC 6479 bitmap blocks), checked against a plain model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.node.wg.constants import REJECT_AFTER_MESSAGES
from tunnelmesh.node.wg.replay import WINDOW_SIZE, ReplayFilter


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
