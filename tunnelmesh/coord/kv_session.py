"""``KvService.Session``: many KV operations multiplexed on one bidirectional stream.

Why: with grpc.aio a unary call costs a coordinator about 0.55 ms of CPU before any work of its own (call
setup, metadata, three completion-queue batches, the handler task), a message on an open stream about 0.2 ms.
The leader serves every write, so at many concurrent clients the per-call cost, not Raft, limits throughput
(docs/benchmarks.md, "What limits TunnelMesh").

Protocol (kv.proto has the contract): the client sends ``KvSessionRequest``s, each with an id of its choice
and one operation; every operation runs as soon as it arrives, concurrently with the others, and is answered
with its id when it completes, in completion order. A failed operation is answered with its status code and
message; the stream goes on. The stream itself ends with INVALID_ARGUMENT only for a broken protocol (an
operation without ``op``, an id already in flight), cancelling what is in flight (a write among them may
still commit, as after a cancelled unary call). When the client half-closes, everything in flight is answered
and the stream ends OK. The coordinator sends the response header ``tunnelmesh-session: ready`` as soon as it
has accepted the stream (after the API-token check of its opening), so a client can tell a refused stream from
an open one before it writes (see ``client.SESSION_READY_HEADER``).

Flow control: at most ``MAX_IN_FLIGHT`` operations run per session; beyond that this side stops reading, and
HTTP/2 flow control holds the client back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from tunnelmesh.api.v1 import kv_pb2
from tunnelmesh.client import SESSION_READY_HEADER, status_code

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1024

SESSIONS = Gauge("tunnelmesh_kv_sessions", "Open KvService.Session streams on this coordinator.")
OPERATIONS = Counter(
    "tunnelmesh_kv_session_operations",
    "KvService.Session operations answered, by operation and gRPC status code (OK included).",
    ["op", "code"],
)
BROKEN = Counter(
    "tunnelmesh_kv_sessions_broken",
    "KvService.Session streams ended with INVALID_ARGUMENT for a broken protocol, by reason.",
    ["reason"],
)
for _reason in ("missing_op", "duplicate_id"):
    BROKEN.labels(_reason)

RunOp = Callable[[kv_pb2.KvSessionRequest, str], Awaitable[kv_pb2.KvSessionResponse]]
"""Runs one operation (``which``: the name of the set ``op`` field) and answers it, never raising."""


class _Broken:
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message


class _Drained:
    """Half-closed, and every operation answered."""


_DRAINED = _Drained()
_Event = _Broken | BaseException | _Drained | None


async def serve(
    requests: AsyncIterator[kv_pb2.KvSessionRequest],
    context: Any,
    run: RunOp,
    *,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> None:
    """Serve one session on ``context`` until the client half-closes (or cancels)."""
    await context.send_initial_metadata((SESSION_READY_HEADER,))
    SESSIONS.inc()
    try:
        broken = await _serve(requests, context, run, max_in_flight)
    finally:
        SESSIONS.dec()
    if broken is not None:
        BROKEN.labels(broken.reason).inc()
        log.info("event=kv_session_broken reason=%s peer=%s", broken.reason, context.peer())
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, broken.message)


async def _serve(
    requests: AsyncIterator[kv_pb2.KvSessionRequest], context: Any, run: RunOp, max_in_flight: int
) -> _Broken | None:
    # The task whose operation completes while no answer is being written writes it, then every answer that
    # completed meanwhile (gRPC takes one message per stream at a time). No hand-over to a writer task: that
    # would cost every answer an event-loop pass, and so would a lock passed from task to task. ``events``
    # carries what ends the session: half-close (None), a broken protocol, a failure, or _DRAINED.
    events: asyncio.Queue[_Event] = asyncio.Queue()
    in_flight: dict[int, str] = {}  # ids not answered yet -> their op
    room = asyncio.Semaphore(max_in_flight)
    answers: collections.deque[kv_pb2.KvSessionResponse] = collections.deque()
    writing = False
    tasks: set[asyncio.Task[None]] = set()
    closed = False

    async def one(req: kv_pb2.KvSessionRequest, which: str) -> None:
        nonlocal writing
        answers.append(await run(req, which))
        if writing:
            return  # the task writing now sends it too
        writing = True
        try:
            while answers:
                resp = answers.popleft()
                await context.write(resp)
                OPERATIONS.labels(in_flight.pop(resp.id), _code_name(resp)).inc()
                room.release()
        except Exception as exc:  # the stream failed under us: end the handler with it
            events.put_nowait(exc)
            return
        finally:
            writing = False
        if closed and not in_flight:
            events.put_nowait(_DRAINED)

    async def read() -> None:
        try:
            async for req in requests:
                which = req.WhichOneof("op")
                if which is None:
                    events.put_nowait(
                        _Broken(
                            "missing_op",
                            f"operation {req.id} has no op: set one of put, get, delete, compare_and_set",
                        )
                    )
                    return
                if req.id in in_flight:
                    events.put_nowait(
                        _Broken(
                            "duplicate_id",
                            f"operation id {req.id} is already in flight on this session: an id may be "
                            "reused only after its answer",
                        )
                    )
                    return
                await room.acquire()
                in_flight[req.id] = which
                task = asyncio.get_running_loop().create_task(one(req, which))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            events.put_nowait(None)  # half-closed
        except Exception as exc:  # the stream failed under us: end the handler with it
            events.put_nowait(exc)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while True:
            item = await events.get()
            if item is None:
                closed = True
                if not in_flight:
                    return None
            elif isinstance(item, _Drained):
                return None
            elif isinstance(item, _Broken):
                return item
            elif isinstance(item, BaseException):
                raise item
    finally:
        # Owned here: cancelled and awaited on every way out (the client cancelling included).
        pending = [reader, *tasks]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _code_name(resp: kv_pb2.KvSessionResponse) -> str:
    return status_code(resp.error.code).name if resp.HasField("error") else "OK"
