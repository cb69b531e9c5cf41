"""The Raft transport: core ``Message`` values over gRPC (``tunnelmesh.raft.v1.Raft``) with mutual TLS.

Theory of operation
===================

* **Mapping** lives in one place, the table ``_CODECS``: for each core ``MessageType`` the
  ``RaftEnvelope`` field that carries it, an encoder and a decoder. ``message_to_envelope`` /
  ``envelope_to_message`` are the only conversions; a test round-trips every type. Snapshots (``SNAP``) are
  not enveloped: they are streamed in chunks through ``InstallSnapshot``.
* **Sending** is one-way, as in etcd's rafthttp: ``send(messages)`` never blocks and never fails. It appends
  to a bounded per-peer queue; a sender task per peer drains everything queued since its previous write into
  one ``MessageBatch`` and writes it on a long-lived ``Stream`` call to that peer (one channel per peer), so
  messages to a peer stay in order, a busy leader sends few large batches, and no message costs a gRPC call
  of its own (a unary call costs ~0.5 ms of CPU in grpc.aio, a stream write a fraction of it). Answers come
  back on the peer's own stream to us. A write has a deadline (``rpc_timeout``): a peer that stops reading
  fails it. When a stream breaks, or the queue overflows, the batches in flight are lost and the driver is
  told ``report_unreachable(peer)``; the next batch reopens the stream after a backoff, and Raft's
  retransmission (probe, heartbeats) recovers. A peer that answers ``Stream`` with ``UNIMPLEMENTED`` (an
  older coordinator) gets one unary ``Send(MessageBatch)`` per batch instead. A ``SNAP`` is streamed in
  chunks of ``SNAPSHOT_CHUNK`` bytes through ``InstallSnapshot`` and its outcome reported with
  ``report_snapshot``.
* **Receiving**: the server refuses (``FAILED_PRECONDITION``) a batch whose header names another cluster or
  another recipient, and (``PERMISSION_DENIED``) a caller whose certificate is not the coordinator named by
  ``header.from_id``; on a ``Stream`` the first batch's header is checked and later batches may not change
  it. Every refusal is counted in ``tunnelmesh_raft_messages_refused_total{reason}``. A client without a
  certificate of the cluster CA never gets past the TLS handshake. Valid messages are handed to the
  driver's ``deliver`` callback, which only queues them.
* ``Join``, ``Propose`` and ``ReadIndex`` are request/response RPCs that wait on the driver; they are served
  by a ``RaftRequestHandler`` (the coordinator service) after the same checks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from prometheus_client import Counter

from tunnelmesh import pki
from tunnelmesh.api.raft.v1 import raft_pb2, raft_pb2_grpc
from tunnelmesh.coord.raft.core import CAMPAIGN_TRANSFER
from tunnelmesh.coord.raft.errors import RaftError
from tunnelmesh.coord.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    SnapshotStatus,
)

log = logging.getLogger(__name__)

M = MessageType

SNAPSHOT_CHUNK = 1 << 20
"""Bytes per InstallSnapshot chunk (below gRPC's 4 MiB default message limit)."""
MAX_QUEUE = 8192
"""Messages queued per peer before the transport drops them and reports the peer unreachable."""
MAX_BATCH = 1024
"""Messages per batch (stream write or Send call)."""
MAX_MESSAGE_BYTES = 64 << 20
SNAPSHOT_TIMEOUT = 60.0


REFUSED = Counter(
    "tunnelmesh_raft_messages_refused",
    "Raft transport calls and messages refused, by reason (other_cluster, other_recipient, identity, "
    "no_header, header_changed, undecodable; removed_member: calls and messages from a member removed from "
    "the cluster).",
    ["reason"],
)
REMOVED_DETAIL = "was removed from cluster"
"""In the PERMISSION_DENIED detail a member gets for a message it sends after its removal: it stops then."""
STREAM_FAILURES = Counter(
    "tunnelmesh_raft_stream_failures",
    "Outbound Raft peer streams that broke or could not be opened (the sender reconnects with backoff).",
)


class TransportError(RaftError):
    """A Raft message could not be encoded or decoded."""


def member_label(member_id: int) -> str:
    """A member id as the public API and certificates show it: 16 lowercase hex digits."""
    return f"{member_id:016x}"


# -- mapping: core Message <-> proto -------------------------------------------------------------------------


def entry_to_proto(e: Entry) -> raft_pb2.Entry:
    return raft_pb2.Entry(index=e.index, term=e.term, type=int(e.type) + 1, data=e.data)  # type: ignore[arg-type]


def entry_from_proto(p: raft_pb2.Entry) -> Entry:
    if p.type == raft_pb2.ENTRY_TYPE_UNSPECIFIED:
        raise TransportError(f"log entry {p.index} has no type")
    try:
        kind = EntryType(p.type - 1)
    except ValueError:
        raise TransportError(f"log entry {p.index} has unknown type {p.type}") from None
    return Entry(p.index, p.term, kind, p.data)


def _enc_vote(p: Any, m: Message) -> None:
    p.term = m.term
    p.last_log_index = m.index
    p.last_log_term = m.log_term
    p.pre_vote = m.type == M.PRE_VOTE
    p.leadership_transfer = m.context == CAMPAIGN_TRANSFER


def _dec_vote(p: Any, frm: int, to: int) -> Message:
    return Message(
        M.PRE_VOTE if p.pre_vote else M.VOTE,
        to=to,
        frm=frm,
        term=p.term,
        index=p.last_log_index,
        log_term=p.last_log_term,
        context=CAMPAIGN_TRANSFER if p.leadership_transfer else b"",
    )


def _enc_vote_resp(p: Any, m: Message) -> None:
    p.term = m.term
    p.vote_granted = not m.reject
    p.pre_vote = m.type == M.PRE_VOTE_RESP


def _dec_vote_resp(p: Any, frm: int, to: int) -> Message:
    kind = M.PRE_VOTE_RESP if p.pre_vote else M.VOTE_RESP
    return Message(kind, to=to, frm=frm, term=p.term, reject=not p.vote_granted)


def _enc_app(p: Any, m: Message) -> None:
    p.term = m.term
    p.leader_commit = m.commit
    if m.type == M.HEARTBEAT:
        p.read_context = m.context
        p.heartbeat = True
        return
    p.prev_log_index = m.index
    p.prev_log_term = m.log_term
    # Appended in place: building Entry messages first and copying them in would copy every payload twice.
    add = p.entries.add
    for e in m.entries:
        add(index=e.index, term=e.term, type=int(e.type) + 1, data=e.data)


def _dec_app(p: Any, frm: int, to: int) -> Message:
    if p.heartbeat:
        return Message(
            M.HEARTBEAT, to=to, frm=frm, term=p.term, commit=p.leader_commit, context=p.read_context
        )
    return Message(
        M.APP,
        to=to,
        frm=frm,
        term=p.term,
        index=p.prev_log_index,
        log_term=p.prev_log_term,
        entries=tuple(entry_from_proto(e) for e in p.entries),
        commit=p.leader_commit,
    )


def _enc_app_resp(p: Any, m: Message) -> None:
    p.term = m.term
    p.success = not m.reject
    if m.type == M.HEARTBEAT_RESP:
        p.read_context = m.context
        p.heartbeat = True
        return
    p.match_index = m.index
    p.reject_hint_index = m.reject_hint
    p.reject_hint_term = m.log_term


def _dec_app_resp(p: Any, frm: int, to: int) -> Message:
    if p.heartbeat:
        return Message(M.HEARTBEAT_RESP, to=to, frm=frm, term=p.term, context=p.read_context)
    return Message(
        M.APP_RESP,
        to=to,
        frm=frm,
        term=p.term,
        index=p.match_index,
        reject=not p.success,
        reject_hint=p.reject_hint_index,
        log_term=p.reject_hint_term,
    )


def _enc_timeout_now(p: Any, m: Message) -> None:
    p.term = m.term


def _dec_timeout_now(p: Any, frm: int, to: int) -> Message:
    return Message(M.TIMEOUT_NOW, to=to, frm=frm, term=p.term)


def _enc_read_index(p: Any, m: Message) -> None:
    p.context = m.context


def _dec_read_index(p: Any, frm: int, to: int) -> Message:
    return Message(M.READ_INDEX, to=to, frm=frm, context=p.context)


def _enc_read_index_resp(p: Any, m: Message) -> None:
    p.read_index = m.index
    p.context = m.context
    p.term = m.term


def _dec_read_index_resp(p: Any, frm: int, to: int) -> Message:
    return Message(M.READ_INDEX_RESP, to=to, frm=frm, term=p.term, index=p.read_index, context=p.context)


def _enc_transfer(p: Any, m: Message) -> None:
    p.transferee = m.frm


def _dec_transfer(p: Any, frm: int, to: int) -> Message:
    # The core's TRANSFER_LEADER names the transferee in ``frm`` (etcd's convention).
    return Message(M.TRANSFER_LEADER, to=to, frm=p.transferee)


@dataclass(frozen=True, slots=True)
class _Codec:
    field: str
    encode: Callable[[Any, Message], None]  # fills the envelope's field in place
    decode: Callable[[Any, int, int], Message]


_VOTE = _Codec("request_vote", _enc_vote, _dec_vote)
_VOTE_RESP = _Codec("request_vote_response", _enc_vote_resp, _dec_vote_resp)
_APP = _Codec("append_entries", _enc_app, _dec_app)
_APP_RESP = _Codec("append_entries_response", _enc_app_resp, _dec_app_resp)

_CODECS: dict[MessageType, _Codec] = {
    M.VOTE: _VOTE,
    M.PRE_VOTE: _VOTE,
    M.VOTE_RESP: _VOTE_RESP,
    M.PRE_VOTE_RESP: _VOTE_RESP,
    M.APP: _APP,
    M.HEARTBEAT: _APP,
    M.APP_RESP: _APP_RESP,
    M.HEARTBEAT_RESP: _APP_RESP,
    M.TIMEOUT_NOW: _Codec("timeout_now", _enc_timeout_now, _dec_timeout_now),
    M.READ_INDEX: _Codec("read_index", _enc_read_index, _dec_read_index),
    M.READ_INDEX_RESP: _Codec("read_index_response", _enc_read_index_resp, _dec_read_index_resp),
    M.TRANSFER_LEADER: _Codec("transfer_leader", _enc_transfer, _dec_transfer),
}
"""The transition table of the wire format: core message type -> envelope field, encoder, decoder."""
_BY_FIELD: dict[str, _Codec] = {c.field: c for c in _CODECS.values()}

WIRE_TYPES = frozenset(_CODECS)
"""Message types that travel in a ``MessageBatch`` (``SNAP`` travels through ``InstallSnapshot``)."""


def message_to_envelope(m: Message) -> raft_pb2.RaftEnvelope:
    env = raft_pb2.RaftEnvelope()
    encode_into(env, m)
    return env


def encode_into(env: raft_pb2.RaftEnvelope, m: Message) -> None:
    """Fill ``env`` (e.g. ``batch.messages.add()``) with ``m``, without intermediate messages."""
    codec = _CODECS.get(m.type)
    if codec is None:
        raise TransportError(f"message type {m.type.name} is not sent in a batch")
    sub = getattr(env, codec.field)
    codec.encode(sub, m)
    sub.SetInParent()  # an all-default message (e.g. a TIMEOUT_NOW at term 0) still selects its oneof field


def envelope_to_message(env: raft_pb2.RaftEnvelope, frm: int, to: int) -> Message:
    which = env.WhichOneof("message")
    if which is None:
        raise TransportError("empty RaftEnvelope (unknown message type from a newer coordinator?)")
    return _BY_FIELD[which].decode(getattr(env, which), frm, to)


def conf_state_to_proto(cs: ConfState) -> raft_pb2.ConfState:
    return raft_pb2.ConfState(voters=sorted(cs.voters), learners=sorted(cs.learners))


def snapshot_chunks(
    snap: Snapshot, header: raft_pb2.RaftHeader, term: int, chunk: int = SNAPSHOT_CHUNK
) -> list[raft_pb2.InstallSnapshotChunk]:
    """A snapshot as ``InstallSnapshot`` chunks (metadata in the first, ``done`` in the last)."""
    data = snap.data
    meta = raft_pb2.SnapshotMetadata(
        last_included_index=snap.index,
        last_included_term=snap.term,
        conf_state=conf_state_to_proto(snap.metadata.conf_state),
        size=len(data),
        sha256=hashlib.sha256(data).digest(),
    )
    out: list[raft_pb2.InstallSnapshotChunk] = []
    offset = 0
    while True:
        piece = data[offset : offset + chunk]
        c = raft_pb2.InstallSnapshotChunk(header=header, term=term, offset=offset, data=piece)
        if offset == 0:
            c.metadata.CopyFrom(meta)
        offset += len(piece)
        c.done = offset >= len(data)
        out.append(c)
        if c.done:
            return out


def assemble_snapshot(chunks: Iterable[raft_pb2.InstallSnapshotChunk]) -> tuple[int, Snapshot]:
    """The (term, snapshot) of a complete chunk stream; ``TransportError`` if it is incomplete or damaged."""
    meta: raft_pb2.SnapshotMetadata | None = None
    term = 0
    parts: list[bytes] = []
    size = 0
    done = False
    for c in chunks:
        if meta is None:
            if not c.HasField("metadata") or c.offset != 0:
                raise TransportError("snapshot stream does not start with the metadata chunk")
            meta = c.metadata
            term = c.term
        elif c.term != term:
            raise TransportError(f"snapshot chunk term {c.term} differs from the stream's {term}")
        if c.offset != size:
            raise TransportError(f"snapshot chunk at offset {c.offset}, expected {size}")
        parts.append(c.data)
        size += len(c.data)
        if size > meta.size:
            raise TransportError(f"snapshot stream longer than announced {meta.size} bytes")
        if c.done:
            done = True
            break
    if meta is None or not done:
        raise TransportError("snapshot stream ended before its last chunk")
    data = b"".join(parts)
    if size != meta.size or hashlib.sha256(data).digest() != meta.sha256:
        raise TransportError("snapshot data fails its size or SHA-256 check")
    cs = ConfState(voters=tuple(meta.conf_state.voters), learners=tuple(meta.conf_state.learners))
    md = SnapshotMetadata(index=meta.last_included_index, term=meta.last_included_term, conf_state=cs)
    return term, Snapshot(md, data)


# -- the server ----------------------------------------------------------------------------------------------


class RaftRequestHandler(Protocol):
    """The request/response RPCs, served by the coordinator (they wait on the driver)."""

    async def handle_join(self, request: raft_pb2.JoinRequest, context: Any) -> raft_pb2.JoinResponse: ...

    async def handle_propose(
        self, request: raft_pb2.ProposeRequest, context: Any
    ) -> raft_pb2.ProposeResponse: ...

    async def handle_propose_batch(
        self, request: raft_pb2.ProposeBatchRequest, context: Any
    ) -> raft_pb2.ProposeBatchResponse: ...

    async def handle_read_index(
        self, request: raft_pb2.ReadIndexRequest, context: Any
    ) -> raft_pb2.ReadIndexResponse: ...


class _Servicer(raft_pb2_grpc.RaftServicer):
    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self._peers_seen: dict[bytes, pki.PeerIdentity] = {}

    async def _check(self, header: raft_pb2.RaftHeader, context: Any, *, allow_zero_to: bool = False) -> None:
        t = self.t
        if header.cluster_id != t.cluster_id:
            REFUSED.labels("other_cluster").inc()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cluster id {header.cluster_id!r} is not this coordinator's ({t.cluster_id!r})",
            )
        if header.to_id != t.member_id and not (allow_zero_to and header.to_id == 0):
            REFUSED.labels("other_recipient").inc()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"message for member {member_label(header.to_id)} reached member {member_label(t.member_id)} "
                "(stale address?)",
            )
        try:
            peer = self._peer(context)
        except pki.PkiError as exc:
            REFUSED.labels("identity").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise  # unreachable: abort raises
        if peer is None or peer.peer_id != member_label(header.from_id):
            who = peer.uri if peer is not None else "a client without a certificate"
            REFUSED.labels("identity").inc()
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} may not send as member {member_label(header.from_id)}",
            )
        await self._refuse_removed(header.from_id, context)

    async def _refuse_removed(self, member_id: int, context: Any) -> None:
        if self.t.is_removed(member_id):
            REFUSED.labels("removed_member").inc()
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"member {member_label(member_id)} {REMOVED_DETAIL} {self.t.cluster_id}",
            )

    def _peer(self, context: Any) -> pki.PeerIdentity | None:
        """``pki.authorize_coordinator``, memoized by the client certificate: parsing it on every batch would
        cost more than the batch itself. gRPC verified the chain in the handshake; the URI check is
        repeated only for a certificate not seen before."""
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or [b""]
        key = bytes(pems[0]) if isinstance(pems, list | tuple) else bytes(pems)
        peer = self._peers_seen.get(key)
        if peer is None:
            peer = pki.authorize_coordinator(context, self.t.cluster_id)
            if len(self._peers_seen) > 1024:
                self._peers_seen.clear()
            self._peers_seen[key] = peer
        return peer

    def _reply_header(self, header: raft_pb2.RaftHeader) -> raft_pb2.RaftHeader:
        return raft_pb2.RaftHeader(
            cluster_id=self.t.cluster_id, from_id=self.t.member_id, to_id=header.from_id
        )

    async def Send(self, request: raft_pb2.MessageBatch, context: Any) -> raft_pb2.SendResponse:
        await self._check(request.header, context)
        self.t.deliver(self._decode(request, request.header))
        return raft_pb2.SendResponse(header=self._reply_header(request.header))

    async def Stream(
        self, request_iterator: AsyncIterator[raft_pb2.MessageBatch], context: Any
    ) -> raft_pb2.SendResponse:
        """The peer stream: the identity checks run once, on the first batch's header; every later batch
        leaves the header unset or repeats it exactly."""
        header: raft_pb2.RaftHeader | None = None
        deliver = self.t.deliver
        async for batch in request_iterator:
            if header is None:
                if not batch.HasField("header"):
                    REFUSED.labels("no_header").inc()
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "the first batch of a Raft stream must carry a header",
                    )
                header = raft_pb2.RaftHeader()
                header.CopyFrom(batch.header)
                await self._check(header, context)
            elif batch.HasField("header") and batch.header != header:
                REFUSED.labels("header_changed").inc()
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "a Raft stream's header may not change; open a new stream",
                )
            else:  # a stream opened before its sender was removed: end it, the sender learns why
                await self._refuse_removed(header.from_id, context)
            deliver(self._decode(batch, header))
        if header is None:
            return raft_pb2.SendResponse()
        return raft_pb2.SendResponse(header=self._reply_header(header))

    def _decode(self, batch: raft_pb2.MessageBatch, header: raft_pb2.RaftHeader) -> list[Message]:
        frm, to = header.from_id, header.to_id
        msgs: list[Message] = []
        for env in batch.messages:
            try:
                msgs.append(envelope_to_message(env, frm, to))
            except TransportError as exc:
                REFUSED.labels("undecodable").inc()
                log.warning("event=raft_message_refused peer=%x error=%r", frm, str(exc))
        return msgs

    async def InstallSnapshot(
        self, request_iterator: AsyncIterator[raft_pb2.InstallSnapshotChunk], context: Any
    ) -> raft_pb2.InstallSnapshotResponse:
        chunks: list[raft_pb2.InstallSnapshotChunk] = []
        header: raft_pb2.RaftHeader | None = None
        async for c in request_iterator:
            if header is None:
                header = c.header
                await self._check(header, context)
            chunks.append(c)
            if c.done:
                break
        if header is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty snapshot stream")
            raise AssertionError("unreachable")
        try:
            term, snap = assemble_snapshot(chunks)
        except TransportError as exc:
            log.warning("event=raft_snapshot_refused peer=%x error=%r", header.from_id, str(exc))
            return raft_pb2.InstallSnapshotResponse(header=self._reply_header(header), success=False)
        self.t.deliver([Message(M.SNAP, to=header.to_id, frm=header.from_id, term=term, snapshot=snap)])
        log.info(
            "event=raft_snapshot_received peer=%x index=%d size=%d",
            header.from_id,
            snap.index,
            len(snap.data),
        )
        return raft_pb2.InstallSnapshotResponse(header=self._reply_header(header), success=True)

    async def Join(self, request: raft_pb2.JoinRequest, context: Any) -> raft_pb2.JoinResponse:
        await self._check(request.header, context, allow_zero_to=True)
        # A joiner joins as itself; a member may forward someone else's join (to the leader).
        frm = request.header.from_id
        if request.member.member_id != frm and frm not in self.t._peers:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "a coordinator may only join as itself")
        return await self.t.handler().handle_join(request, context)

    async def Propose(self, request: raft_pb2.ProposeRequest, context: Any) -> raft_pb2.ProposeResponse:
        await self._check(request.header, context)
        return await self.t.handler().handle_propose(request, context)

    async def ProposeBatch(
        self, request: raft_pb2.ProposeBatchRequest, context: Any
    ) -> raft_pb2.ProposeBatchResponse:
        await self._check(request.header, context)
        return await self.t.handler().handle_propose_batch(request, context)

    async def ReadIndex(self, request: raft_pb2.ReadIndexRequest, context: Any) -> raft_pb2.ReadIndexResponse:
        await self._check(request.header, context)
        return await self.t.handler().handle_read_index(request, context)

    async def _one_way_only(self, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "coordinators exchange Raft messages with Send (batched, one-way); see raft.proto",
        )

    async def RequestVote(self, request: Any, context: Any) -> Any:
        return await self._one_way_only(context)

    async def AppendEntries(self, request: Any, context: Any) -> Any:
        return await self._one_way_only(context)

    async def TimeoutNow(self, request: Any, context: Any) -> Any:
        return await self._one_way_only(context)


# -- the client side -----------------------------------------------------------------------------------------


class _Peer:
    def __init__(self, transport: Transport, member_id: int, address: str) -> None:
        self.member_id = member_id
        self.address = address
        self.queue: collections.deque[Message] = collections.deque()
        self.wake = asyncio.Event()
        t = transport
        options = [
            *pki.coordinator_channel_options(t.cluster_id, member_label(member_id)),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 2000),
            ("grpc.keepalive_timeout_ms", 2000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self.channel = grpc.aio.secure_channel(address, t.channel_credentials, options=options)
        self.stub = raft_pb2_grpc.RaftStub(self.channel)
        self.task: asyncio.Task[None] | None = None
        self.down_since: float | None = None
        # The open Stream call (None: open one, with the header, with the next batch).
        self.call: Any = None
        # The peer answered Stream with UNIMPLEMENTED (an older coordinator): one unary Send per batch.
        self.legacy = False

    def close_stream(self) -> None:
        call, self.call = self.call, None
        if call is not None and not call.done():
            call.cancel()


class Transport:
    """gRPC server for the Raft port plus one sender per peer; see the module docstring."""

    def __init__(
        self,
        *,
        cluster_id: str,
        member_id: int,
        listen: str,
        credentials: pki.CoordinatorCredentials,
        deliver: Callable[[Sequence[Message]], None],
        report_unreachable: Callable[[int], None],
        report_snapshot: Callable[[int, SnapshotStatus], None],
        rpc_timeout: float = 1.0,
        is_removed: Callable[[int], bool] = lambda _member: False,
        report_removed: Callable[[], None] = lambda: None,
    ) -> None:
        self.cluster_id = cluster_id
        self.member_id = member_id
        self.listen = listen
        self.credentials = credentials
        self.deliver = deliver
        self.report_unreachable = report_unreachable
        self.report_snapshot = report_snapshot
        self.rpc_timeout = rpc_timeout
        # Membership as the driver applied it: a removed member is refused, and told so (REMOVED_DETAIL).
        self.is_removed = is_removed
        self.report_removed = report_removed
        self.channel_credentials = pki.channel_credentials(credentials.trust_pem, credentials.identity)
        self._handler: RaftRequestHandler | None = None
        self._peers: dict[int, _Peer] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._server: grpc.aio.Server | None = None
        self.bound_port = 0
        self.dropped = 0

    def set_handler(self, handler: RaftRequestHandler) -> None:
        self._handler = handler

    def handler(self) -> RaftRequestHandler:
        if self._handler is None:
            raise RaftError("the coordinator service is not ready yet")
        return self._handler

    def header(self, to: int) -> raft_pb2.RaftHeader:
        return raft_pb2.RaftHeader(cluster_id=self.cluster_id, from_id=self.member_id, to_id=to)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the Raft port (before the driver starts, so a bad address fails fast)."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
            ]
        )
        raft_pb2_grpc.add_RaftServicer_to_server(_Servicer(self), server)
        creds = pki.server_credentials(
            self.credentials.identity, trust_pem=self.credentials.trust_pem, require_client_auth=True
        )
        what = "the Raft port: --raft-listen, coord.peer_listen"
        self.bound_port = await pki.add_secure_port(server, self.listen, creds, what)
        await server.start()
        self._server = server
        log.info("event=raft_transport_listening address=%s member=%x", self.listen, self.member_id)

    async def run(self) -> None:
        """Own the peer senders until cancelled; then stop the server and close every channel."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for p in self._peers.values():
                    if p.task is None:
                        p.task = tg.create_task(self._sender(p), name=f"raft-send-{p.member_id:x}")
                await asyncio.Event().wait()
        finally:
            self._tg = None
            server, self._server = self._server, None
            try:
                if server is not None:
                    await server.stop(grace=0.2)
            finally:
                for p in list(self._peers.values()):
                    with contextlib.suppress(Exception):
                        await p.channel.close(grace=None)

    async def close(self) -> None:
        """Stop the server if ``run`` never did (cancelled before it started); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)

    # -- peers -----------------------------------------------------------------------------------------------

    def set_peers(self, peers: dict[int, str]) -> None:
        """Make the peer set ``{member_id: raft_address}`` (without ourselves); channels are reused."""
        for mid in list(self._peers):
            if mid not in peers or self._peers[mid].address != peers[mid]:
                self._drop_peer(mid)
        for mid, addr in peers.items():
            if mid == self.member_id or mid in self._peers or not addr:
                continue
            p = _Peer(self, mid, addr)
            self._peers[mid] = p
            if self._tg is not None:
                p.task = self._tg.create_task(self._sender(p), name=f"raft-send-{mid:x}")

    def _drop_peer(self, mid: int) -> None:
        p = self._peers.pop(mid)
        if p.task is not None:
            p.task.cancel()  # the task closes its own channel on the way out; the TaskGroup awaits it

    def stub(self, member_id: int) -> raft_pb2_grpc.RaftAsyncStub | None:
        p = self._peers.get(member_id)
        return p.stub if p is not None else None

    def peer_address(self, member_id: int) -> str | None:
        p = self._peers.get(member_id)
        return p.address if p is not None else None

    # -- sending ---------------------------------------------------------------------------------------------

    def send(self, messages: Iterable[Message]) -> None:
        """Queue messages for their peers; never blocks. Unknown peers: dropped and reported unreachable."""
        for m in messages:
            p = self._peers.get(m.to)
            if p is None:
                self.dropped += 1
                if m.type == M.SNAP:
                    self.report_snapshot(m.to, SnapshotStatus.FAILURE)
                continue
            if len(p.queue) >= MAX_QUEUE:
                p.queue.clear()
                self.dropped += MAX_QUEUE
                self.report_unreachable(m.to)
            p.queue.append(m)
            p.wake.set()

    async def _sender(self, p: _Peer) -> None:
        backoff = 0.05
        try:
            while True:
                if not p.queue:
                    p.wake.clear()
                    await p.wake.wait()
                batch: list[Message] = []
                snap: Message | None = None
                while p.queue and len(batch) < MAX_BATCH:
                    m = p.queue.popleft()
                    if m.type == M.SNAP:
                        snap = m
                        break
                    batch.append(m)
                ok = True
                if batch:
                    ok = await (self._send_unary(p, batch) if p.legacy else self._send_stream(p, batch))
                if snap is not None:
                    await self._send_snapshot(p, snap)
                if ok:
                    backoff = 0.05
                    if p.down_since is not None:
                        log.info("event=raft_peer_reachable peer=%x address=%s", p.member_id, p.address)
                        p.down_since = None
                    continue
                # The peer is down: drop what queued meanwhile (Raft retransmits), wait a little.
                dropped = len(p.queue)
                for m in p.queue:
                    if m.type == M.SNAP:
                        self.report_snapshot(p.member_id, SnapshotStatus.FAILURE)
                p.queue.clear()
                self.dropped += dropped
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
        finally:
            p.close_stream()
            with contextlib.suppress(Exception):
                await p.channel.close(grace=None)

    def _encode_batch(
        self, p: _Peer, batch: list[Message], with_header: bool
    ) -> raft_pb2.MessageBatch | None:
        req = raft_pb2.MessageBatch()
        if with_header:
            req.header.CopyFrom(self.header(p.member_id))
        try:
            for m in batch:
                encode_into(req.messages.add(), m)
        except TransportError as exc:
            log.error("event=raft_encode_failed peer=%x error=%r", p.member_id, str(exc))
            return None
        return req

    async def _send_stream(self, p: _Peer, batch: list[Message]) -> bool:
        """Write one batch on the peer's stream, opening it first if needed. The write completes once gRPC has
        taken the message (not when the peer has it), so batches pipeline; a write that cannot complete
        within ``rpc_timeout`` (the peer stopped reading, or is unreachable) fails the stream."""
        call = p.call
        if call is not None and call.done():
            # The stream ended since the last batch (peer restarted, or refused it): a failure, then reopen.
            await self._stream_failed(p, batch, None)
            return False
        fresh = call is None
        req = self._encode_batch(p, batch, with_header=fresh)
        if req is None:
            return True
        try:
            async with asyncio.timeout(self.rpc_timeout):
                if fresh:
                    # No deadline: the stream lives until it breaks; keepalive pings detect a dead peer.
                    call = p.call = p.stub.Stream()
                await call.write(req)
            return True
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
            await self._stream_failed(p, batch, exc)
            return False

    async def _stream_failed(self, p: _Peer, batch: list[Message], exc: BaseException | None) -> None:
        call = p.call
        p.call = None
        code: grpc.StatusCode | None = None
        detail = type(exc).__name__ if exc is not None else "stream ended"
        if call is not None:
            if call.done():
                with contextlib.suppress(Exception):
                    code = await call.code()
                    detail = await call.details() or detail
            else:
                call.cancel()
        if isinstance(exc, grpc.aio.AioRpcError):
            code, detail = exc.code(), exc.details() or detail
        self._check_removed(code, detail)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            # An older coordinator without Stream: unary Send per batch from now on.
            p.legacy = True
            log.info("event=raft_peer_legacy_transport peer=%x address=%s", p.member_id, p.address)
            return
        STREAM_FAILURES.inc()
        self.dropped += len(batch)
        if p.down_since is None:
            p.down_since = asyncio.get_running_loop().time()
            log.warning(
                "event=raft_peer_unreachable peer=%x address=%s code=%s detail=%r",
                p.member_id,
                p.address,
                code.name if code is not None else "NONE",
                detail,
            )
        self.report_unreachable(p.member_id)

    def _check_removed(self, code: grpc.StatusCode | None, detail: str) -> None:
        if code == grpc.StatusCode.PERMISSION_DENIED and REMOVED_DETAIL in detail:
            log.warning("event=raft_removed_by_peer detail=%r", detail)
            self.report_removed()

    async def _send_unary(self, p: _Peer, batch: list[Message]) -> bool:
        req = self._encode_batch(p, batch, with_header=True)
        if req is None:
            return True
        try:
            await p.stub.Send(req, timeout=self.rpc_timeout)
            return True
        except grpc.aio.AioRpcError as exc:
            self._check_removed(exc.code(), exc.details() or "")
            self.dropped += len(batch)
            if p.down_since is None:
                p.down_since = asyncio.get_running_loop().time()
                log.warning(
                    "event=raft_peer_unreachable peer=%x address=%s code=%s detail=%r",
                    p.member_id,
                    p.address,
                    exc.code().name,
                    exc.details(),
                )
            self.report_unreachable(p.member_id)
            return False

    async def _send_snapshot(self, p: _Peer, m: Message) -> None:
        assert m.snapshot is not None
        chunks = snapshot_chunks(m.snapshot, self.header(p.member_id), m.term)

        async def gen() -> AsyncIterator[raft_pb2.InstallSnapshotChunk]:
            for c in chunks:
                yield c

        try:
            resp = await p.stub.InstallSnapshot(gen(), timeout=SNAPSHOT_TIMEOUT)
            ok = resp.success
        except grpc.aio.AioRpcError as exc:
            log.warning("event=raft_snapshot_send_failed peer=%x code=%s", p.member_id, exc.code().name)
            ok = False
        log.info(
            "event=raft_snapshot_sent peer=%x index=%d size=%d ok=%s",
            p.member_id,
            m.snapshot.index,
            len(m.snapshot.data),
            ok,
        )
        self.report_snapshot(p.member_id, SnapshotStatus.FINISH if ok else SnapshotStatus.FAILURE)
