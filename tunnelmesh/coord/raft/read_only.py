"""Pending ReadIndex requests on the leader (§6.4 of the Raft thesis).

A read request is registered with the commit index at the time it arrived; the leader then broadcasts a
heartbeat carrying the request's context and, once a quorum of voters echoed that context, every request
queued up to and including it is released: serving them at their recorded index is linearizable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tunnelmesh.coord.raft.messages import Message


class ReadOnlyOption(enum.Enum):
    SAFE = 0  # confirm leadership with a heartbeat round (default)
    LEASE_BASED = 1  # trust the leader lease; needs check_quorum and bounded clock drift


@dataclass(slots=True)
class ReadIndexStatus:
    req: Message
    index: int
    acks: dict[int, bool] = field(default_factory=dict)


class ReadOnly:
    __slots__ = ("option", "pending", "queue")

    def __init__(self, option: ReadOnlyOption) -> None:
        self.option = option
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []

    def add_request(self, index: int, m: Message) -> None:
        ctx = m.context
        if ctx in self.pending:
            return
        self.pending[ctx] = ReadIndexStatus(m, index)
        self.queue.append(ctx)

    def recv_ack(self, node_id: int, ctx: bytes) -> dict[int, bool] | None:
        rs = self.pending.get(ctx)
        if rs is None:
            return None
        rs.acks[node_id] = True
        return rs.acks

    def advance(self, ctx: bytes) -> list[ReadIndexStatus]:
        """Release the request ``ctx`` and every request queued before it."""
        if ctx not in self.pending:
            return []
        i = self.queue.index(ctx)
        released = [self.pending.pop(c) for c in self.queue[: i + 1]]
        del self.queue[: i + 1]
        return released

    def last_pending_request_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""
