"""The Raft transport: the wire mapping (every core message type round-trips through its RaftEnvelope field),
snapshot chunking, and the server's refusals, over real gRPC with mutual TLS on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelmesh import pki
from tunnelmesh.api.raft.v1 import raft_pb2, raft_pb2_grpc
from tunnelmesh.coord.raft import transport
from tunnelmesh.coord.raft.core import CAMPAIGN_TRANSFER
from tunnelmesh.coord.raft.messages import (
    LOCAL_MESSAGES,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    SnapshotStatus,
)
from tunnelmesh.coord.raft.transport import (
    REFUSED,
    WIRE_TYPES,
    Transport,
    TransportError,
    assemble_snapshot,
    envelope_to_message,
    member_label,
    message_to_envelope,
    snapshot_chunks,
)

M = MessageType
E1 = (Entry(5, 2, EntryType.NORMAL, b"cmd"), Entry(6, 2, EntryType.CONF_CHANGE, b"\x00" * 9))

# One case per wire type, with every field the type carries set to a non-default value (raft.proto's mapping).
CASES: list[Message] = [
    Message(M.VOTE, to=2, frm=1, term=7, index=10, log_term=6),
    Message(M.VOTE, to=2, frm=1, term=7, index=10, log_term=6, context=CAMPAIGN_TRANSFER),
    Message(M.PRE_VOTE, to=2, frm=1, term=8, index=10, log_term=6),
    Message(M.VOTE_RESP, to=1, frm=2, term=7),
    Message(M.VOTE_RESP, to=1, frm=2, term=7, reject=True),
    Message(M.PRE_VOTE_RESP, to=1, frm=2, term=8, reject=True),
    Message(M.APP, to=2, frm=1, term=3, index=4, log_term=2, entries=E1, commit=4),
    Message(M.APP, to=2, frm=1, term=3, index=4, log_term=2, commit=4),  # an empty append (probe)
    Message(M.APP_RESP, to=1, frm=2, term=3, index=6),
    Message(M.APP_RESP, to=1, frm=2, term=3, index=9, reject=True, reject_hint=5, log_term=2),
    Message(M.HEARTBEAT, to=2, frm=1, term=3, commit=6, context=b"\x00\x01"),
    Message(M.HEARTBEAT_RESP, to=1, frm=2, term=3, context=b"\x00\x01"),
    Message(M.TIMEOUT_NOW, to=2, frm=1, term=3),
    Message(M.READ_INDEX, to=1, frm=2, context=b"r1"),
    Message(M.READ_INDEX_RESP, to=2, frm=1, term=3, index=41, context=b"r1"),
    Message(M.TRANSFER_LEADER, to=1, frm=3),  # the transferee travels in frm (etcd's convention)
]


@pytest.mark.parametrize("m", CASES, ids=lambda m: m.type.name)
def test_every_wire_message_round_trips_through_its_envelope(m: Message) -> None:
    env = raft_pb2.RaftEnvelope.FromString(message_to_envelope(m).SerializeToString())
    # TRANSFER_LEADER's header sender is the forwarding follower; the transferee is in the body.
    frm = 2 if m.type == M.TRANSFER_LEADER else m.frm
    back = envelope_to_message(env, frm=frm, to=m.to)
    assert back == m


def test_the_table_covers_every_non_local_type_but_snapshots_and_proposals() -> None:
    network = set(MessageType) - set(LOCAL_MESSAGES) - {M.SNAP, M.PROP}
    assert set(WIRE_TYPES) == network
    assert {m.type for m in CASES} == network


def test_local_and_snapshot_messages_are_not_enveloped() -> None:
    for t in (M.HUP, M.BEAT, M.SNAP, M.PROP):
        with pytest.raises(TransportError):
            message_to_envelope(Message(t, to=1, frm=2))


def test_an_empty_envelope_is_refused_not_guessed() -> None:
    with pytest.raises(TransportError, match="empty RaftEnvelope"):
        envelope_to_message(raft_pb2.RaftEnvelope(), 1, 2)


def test_an_entry_without_a_type_is_refused() -> None:
    env = raft_pb2.RaftEnvelope(
        append_entries=raft_pb2.AppendEntriesRequest(term=1, entries=[raft_pb2.Entry(index=1, term=1)])
    )
    with pytest.raises(TransportError, match="no type"):
        envelope_to_message(env, 1, 2)


_u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(
    term=_u64,
    index=_u64,
    log_term=_u64,
    commit=_u64,
    entries=st.lists(
        st.tuples(_u64, _u64, st.sampled_from(list(EntryType)), st.binary(max_size=64)), max_size=8
    ),
)
def test_appends_round_trip_for_any_field_values(
    term: int, index: int, log_term: int, commit: int, entries: list[tuple[int, int, EntryType, bytes]]
) -> None:
    m = Message(
        M.APP,
        to=9,
        frm=3,
        term=term,
        index=index,
        log_term=log_term,
        commit=commit,
        entries=tuple(Entry(i, t, k, d) for i, t, k, d in entries),
    )
    env = raft_pb2.RaftEnvelope.FromString(message_to_envelope(m).SerializeToString())
    assert envelope_to_message(env, 3, 9) == m


# -- snapshots ----------------------------------------------------------------------------------------------


def _snap(size: int) -> Snapshot:
    data = bytes(i % 251 for i in range(size))
    return Snapshot(
        SnapshotMetadata(index=77, term=4, conf_state=ConfState(voters=(1, 2, 3), learners=(9,))), data
    )


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000])
def test_snapshots_split_into_chunks_and_reassemble(size: int) -> None:
    snap = _snap(size)
    chunks = snapshot_chunks(
        snap, raft_pb2.RaftHeader(cluster_id="c", from_id=1, to_id=2), term=5, chunk=1000
    )
    assert chunks[0].HasField("metadata") and chunks[-1].done
    assert sum(c.done for c in chunks) == 1
    term, back = assemble_snapshot(chunks)
    assert term == 5 and back == snap


def test_a_damaged_or_truncated_snapshot_stream_is_refused() -> None:
    chunks = snapshot_chunks(_snap(3000), raft_pb2.RaftHeader(), term=5, chunk=1000)
    with pytest.raises(TransportError, match="ended before"):
        assemble_snapshot(chunks[:-1])
    bad = [raft_pb2.InstallSnapshotChunk() for _ in chunks]
    for b, c in zip(bad, chunks, strict=True):
        b.CopyFrom(c)
    bad[1].data = b"x" * len(bad[1].data)
    with pytest.raises(TransportError, match="SHA-256"):
        assemble_snapshot(bad)
    with pytest.raises(TransportError, match="offset"):
        assemble_snapshot([chunks[0], chunks[2]])


# -- over the wire: two transports on loopback with mutual TLS ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class _Node:
    t: Transport
    got: list[Message]
    unreachable: list[int]
    snaps: list[tuple[int, SnapshotStatus]]


def _creds(ca: pki.CertificateAuthority, cluster: str, mid: int) -> pki.CoordinatorCredentials:
    ident = pki.issue_coordinator_identity(ca, cluster, member_label(mid), ip_addresses=["127.0.0.1"])
    return pki.CoordinatorCredentials(ident, ca.certificate_pem, ca)


def _node(ca: pki.CertificateAuthority, cluster: str, mid: int, port: int) -> _Node:
    got: list[Message] = []
    unreachable: list[int] = []
    snaps: list[tuple[int, SnapshotStatus]] = []
    t = Transport(
        cluster_id=cluster,
        member_id=mid,
        listen=f"127.0.0.1:{port}",
        credentials=_creds(ca, cluster, mid),
        deliver=got.extend,
        report_unreachable=unreachable.append,
        report_snapshot=lambda p, s: snaps.append((p, s)),
        rpc_timeout=2.0,
    )
    return _Node(t, got, unreachable, snaps)


async def _until(cond: Callable[[], object], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - polling test observations, not a production wait
            await asyncio.sleep(0.01)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[_Node, _Node]]:
    ca = pki.create_ca("testc")
    pa, pb = _free_port(), _free_port()
    a, b = _node(ca, "testc", 1, pa), _node(ca, "testc", 2, pb)
    a.t.set_peers({2: f"127.0.0.1:{pb}"})
    b.t.set_peers({1: f"127.0.0.1:{pa}"})
    await a.t.start()
    await b.t.start()
    async with asyncio.TaskGroup() as tg:
        ta = tg.create_task(a.t.run())
        tb = tg.create_task(b.t.run())
        yield a, b
        ta.cancel()
        tb.cancel()
    await a.t.close()
    await b.t.close()


async def test_messages_arrive_in_order_and_snapshots_are_streamed(pair: tuple[_Node, _Node]) -> None:
    a, b = pair
    msgs = [Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=i) for i in range(300)]
    a.t.send(msgs)
    await _until(lambda: len(b.got) == 300)
    assert b.got == msgs
    snap = _snap(3 << 20)  # three and a bit chunks
    a.t.send([Message(M.SNAP, to=2, frm=1, term=1, snapshot=snap)])
    await _until(lambda: a.snaps)
    assert a.snaps == [(2, SnapshotStatus.FINISH)]
    assert b.got[-1] == Message(M.SNAP, to=2, frm=1, term=1, snapshot=snap)


async def test_an_unreachable_peer_is_reported_and_send_never_blocks(tmp_path: Path) -> None:
    ca = pki.create_ca("testc")
    a = _node(ca, "testc", 1, _free_port())
    a.t.set_peers({2: f"127.0.0.1:{_free_port()}"})  # nobody listens there
    await a.t.start()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(a.t.run())
        a.t.send([Message(M.HEARTBEAT, to=2, frm=1, term=1)] * 10_000)  # returns at once, bounded queue
        a.t.send([Message(M.SNAP, to=3, frm=1, term=1, snapshot=_snap(1))])  # unknown peer
        await _until(lambda: 2 in a.unreachable)
        assert a.snaps == [(3, SnapshotStatus.FAILURE)]
        await asyncio.sleep(0.05)
        task.cancel()
    await a.t.close()


async def _call(port: int, creds: pki.CoordinatorCredentials, header: raft_pb2.RaftHeader) -> grpc.StatusCode:
    ch = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        pki.channel_credentials(creds.trust_pem, creds.identity),
        options=pki.coordinator_channel_options("testc"),
    )
    try:
        await raft_pb2_grpc.RaftStub(ch).Send(raft_pb2.MessageBatch(header=header), timeout=3)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await ch.close()


async def test_the_server_refuses_other_clusters_other_recipients_impostors_and_other_cas(
    pair: tuple[_Node, _Node],
) -> None:
    a, b = pair
    port = b.t.bound_port
    good = a.t.credentials

    def h(cluster: str = "testc", frm: int = 1, to: int = 2) -> raft_pb2.RaftHeader:
        return raft_pb2.RaftHeader(cluster_id=cluster, from_id=frm, to_id=to)

    assert await _call(port, good, h()) == grpc.StatusCode.OK
    assert await _call(port, good, h(cluster="other")) == grpc.StatusCode.FAILED_PRECONDITION
    assert await _call(port, good, h(to=3)) == grpc.StatusCode.FAILED_PRECONDITION
    assert await _call(port, good, h(frm=3)) == grpc.StatusCode.PERMISSION_DENIED  # cert says member 1
    foreign = pki.create_ca("testc")  # same cluster id, different CA: refused in the TLS handshake
    assert await _call(port, _creds(foreign, "testc", 1), h()) == grpc.StatusCode.UNAVAILABLE
    assert b.got == []


# -- the peer stream -----------------------------------------------------------------------------------------


def _refused(reason: str) -> float:
    return float(REFUSED.labels(reason)._value.get())


async def _stream(
    port: int, creds: pki.CoordinatorCredentials, batches: list[raft_pb2.MessageBatch]
) -> grpc.StatusCode:
    ch = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        pki.channel_credentials(creds.trust_pem, creds.identity),
        options=pki.coordinator_channel_options("testc"),
    )

    async def gen() -> AsyncIterator[raft_pb2.MessageBatch]:
        for b in batches:
            yield b

    try:
        await raft_pb2_grpc.RaftStub(ch).Stream(gen(), timeout=3)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await ch.close()


async def test_the_stream_checks_its_first_header_and_refuses_a_changed_one(
    pair: tuple[_Node, _Node],
) -> None:
    a, b = pair
    port, good = b.t.bound_port, a.t.credentials
    hdr = raft_pb2.RaftHeader(cluster_id="testc", from_id=1, to_id=2)
    hb = message_to_envelope(Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=1))
    hb2 = message_to_envelope(Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=2))
    # Header on the first batch only, then repeated exactly: all delivered, in order.
    ok = [
        raft_pb2.MessageBatch(header=hdr, messages=[hb]),
        raft_pb2.MessageBatch(messages=[hb2]),
        raft_pb2.MessageBatch(header=hdr, messages=[hb]),
    ]
    assert await _stream(port, good, ok) == grpc.StatusCode.OK
    assert [m.commit for m in b.got] == [1, 2, 1]
    b.got.clear()

    before = {r: _refused(r) for r in ("no_header", "header_changed", "other_cluster", "identity")}
    no_header = [raft_pb2.MessageBatch(messages=[hb])]
    assert await _stream(port, good, no_header) == grpc.StatusCode.FAILED_PRECONDITION
    changed = [
        raft_pb2.MessageBatch(header=hdr, messages=[hb]),
        raft_pb2.MessageBatch(
            header=raft_pb2.RaftHeader(cluster_id="testc", from_id=3, to_id=2), messages=[hb2]
        ),
    ]
    assert await _stream(port, good, changed) == grpc.StatusCode.FAILED_PRECONDITION
    other = raft_pb2.RaftHeader(cluster_id="other", from_id=1, to_id=2)
    assert await _stream(port, good, [raft_pb2.MessageBatch(header=other, messages=[hb])]) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    impostor = raft_pb2.RaftHeader(cluster_id="testc", from_id=3, to_id=2)  # the certificate says member 1
    assert await _stream(port, good, [raft_pb2.MessageBatch(header=impostor, messages=[hb])]) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Only the batch before the changed header got through; every refusal is counted by reason.
    assert [m.commit for m in b.got] == [1]
    for reason in before:
        assert _refused(reason) == before[reason] + 1, reason


async def test_the_stream_reconnects_after_the_peer_restarts(pair: tuple[_Node, _Node]) -> None:
    a, b = pair
    a.t.send([Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=1)])
    await _until(lambda: len(b.got) == 1)
    port = b.t.bound_port
    await b.t.close()  # the peer goes away: a's open stream breaks
    # A write may still land in the broken stream's buffers before the close is seen; the core keeps sending
    # heartbeats, and one of them fails.
    async with asyncio.timeout(5.0):
        while 2 not in a.unreachable:
            a.t.send([Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=2)])
            await asyncio.sleep(0.05)
    ca_b = b.t.credentials
    b2 = Transport(
        cluster_id="testc",
        member_id=2,
        listen=f"127.0.0.1:{port}",
        credentials=ca_b,
        deliver=b.got.extend,
        report_unreachable=b.unreachable.append,
        report_snapshot=lambda p, s: None,
    )
    await b2.start()
    try:
        # Raft retransmits: keep sending until the new server has one (the sender backs off meanwhile).
        async with asyncio.timeout(10):
            while not any(m.commit == 3 for m in b.got):
                a.t.send([Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=3)])
                await asyncio.sleep(0.1)
    finally:
        await b2.close()


async def test_a_peer_without_stream_gets_unary_sends(
    pair: tuple[_Node, _Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    # b plays an older coordinator: its server answers Stream with UNIMPLEMENTED (the generated default).
    a, b = pair
    monkeypatch.setattr(transport._Servicer, "Stream", raft_pb2_grpc.RaftServicer.Stream)
    port = b.t.bound_port
    await b.t.close()
    old = Transport(
        cluster_id="testc",
        member_id=2,
        listen=f"127.0.0.1:{port}",
        credentials=b.t.credentials,
        deliver=b.got.extend,
        report_unreachable=b.unreachable.append,
        report_snapshot=lambda p, s: None,
    )
    await old.start()
    try:
        async with asyncio.timeout(10):
            while not any(m.commit == 7 for m in b.got):
                a.t.send([Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=7)])
                await asyncio.sleep(0.1)
        assert a.t._peers[2].legacy
        # From now on every batch arrives by unary Send, in order.
        b.got.clear()
        msgs = [Message(M.HEARTBEAT, to=2, frm=1, term=1, commit=i) for i in range(100, 150)]
        a.t.send(msgs)
        await _until(lambda: len(b.got) == 50)
        assert b.got == msgs
    finally:
        await old.close()
