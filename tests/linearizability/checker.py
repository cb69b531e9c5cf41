"""Linearizability checker: is there one sequential order of the history that the model accepts?

Theory of operation
-------------------
A history is linearizable (Herlihy & Wing 1990) if every operation can be given a single instant between
its call and its return such that, executed one at a time in the order of those instants, the sequential
model produces exactly the outputs the clients saw. An operation whose outcome is unknown (a timeout) has
its return at +infinity: it may take effect at any time after its call, or never; its output constrains
nothing.

1. P-compositionality (Horn & Kroening 2015): linearizability is local. Keys of the register map never
   affect each other, so the history is split by ``model.partition(op)`` (the key) and each part is checked
   alone: ten searches over 200 operations instead of one over 2,000, for a search that is exponential in
   the worst case.

2. Just-in-time linearization (Wing & Gong 1993, Lowe 2017, as in porcupine): each operation becomes a
   *call* and a *return* entry, sorted by time (calls first on ties: equal timestamps count as overlapping)
   in a doubly linked list. Walk the list from the head:
   * a call entry: try to linearize that operation *now*, from the current model state. If the model
     accepts it, push (entry, old state) on a stack, unlink its call and return entries ("lift") and start
     again from the head; otherwise look at the next entry.
   * a return entry: that operation has returned without being linearized, so no choice still open can save
     the current prefix. Backtrack: pop the last linearized operation, relink it ("unlift") and try the
     entry after its call instead.
   The calls before the first return entry are exactly the operations that may be linearized next:
   everything else is concurrent with them or later. A return entry with an empty stack: no order exists.

3. Memoization (Lowe): two search paths that have linearized the same *set* of operations (a bitset) and
   reached the same model state have the same future, so each (bitset, state) pair is explored once. This
   is what keeps histories with wide overlaps tractable.

4. Unknown outcomes: once every operation with a known outcome is linearized, the rest are unknown-outcome
   operations, which go after everything else, i.e. never (a model accepts them in any state): the part is
   linearizable. Unknown gets have no effect and are dropped up front. Open unknown writes are what makes
   the search blow up (each doubles the sets that stay open to the end), so three reductions, each keeping
   at least one linearization if any exists:
   a. an unknown operation immediately followed by a *blind* write (a put/delete that reports nothing) is
      invisible, so it may as well never happen: that order is not tried;
   b. unknown operations with the same effect (same kind and values) are interchangeable: only the
      earliest-called unused one of them is tried;
   c. subsumption: a node that failed with a set U of unknown operations used (and so more still available)
      proves that the same known set and state with a superset of U fails too.
   d. each node tries its known-outcome candidates before its unknown ones, so that the first failures
      recorded use few unknown operations and rule c prunes much.
   The memo key includes "the last operation was unknown", since rule a restricts what may come next.

5. Deadline: the search looks at the clock every few hundred steps and gives up with TIMEOUT rather than
   hang, e.g. on an illegal history with many overlapping unknown cas operations.

On ILLEGAL the checker reports, per key, the longest linearizable prefix it found (in linearization order),
the model state after it, and the operations that could not be placed next, with the model's reason.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .history import History, Operation, OpKind, show
from .models import KV_REGISTER, Model

S = TypeVar("S", bound=Hashable)

_CLOCK_EVERY = 64  # search steps between deadline checks; a step is at most ~100 µs (a full failure bucket)
_BUCKET_MAX = 256  # rule 4c keeps at most this many failures per (known set, state): pruning is optional
_FOREVER = 1 << 127  # sort key of an unknown outcome's return: after every real timestamp


class Outcome(enum.StrEnum):
    OK = "ok"
    ILLEGAL = "illegal"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Stuck:
    """An operation that could not be linearized right after the longest prefix, and why."""

    op: Operation
    reason: str


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why one partition (key) is not linearizable."""

    partition: Hashable
    operations: int
    prefix: tuple[Operation, ...]  # the longest linearizable prefix found, in linearization order
    state: str  # the model state after the prefix
    stuck: tuple[Stuck, ...]  # first: the operation that returned first without being placed
    origin_ns: int  # times are printed relative to this (the history's first call)

    def render(self, max_prefix: int = 12) -> str:
        name = _show_partition(self.partition)
        lines = [f"{name}: not linearizable ({self.operations} operations)"]
        lines.append(
            f"  longest linearizable prefix found: {len(self.prefix)} operations, in linearization order"
            + (":" if self.prefix else ".")
        )
        shown = self.prefix[-max_prefix:] if max_prefix else ()
        if len(shown) < len(self.prefix):
            lines.append(f"    ... {len(self.prefix) - len(shown)} earlier operations")
        lines.extend("    " + op.describe(self.origin_ns) for op in shown)
        lines.append(f"  state after the prefix: {self.state}")
        lines.append("  could not be placed next:")
        for s in self.stuck:
            lines.append(f"    {s.op.describe(self.origin_ns)}")
            lines.append(f"        {s.reason}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class CheckResult:
    outcome: Outcome
    explanations: tuple[Explanation, ...] = ()  # one per illegal partition
    timed_out: tuple[Hashable, ...] = ()  # partitions whose search did not finish
    # For each linearizable partition, a witness order. Unknown-outcome operations missing from it are
    # the ones that need not have taken effect at all.
    linearizations: Mapping[Hashable, tuple[Operation, ...]] = field(default_factory=dict)
    operations: int = 0
    partitions: int = 0
    elapsed_s: float = 0.0
    search_steps: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def explain(self, max_prefix: int = 12) -> str:
        head = (
            f"linearizability: {self.outcome.value.upper()} — {self.operations} operations, "
            f"{_plural(self.partitions, 'key')}, {self.search_steps} search steps, {self.elapsed_s:.3f} s"
        )
        parts = [head]
        parts.extend(e.render(max_prefix) for e in self.explanations)
        if self.timed_out:
            keys = ", ".join(_show_partition(p) for p in self.timed_out)
            parts.append(f"search gave up at the deadline on: {keys}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.explain()


def check(
    history: History | Iterable[Operation],
    model: Model[Any] = KV_REGISTER,
    *,
    timeout: float = 10.0,
) -> CheckResult:
    """Check ``history`` against ``model``; never runs (much) longer than ``timeout`` seconds.

    ILLEGAL wins over TIMEOUT: after one key is found illegal the others are still checked (to report them
    all) while time remains.
    """
    start = time.monotonic()
    deadline = start + timeout
    ops = tuple(history)
    origin = min((op.call_ns for op in ops), default=0)
    parts: dict[Hashable, list[Operation]] = {}
    for op in ops:
        if op.kind is OpKind.GET and op.unknown:
            continue  # a read whose answer was lost changes nothing and constrains nothing
        parts.setdefault(model.partition(op), []).append(op)

    explanations: list[Explanation] = []
    timed_out: list[Hashable] = []
    witnesses: dict[Hashable, tuple[Operation, ...]] = {}
    steps = 0
    # Small partitions first: a cheap ILLEGAL is found before an expensive key eats the deadline.
    for key, part in sorted(parts.items(), key=lambda kv: len(kv[1])):
        if time.monotonic() > deadline:
            timed_out.append(key)
            continue
        search = _Search(part, model, deadline)
        verdict = search.run()
        steps += search.steps
        if verdict is Outcome.OK:
            witnesses[key] = search.witness()
        elif verdict is Outcome.ILLEGAL:
            explanations.append(search.explain(key, origin))
        else:
            timed_out.append(key)

    if explanations:
        outcome = Outcome.ILLEGAL
    elif timed_out:
        outcome = Outcome.TIMEOUT
    else:
        outcome = Outcome.OK
    return CheckResult(
        outcome,
        tuple(explanations),
        tuple(timed_out),
        witnesses,
        operations=len(ops),
        partitions=len(parts),
        elapsed_s=time.monotonic() - start,
        search_steps=steps,
    )


class _Entry:
    """A call or return entry of the doubly linked list."""

    __slots__ = ("index", "is_call", "match", "next", "prev")

    def __init__(self, index: int, is_call: bool) -> None:
        self.index = index  # of the operation in the partition: its bit in the linearized-set bitset
        self.is_call = is_call
        self.match: _Entry | None = None  # call -> its return entry
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


class _Search(Generic[S]):
    def __init__(self, ops: list[Operation], model: Model[S], deadline: float) -> None:
        self.ops = ops
        self.model = model
        self.deadline = deadline
        self.steps = 0
        self.stack: list[tuple[_Entry, S, bool]] = []  # (call entry, state before it, previous top unknown)
        self.best: list[int] = []
        self.best_state: S = model.init()
        self.blocker = -1  # the operation whose return ended the best prefix

        events: list[tuple[int, int, int]] = []
        for i, op in enumerate(ops):
            events.append((op.call_ns, 0, i))
            events.append((_FOREVER if op.return_ns is None else op.return_ns, 1, i))
        events.sort()  # (time, calls before returns, index): deterministic
        self.head = _Entry(-1, False)
        calls: dict[int, _Entry] = {}
        prev = self.head
        for _, kind, i in events:
            entry = _Entry(i, kind == 0)
            if kind == 0:
                calls[i] = entry
            else:
                calls[i].match = entry
            entry.prev = prev
            prev.next = entry
            prev = entry

        # Unknown-outcome operations with the same effect, chained in call order: only the first unused one
        # of a chain is ever tried (rule 4b of the top comment).
        self.pred = [-1] * len(ops)
        last: dict[Hashable, int] = {}
        for _, kind, i in events:
            if kind == 0 and ops[i].unknown:
                sig = model.signature(ops[i])
                self.pred[i] = last.get(sig, -1)
                last[sig] = i

    def run(self) -> Outcome:
        ops, head, stack, pred = self.ops, self.head, self.stack, self.pred
        step = self.model.step
        known = [not op.unknown for op in ops]
        blind = [self.model.blind(op) for op in ops]
        unknown_mask = sum(1 << i for i, op in enumerate(ops) if op.unknown)
        remaining_known = sum(known)
        state = self.model.init()
        linearized = 0
        top_unknown = False  # the last linearized operation has an unknown outcome
        seen: set[tuple[int, S, bool]] = set()
        # Rule 4c: exhausted nodes, by (known ops linearized, state): [(unknown ops linearized, top unknown)].
        failed: dict[tuple[Any, ...], list[tuple[int, bool]]] = {}
        entry = head.next
        unknown_pass = False  # rule 4d: each node tries its known candidates first, then the unknown ones
        steps = 0
        try:
            while remaining_known:
                steps += 1
                if steps % _CLOCK_EVERY == 0 and time.monotonic() > self.deadline:
                    return Outcome.TIMEOUT
                assert entry is not None  # a known op is left, so its return entry ends the walk
                if entry.is_call:
                    i = entry.index
                    # Not in this pass (rule 4d), or an equivalent order is tried elsewhere (rules 4a, 4b).
                    if (
                        known[i] == unknown_pass
                        or (top_unknown and blind[i])
                        or (pred[i] >= 0 and not linearized >> pred[i] & 1)
                    ):
                        entry = entry.next
                        continue
                    accepted, after = step(state, ops[i])
                    if accepted:
                        now_linearized = linearized | (1 << i)
                        now_top_unknown = not known[i]
                        memo = (now_linearized, after, now_top_unknown)
                        if memo not in seen and not (
                            unknown_mask
                            and _subsumed(
                                failed.get((now_linearized & ~unknown_mask, after)),
                                now_linearized & unknown_mask,
                                now_top_unknown,
                            )
                        ):
                            seen.add(memo)
                            stack.append((entry, state, top_unknown))
                            state, linearized, top_unknown = after, now_linearized, now_top_unknown
                            remaining_known -= known[i]
                            _lift(entry)
                            entry = head.next
                            unknown_pass = False
                            continue
                    entry = entry.next
                elif not unknown_pass and unknown_mask:
                    entry = head.next
                    unknown_pass = True
                else:
                    # An operation returned before we placed it: the current prefix is a dead end.
                    if len(stack) > len(self.best) or self.blocker < 0:
                        self.best = [e.index for e, _, _ in stack]
                        self.best_state = state
                        self.blocker = entry.index
                    if not stack:
                        return Outcome.ILLEGAL
                    if unknown_mask:
                        _add_failed(failed, linearized, unknown_mask, state, top_unknown)
                    top, state, top_unknown = stack.pop()
                    linearized &= ~(1 << top.index)
                    remaining_known += known[top.index]
                    unknown_pass = not known[top.index]
                    _unlift(top)
                    entry = top.next
            return Outcome.OK
        finally:
            self.steps = steps

    def witness(self) -> tuple[Operation, ...]:
        return tuple(self.ops[e.index] for e, _, _ in self.stack)

    def explain(self, partition: Hashable, origin_ns: int) -> Explanation:
        model, state = self.model, self.best_state
        placed = set(self.best)
        rest = [op for i, op in enumerate(self.ops) if i not in placed]
        # The operation that forced the dead end returned first among those left; anything called no later
        # than that return could have been placed next.
        first = self.ops[self.blocker]
        assert first.return_ns is not None
        stuck = [Stuck(first, self._reason(state, first, must=True))]
        for op in sorted(rest, key=lambda op: (op.call_ns, op.id)):
            if op is not first and op.call_ns <= first.return_ns and not model.step(state, op)[0]:
                stuck.append(Stuck(op, self._reason(state, op, must=False)))
        return Explanation(
            partition,
            len(self.ops),
            tuple(self.ops[i] for i in self.best),
            model.describe_state(state),
            tuple(stuck),
            origin_ns,
        )

    def _reason(self, state: S, op: Operation, *, must: bool) -> str:
        when = "returned before it could take effect: " if must else ""
        if self.model.step(state, op)[0]:
            return when + "possible here, but no order of the remaining operations continues from it"
        return when + self.model.why_not(state, op)


def _subsumed(exhausted: list[tuple[int, bool]] | None, unknowns: int, top_unknown: bool) -> bool:
    """Rule 4c: a node failed with a subset of these unknown-outcome operations used (so with more of them
    still available), and with no more freedom for the next step than this one has."""
    if not exhausted:
        return False
    return any(used & ~unknowns == 0 and (top_unknown or not restricted) for used, restricted in exhausted)


def _add_failed(
    failed: dict[tuple[Any, ...], list[tuple[int, bool]]],
    linearized: int,
    unknown_mask: int,
    state: Hashable,
    top_unknown: bool,
) -> None:
    """Record an exhausted node for rule 4c, keeping each bucket an antichain: entries the new one
    subsumes (supersets of its unknown set, no freer next step) are dropped, so scans stay short."""
    used = linearized & unknown_mask
    bucket = failed.setdefault((linearized & ~unknown_mask, state), [])
    bucket[:] = [(u, r) for u, r in bucket if not (used & ~u == 0 and (r or not top_unknown))]
    if len(bucket) >= _BUCKET_MAX:
        del bucket[0]  # forget the oldest: the search stays correct, only prunes less
    bucket.append((used, top_unknown))


def _lift(call: _Entry) -> None:
    """Unlink a call entry and its return entry (they keep their own links, for _unlift)."""
    assert call.prev is not None and call.next is not None and call.match is not None
    call.prev.next = call.next
    call.next.prev = call.prev
    ret = call.match
    assert ret.prev is not None
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Entry) -> None:
    """Undo _lift, in reverse order."""
    ret = call.match
    assert ret is not None and ret.prev is not None and call.prev is not None and call.next is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    call.next.prev = call


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _show_partition(partition: Hashable) -> str:
    if isinstance(partition, bytes):
        return f"key {show(partition)}"
    return f"partition {partition!r}"
