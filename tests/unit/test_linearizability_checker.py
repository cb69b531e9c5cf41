"""The linearizability checker (``tests/linearizability``): recorded histories in, OK / ILLEGAL / TIMEOUT out.

* Hand-written histories, each named after the rule it shows (Herlihy & Wing's real-time order, the atomic
  register's "no new-old inversion", compare-and-set races, unknown outcomes).
* The checker agrees with a brute-force search (every subset of unknown-outcome writes, every order allowed by
  real time) on small random histories, and its witness replays on an independent model of the register map.
* Histories produced by a real sequential register map, each operation taking effect at a random instant of
  its interval, are linearizable; the same histories with one impossible output are not.
* Recorder (threads, asyncio), JSON round trip, the deadline, and the time to check 2,000 operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.linearizability import (
    NOT_REPORTED,
    History,
    HistoryError,
    Operation,
    OpKind,
    Outcome,
    Recorder,
    check,
)
from tests.linearizability.history import Previous, Value

# ----------------------------------------------------------------------------------------------------
# Building histories by hand: times in µs-like units; ``None`` as a return time means "outcome unknown".

_KEY = b"x"


def put(
    c: int, v: str, call: int, ret: int | None, *, prev: str | Any | None = NOT_REPORTED, key: bytes = _KEY
) -> Operation:
    return Operation(0, c, OpKind.PUT, key, call, ret, value=v.encode(), previous=_prev(prev))


def get(c: int, v: str | None, call: int, ret: int | None, *, key: bytes = _KEY) -> Operation:
    return Operation(0, c, OpKind.GET, key, call, ret, read=_b(v))


def delete(c: int, call: int, ret: int | None, *, prev: str | Any | None = NOT_REPORTED) -> Operation:
    return Operation(0, c, OpKind.DELETE, _KEY, call, ret, previous=_prev(prev))


def cas(c: int, expected: str | None, new: str, ok: bool, call: int, ret: int | None) -> Operation:
    return Operation(
        0, c, OpKind.CAS, _KEY, call, ret, value=new.encode(), expected=_b(expected), succeeded=ok
    )


def _b(v: str | None) -> bytes | None:
    return None if v is None else v.encode()


def _prev(p: str | Any | None) -> Previous:
    return p if p is NOT_REPORTED else _b(p)


def hist(*ops: Operation) -> History:
    return History(tuple(replace(op, id=i) for i, op in enumerate(ops)))


OK, ILLEGAL = Outcome.OK, Outcome.ILLEGAL

CASES: list[tuple[str, History, Outcome]] = [
    # Real-time order (Herlihy & Wing 1990): an operation that returned before another was called precedes it.
    ("a read after a completed write sees it", hist(put(1, "1", 0, 10), get(2, "1", 20, 30)), OK),
    ("a read of the initial state sees the key absent", hist(get(1, None, 0, 10), put(2, "1", 20, 30)), OK),
    ("a read of a value nobody wrote", hist(put(1, "1", 0, 10), get(2, "9", 20, 30)), ILLEGAL),
    (
        "stale read: a read after a completed overwrite sees the old value",
        hist(put(1, "1", 0, 10), put(1, "2", 20, 30), get(2, "1", 40, 50)),
        ILLEGAL,
    ),
    (
        "a read concurrent with an overwrite may see the old value",
        hist(put(1, "1", 0, 10), put(1, "2", 20, 50), get(2, "1", 30, 40)),
        OK,
    ),
    (
        "a read concurrent with an overwrite may see the new value",
        hist(put(1, "1", 0, 10), put(1, "2", 20, 50), get(2, "2", 30, 40)),
        OK,
    ),
    (
        "a read that returned before the write was called cannot see it",
        hist(get(2, "1", 0, 10), put(1, "1", 20, 30)),
        ILLEGAL,
    ),
    (
        "equal timestamps count as overlapping (a return at t and a call at t)",
        hist(get(2, "1", 0, 10), put(1, "1", 10, 30)),
        OK,
    ),
    # Atomic, not merely regular, register (Lamport 1986): no new-old inversion.
    (
        "new-old inversion: sequential reads during one write see the new value, then the old",
        hist(put(1, "1", 0, 10), put(1, "2", 20, 100), get(2, "2", 30, 40), get(2, "1", 50, 60)),
        ILLEGAL,
    ),
    (
        "two readers may see a concurrent write take effect at different times, in one order",
        hist(put(1, "1", 0, 10), put(1, "2", 20, 100), get(2, "1", 30, 40), get(3, "2", 30, 40)),
        OK,
    ),
    # Concurrent writes: any order, but one order for everyone.
    (
        "concurrent writes, readers agreeing on their order",
        hist(
            put(1, "a", 0, 100),
            put(2, "b", 0, 100),
            get(3, "a", 10, 20),
            get(3, "b", 30, 40),
            get(4, "a", 10, 20),
            get(4, "b", 30, 40),
        ),
        OK,
    ),
    (
        "concurrent writes, readers observing both orders",
        hist(
            put(1, "a", 0, 100),
            put(2, "b", 0, 100),
            get(3, "a", 10, 20),
            get(3, "b", 30, 40),
            get(4, "b", 10, 20),
            get(4, "a", 30, 40),
        ),
        ILLEGAL,
    ),
    (
        "concurrent writes both completed, later readers disagree on the winner",
        hist(put(1, "a", 0, 10), put(2, "b", 0, 10), get(3, "a", 20, 30), get(4, "b", 20, 30)),
        ILLEGAL,
    ),
    # Delete.
    (
        "a read after a delete sees the key absent",
        hist(put(1, "1", 0, 10), delete(1, 20, 30), get(2, None, 40, 50)),
        OK,
    ),
    (
        "a read after a completed delete still sees the value",
        hist(put(1, "1", 0, 10), delete(1, 20, 30), get(2, "1", 40, 50)),
        ILLEGAL,
    ),
    ("deleting an absent key succeeds", hist(delete(1, 0, 10, prev=None), get(2, None, 20, 30)), OK),
    # Compare-and-set (KvCompareAndSet: an unset expected value means "the key must be absent").
    (
        "lock race: two concurrent creates from absent, one wins",
        hist(cas(1, None, "a", True, 0, 10), cas(2, None, "b", False, 0, 10), get(3, "a", 20, 30)),
        OK,
    ),
    (
        "lock race: two concurrent creates from absent, both win",
        hist(cas(1, None, "a", True, 0, 10), cas(2, None, "b", True, 0, 10)),
        ILLEGAL,
    ),
    (
        "lost update: two concurrent increments from 0 both succeed",
        hist(put(1, "0", 0, 10), cas(1, "0", "1", True, 20, 30), cas(2, "0", "1", True, 20, 30)),
        ILLEGAL,
    ),
    (
        "increments serialize: the loser fails, re-reads and retries",
        hist(
            put(1, "0", 0, 10),
            cas(1, "0", "1", True, 20, 30),
            cas(2, "0", "1", False, 20, 30),
            get(2, "1", 40, 50),
            cas(2, "1", "2", True, 60, 70),
            get(1, "2", 80, 90),
        ),
        OK,
    ),
    (
        "a cas fails although the expected value is there and nothing runs concurrently",
        hist(put(1, "1", 0, 10), cas(2, "1", "2", False, 20, 30)),
        ILLEGAL,
    ),
    (
        "a cas fails because a concurrent write changed the value first",
        hist(put(1, "1", 0, 10), put(1, "3", 15, 40), cas(2, "1", "2", False, 20, 30), get(2, "3", 50, 60)),
        OK,
    ),
    (
        "a cas expecting absence fails on a present empty value (b'' is not absent)",
        hist(put(1, "", 0, 10), cas(2, None, "x", True, 20, 30)),
        ILLEGAL,
    ),
    (
        "a cas expecting b'' succeeds on a present empty value",
        hist(put(1, "", 0, 10), cas(2, "", "x", True, 20, 30)),
        OK,
    ),
    # Previous values reported by writes (KvResult.previous_value) make each write a read too.
    (
        "a put reports the value it overwrote",
        hist(put(1, "1", 0, 10, prev=None), put(2, "2", 20, 30, prev="1")),
        OK,
    ),
    (
        "two concurrent puts both report they created the key",
        hist(put(1, "1", 0, 10, prev=None), put(2, "2", 0, 10, prev=None)),
        ILLEGAL,
    ),
    # Unknown outcomes (timeouts): may take effect at any time after the call, or never.
    (
        "a timed-out put takes effect long after the client gave up",
        hist(
            put(1, "1", 0, None),
            get(2, None, 10, 20),
            get(2, None, 30, 40),
            get(3, "1", 50, 60),
            get(2, "1", 70, 80),
        ),
        OK,
    ),
    (
        "a timed-out put never takes effect",
        hist(put(1, "1", 0, 10), put(2, "2", 20, None), get(3, "1", 30, 40), get(3, "1", 500, 600)),
        OK,
    ),
    (
        "a timed-out put cannot take effect before it was called",
        hist(get(2, "1", 0, 10), put(1, "1", 20, None)),
        ILLEGAL,
    ),
    (
        "a timed-out put takes effect once: the old value cannot come back",
        hist(put(1, "1", 0, 10), put(2, "2", 20, None), get(3, "2", 30, 40), get(3, "1", 50, 60)),
        ILLEGAL,
    ),
    (
        "a timed-out cas may have succeeded",
        hist(put(1, "1", 0, 10), cas(2, "1", "2", True, 20, None), get(3, "2", 100, 110)),
        OK,
    ),
    (
        "a timed-out cas applies only if its comparison holds when it takes effect",
        hist(put(1, "1", 0, 10), cas(2, "9", "2", True, 20, None), get(3, "2", 100, 110)),
        ILLEGAL,
    ),
    (
        "a timed-out put seen only through a cas that failed because of it, then overwritten",
        hist(put(1, "1", 0, 10), put(2, "2", 20, None), cas(3, "1", "x", False, 30, 40), put(4, "3", 50, 60)),
        OK,
    ),
    (
        "timed-out puts of one value are interchangeable, but each takes effect at most once",
        hist(
            put(1, "a", 0, None),
            put(2, "a", 0, None),
            put(3, "b", 0, 10),
            get(4, "a", 20, 30),
            put(3, "b", 40, 50),
            get(4, "a", 60, 70),
            put(3, "b", 80, 90),
            get(4, "a", 100, 110),
        ),
        ILLEGAL,
    ),
    (
        "timed-out puts of one value, each used once",
        hist(
            put(1, "a", 0, None),
            put(2, "a", 0, None),
            put(3, "b", 0, 10),
            get(4, "a", 20, 30),
            put(3, "b", 40, 50),
            get(4, "a", 60, 70),
        ),
        OK,
    ),
    (
        "a timed-out get constrains nothing",
        hist(put(1, "1", 0, 10), get(2, None, 20, None), get(3, "1", 30, 40)),
        OK,
    ),
]


@pytest.mark.parametrize(("history", "verdict"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_literature_histories(history: History, verdict: Outcome) -> None:
    result = check(history, timeout=5)
    assert result.outcome is verdict, result.explain()


def test_keys_are_checked_independently() -> None:
    # Each key alone is fine; a single register holding both keys' values would not be.
    h = hist(
        put(1, "1", 0, 10, key=b"a"),
        put(2, "2", 0, 10, key=b"b"),
        get(1, "1", 20, 30, key=b"a"),
        get(2, "2", 20, 30, key=b"b"),
        get(3, None, 20, 30, key=b"c"),
    )
    result = check(h)
    assert result.ok and result.partitions == 3, result.explain()
    assert [op.id for op in result.linearizations[b"a"]] == [0, 2]


def test_illegal_history_is_explained_with_the_key_prefix_and_the_operation_that_could_not_be_placed() -> (
    None
):
    h = hist(
        put(1, "1", 1_000_000, 2_000_000, key=b"ok"),
        put(1, "1", 1_000_000, 2_000_000),
        put(1, "2", 3_000_000, 4_000_000),
        get(2, "1", 5_000_000, 6_500_000),  # stale
        get(3, "2", 7_000_000, 8_000_000),
    )
    result = check(h)
    assert result.outcome is Outcome.ILLEGAL
    (e,) = result.explanations
    assert e.partition == _KEY and e.operations == 4
    assert [op.id for op in e.prefix] == [1, 2] and e.state == "'2'"
    assert e.stuck[0].op.id == 3 and "read '1' but the key held '2'" in e.stuck[0].reason
    text = result.explain()
    assert "key 'x': not linearizable" in text
    # Times are relative to the history's first call, in ms.
    assert "[     4.000 ..      5.500 ms] client 2" in text
    assert "get('x') -> '1'" in text


def test_unknown_outcomes_are_shown_returning_at_infinity() -> None:
    h = hist(get(2, "1", 0, 10_000), put(1, "1", 20_000, None))
    assert (
        "[     0.020 ..          ∞ ms] client 1    #1     put('x', '1') -> unknown (timed out)"
        in h.describe()
    )
    assert "read '1' but the key held <absent>" in check(h).explain()


def test_deadline_returns_timeout_instead_of_hanging() -> None:
    # 40 overlapping writes of distinct values, then a read nothing explains: the search must try every
    # (set of writes, last write) pair before it can say ILLEGAL, so it gives up at the deadline instead.
    h = hist(*[put(c, f"v{c}", 0, 100) for c in range(40)], get(99, "never", 200, 210))
    started = time.monotonic()
    result = check(h, timeout=0.3)
    elapsed = time.monotonic() - started
    assert result.outcome is Outcome.TIMEOUT and result.timed_out == (_KEY,)
    assert elapsed < 1.5
    assert "gave up at the deadline on: key 'x'" in result.explain()


def test_illegal_wins_over_timeout() -> None:
    hopeless = [put(c, f"v{c}", 0, 100, key=b"slow") for c in range(40)]
    h = hist(*hopeless, get(99, "never", 200, 210, key=b"slow"), put(1, "1", 0, 10), get(2, "9", 20, 30))
    result = check(h, timeout=0.3)
    assert result.outcome is Outcome.ILLEGAL
    assert [e.partition for e in result.explanations] == [_KEY] and result.timed_out == (b"slow",)


def test_many_timed_out_writes_do_not_blow_up_the_search() -> None:
    # 40 writes that may each take effect at any time or never, then a read nothing explains: 2^40 sets of
    # writes stay open, but a timed-out write followed by nothing that observes it need not be tried.
    h = hist(*[put(c, f"v{c}", 0, None) for c in range(40)], get(99, "never", 100, 110))
    result = check(h, timeout=5)
    assert result.outcome is Outcome.ILLEGAL and result.elapsed_s < 1.0, result.explain()


# ----------------------------------------------------------------------------------------------------
# An independent specification of the register map, written as "what the server answers", then compared.


@dataclass(frozen=True)
class Answer:
    read: Value
    succeeded: bool
    previous: Value


def serve(store: dict[bytes, bytes], op: Operation) -> Answer:
    """Apply ``op`` to ``store`` (a plain dict, as coord/state.py keeps it) and return the server's answer."""
    before = store.get(op.key)
    ok = True
    if op.kind is OpKind.PUT:
        assert op.value is not None
        store[op.key] = op.value
    elif op.kind is OpKind.DELETE:
        store.pop(op.key, None)
    elif op.kind is OpKind.CAS:
        ok = before == op.expected if op.expected is not None else op.key not in store
        if ok:
            assert op.value is not None
            store[op.key] = op.value
    return Answer(before, ok, before)


def answer_matches(op: Operation, answer: Answer) -> bool:
    if op.unknown:
        return True
    if op.kind is OpKind.GET:
        return op.read == answer.read
    if op.previous is not NOT_REPORTED and op.previous != answer.previous:
        return False
    return op.kind is not OpKind.CAS or op.succeeded == answer.succeeded


def replays(order: Sequence[Operation]) -> bool:
    store: dict[bytes, bytes] = {}
    return all(answer_matches(op, serve(store, op)) for op in order)


def respects_real_time(order: Sequence[Operation]) -> bool:
    position = {op.id: i for i, op in enumerate(order)}
    return not any(
        a.return_ns is not None and a.return_ns < b.call_ns and position[a.id] > position[b.id]
        for a in order
        for b in order
    )


def brute_force(h: History) -> bool:
    """The definition, literally: some subset of the unknown-outcome operations took effect, and some order of
    those plus every known one respects real time and replays."""
    known = [op for op in h if not op.unknown]
    unknown = [op for op in h if op.unknown]
    for r in range(len(unknown) + 1):
        for subset in itertools.combinations(unknown, r):
            chosen = known + list(subset)
            for order in itertools.permutations(chosen):
                if respects_real_time(order) and replays(order):
                    return True
    return False


_VALUES = [None, "a", "b"]


@st.composite
def small_histories(draw: st.DrawFn, max_ops: int = 6, keys: int = 2) -> History:
    """Arbitrary small histories: random intervals, random outputs (about half illegal), often unknown."""
    ops: list[Operation] = []
    unknown_odds = draw(st.sampled_from([0, 4, 2]))  # none, 1 in 5, 1 in 3
    for i in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(list(OpKind)))
        key = draw(st.sampled_from([b"x", b"y"][:keys]))
        call = draw(st.integers(0, 30))
        unknown = unknown_odds > 0 and draw(st.integers(0, unknown_odds)) == 0
        ret = None if unknown else call + draw(st.integers(0, 15))
        value = draw(st.sampled_from(["a", "b"])).encode() if kind in (OpKind.PUT, OpKind.CAS) else None
        expected = _b(draw(st.sampled_from(_VALUES))) if kind is OpKind.CAS else None
        read = _b(draw(st.sampled_from(_VALUES))) if kind is OpKind.GET and ret is not None else None
        ok = draw(st.booleans()) if kind is OpKind.CAS and ret is not None else True
        prev: Previous = NOT_REPORTED
        if kind is not OpKind.GET and ret is not None and draw(st.booleans()):
            prev = _b(draw(st.sampled_from(_VALUES)))
        ops.append(Operation(i, i % 3, kind, key, call, ret, value, expected, read, ok, prev))
    return History(tuple(ops))


@settings(max_examples=600, deadline=None)
@given(h=small_histories())
def test_agrees_with_brute_force_on_small_histories(h: History) -> None:
    result = check(h, timeout=5)
    assert result.outcome is not Outcome.TIMEOUT
    assert result.ok == brute_force(h), f"{result.explain()}\n{h.describe()}"
    if result.ok:
        # The witness, with the unknown-outcome operations it left out never applied, is a legal order.
        for key, witness in result.linearizations.items():
            assert respects_real_time(witness) and replays(witness)
            assert {op.id for op in witness} >= {op.id for op in h if op.key == key and not op.unknown}


# ----------------------------------------------------------------------------------------------------
# Histories from a real sequential register map with random overlaps.


def generate(
    rng: random.Random,
    *,
    clients: int,
    operations: int,
    keys: int,
    unknown_rate: float = 0.0,
    values: int = 4,
) -> History:
    """Clients each run operations back to back; every operation takes effect at a random instant of its
    interval (an unknown-outcome one: at a random instant after its call, possibly after the client gave up,
    or never), and its outputs come from applying the operations to ``serve`` in that order. Times: µs."""
    key_names = [f"k{i}".encode() for i in range(keys)]
    clock = [rng.randrange(0, 50) for _ in range(clients)]
    planned: list[tuple[float, Operation, bool]] = []  # (effect instant, op without outputs, applied)
    for i in range(operations):
        c = rng.randrange(clients)
        call = clock[c] + rng.randrange(0, 30)
        ret = call + rng.randrange(1, 100)
        clock[c] = ret
        kind = rng.choices(list(OpKind), weights=[4, 4, 3, 1])[0]
        val = f"v{rng.randrange(values)}".encode()
        expected = None if rng.random() < 0.2 else f"v{rng.randrange(values)}".encode()
        op = Operation(
            i,
            c,
            kind,
            rng.choice(key_names),
            call,
            ret,
            value=val if kind in (OpKind.PUT, OpKind.CAS) else None,
            expected=expected if kind is OpKind.CAS else None,
        )
        applied = True
        at = rng.uniform(call, ret)
        if rng.random() < unknown_rate:
            op = replace(op, return_ns=None)
            applied = rng.random() < 0.5
            at = rng.uniform(call, ret + 500)
        planned.append((at, op, applied))
    planned.sort(key=lambda p: p[0])
    store: dict[bytes, bytes] = {}
    done: list[Operation] = []
    for _, op, applied in planned:
        if not applied:
            done.append(op)
            continue
        answer = serve(store, op)
        if op.unknown:
            done.append(op)
            continue
        report = rng.random() < 0.5
        done.append(
            replace(
                op,
                read=answer.read if op.kind is OpKind.GET else None,
                succeeded=answer.succeeded,
                previous=answer.previous if report and op.kind is not OpKind.GET else NOT_REPORTED,
            )
        )
    in_ns = [
        replace(op, call_ns=op.call_ns * 1000, return_ns=op.return_ns and op.return_ns * 1000) for op in done
    ]
    return History(tuple(sorted(in_ns, key=lambda op: op.id)))


def impossible(op: Operation) -> Operation | None:
    """``op`` with an output no execution can produce (nobody ever writes b"never"), if it has one."""
    if op.unknown:
        return None
    if op.kind is OpKind.GET:
        return replace(op, read=b"never")
    if op.kind is OpKind.CAS and op.succeeded:
        return replace(op, expected=b"never")
    if op.previous is not NOT_REPORTED:
        return replace(op, previous=b"never")
    return None


generated = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "clients": st.integers(1, 8),
        "operations": st.integers(1, 120),
        "keys": st.integers(1, 3),
        "unknown_rate": st.sampled_from([0.0, 0.05, 0.2]),
        "values": st.integers(1, 5),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=generated)
def test_histories_of_a_sequential_register_map_are_linearizable(params: dict[str, Any]) -> None:
    h = generate(random.Random(params.pop("seed")), **params)
    result = check(h, timeout=10)
    assert result.ok, f"{result.explain()}\n{h.describe()}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=generated, pick=st.integers(0, 10**6))
def test_one_impossible_output_makes_the_history_illegal(params: dict[str, Any], pick: int) -> None:
    h = generate(random.Random(params.pop("seed")), **params)
    candidates = [i for i, op in enumerate(h.operations) if impossible(op) is not None]
    assume(candidates)
    i = candidates[pick % len(candidates)]
    bad = impossible(h.operations[i])
    assert bad is not None
    mutated = History((*h.operations[:i], bad, *h.operations[i + 1 :]))
    result = check(mutated, timeout=10)
    assert result.outcome is Outcome.ILLEGAL, f"mutated op #{i}\n{mutated.describe()}"
    assert [e.partition for e in result.explanations] == [bad.key]


# ----------------------------------------------------------------------------------------------------
# Performance: the size of a quick-profile integration run.


@pytest.mark.parametrize(
    ("keys", "unknown_rate"),
    [(10, 0.0), (10, 0.02), (1, 0.0)],
    ids=["10-keys", "10-keys-2%-unknown", "1-key"],
)
def test_two_thousand_operations_check_in_well_under_a_few_seconds(keys: int, unknown_rate: float) -> None:
    h = generate(random.Random(7), clients=8, operations=2000, keys=keys, unknown_rate=unknown_rate)
    result = check(h, timeout=20)
    print(f"\n{result.explain()}")
    assert result.ok, result.explain()
    assert result.elapsed_s < 3.0


@pytest.mark.parametrize("unknown_rate", [0.0, 0.05], ids=["all-known", "5%-unknown"])
def test_two_thousand_operations_with_one_impossible_read_are_found_illegal_quickly(
    unknown_rate: float,
) -> None:
    h = generate(random.Random(8), clients=8, operations=2000, keys=10, unknown_rate=unknown_rate)
    i = max(i for i, op in enumerate(h.operations) if op.kind is OpKind.GET and not op.unknown)
    bad = replace(h.operations[i], read=b"never")
    result = check(History((*h.operations[:i], bad, *h.operations[i + 1 :])), timeout=20)
    print(f"\n{result.explain(max_prefix=3)}")
    assert result.outcome is Outcome.ILLEGAL and result.elapsed_s < 3.0


# ----------------------------------------------------------------------------------------------------
# Recorder and the JSON form.


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        self.now += 10
        return self.now


def test_recorder_records_intervals_and_outcomes() -> None:
    rec = Recorder(clock=FakeClock())
    p = rec.invoke(1, "put", "k", value="1")  # call 10
    g = rec.invoke(2, OpKind.GET, b"k")  # call 20
    c = rec.invoke(3, "cas", b"k", expected=None, value=b"\xff")  # call 30
    d = rec.invoke(4, "delete", b"k")  # call 40
    lost = rec.invoke(5, "put", b"k", value=b"2")  # call 50, never answered
    rec.complete(p, previous=None)  # 60
    rec.complete(g, b"1")  # 70
    rec.fail_unknown(c)
    rec.fail_definite(d)
    h = rec.history(scenario="unit")
    assert [op.id for op in h] == [p, g, c, lost]
    ops = {op.id: op for op in h}
    assert (ops[p].call_ns, ops[p].return_ns, ops[p].value, ops[p].previous) == (10, 60, b"1", None)
    assert (ops[g].read, ops[g].return_ns) == (b"1", 70)
    assert ops[c].unknown and ops[c].expected is None and ops[c].value == b"\xff"
    assert ops[lost].unknown  # pending when the history was taken
    assert h.meta == {"scenario": "unit"}


def test_recorder_rejects_calls_that_make_no_sense() -> None:
    rec = Recorder()
    with pytest.raises(HistoryError, match="put needs a value"):
        rec.invoke(1, "put", b"k")
    with pytest.raises(HistoryError, match="only cas takes an expected value"):
        rec.invoke(1, "put", b"k", value=b"v", expected=b"w")
    with pytest.raises(HistoryError, match="unknown operation kind 'increment'"):
        rec.invoke(1, "increment", b"k")
    c = rec.invoke(1, "cas", b"k", value=b"v")
    with pytest.raises(HistoryError, match="whether it succeeded"):
        rec.complete(c, b"v")
    rec.complete(c, False, previous=b"w")
    with pytest.raises(HistoryError, match="already finished"):
        rec.fail_unknown(c)
    with pytest.raises(HistoryError, match="never invoked"):
        rec.complete(99)


def test_recorder_completes_from_kv_service_responses() -> None:
    kv_pb2 = pytest.importorskip("tunnelmesh.api.v1.kv_pb2")
    rec = Recorder()
    g, g0 = rec.invoke(1, "get", b"k"), rec.invoke(1, "get", b"k")
    p, d = rec.invoke(1, "put", b"k", value=b"2"), rec.invoke(1, "delete", b"k")
    c = rec.invoke(1, "cas", b"k", expected=b"1", value=b"2")
    rec.complete_response(g, kv_pb2.KvGetResponse(found=True, value=b"1", revision=3))
    rec.complete_response(g0, kv_pb2.KvGetResponse(found=False))
    rec.complete_response(p, kv_pb2.KvPutResponse(previous_value=b"1", revision=4))
    rec.complete_response(d, kv_pb2.KvDeleteResponse())
    rec.complete_response(c, kv_pb2.KvCompareAndSetResponse(succeeded=False, previous_value=b""))
    ops = {op.id: op for op in rec.history()}
    assert (ops[g].read, ops[g0].read, ops[p].previous, ops[d].previous) == (b"1", None, b"1", None)
    assert (ops[c].succeeded, ops[c].previous) == (False, b"")
    with pytest.raises(HistoryError, match="already finished"):
        rec.complete_response(c, kv_pb2.KvCompareAndSetResponse())


def test_recorder_from_many_threads() -> None:
    rec = Recorder()

    def client(c: int) -> None:
        for i in range(200):
            op = rec.invoke(c, "put", f"k{i % 3}", value=f"{c}-{i}")
            rec.complete(op)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h = rec.history()
    assert len(h) == 1600 and len({op.id for op in h}) == 1600
    assert all(op.return_ns is not None and op.return_ns >= op.call_ns for op in h)


async def test_recorder_from_asyncio_tasks_against_a_register_map_with_a_lock() -> None:
    """The way an integration test uses it: tasks around awaits, then one check."""
    store: dict[bytes, bytes] = {}
    lock = asyncio.Lock()
    rec = Recorder()

    async def server(op: Operation) -> Answer:
        await asyncio.sleep(random.random() / 1000)
        async with lock:
            answer = serve(store, op)
        await asyncio.sleep(random.random() / 1000)
        return answer

    async def client(c: int, rng: random.Random) -> None:
        for _ in range(40):
            key = rng.choice([b"a", b"b"])
            kind = rng.choice(list(OpKind))
            value = f"{c}".encode() if kind in (OpKind.PUT, OpKind.CAS) else None
            expected = rng.choice([None, b"0", b"1"]) if kind is OpKind.CAS else None
            op_id = rec.invoke(c, kind, key, value=value, expected=expected)
            answer = await server(Operation(op_id, c, kind, key, 0, 0, value=value, expected=expected))
            if kind is OpKind.GET:
                rec.complete(op_id, answer.read)
            elif kind is OpKind.CAS:
                rec.complete(op_id, answer.succeeded, previous=answer.previous)
            else:
                rec.complete(op_id, previous=answer.previous)

    async with asyncio.TaskGroup() as tg:
        for c in range(4):
            tg.create_task(client(c, random.Random(c)))
    result = check(rec.history(), timeout=10)
    assert result.ok and result.operations == 160, result.explain()


def test_failing_history_saved_and_replayed(tmp_path: Any) -> None:
    h = hist(put(1, "1", 0, 10), put(1, "2", 20, 30), get(2, "1", 40, 50))
    path = History(h.operations, meta={"seed": 42}).save(tmp_path / "history.json")
    loaded = History.load(path)
    assert loaded == History(h.operations, meta={"seed": 42})
    assert check(loaded).outcome is Outcome.ILLEGAL


byte_values = st.one_of(st.none(), st.binary(max_size=8), st.text(max_size=4).map(str.encode))


@st.composite
def any_operation(draw: st.DrawFn) -> Operation:
    kind = draw(st.sampled_from(list(OpKind)))
    call = draw(st.integers(0, 2**63))
    ret = draw(st.one_of(st.none(), st.integers(call, 2**64)))
    writes = kind in (OpKind.PUT, OpKind.CAS)
    return Operation(
        id=draw(st.integers(0, 10**6)),
        client=draw(st.one_of(st.integers(-5, 5), st.text(max_size=5))),
        kind=kind,
        key=draw(st.binary(min_size=1, max_size=8)),
        call_ns=call,
        return_ns=ret,
        value=draw(st.binary(max_size=8)) if writes else None,
        expected=draw(byte_values) if kind is OpKind.CAS else None,
        read=draw(byte_values) if kind is OpKind.GET and ret is not None else None,
        succeeded=draw(st.booleans()) if kind is OpKind.CAS and ret is not None else True,
        previous=draw(st.one_of(st.just(NOT_REPORTED), byte_values))
        if kind is not OpKind.GET and ret is not None
        else NOT_REPORTED,
    )


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(any_operation(), max_size=6))
def test_json_round_trip(ops: list[Operation]) -> None:
    h = History(tuple(ops), meta={"note": "round trip"})
    assert History.from_json(h.to_json()) == h


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def damaged_operation(draw: st.DrawFn) -> dict[str, Any]:
    raw = json.loads(History((draw(any_operation()),)).to_json())["operations"][0]
    for field in draw(st.lists(st.sampled_from([*raw, "previous", "hex"]), max_size=3)):
        if draw(st.booleans()):
            raw.pop(field, None)
        else:
            raw[field] = draw(json_values)
    return dict(raw)


@settings(max_examples=150, deadline=None)
@given(doc=st.one_of(json_values, damaged_operation().map(lambda raw: {"operations": [raw]})))
def test_damaged_history_files_raise_only_history_error(doc: Any) -> None:
    if isinstance(doc, dict) and "operations" in doc:
        doc = {"format": "tunnelmesh-linearizability-history", "version": 1, **doc}
    with contextlib.suppress(HistoryError):
        History.from_json(json.dumps(doc))
    with pytest.raises(HistoryError):
        History.from_json("{not json")
