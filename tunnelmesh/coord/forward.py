"""Writes a follower forwards to the leader, batched.

A follower cannot commit a write itself: it forwards the serialized ``Command`` to the leader. One RPC per
write would cost the leader one gRPC call per write, and gRPC calls are what its single Python event loop
spends most of its time on. Instead a follower keeps at most ``MAX_IN_FLIGHT`` ``Raft.ProposeBatch`` calls
open per leader and sends whatever its clients wrote while they were in flight as the next batch: a lone write
leaves at once (no added latency), and under load the batches grow with the load. The leader proposes a batch
in one go (one Raft append, one fsync) and answers every command.

A command the leader did not commit (it is no longer the leader, lost the entry in a leader change, or could
not be reached) comes back as ``None``: the caller retries it with the same request id, which the state
machine applies at most once. A leader of an older version answers ``ProposeBatch`` with UNIMPLEMENTED; it
then gets one ``Raft.Propose`` per command.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.coord.raft.driver import DeadlineExceeded
from tunnelmesh.coord.raft.transport import Transport

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2
"""ProposeBatch calls a follower keeps open per leader; further writes wait for one to return."""
MAX_BATCH = 512
"""Commands per ProposeBatch call."""

FORWARDED = Counter(
    "tunnelmesh_raft_forwarded_commands",
    "Writes this coordinator forwarded to the leader, by outcome (committed, retry: not committed, the "
    "caller tries again; timeout).",
    ["outcome"],
)
FORWARD_CALLS = Counter(
    "tunnelmesh_raft_forward_calls",
    "ProposeBatch (or, to a leader without it, Propose) calls this coordinator made to the leader.",
)

Outcome = tuple[int, bytes] | None
"""(log index, serialized CommandResult) of a command the leader applied, or None: retry it."""


@dataclass(slots=True)
class _Pending:
    command: bytes
    deadline: float  # loop time
    future: asyncio.Future[Outcome]


class Forwarder:
    """``await forward(leader, command, timeout)``: the leader's outcome for one command, batched with the
    other commands forwarded meanwhile."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._queues: dict[int, deque[_Pending]] = {}
        self._in_flight: dict[int, int] = {}
        self._single: set[int] = set()  # leaders without ProposeBatch
        self._tasks: set[asyncio.Task[None]] = set()

    async def forward(self, leader: int, command: bytes, timeout: float) -> Outcome:  # noqa: ASYNC109 - a wait budget
        """Raises ``DeadlineExceeded`` if the leader's answer did not come within ``timeout`` (the write may
        still commit)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._queues.setdefault(leader, deque()).append(_Pending(command, loop.time() + timeout, fut))
        self._pump(leader)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            FORWARDED.labels("timeout").inc()
            raise DeadlineExceeded("the leader did not answer the forwarded write in time") from None

    def _pump(self, leader: int) -> None:
        q = self._queues.get(leader)
        while q and self._in_flight.get(leader, 0) < MAX_IN_FLIGHT:
            batch = [p for p in (q.popleft() for _ in range(min(len(q), MAX_BATCH))) if not p.future.done()]
            if not batch:
                continue  # every caller of these gave up
            self._in_flight[leader] = self._in_flight.get(leader, 0) + 1
            task = asyncio.create_task(self._send(leader, batch), name=f"raft-forward-{leader:x}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if q is not None and not q:
            del self._queues[leader]

    async def _send(self, leader: int, batch: list[_Pending]) -> None:
        outcomes: list[Outcome] = [None] * len(batch)  # what the callers get unless the leader answers
        try:
            if leader in self._single:
                outcomes = list(await asyncio.gather(*(self._propose(leader, p) for p in batch)))
            else:
                outcomes = await self._propose_batch(leader, batch)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # The call, not this task, was cancelled: grpc.aio does that to the calls of a channel it closes
            # (this coordinator is stopping, or the leader was removed). The callers retry, and find out.
            log.debug("event=forward_failed leader=%x error='channel closed'", leader)
        except Exception as exc:  # a call on a channel closed before it started (UsageError), and the like
            log.debug("event=forward_failed leader=%x error=%r", leader, str(exc))
        finally:
            # Answered or not, no caller is left to wait for its deadline.
            for p, outcome in zip(batch, outcomes, strict=True):
                FORWARDED.labels("retry" if outcome is None else "committed").inc()
                if not p.future.done():
                    p.future.set_result(outcome)
            self._in_flight[leader] -= 1
            self._pump(leader)

    async def _propose_batch(self, leader: int, batch: list[_Pending]) -> list[Outcome]:
        stub = self._t.stub(leader)
        if stub is None:
            return [None] * len(batch)
        timeout = max(p.deadline for p in batch) - asyncio.get_running_loop().time()
        req = raft_pb2.ProposeBatchRequest(header=self._t.header(leader), commands=[p.command for p in batch])
        FORWARD_CALLS.inc()
        try:
            resp = await stub.ProposeBatch(req, timeout=max(timeout, 0.001))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("event=raft_forward_single leader=%x detail='leader has no ProposeBatch'", leader)
                self._single.add(leader)
                return list(await asyncio.gather(*(self._propose(leader, p) for p in batch)))
            log.debug("event=forward_failed leader=%x code=%s", leader, exc.code().name)
            return [None] * len(batch)
        outcomes: list[Outcome] = [
            (o.index, o.result) if o.index else None for o in resp.outcomes[: len(batch)]
        ]
        for o in resp.outcomes:
            if o.error:
                log.debug("event=forward_not_committed leader=%x reason=%r", leader, o.error)
        return outcomes + [None] * (len(batch) - len(outcomes))

    async def _propose(self, leader: int, p: _Pending) -> Outcome:
        stub = self._t.stub(leader)
        if stub is None or p.future.done():
            return None
        timeout = p.deadline - asyncio.get_running_loop().time()
        req = raft_pb2.ProposeRequest(header=self._t.header(leader), command=p.command)
        FORWARD_CALLS.inc()
        try:
            resp = await stub.Propose(req, timeout=max(timeout, 0.001))
        except grpc.aio.AioRpcError as exc:
            log.debug("event=forward_failed leader=%x code=%s", leader, exc.code().name)
            return None
        return resp.index, resp.result
