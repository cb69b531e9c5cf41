"""The Raft driver in-process: three members on loopback (real transport with mutual TLS, real SQLite stores)
with 20 ms ticks. Proposals resolve when their entry is applied, followers refuse proposals with the leader's
id, ReadIndex works through a follower, and a member that may not vote blocks nothing but its own votes."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from tunnelmesh import pki
from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.api.v1 import state_pb2
from tunnelmesh.coord.raft import driver as driver_mod
from tunnelmesh.coord.raft.driver import Driver, DriverOptions, Registry, decode_snapshot, encode_snapshot
from tunnelmesh.coord.raft.errors import NotLeader, Stopped
from tunnelmesh.coord.raft.messages import (
    ConfState,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)
from tunnelmesh.coord.raft.storage import SqliteStorage, StorageIOError
from tunnelmesh.coord.raft.transport import member_label
from tunnelmesh.coord.service import Coordinator, RequestFailed
from tunnelmesh.coord.state import MeshState, encode_command

CLUSTER = "drvtest"
IDS = (11, 22, 33)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build(tmp: Path) -> list[Driver]:
    ca = pki.create_ca(CLUSTER)
    ports = {i: _port() for i in IDS}
    stores = {i: SqliteStorage.open(tmp / str(i), create=True, cluster_id=CLUSTER, member_id=i) for i in IDS}
    reg = Registry(
        {
            i: raft_pb2.Member(
                member_id=i, raft_address=f"127.0.0.1:{ports[i]}", storage_id=stores[i].identity.storage_id
            )
            for i in IDS
        }
    )
    drivers = []
    for i in IDS:
        boot = Snapshot(SnapshotMetadata(1, 1, ConfState(voters=IDS)), encode_snapshot(reg, b""))
        stores[i].save(HardState(term=1, commit=1), (), boot)
        ident = pki.issue_coordinator_identity(ca, CLUSTER, member_label(i), ip_addresses=["127.0.0.1"])
        drivers.append(
            Driver(
                storage=stores[i],
                state=MeshState(),
                cluster_id=CLUSTER,
                member_id=i,
                raft_listen=f"127.0.0.1:{ports[i]}",
                credentials=pki.CoordinatorCredentials(ident, ca.certificate_pem, ca),
                options=DriverOptions(tick=0.02, election_ticks=10, heartbeat_ticks=1),
            )
        )
    return drivers


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[Driver]]:
    drivers = _build(tmp_path)
    for d in drivers:
        await d.start()
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(d.run()) for d in drivers]
            yield drivers
            for t in tasks:
                t.cancel()
    finally:
        for d in drivers:
            d.storage.close()


async def _leader(drivers: list[Driver], within: float = 5.0) -> Driver:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for d in drivers:
            if d.is_leader:
                return d
        await asyncio.sleep(0.02)
    raise AssertionError("no leader elected")


def _put(key: bytes, value: bytes, rid: str = "") -> bytes:
    return encode_command(state_pb2.KvPut(key=key, value=value), proposed_at=time.time_ns(), request_id=rid)


async def test_a_proposal_resolves_once_applied_and_every_replica_applies_it(cluster: list[Driver]) -> None:
    lead = await _leader(cluster)
    index, result = await lead.propose(_put(b"k", b"v", "r1"), 5.0)
    assert result is not None and result.kv.succeeded and result.kv.revision == index
    for d in cluster:
        await d.wait_applied(index, 5.0)
        entry = d.state.kv_get(b"k")
        assert entry is not None and entry.value == b"v"
    # The same request id again: applied once, the first result comes back.
    index2, again = await lead.propose(_put(b"k", b"other", "r1"), 5.0)
    assert index2 > index and again is not None and again.kv.revision == index
    assert lead.state.kv_get(b"k").value == b"v"  # type: ignore[union-attr]


async def test_followers_refuse_proposals_naming_the_leader_and_serve_linearizable_reads(
    cluster: list[Driver],
) -> None:
    lead = await _leader(cluster)
    follower = next(d for d in cluster if d is not lead)
    await lead.propose(_put(b"x", b"1"), 5.0)  # also makes sure the follower knows the leader
    with pytest.raises(NotLeader) as info:
        await follower.propose(_put(b"x", b"2"), 1.0)
    assert info.value.leader_id == lead.member_id
    index, _ = await lead.propose(_put(b"x", b"3"), 5.0)
    read = await follower.read_index(5.0)
    assert read >= index and follower.state.kv_get(b"x").value == b"3"  # type: ignore[union-attr]


async def test_members_that_lost_acknowledged_entries_do_not_vote_until_caught_up(tmp_path: Path) -> None:
    drivers = _build(tmp_path)
    # Two of three members opened stores that truncated an uncommitted tail (storage.truncated_from).
    for d in drivers[1:]:
        d._no_vote_before = 2
    for d in drivers:
        await d.start()
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(d.run()) for d in drivers]
            await asyncio.sleep(1.0)  # 2.5-5 election timeouts
            assert not any(d.is_leader for d in drivers), "a leader was elected without the members' votes"
            assert all(d.status().votes_disabled for d in drivers[1:])
            drivers[1]._no_vote_before = None  # caught up (in production: commit index reached it)
            lead = await _leader(drivers)
            index, _ = await lead.propose(_put(b"a", b"b"), 5.0)
            await drivers[2].wait_applied(index, 5.0)
            assert not drivers[2].status().votes_disabled  # its commit index passed the truncation point
            for t in tasks:
                t.cancel()
    finally:
        for d in drivers:
            d.storage.close()


async def test_a_follower_whose_save_fails_stops_with_the_error(tmp_path: Path) -> None:
    """The follower's save runs in the turn of the stream handler that delivered the append, not in the loop
    task: its failure must still end the driver (as a failed loop would), not vanish in that handler, and
    not be retried by a later turn (the save fails once here: a retry would succeed)."""
    drivers = _build(tmp_path)
    for d in drivers:
        await d.start()
    tasks = [asyncio.create_task(d.run()) for d in drivers]
    try:
        lead = await _leader(drivers)
        follower = next(d for d in drivers if d is not lead)

        real_save, failed = follower.storage.save, []

        def broken(*args: Any, **kwargs: Any) -> None:
            if not failed and len(args) > 1 and args[1]:
                failed.append(True)
                raise StorageIOError("the disk is gone")
            real_save(*args, **kwargs)

        follower.storage.save = broken  # type: ignore[method-assign]
        await lead.propose(_put(b"k", b"v"), 5.0)  # committed with the other follower
        run = tasks[drivers.index(follower)]
        with pytest.raises(ExceptionGroup) as exc_info:
            async with asyncio.timeout(5):
                await run
        assert exc_info.group_contains(StorageIOError, match="the disk is gone")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers:
            d.storage.close()


async def test_commit_notices_are_held_back_and_followers_still_apply(
    cluster: list[Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold notices "forever": followers must learn every commit from later appends and heartbeats.
    monkeypatch.setattr(driver_mod, "COMMIT_NOTICE_DELAY", 60.0)
    lead = await _leader(cluster)
    index, _ = await lead.propose(_put(b"w", b"0"), 5.0)
    for d in cluster:
        await d.wait_applied(index, 5.0)
    sent: list[Message] = []
    real_send = lead.transport.send

    def spy(msgs: Iterable[Message]) -> None:
        msgs = list(msgs)
        sent.extend(msgs)
        real_send(msgs)

    monkeypatch.setattr(lead.transport, "send", spy)
    for i in range(20):
        index, _ = await lead.propose(_put(b"w", b"%d" % i), 5.0)
    for d in cluster:
        await d.wait_applied(index, 5.0)
        assert d.state.kv_get(b"w").value == b"19"  # type: ignore[union-attr]
    assert any(m.type == MessageType.APP and m.entries for m in sent)
    # No append without entries went out: each write's commit notice was held, then superseded.
    assert [m for m in sent if m.type == MessageType.APP and not m.entries] == []


async def test_a_write_through_a_follower_is_applied_there_when_it_returns(
    cluster: list[Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Commit notices held "forever" and no heartbeats to the follower: only the leader releasing the held
    # notice once the forwarded write applied can tell the follower the commit before its 1 s wait runs out.
    monkeypatch.setattr(driver_mod, "COMMIT_NOTICE_DELAY", 60.0)
    coords = _coordinators(cluster)
    lead = await _leader(cluster)
    follower = next(d for d in cluster if d is not lead)
    index, _ = await lead.propose(_put(b"fw", b"0"), 5.0)
    await follower.wait_applied(index, 5.0)
    real_send = lead.transport.send

    def no_heartbeats_to_follower(msgs: Iterable[Message]) -> None:
        real_send(m for m in msgs if not (m.type == MessageType.HEARTBEAT and m.to == follower.member_id))

    monkeypatch.setattr(lead.transport, "send", no_heartbeats_to_follower)
    started = time.monotonic()
    await coords[cluster.index(follower)].write(_put(b"fw", b"1"), 5.0)
    took = time.monotonic() - started
    assert follower.state.kv_get(b"fw").value == b"1"  # type: ignore[union-attr]
    assert took < 0.9, f"the forwarded write took {took:.2f}s: the follower waited for the commit"


async def test_a_stopping_member_ends_what_is_in_flight_with_an_error_clients_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator that stops (SIGTERM in a rolling restart, or its disk failed) fails the writes, reads and
    waits it still holds with ``Stopped``, which the API answers as UNAVAILABLE: the client retries on another
    coordinator (the request id applies a write once). Anything else would be UNKNOWN, which clients do not
    retry: a write lost to the caller in every rolling restart under load."""
    drivers = _build(tmp_path)
    for d in drivers:
        await d.start()
    tasks = {d.member_id: asyncio.create_task(d.run()) for d in drivers}
    try:
        lead = await _leader(drivers)
        coord = _coordinators([lead])[0]
        index, _ = await lead.propose(_put(b"k", b"0"), 5.0)
        # The leader hears nothing more from the others: what it starts now stays in flight.
        monkeypatch.setattr(lead.transport, "send", lambda msgs: None)
        write = asyncio.create_task(coord.write(_put(b"k", b"1", "rid-1"), 30.0))
        read = asyncio.create_task(coord.read_barrier(30.0))
        wait = asyncio.create_task(lead.wait_applied(index + 100, 30.0))
        await asyncio.sleep(0.2)
        assert not (write.done() or read.done() or wait.done())
        tasks[lead.member_id].cancel()
        with pytest.raises(RequestFailed) as failed_write:
            await asyncio.wait_for(write, 5.0)
        assert failed_write.value.code == grpc.StatusCode.UNAVAILABLE
        assert "stopping" in failed_write.value.message and "same request id" in failed_write.value.message
        with pytest.raises(RequestFailed) as failed_read:
            await asyncio.wait_for(read, 5.0)
        assert failed_read.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Stopped):
            await asyncio.wait_for(wait, 5.0)
        # And anything asked after the stop is refused at once, not left to its deadline.
        with pytest.raises(Stopped):
            await lead.propose(_put(b"k", b"2"), 30.0)
        with pytest.raises(Stopped):
            await lead.read_index(30.0)
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for d in drivers:
            d.storage.close()


async def test_a_leader_hands_over_to_the_most_caught_up_voter_before_it_stops(cluster: list[Driver]) -> None:
    lead = await _leader(cluster)
    index, _ = await lead.propose(_put(b"h", b"1"), 5.0)
    for d in cluster:
        await d.wait_applied(index, 5.0)
    coords = _coordinators(cluster)
    target = coords[cluster.index(lead)].transfer_target()
    assert target in {d.member_id for d in cluster} - {lead.member_id}
    await coords[cluster.index(lead)].hand_over_leadership()
    # Moved, not elected after a timeout: the target leads and the old leader follows it.
    assert lead.leader_id == target and not lead.is_leader
    new = next(d for d in cluster if d.member_id == target)
    assert new.is_leader and new.state.kv_get(b"h") is not None
    # A follower (the old leader now) has nothing to hand over, and picks no target (only a leader knows how
    # far each member is); asked through it, a transfer reaches the leader and happens.
    term = lead.status().term
    await coords[cluster.index(lead)].hand_over_leadership()
    assert lead.status().term == term and lead.leader_id == target
    assert coords[cluster.index(lead)].transfer_target() == 0
    assert await coords[cluster.index(lead)].transfer_leadership(lead.member_id, 5.0)
    assert lead.is_leader


async def test_a_forwarded_write_whose_channel_closes_returns_for_a_retry_at_once(
    cluster: list[Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc.aio cancels the calls of a channel it closes (the coordinator stopping, the leader removed) and
    refuses new ones: the forwarder hands the write back for a retry instead of leaving it to its deadline
    (which, on a stopping coordinator, outlived the server and reached the client as CANCELLED)."""
    coords = _coordinators(cluster)
    lead = await _leader(cluster)
    follower = next(d for d in cluster if d is not lead)
    forwarder = coords[cluster.index(follower)]._forwarder
    answered = asyncio.Event()

    async def never_answers(request: Any, context: Any) -> Any:
        answered.set()
        await asyncio.sleep(30)

    monkeypatch.setattr(coords[cluster.index(lead)], "handle_propose_batch", never_answers)
    started = time.monotonic()
    call = asyncio.create_task(forwarder.forward(lead.member_id, _put(b"f", b"1"), 20.0))
    await asyncio.wait_for(answered.wait(), 5.0)  # the call is in flight at the leader
    await follower.transport._peers[lead.member_id].channel.close(grace=None)
    assert await asyncio.wait_for(call, 2.0) is None
    # And on the closed channel, a new forward is handed back at once too.
    assert await asyncio.wait_for(forwarder.forward(lead.member_id, _put(b"f", b"2"), 20.0), 2.0) is None
    assert time.monotonic() - started < 5.0


def _coordinators(drivers: list[Driver]) -> list[Coordinator]:
    return [
        Coordinator(d, self_member=raft_pb2.Member(member_id=d.member_id), join_bundle=None, max_voters=3)
        for d in drivers
    ]


def _forward_calls() -> float:
    return REGISTRY.get_sample_value("tunnelmesh_raft_forward_calls_total") or 0.0


async def _write_through_follower(cluster: list[Driver], coords: list[Coordinator], n: int) -> float:
    """``n`` concurrent writes to one follower; returns how many forwarding calls it made."""
    lead = await _leader(cluster)
    follower = next(d for d in cluster if d is not lead)
    calls = _forward_calls()
    results = await asyncio.gather(
        *(coords[cluster.index(follower)].write(_put(b"b%d" % i, b"v%d" % i, f"r{i}"), 5.0) for i in range(n))
    )
    assert all(not r.HasField("error") for r in results)
    for i in range(n):  # each write is applied on the follower by the time its call returned
        assert follower.state.kv_get(b"b%d" % i).value == b"v%d" % i  # type: ignore[union-attr]
    return _forward_calls() - calls


async def test_writes_through_a_follower_are_forwarded_in_batches(cluster: list[Driver]) -> None:
    calls = await _write_through_follower(cluster, _coordinators(cluster), 60)
    # Two calls leave at once (MAX_IN_FLIGHT), the other 58 writes wait for one of them and go together.
    assert 1 <= calls <= 10, f"{calls} forwarding calls for 60 concurrent writes"


async def test_a_leader_without_propose_batch_gets_one_propose_per_write(
    cluster: list[Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unimplemented(request: raft_pb2.ProposeBatchRequest, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")

    coords = _coordinators(cluster)
    lead = await _leader(cluster)
    monkeypatch.setattr(coords[cluster.index(lead)], "handle_propose_batch", unimplemented)
    calls = await _write_through_follower(cluster, coords, 20)
    assert calls >= 20  # the refused batch, then one Propose per write


async def test_messages_from_a_removed_member_are_dropped(cluster: list[Driver]) -> None:
    # A removed coordinator that keeps running still holds a certificate of the cluster: a heartbeat of a
    # higher term from it would make the leader step down if it reached the core.
    lead = await _leader(cluster)
    term = lead.node.raft.term
    ghost = 99
    lead.registry.removed.add(ghost)

    def refused() -> float:
        return (
            REGISTRY.get_sample_value("tunnelmesh_raft_messages_refused_total", {"reason": "removed_member"})
            or 0.0
        )

    before = refused()
    lead._deliver([Message(MessageType.HEARTBEAT, to=lead.member_id, frm=ghost, term=term + 5, commit=0)])
    await asyncio.sleep(0.2)  # ten ticks: the loop has stepped whatever it was given
    assert lead.is_leader and lead.node.raft.term == term
    assert refused() == before + 1


async def test_snapshots_are_encoded_off_the_loop_and_hold_exactly_the_state_at_their_index(
    tmp_path: Path,
) -> None:
    drivers = _build(tmp_path)
    for d in drivers:
        d.opts.snapshot_entries, d.opts.catchup_entries = 20, 5
        await d.start()
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(d.run()) for d in drivers]
            lead = await _leader(drivers)
            index_of: dict[bytes, int] = {}
            for i in range(70):
                key = b"k%d" % i
                index_of[key], _ = await lead.propose(_put(key, b"v"), 5.0)
            deadline = time.monotonic() + 10
            while not all(d.snapshot_index >= 40 for d in drivers):
                assert time.monotonic() < deadline, [d.snapshot_index for d in drivers]
                await asyncio.sleep(0.02)
            for d in drivers:
                snap = d.storage.snapshot()
                reg, data = decode_snapshot(snap.data)
                restored = MeshState.from_snapshot(data)
                # The view was taken at the snapshot's index: every write up to it, none after it.
                assert {k for k, _ in restored.kv_items()} == {
                    k for k, ix in index_of.items() if ix <= snap.index
                }
                assert set(reg.members) == set(IDS)
                assert d.storage.first_index() > 1  # the log was compacted behind the snapshot
            for t in tasks:
                t.cancel()
    finally:
        for d in drivers:
            d.storage.close()


async def test_followers_save_on_the_loop_thread_and_leaders_in_a_worker(
    cluster: list[Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower's save is on every write's critical path: it runs on the event loop thread, unless the last
    one took longer than INLINE_SAVE_LIMIT (a stalling disk must not stall the API); a leader's runs in a
    worker thread, overlapping the followers' round trip."""
    lead = await _leader(cluster)
    follower = next(d for d in cluster if d is not lead)
    # A limit no ordinary save here exceeds, even on a loaded machine; the "slow" save sleeps past it (less
    # than an election timeout: the follower's loop is blocked meanwhile).
    monkeypatch.setattr(driver_mod, "INLINE_SAVE_LIMIT", 0.1)
    loop_thread = threading.current_thread()
    on_loop: dict[int, list[bool]] = {d.member_id: [] for d in cluster}
    big_on_loop: list[bool] = []  # followers' saves of more than INLINE_SAVE_ENTRIES entries
    slow_next: set[int] = set()
    for d in cluster:

        def save(*args: Any, _d: Driver = d, _real: Any = d.storage.save, **kwargs: Any) -> None:
            if len(args) > 1 and len(args[1]) > driver_mod.INLINE_SAVE_ENTRIES and _d is not lead:
                big_on_loop.append(threading.current_thread() is loop_thread)
            elif len(args) > 1 and args[1]:  # a save with entries (not a commit-index-only write)
                on_loop[_d.member_id].append(threading.current_thread() is loop_thread)
                if _d.member_id in slow_next:
                    slow_next.discard(_d.member_id)
                    time.sleep(driver_mod.INLINE_SAVE_LIMIT * 1.2)
            _real(*args, **kwargs)

        d.storage.save = save  # type: ignore[method-assign]

    async def write(key: bytes) -> None:
        index, _ = await lead.propose(_put(key, b"v"), 5.0)
        await follower.wait_applied(index, 5.0)
        on_loop[follower.member_id].clear()

    # A first write settles where the next save goes under this limit (an earlier save may have been slow).
    index, _ = await lead.propose(_put(b"warm-up", b"v"), 5.0)
    for d in cluster:
        await d.wait_applied(index, 5.0)
        on_loop[d.member_id].clear()
    for i in range(3):
        index, _ = await lead.propose(_put(b"a%d" % i, b"v"), 5.0)
        for d in cluster:
            await d.wait_applied(index, 5.0)
    assert on_loop[lead.member_id] and not any(on_loop[lead.member_id])
    for d in cluster:
        if d is not lead:
            assert on_loop[d.member_id] and all(on_loop[d.member_id]), on_loop
    # One slow save: the next goes to a worker thread; it was fast, so the one after runs inline again.
    slow_next.add(follower.member_id)
    await write(b"slow")
    index, _ = await lead.propose(_put(b"after-slow", b"v"), 5.0)
    await follower.wait_applied(index, 5.0)
    assert on_loop[follower.member_id] == [False]
    on_loop[follower.member_id].clear()
    index, _ = await lead.propose(_put(b"inline-again", b"v"), 5.0)
    await follower.wait_applied(index, 5.0)
    assert on_loop[follower.member_id] == [True]
    # A burst: the leader batches the proposals that arrive during its save; big batches go to the thread
    # (whatever the time a save takes: the time limit is out of the way here).
    monkeypatch.setattr(driver_mod, "INLINE_SAVE_LIMIT", 60.0)
    await asyncio.gather(*(lead.propose(_put(b"burst%d" % i, b"v"), 10.0) for i in range(400)))
    assert big_on_loop and not any(big_on_loop)


async def test_a_leader_with_one_writer_at_a_time_saves_on_its_loop_once_its_appends_are_out(
    cluster: list[Driver],
) -> None:
    """While writes overlap, a leader saves in a worker thread (its loop goes on taking writes during the
    fsync). After LONE_WRITER_PROPOSALS proposals in a row that found no other one waiting, it saves on its
    loop thread instead, after the sender tasks took the Ready's appends: the fsync then runs before the
    followers' own, not alongside them. The first overlapping write switches it back."""
    lead = await _leader(cluster)
    loop_thread = threading.current_thread()
    events: list[tuple[str, int, bool]] = []  # ("sent" | "save", last entry index, on the loop thread)
    real_save, real_send = lead.storage.save, lead.transport._send_stream

    def save(*args: Any, **kwargs: Any) -> None:
        if len(args) > 1 and args[1]:
            events.append(("save", args[1][-1].index, threading.current_thread() is loop_thread))
        real_save(*args, **kwargs)

    async def send_stream(p: Any, batch: list[Message]) -> bool:
        events.extend(("sent", m.entries[-1].index, True) for m in batch if m.entries)
        return await real_send(p, batch)

    lead.storage.save = save  # type: ignore[method-assign]
    lead.transport._send_stream = send_stream  # type: ignore[method-assign]

    def saves_on_loop() -> list[bool]:
        return [on_loop for kind, _, on_loop in events if kind == "save"]

    await asyncio.gather(*(lead.propose(_put(b"o%d" % i, b"v"), 5.0) for i in range(20)))
    assert saves_on_loop() and not any(saves_on_loop())
    events.clear()
    lone = driver_mod.LONE_WRITER_PROPOSALS
    for i in range(lone + 4):
        await lead.propose(_put(b"s%d" % i, b"v"), 5.0)
    assert saves_on_loop() == [False] * (lone - 1) + [True] * 5, events
    for kind, index, on_loop in events:
        if kind == "save" and on_loop:
            assert ("sent", index, True) in events[: events.index((kind, index, on_loop))], events
    events.clear()
    await asyncio.gather(*(lead.propose(_put(b"b%d" % i, b"v"), 5.0) for i in range(20)))
    assert len(saves_on_loop()) > 1 and not any(saves_on_loop()[1:]), events


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exported"
    return value


async def test_raft_state_and_disk_latency_are_exported(cluster: list[Driver]) -> None:
    """What an operator graphs and alerts on: who leads, term, indexes, each member's lag in the leader's
    view, proposal outcomes and the time each durable save takes."""
    lead = await _leader(cluster)
    saves = REGISTRY.get_sample_value("tunnelmesh_raft_storage_save_seconds_count") or 0.0
    committed = REGISTRY.get_sample_value("tunnelmesh_raft_proposals_total", {"outcome": "committed"}) or 0.0
    for i in range(5):
        index, _ = await lead.propose(_put(b"m%d" % i, b"v"), 5.0)
    for d in cluster:
        await d.wait_applied(index, 5.0)
    assert _sample("tunnelmesh_raft_proposals_total", outcome="committed") == committed + 5
    assert _sample("tunnelmesh_raft_storage_save_seconds_count") >= saves + 5 * len(cluster)
    with pytest.raises(driver_mod.DeadlineExceeded):
        await lead.propose(_put(b"late", b"v"), 0.0)  # no time at all: not applied within it
    assert _sample("tunnelmesh_raft_proposals_total", outcome="timeout") >= 1
    for d in cluster:
        me = member_label(d.member_id)
        assert _sample("tunnelmesh_raft_is_leader", member=me) == float(d is lead)
        assert _sample("tunnelmesh_raft_has_leader", member=me) == 1
        assert _sample("tunnelmesh_raft_term", member=me) == lead.node.raft.term
        assert _sample("tunnelmesh_raft_applied_index", member=me) >= index
        assert _sample("tunnelmesh_raft_commit_index", member=me) >= index
    deadline = time.monotonic() + 5
    for d in cluster:
        if d is lead:
            continue
        labels = {"member": member_label(lead.member_id), "peer": member_label(d.member_id)}
        while _sample("tunnelmesh_raft_peer_lag_entries", **labels) != 0:  # caught up once it acknowledged
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert 0 <= _sample("tunnelmesh_raft_peer_last_contact_seconds", **labels) < 5
    # Exactly the running drivers are exported (those of earlier tests stopped and left).
    (family,) = [m for m in REGISTRY.collect() if m.name == "tunnelmesh_raft_term"]
    assert sorted(s.labels["member"] for s in family.samples) == sorted(
        member_label(d.member_id) for d in cluster
    )


class _FixedPhase(random.Random):
    """Election timeouts drawn as usual; every ``random()`` (the ticker's phase) is 0.75."""

    def random(self) -> float:
        return 0.75


async def test_each_member_ticks_at_a_random_phase(tmp_path: Path) -> None:
    """Members started in the same millisecond must not tick in step (two followers drawing the same election
    timeout would split the vote): the first tick comes a random fraction of a tick late."""
    store = SqliteStorage.open(tmp_path / "s", create=True, cluster_id=CLUSTER, member_id=11)
    ca = pki.create_ca(CLUSTER)
    ident = pki.issue_coordinator_identity(ca, CLUSTER, member_label(11), ip_addresses=["127.0.0.1"])
    tick = 0.2
    d = Driver(
        storage=store,
        state=MeshState(),
        cluster_id=CLUSTER,
        member_id=11,
        raft_listen=f"127.0.0.1:{_port()}",
        credentials=pki.CoordinatorCredentials(ident, ca.certificate_pem, ca),
        options=DriverOptions(tick=tick, election_ticks=10, heartbeat_ticks=1),
        rng=_FixedPhase(1),
    )
    t0 = time.monotonic()
    ticker = asyncio.create_task(d._ticker())
    try:
        await asyncio.wait_for(d._wake.wait(), 5)  # the ticker sets it on every tick
        first = time.monotonic() - t0
        assert d._ticks_due == 1
    finally:
        ticker.cancel()
        store.close()
    assert first >= tick * 1.75 - 0.01, f"first tick after {first:.3f}s: no phase offset"
