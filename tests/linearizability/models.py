"""Sequential specifications the checker tests histories against.

A model is a pure function from (state, operation) to "is this operation's observed output possible here, and
what is the state after it". States must be hashable and compared by value: the checker memoizes on them.
``partition`` says which operations can be checked independently (P-compositionality, Horn & Kroening 2015):
for a map of independent registers, one sub-history per key.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol, TypeVar

from .history import NOT_REPORTED, Operation, OpKind, Value, show

S = TypeVar("S", bound=Hashable)


class Model(Protocol[S]):
    """What the checker needs from a sequential specification."""

    def partition(self, op: Operation) -> Hashable:
        """Operations with different partitions never affect each other."""
        ...

    def init(self) -> S: ...

    def step(self, state: S, op: Operation) -> tuple[bool, S]:
        """(output possible in ``state``, next state). An unknown-outcome op must always be possible."""
        ...

    def why_not(self, state: S, op: Operation) -> str:
        """Why ``step`` refused ``op`` in ``state``, for the report."""
        ...

    def blind(self, op: Operation) -> bool:
        """``op`` is accepted in every state and its next state does not depend on the current one (a write
        that reports nothing): whatever an unknown-outcome operation just before it did is invisible."""
        ...

    def signature(self, op: Operation) -> Hashable:
        """Equal for unknown-outcome operations with the same effect in every state (interchangeable)."""
        ...

    def describe_state(self, state: S) -> str: ...


class KvRegister:
    """One key of the test register map (``coord/state.py``: ``KvPut``, ``KvDelete``, ``KvCompareAndSet``).

    State: the key's value, ``None`` if absent. put sets it; delete removes it (also if already absent); cas
    compares the current value with ``expected`` (``None``: the key must be absent; ``b""`` is a present empty
    value, not absence) and, if equal, sets ``value``. put / delete / cas may report the previous value.
    Revisions are not modelled: they are Raft indexes, which a client history cannot predict.
    """

    def partition(self, op: Operation) -> Hashable:
        return op.key

    def init(self) -> Value:
        return None

    def step(self, state: Value, op: Operation) -> tuple[bool, Value]:
        kind = op.kind
        if kind is OpKind.GET:
            return (op.unknown or op.read == state), state
        if not op.unknown and op.previous is not NOT_REPORTED and op.previous != state:
            return False, state
        if kind is OpKind.PUT:
            return True, op.value
        if kind is OpKind.DELETE:
            return True, None
        holds = state == op.expected
        if not op.unknown and op.succeeded != holds:
            return False, state
        return True, (op.value if holds else state)

    def why_not(self, state: Value, op: Operation) -> str:
        held = f"the key held {show(state)}"
        if op.kind is OpKind.GET:
            return f"read {show(op.read)} but {held}"
        if op.previous is not NOT_REPORTED and op.previous != state:
            return f"reported previous value {show(op.previous)} but {held}"
        if op.kind is OpKind.CAS:
            return f"{'succeeded' if op.succeeded else 'failed'} expecting {show(op.expected)} but {held}"
        return "always possible"  # put/delete without a reported previous value never fail

    def blind(self, op: Operation) -> bool:
        return op.kind in (OpKind.PUT, OpKind.DELETE) and (op.unknown or op.previous is NOT_REPORTED)

    def signature(self, op: Operation) -> Hashable:
        return (op.kind, op.value, op.expected)

    def describe_state(self, state: Value) -> str:
        return show(state)


KV_REGISTER = KvRegister()
