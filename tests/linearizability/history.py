"""Recording a concurrent client history of the test register map (put / get / cas / delete per key).

An operation is an interval: its *call* time (just before the request leaves the client) and its *return*
time (just after the answer arrived), both ``time.monotonic_ns()`` by default. ``CLOCK_MONOTONIC`` is one
clock for the whole host, so clients in several threads, tasks or processes of one machine can share a
history.

Outcomes:

* known: the client saw the answer (``Recorder.complete``);
* unknown: a timeout or "unavailable" error, so the write may or may not have been applied, possibly long
  after the client gave up (``Recorder.fail_unknown``). Its return time is +infinity (``return_ns is None``)
  and the checker may place it anywhere after its call, or nowhere. An operation still pending when the
  history is taken is unknown too;
* definitely not applied (an error that proves it, e.g. a rejected argument): ``Recorder.fail_definite``
  drops it.

Keys and values are ``bytes`` as in ``KvPut``/``KvDelete``/``KvCompareAndSet`` (``str`` is accepted and
encoded as UTF-8); ``None`` as a value means "key absent". Histories round-trip through JSON, so that a
failing one can be saved next to the test report and replayed with ``History.load(path)``.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

FORMAT: Final = "tunnelmesh-linearizability-history"
FORMAT_VERSION: Final = 1

ClientId = int | str
Value = bytes | None  # None: the key is absent


class HistoryError(ValueError):
    """A history (or a Recorder call) that does not make sense: says which operation and what is wrong."""


class OpKind(enum.StrEnum):
    PUT = "put"
    GET = "get"
    CAS = "cas"
    DELETE = "delete"


class _NotReported(enum.Enum):
    NOT_REPORTED = "not-reported"

    def __repr__(self) -> str:
        return "NOT_REPORTED"


# The answer did not include the previous value (KvResult has it, but the API a test goes through may not
# pass it on), so the checker must not constrain it.
NOT_REPORTED: Final = _NotReported.NOT_REPORTED
Previous = bytes | None | Literal[_NotReported.NOT_REPORTED]


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation on one key. Which fields matter depends on ``kind``:

    * put: ``value``; delete: nothing;
    * cas: ``expected`` (``None``: the key must be absent) and ``value`` (the new value); ``succeeded``;
    * get: ``read`` (``None``: the key was absent);
    * put / delete / cas may carry ``previous``, the value before the command as the server reported it.

    ``return_ns is None``: the outcome is unknown, and ``read``/``succeeded``/``previous`` carry nothing.
    """

    id: int
    client: ClientId
    kind: OpKind
    key: bytes
    call_ns: int
    return_ns: int | None
    value: Value = None
    expected: Value = None
    read: Value = None
    succeeded: bool = True
    previous: Previous = NOT_REPORTED

    @property
    def unknown(self) -> bool:
        return self.return_ns is None

    def describe(self, origin_ns: int = 0) -> str:
        """One readable line: times in ms relative to ``origin_ns``, the call and what came back."""
        start = _ms(self.call_ns - origin_ns)
        end = "∞" if self.return_ns is None else _ms(self.return_ns - origin_ns)
        return f"[{start:>10} .. {end:>10} ms] client {self.client!s:<4} #{self.id:<5} {self.call_text()}"

    def call_text(self) -> str:
        key = show(self.key)
        if self.kind is OpKind.PUT:
            text = f"put({key}, {show(self.value)})"
        elif self.kind is OpKind.DELETE:
            text = f"delete({key})"
        elif self.kind is OpKind.CAS:
            text = f"cas({key}, expect {show(self.expected)}, new {show(self.value)})"
        else:
            text = f"get({key})"
        return f"{text} -> {self.output_text()}"

    def output_text(self) -> str:
        if self.unknown:
            return "unknown (timed out)"
        if self.kind is OpKind.GET:
            return show(self.read)
        out = ("ok" if self.succeeded else "failed") if self.kind is OpKind.CAS else "ok"
        if self.previous is not NOT_REPORTED:
            out += f", previous {show(self.previous)}"
        return out


def show(value: Value) -> str:
    """A value as a human reads it: the text if it is printable UTF-8, else hex; absence spelled out."""
    if value is None:
        return "<absent>"
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return "0x" + value.hex()
    return repr(text) if text.isprintable() else "0x" + value.hex()


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


@dataclass(frozen=True, slots=True)
class History:
    """A finished history: operations in invocation order."""

    operations: tuple[Operation, ...]
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: seed, scenario, faults injected ...

    def __len__(self) -> int:
        return len(self.operations)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    @property
    def origin_ns(self) -> int:
        return min((op.call_ns for op in self.operations), default=0)

    def by_key(self) -> dict[bytes, list[Operation]]:
        parts: dict[bytes, list[Operation]] = {}
        for op in self.operations:
            parts.setdefault(op.key, []).append(op)
        return parts

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "meta": self.meta,
                "operations": [_op_to_json(op) for op in self.operations],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> History:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise HistoryError(f"history is not JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise HistoryError(f"not a history file: expected format {FORMAT!r}")
        if doc.get("version") != FORMAT_VERSION:
            raise HistoryError(
                f"history format version {doc.get('version')!r}; this reader knows {FORMAT_VERSION}"
            )
        ops = doc.get("operations")
        if not isinstance(ops, list):
            raise HistoryError("history has no 'operations' list")
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise HistoryError("history 'meta' must be an object")
        return cls(tuple(_op_from_json(i, raw) for i, raw in enumerate(ops)), meta=meta)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> History:
        return cls.from_json(Path(path).read_text())

    def describe(self) -> str:
        origin = self.origin_ns
        ops = sorted(self.operations, key=lambda o: (o.call_ns, o.id))
        return "\n".join(op.describe(origin) for op in ops)


@dataclass(slots=True)
class _Pending:
    client: ClientId
    kind: OpKind
    key: bytes
    value: Value
    expected: Value
    call_ns: int


class Recorder:
    """Collects operations from concurrent clients: threads or asyncio tasks (every method is short,
    non-blocking and takes one lock). Call ``invoke`` just before sending a request and one of ``complete``,
    ``fail_unknown`` or ``fail_definite`` after the answer. ``history()`` may be taken at any time; pending
    operations count as unknown.
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._done: dict[int, Operation] = {}  # op id -> operation; dropped ones are simply absent

    def invoke(
        self,
        client: ClientId,
        kind: OpKind | str,
        key: bytes | str,
        *,
        value: bytes | str | None = None,
        expected: bytes | str | None = None,
    ) -> int:
        """Record a call; returns its op id.

        put: ``value``; cas: ``expected`` (None: the key must be absent) and ``value`` (the new value)."""
        try:
            kind = OpKind(kind)
        except ValueError:
            raise HistoryError(
                f"unknown operation kind {kind!r}; one of {[k.value for k in OpKind]}"
            ) from None
        if kind in (OpKind.PUT, OpKind.CAS) and value is None:
            raise HistoryError(f"{kind} needs a value")
        if kind not in (OpKind.PUT, OpKind.CAS) and value is not None:
            raise HistoryError(f"{kind} takes no value")
        if kind is not OpKind.CAS and expected is not None:
            raise HistoryError(f"only cas takes an expected value, not {kind}")
        pending = _Pending(client, kind, _bytes(key), _value(value), _value(expected), 0)
        with self._lock:
            pending.call_ns = self._clock()
            op_id = self._next_id
            self._next_id += 1
            self._pending[op_id] = pending
        return op_id

    def complete(
        self,
        op_id: int,
        output: bytes | str | bool | None = None,
        *,
        previous: bytes | str | _NotReported | None = NOT_REPORTED,
    ) -> None:
        """The answer arrived. ``output``: get -> the value read (None: absent); cas -> succeeded (bool);
        put / delete -> None. ``previous``: the value before the command, if the server reported it."""
        with self._lock:
            now = self._clock()
            p = self._pending.get(op_id) or self._take(op_id)  # _take raises the right error
            if p.kind is OpKind.GET:
                if isinstance(output, bool):
                    raise HistoryError(f"op {op_id}: a get returns a value or None, not {output!r}")
                if previous is not NOT_REPORTED:
                    raise HistoryError(f"op {op_id}: a get has no previous value")
                op = self._op(op_id, p, now, read=_value(output))
            else:
                if p.kind is OpKind.CAS:
                    if not isinstance(output, bool):
                        raise HistoryError(f"op {op_id}: a cas returns whether it succeeded, not {output!r}")
                    succeeded = output
                elif output is not None:
                    raise HistoryError(
                        f"op {op_id}: a {p.kind} returns nothing but `previous`, not {output!r}"
                    )
                else:
                    succeeded = True
                prev: Previous = NOT_REPORTED if isinstance(previous, _NotReported) else _value(previous)
                op = self._op(op_id, p, now, succeeded=succeeded, previous=prev)
            # Only a well-formed answer finishes the operation: a wrong call can be corrected.
            del self._pending[op_id]
            self._done[op_id] = op

    def complete_response(self, op_id: int, response: Any) -> None:
        """``complete`` from a ``KvService`` answer (``kv.proto``: ``KvGetResponse`` found/value, the
        writes' optional ``previous_value``, ``succeeded``). Only linearizable gets belong here, not stale
        ones."""
        with self._lock:
            kind = (self._pending.get(op_id) or self._take(op_id)).kind  # _take raises the right error
        if kind is OpKind.GET:
            self.complete(op_id, bytes(response.value) if response.found else None)
            return
        previous = bytes(response.previous_value) if response.HasField("previous_value") else None
        if kind is OpKind.CAS:
            self.complete(op_id, bool(response.succeeded), previous=previous)
        else:
            self.complete(op_id, previous=previous)

    def fail_unknown(self, op_id: int) -> None:
        """Timeout / unavailable: the operation may take effect at any time after its call, or never."""
        with self._lock:
            p = self._take(op_id)
            self._done[op_id] = self._op(op_id, p, None)

    def fail_definite(self, op_id: int) -> None:
        """The operation certainly did not take effect: it is left out of the history."""
        with self._lock:
            self._take(op_id)

    def history(self, **meta: Any) -> History:
        with self._lock:
            ops = dict(self._done)
            ops.update((i, self._op(i, p, None)) for i, p in self._pending.items())
        return History(tuple(ops[i] for i in sorted(ops)), meta=meta)

    def _take(self, op_id: int) -> _Pending:
        try:
            return self._pending.pop(op_id)
        except KeyError:
            state = "already finished" if op_id in self._done or op_id < self._next_id else "never invoked"
            raise HistoryError(f"op {op_id} is {state}") from None

    @staticmethod
    def _op(op_id: int, p: _Pending, return_ns: int | None, **output: Any) -> Operation:
        return Operation(
            op_id, p.client, p.kind, p.key, p.call_ns, return_ns, value=p.value, expected=p.expected, **output
        )


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _value(data: bytes | str | None) -> Value:
    return None if data is None else _bytes(data)


# JSON: a bytes value is a string when it is valid UTF-8 (readable in a saved file), else {"hex": "..."};
# null is "absent"; a missing "previous" is NOT_REPORTED.


def _enc(value: Value) -> str | dict[str, str] | None:
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"hex": value.hex()}


def _dec(raw: Any, where: str) -> Value:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw.encode()
    if isinstance(raw, dict) and isinstance(raw.get("hex"), str):
        try:
            return bytes.fromhex(raw["hex"])
        except ValueError as e:
            raise HistoryError(f"{where}: bad hex: {e}") from e
    raise HistoryError(f"{where}: expected a string, {{'hex': ...}} or null, got {raw!r}")


def _op_to_json(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": op.id,
        "client": op.client,
        "kind": op.kind.value,
        "key": _enc(op.key),
        "call_ns": op.call_ns,
        "return_ns": op.return_ns,
    }
    if op.kind in (OpKind.PUT, OpKind.CAS):
        out["value"] = _enc(op.value)
    if op.kind is OpKind.CAS:
        out["expected"] = _enc(op.expected)
    if not op.unknown:
        if op.kind is OpKind.GET:
            out["read"] = _enc(op.read)
        if op.kind is OpKind.CAS:
            out["succeeded"] = op.succeeded
        if op.previous is not NOT_REPORTED:
            out["previous"] = _enc(op.previous)
    return out


def _op_from_json(index: int, raw: Any) -> Operation:
    where = f"operation {index}"
    if not isinstance(raw, dict):
        raise HistoryError(f"{where}: expected an object")
    try:
        kind = OpKind(raw["kind"])
        key = _dec(raw["key"], f"{where} key")
        if key is None:
            raise HistoryError(f"{where}: key is null")
        succeeded = raw.get("succeeded", True)
        if not isinstance(succeeded, bool):
            raise HistoryError(f"{where}: 'succeeded' must be true or false, got {succeeded!r}")
        op = Operation(
            id=int(raw["id"]),
            client=raw["client"],
            kind=kind,
            key=key,
            call_ns=int(raw["call_ns"]),
            return_ns=None if raw["return_ns"] is None else int(raw["return_ns"]),
            value=_dec(raw.get("value"), f"{where} value"),
            expected=_dec(raw.get("expected"), f"{where} expected"),
            read=_dec(raw.get("read"), f"{where} read"),
            succeeded=succeeded,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, HistoryError):
            raise
        raise HistoryError(f"{where}: {type(e).__name__}: {e}") from e
    if "previous" in raw:
        op = replace(op, previous=_dec(raw["previous"], f"{where} previous"))
    validate([op])
    return op


def validate(ops: Iterable[Operation]) -> None:
    """Reject operations a client cannot have produced (so the checker's verdict is about the server)."""
    for op in ops:
        where = f"operation #{op.id}"
        if not isinstance(op.client, int | str) or isinstance(op.client, bool):
            raise HistoryError(f"{where}: client id must be an int or a string, got {op.client!r}")
        if op.return_ns is not None and op.return_ns < op.call_ns:
            raise HistoryError(f"{where}: returns ({op.return_ns}) before its call ({op.call_ns})")
        if op.kind in (OpKind.PUT, OpKind.CAS) and op.value is None:
            raise HistoryError(f"{where}: {op.kind} without a value")
