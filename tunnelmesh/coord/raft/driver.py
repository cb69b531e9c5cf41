"""The Raft driver: the asyncio loop tying the core, the durable store, the transport and the state machine.

Theory of operation
===================

This is the only part of ``coord/raft`` that touches time, threads and sockets (etcd's ``node.go``). The
``RawNode`` is driven in *turns* (``_turn``): step the inbound messages and ticks, collect ``Ready`` values
and handle each **in the order of the rawnode contract** (below). A turn runs in the task that queued the
work (the transport's stream handler delivering messages, a proposal) when no other turn or save is under
way, and otherwise in the loop task, ``_loop``, which is woken instead: waking it costs an event-loop pass,
and a write crosses three such hand-overs (client -> leader, leader -> follower, and back). Turns never
interleave (they are synchronous), and a Ready whose save runs outside its turn (below) is finished by the
loop task, with nothing stepped meanwhile. The order:

1. a snapshot from the leader is saved together with the entries and hard state (one SQLite transaction,
   fsynced, in a worker thread so the event loop keeps serving RPCs) and the state machine is restored from
   it;
2. entries + hard state are durable before anything else happens;
3. then messages are handed to the transport (which never blocks) -- except on a leader, see below;
4. committed entries are applied: NORMAL entries to ``MeshState.apply``, CONF_CHANGE entries to
   ``RawNode.apply_conf_change`` and to the member registry (addresses, storage ids);
5. read states are released (readers wait until the state machine applied the read index);
6. ``advance``.

The leader's disk write in parallel with replication (Raft thesis §10.2.1)
--------------------------------------------------------------------------

The thesis allows the leader to send AppendEntries before its own log write is durable, provided it counts
itself towards a commit quorum only for entries that *are* durable on its disk; followers must still persist
before they acknowledge. Here a leader whose term and vote are already durable (a Ready that changes them
is persisted first, as on any member) hands the Ready's appends to the transport *first*, then writes the
entries with fsync in a worker thread (SQLite releases the GIL), and the loop awaits that write before it
steps anything else. That is exact although the core counts the leader's own ``match`` as soon as it
appends (``Raft._append_entries``): a commit index can only move when the loop steps a follower's
``APP_RESP``, and the loop steps none until the save has returned, so every entry a quorum containing the
leader is found to hold is on the leader's disk by then. Entries proposed during the save (``propose`` runs
between ``ready`` and ``advance``) are only appended in memory; they are sent with the next Ready, so no
acknowledgement for them can exist before their own save -- and on a single-member cluster, where the leader
alone is a quorum, the Ready that carries them as committed persists them before step 4 applies them.
Followers are unchanged: entries durable (step 2), then acknowledged (step 3). The gain is that the
leader's fsync overlaps the follower's round trip (network, follower fsync, answer) instead of preceding it.

Where the save runs
-------------------

A leader saves in a worker thread (SQLite releases the GIL), so its loop keeps taking client calls during the
fsync, which overlaps the followers' round trip anyway. Except with one writer at a time (none of the last
``LONE_WRITER_PROPOSALS`` proposals found another one waiting): then its loop has nothing else to do, and it
saves on the loop thread once the sender tasks have written the Ready's appends. The worker thread would wait
for the GIL while the loop encodes and writes those appends, and its fsync would start late enough to run
alongside the followers' own, which slows theirs (on the development VM, sequential writes took 2.05 against
2.38 ms; 10 alternated blocks of 200 on one cluster). The first overlapping proposal sends saves back to the
thread: with many writers, blocking the loop for each fsync cost a third of the throughput.

A follower's save is on every write's critical path and its loop has nothing to step until the entries are
durable, so it saves on the loop thread: the hop to a worker thread and back cost more than the write itself
(measured on a 2-vCPU VM: a follower's save p50 0.7-1.0 ms inline against 1.1-2.0 ms through a thread, and a
sequential write ~1 ms faster). Once a save took longer than ``INLINE_SAVE_LIMIT``, the following ones go to
the thread until one is fast again, so a stalling disk does not stall the coordinator's API with it. Big
batches (a member catching up: more than ``INLINE_SAVE_ENTRIES``) and snapshots from the leader are always
saved in the thread.

A leader's Ready with nothing to persist (commit index moves, heartbeats) is applied before its messages are
sent, so the writers waiting on those entries are answered first; and appends that carry no entries to a
follower in REPLICATE state -- commit notices -- are held back for ``COMMIT_NOTICE_DELAY`` and dropped when a
later append or heartbeat carries the commit index anyway (``_send``). Both only reorder or drop messages,
which Raft tolerates on any network.

Client work enters through coroutines that never block the loop: ``propose`` appends to the core directly
(``RawNode.propose`` is allowed between ``ready`` and ``advance``) and waits for the entry with that index
*and term* to be applied (another term at that index means the proposal was lost in a leader change:
``ProposalDropped``); ``read_index`` batches every read queued during one loop turn into one ReadIndex round.
Every wait has a deadline. ``NotLeader`` is raised to the caller, which forwards (``service.py``).

Snapshots: every ``snapshot_entries`` applied entries the driver takes a consistent copy of the state machine
on the loop (``snapshot_view``: containers copied, immutable records shared), serializes it with the member
registry (``encode_snapshot``) in a worker thread while the loop goes on applying, then, back on the loop,
records it with ``create_snapshot`` and compacts the log up to
``snapshot index - catchup_entries`` (never past the snapshot). A restarted node restores the latest snapshot
and the core re-delivers the committed entries after it.

A store that truncated an uncommitted tail on open (``storage.truncated_from``) may have acknowledged entries
it no longer has; until its commit index reaches that point again the node neither votes nor campaigns.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import enum
import heapq
import itertools
import logging
import random
import struct
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from tunnelmesh import pki
from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.api.v1 import state_pb2
from tunnelmesh.coord.raft.core import Config
from tunnelmesh.coord.raft.errors import NotLeader, ProposalDropped, RaftError, Stopped
from tunnelmesh.coord.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Ready,
    Snapshot,
    SnapshotStatus,
    StateType,
)
from tunnelmesh.coord.raft.progress import ProgressState
from tunnelmesh.coord.raft.rawnode import RawNode
from tunnelmesh.coord.raft.storage import SqliteStorage
from tunnelmesh.coord.raft.transport import REFUSED, Transport, member_label
from tunnelmesh.coord.state import MeshState

log = logging.getLogger(__name__)

COMMIT_NOTICE_DELAY = 0.02
"""Seconds a leader holds back an append that only moves a follower's commit index: a later append or
heartbeat usually carries it, and each message costs the leader's event loop a stream write and the answer's
read. A follower applies at most this much later than without the delay (linearizable reads are not affected:
their heartbeat round carries the commit index; nor are writes forwarded by a follower: the leader releases
that follower's notice as soon as the write has applied, see ``release_commit_notice``)."""

INLINE_SAVE_LIMIT = 0.005
"""Seconds a follower's save may take and the next one still run on the event loop thread (see "Where the save
runs" above)."""
INLINE_SAVE_ENTRIES = 64
"""A follower's save of more entries than this runs in a worker thread (catching up: big writes)."""

LONE_WRITER_PROPOSALS = 8
"""A leader saves on its event loop thread while none of its last this many proposals overlapped an earlier
one (see "Where the save runs" above)."""

STOPPED = "this coordinator is stopping"

SAVE_SECONDS = Histogram(
    "tunnelmesh_raft_storage_save_seconds",
    "Time to make one Raft batch durable (entries and hard state, one fsynced SQLite transaction): every "
    "write waits for one on the leader and one on a follower, so a slow disk shows up here first.",
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 4.0),
)
LEADER_CHANGES = Counter(
    "tunnelmesh_raft_leader_changes",
    "Times this coordinator saw the leader change, to another member or to none (elections).",
)
PROPOSALS = Counter(
    "tunnelmesh_raft_proposals",
    "Entries this coordinator proposed as leader, by outcome: committed (applied), dropped (lost in a leader "
    "change: the caller retries), timeout (not applied in time: outcome unknown), failed (shutdown).",
    ["outcome"],
)
_DRIVERS: weakref.WeakSet[Driver] = weakref.WeakSet()


class _Collector(Collector):
    """Each running driver's Raft state, read at scrape time (``member`` = the member id, as in the logs)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"tunnelmesh_raft_{name}", doc, labels=["member", *extra])

        is_leader = gauge("is_leader", "1 on the leader")
        has_leader = gauge("has_leader", "1 while this member knows a leader (0: an election is running)")
        term = gauge("term", "Current Raft term")
        commit = gauge("commit_index", "Highest log index known committed")
        applied = gauge("applied_index", "Highest log index applied to the mesh state")
        snapshot = gauge("snapshot_index", "Index of the latest snapshot")
        pending = gauge("proposals_pending", "Proposals waiting to be applied")
        lag = gauge(
            "peer_lag_entries", "Leader's view: entries a member is behind the leader's log", ("peer",)
        )
        contact = gauge(
            "peer_last_contact_seconds", "Seconds since a message from a member arrived", ("peer",)
        )
        for d in list(_DRIVERS):
            st = d.status()
            me = member_label(st.member_id)
            leads = st.role == StateType.LEADER
            is_leader.add_metric([me], float(leads))
            has_leader.add_metric([me], float(st.leader_id != 0))
            term.add_metric([me], st.term)
            commit.add_metric([me], st.commit)
            applied.add_metric([me], st.applied)
            snapshot.add_metric([me], st.snapshot_index)
            pending.add_metric([me], len(d._proposals))
            last = d.node.raft.raft_log.last_index()
            for mid, peer in st.peers.items():
                if mid == st.member_id:
                    continue
                if leads:
                    lag.add_metric([me, member_label(mid)], max(0, last - peer.match))
                if peer.last_contact_age is not None:
                    contact.add_metric([me, member_label(mid)], peer.last_contact_age)
        yield from (is_leader, has_leader, term, commit, applied, snapshot, pending, lag, contact)


REGISTRY.register(_Collector())

_SNAP_MAGIC = b"TMS1"
_U32 = struct.Struct(">I")


class DeadlineExceeded(RaftError):
    """A proposal or read did not complete before its deadline (its outcome is unknown for writes)."""


# -- the snapshot envelope: member registry + mesh state -----------------------------------------------------


@dataclass(slots=True)
class Registry:
    """What the Raft layer knows about members beyond their ids: addresses, names, storage ids, and every id
    ever removed (ids are never reused)."""

    members: dict[int, raft_pb2.Member] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)

    def encode(self) -> bytes:
        cs = raft_pb2.ConfState(
            members=[self.members[k] for k in sorted(self.members)], learners=sorted(self.removed)
        )
        return cs.SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> Registry:
        cs = raft_pb2.ConfState.FromString(data)
        return cls({m.member_id: m for m in cs.members}, set(cs.learners))

    def apply_change(self, cc: ConfChange) -> None:
        """A committed membership change: a removed id is kept forever; an added member's addresses come from
        the change's context (a ``raft_pb2.Member``)."""
        if cc.type == ConfChangeType.REMOVE_NODE:
            self.members.pop(cc.node_id, None)
            self.removed.add(cc.node_id)
        elif cc.context:
            try:
                self.members[cc.node_id] = raft_pb2.Member.FromString(cc.context)
            except Exception:
                log.warning("event=raft_member_context_invalid member=%x", cc.node_id)


def encode_snapshot(registry: Registry, state: bytes) -> bytes:
    """Snapshot data: ``TMS1``, the registry (a raft ``ConfState`` whose ``members`` are the members and whose
    ``learners`` field lists removed ids), then the ``StateSnapshot`` bytes."""
    reg = registry.encode()
    return _SNAP_MAGIC + _U32.pack(len(reg)) + reg + state


def decode_snapshot(data: bytes) -> tuple[Registry, bytes]:
    if not data:
        return Registry(), b""
    if data[:4] != _SNAP_MAGIC or len(data) < 8:
        raise RaftError("snapshot data is not a TunnelMesh coordinator snapshot (bad magic)")
    (n,) = _U32.unpack_from(data, 4)
    return Registry.decode(data[8 : 8 + n]), data[8 + n :]


# MeshState attributes snapshot() may share with the view: its own encoding cache (only snapshot() uses it,
# and a cached encoding is reused only for the very record object it was made from).
_VIEW_SHARED = frozenset({"_encoded"})


def snapshot_view(state: MeshState) -> MeshState:
    """A copy of ``state`` for ``snapshot()`` in another thread while the loop keeps applying to ``state``.

    Records (nodes, tokens, KV entries, applied requests) are immutable and replaced on change, so a shallow
    copy of every container is a consistent view; the address pools are mutable objects and are copied with
    their quarantine. Costs a few dict copies on the loop thread instead of the whole encoding."""
    view = copy.copy(state)
    for name, value in vars(state).items():
        if name in _VIEW_SHARED:
            continue
        if name == "_pools":
            pools = []
            for pool in value:
                cp = copy.copy(pool)
                cp.quarantine = dict(pool.quarantine)
                pools.append(cp)
            setattr(view, name, pools)
        elif isinstance(value, dict | list | set):
            setattr(view, name, value.copy())
    return view


@dataclass(frozen=True, slots=True)
class PeerStatus:
    member_id: int
    match: int
    recent_active: bool
    last_contact_age: float | None


class _SaveSite(enum.Enum):
    HERE = "here"  # in the turn, on the loop thread
    LOOP = "loop"  # by the loop task, on its thread, once this Ready's appends are written
    THREAD = "thread"  # in a worker thread, awaited by the loop task


@dataclass(frozen=True, slots=True)
class _PendingSave:
    rd: Ready
    early: bool
    late: bool
    thread: asyncio.Future[float] | None  # the save in a worker thread; None: the loop task saves it


@dataclass(frozen=True, slots=True)
class DriverStatus:
    member_id: int
    cluster_id: str
    leader_id: int
    role: StateType
    term: int
    commit: int
    applied: int
    snapshot_index: int
    conf_state: ConfState
    members: dict[int, raft_pb2.Member]
    peers: dict[int, PeerStatus]
    votes_disabled: bool


@dataclass(slots=True)
class DriverOptions:
    tick: float = 0.1
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    snapshot_entries: int = 10_000
    catchup_entries: int = 5_000


class Driver:
    """Runs one Raft member. Create, ``await start()`` (binds the Raft port), then ``await run()``."""

    def __init__(
        self,
        *,
        storage: SqliteStorage,
        state: MeshState,
        cluster_id: str,
        member_id: int,
        raft_listen: str,
        credentials: pki.CoordinatorCredentials,
        options: DriverOptions | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.storage = storage
        self.state = state
        self.cluster_id = cluster_id
        self.member_id = member_id
        self.opts = options or DriverOptions()
        self.registry = Registry()
        # Raft index of the last applied change of the member registry (or of the snapshot it came from): the
        # config version of the coordinator list nodes see.
        self.members_index = 0
        # Set (and replaced) after every batch of applied entries: config streams wait on it.
        self._applied_changed = asyncio.Event()
        # Set once this member is out of the cluster: it applied its own removal, or a peer refused it as
        # removed (the leader stops replicating to a removed member, which may never see the entry itself).
        self.removed = asyncio.Event()
        snap = storage.snapshot()
        applied = 0
        if not snap.is_empty():
            self._restore_snapshot(snap)
            applied = snap.index
            self.members_index = snap.index
            if member_id in self.registry.removed:
                self.removed.set()
        self.applied = applied
        self._notified_applied = applied
        self.snapshot_index = snap.index
        self.conf_state = snap.metadata.conf_state
        cfg = Config(
            id=member_id,
            election_tick=self.opts.election_ticks,
            heartbeat_tick=self.opts.heartbeat_ticks,
            applied=applied,
        )
        self.node = RawNode(cfg, storage, rng)
        self.transport = Transport(
            cluster_id=cluster_id,
            member_id=member_id,
            listen=raft_listen,
            credentials=credentials,
            deliver=self._deliver,
            report_unreachable=self._report_unreachable,
            report_snapshot=self._report_snapshot,
            rpc_timeout=max(0.5, self.opts.tick * self.opts.election_ticks),
            is_removed=lambda member: member in self.registry.removed,
            report_removed=self.removed.set,
        )
        self._inbox: list[Message] = []
        self._local: list[tuple[str, int, SnapshotStatus]] = []
        self._wake = asyncio.Event()
        self._ticks_due = 0
        self._proposals: dict[int, tuple[int, asyncio.Future[state_pb2.CommandResult | None]]] = {}
        self._read_batch: list[asyncio.Future[int]] = []
        self._reads: dict[bytes, list[asyncio.Future[int]]] = {}
        self._read_ctx = itertools.count(1)
        self._applied_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_seq = itertools.count()
        self._last_contact: dict[int, float] = {}
        self._no_vote_before = storage.truncated_from
        if self._no_vote_before is not None:
            log.warning(
                "event=raft_votes_disabled reason=truncated_tail truncated_from=%d "
                "detail='will not vote or campaign until the commit index reaches it again'",
                self._no_vote_before,
            )
        self._lead = 0
        self._role = StateType.FOLLOWER
        self._stopping = False
        self._snapshot_task: asyncio.Task[tuple[int, ConfState, bytes]] | None = None
        self._held: dict[int, Message] = {}
        self._held_timer: asyncio.TimerHandle | None = None
        self._slow_saves = False  # the last save took longer than INLINE_SAVE_LIMIT
        self._saving: _PendingSave | None = None  # a Ready the loop task finishes
        self._loop_busy = False  # the loop task awaits storage work of its own (a snapshot)
        self._failure: Exception | None = None  # a turn outside the loop task failed: the loop raises it
        # For each of the last proposals: was an earlier one still waiting? (see "Where the save runs")
        self._writes_overlapped: collections.deque[bool] = collections.deque(
            [True] * LONE_WRITER_PROPOSALS, maxlen=LONE_WRITER_PROPOSALS
        )
        self._sync_peers()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.start()

    async def run(self) -> None:
        """Run until cancelled: the Ready loop, the ticker and the transport, all owned by one TaskGroup."""
        _DRIVERS.add(self)  # its metrics are exported while it runs
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.transport.run(), name="raft-transport")
                tg.create_task(self._ticker(), name="raft-ticker")
                tg.create_task(self._loop(), name="raft-loop")
        finally:
            _DRIVERS.discard(self)
            self._stopping = True
            if self._snapshot_task is not None:
                self._snapshot_task.cancel()  # the encoding thread finishes on its own; nothing is recorded
            if self._held_timer is not None:
                self._held_timer.cancel()
            self._fail_all(Stopped(STOPPED))
            await self.transport.close()

    # -- inputs from the transport ---------------------------------------------------------------------------

    def _deliver(self, msgs: Sequence[Message]) -> None:
        removed = self.registry.removed
        if removed and any(m.frm in removed for m in msgs):
            # A removed member that kept running (or came back after a forced new cluster) still holds valid
            # certificates: its votes and appends, perhaps from a higher term, must not disturb the cluster.
            REFUSED.labels("removed_member").inc(sum(m.frm in removed for m in msgs))
            msgs = [m for m in msgs if m.frm not in removed]
        if not msgs:
            return
        now = time.monotonic()
        for m in msgs:
            self._last_contact[m.frm] = now
        self._inbox.extend(msgs)
        self._kick()

    def _report_unreachable(self, peer: int) -> None:
        self._local.append(("unreachable", peer, SnapshotStatus.FAILURE))
        self._wake.set()

    def _report_snapshot(self, peer: int, status: SnapshotStatus) -> None:
        self._local.append(("snapshot", peer, status))
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        # A random phase within one tick. Members started together (one orchestration step, or joining through
        # the same seed at once) would otherwise tick in step, and two followers that draw the same election
        # timeout after the leader dies would campaign in the same millisecond and split the vote: another
        # whole election timeout before a leader (seen in CI: 2.35 s instead of about 1 s).
        nxt = loop.time() + self.node.raft.rng.random() * self.opts.tick
        while True:
            nxt += self.opts.tick
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            self._ticks_due += 1
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._failure is not None:
                raise self._failure
            if self._saving is not None:
                await self._finish_save(self._saving)
            self._turn()
            self._loop_busy = True
            try:
                await self._maybe_snapshot()
            finally:
                self._loop_busy = False

    def _kick(self) -> None:
        """Work was queued (messages, a proposal): do the turn now, in the caller's task, unless a save or the
        loop task's own storage work is under way (then the loop task does it). Waking the loop task instead
        would cost an event-loop pass on every hop of every write (client -> leader, leader -> follower, and
        back). After a failed turn (a Ready left half-handled) nothing more is stepped: the loop task raises
        the failure."""
        busy = self._saving is not None or self._loop_busy
        if busy or self._stopping or self._failure is not None:
            self._wake.set()
            return
        try:
            self._turn()
        except Exception as exc:  # fail the driver as if the loop task had done the turn
            self._failure = exc
            self._wake.set()

    def _turn(self) -> None:
        """Step what is queued, then handle Readies until there are none, or until one must be saved outside
        this turn (``_save_site``): the loop task finishes that one (``_finish_save``), and nothing is stepped
        until it has. Synchronous, and nothing in it queues work, so turns never nest."""
        node = self.node
        for _ in range(self._ticks_due):
            if self._no_vote_before is not None and not node.is_leader:
                continue  # a node that lost acknowledged entries must not campaign
            node.tick()
        self._ticks_due = 0
        inbox, self._inbox = self._inbox, []
        for m in inbox:
            if self._no_vote_before is not None and m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                continue
            try:
                node.step(m)
            except RaftError as exc:
                log.debug("event=raft_step_refused type=%s from=%x error=%r", m.type.name, m.frm, str(exc))
        local, self._local = self._local, []
        for kind, peer, status in local:
            if kind == "unreachable":
                node.report_unreachable(peer)
            else:
                node.report_snapshot(peer, status)
        if self._read_batch:
            self._start_read_batch()
        while node.has_ready():
            rd = node.ready()
            if self._begin_ready(rd):
                return
            node.advance(rd)

    def _begin_ready(self, rd: Ready) -> bool:
        """Handle ``rd`` (steps 1-5), or start it and leave the rest to the loop task: returns True then."""
        if rd.soft_state is not None:
            self._on_soft_state(rd.soft_state.lead, rd.soft_state.raft_state)
        leader = self.node.raft.state == StateType.LEADER
        durable = rd.snapshot is not None or bool(rd.entries) or rd.must_sync
        # A leader whose term and vote are already durable sends before persisting its own entries (Raft
        # thesis §10.2.1: the leader's disk write runs in parallel with replication); see the module
        # docstring for why that is exact with this loop.
        early = (
            bool(rd.messages) and durable and rd.snapshot is None and leader and self._term_vote_durable(rd)
        )
        # A leader's Ready with nothing to make durable carries commit notices and heartbeats only: apply
        # first, so the writers waiting on these entries are answered before those messages cost the loop.
        late = bool(rd.messages) and not durable and leader
        if early:
            self._send(rd.messages)
        # 1 + 2: snapshot, entries and hard state in one fsynced transaction, where "Where the save runs"
        # says. A Ready that only moves the commit index is written without fsync (a lost commit index is
        # relearned from the leader), here.
        if durable:
            site = self._save_site(rd, leader, early)
            if site is not _SaveSite.HERE:
                thread = None
                if site is _SaveSite.THREAD:
                    thread = asyncio.get_running_loop().run_in_executor(None, self._save, rd)
                    thread.add_done_callback(lambda _: self._wake.set())
                else:
                    self._wake.set()
                self._saving = _PendingSave(rd, early, late, thread)
                return True
            self._slow_saves = self._save(rd) > INLINE_SAVE_LIMIT
        elif rd.hard_state is not None and not late:
            self.storage.save(rd.hard_state, sync=False)
        self._finish_ready(rd, early, late)
        return False

    def _save_site(self, rd: Ready, leader: bool, early: bool) -> _SaveSite:
        if rd.snapshot is not None or self._slow_saves or len(rd.entries) > INLINE_SAVE_ENTRIES:
            return _SaveSite.THREAD
        if not leader:
            return _SaveSite.HERE
        if early and not any(self._writes_overlapped):
            return _SaveSite.LOOP
        return _SaveSite.THREAD

    async def _finish_save(self, p: _PendingSave) -> None:
        if p.thread is None:
            await asyncio.sleep(0)  # the sender tasks write this Ready's appends first
            took = self._save(p.rd)
        else:
            took = await p.thread
        self._saving = None
        self._slow_saves = took > INLINE_SAVE_LIMIT
        self._finish_ready(p.rd, p.early, p.late)
        self.node.advance(p.rd)

    def _finish_ready(self, rd: Ready, early: bool, late: bool) -> None:
        """Steps 2 (a snapshot's restore) to 5 of a Ready that is durable."""
        if rd.snapshot is not None:
            self._restore_snapshot(rd.snapshot)
            self.members_index = rd.snapshot.index
            self.applied = max(self.applied, rd.snapshot.index)
            self.snapshot_index = rd.snapshot.index
            self.conf_state = rd.snapshot.metadata.conf_state
            self._sync_peers()
            log.info("event=raft_snapshot_installed index=%d term=%d", rd.snapshot.index, rd.snapshot.term)
        nv = self._no_vote_before
        if rd.hard_state is not None and nv is not None and rd.hard_state.commit >= nv:
            log.info("event=raft_votes_enabled commit=%d", rd.hard_state.commit)
            self._no_vote_before = None
        # 3: send (a follower acknowledges only what step 2 made durable).
        if rd.messages and not early and not late:
            self._send(rd.messages)
        # 4: apply.
        for e in rd.committed_entries:
            self._apply(e)
        if late:
            if rd.hard_state is not None:
                self.storage.save(rd.hard_state, sync=False)
            self._send(rd.messages)
        # 5: reads.
        for rs in rd.read_states:
            for fut in self._reads.pop(rs.request_ctx, ()):
                if not fut.done():
                    fut.set_result(rs.index)
        self._release_applied_waiters()

    def _save(self, rd: Ready) -> float:
        """Persist ``rd``'s snapshot, entries and hard state; returns the seconds it took."""
        t0 = time.perf_counter()
        self.storage.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)
        took = time.perf_counter() - t0
        if rd.must_sync or rd.snapshot is not None:
            SAVE_SECONDS.observe(took)
        return took

    def _send(self, msgs: Sequence[Message]) -> None:
        """Hand messages to the transport, holding back a leader's commit notices (``COMMIT_NOTICE_DELAY``):
        an append without entries to a follower in REPLICATE state only tells it the new commit index. It is
        dropped if a later append or heartbeat to the same follower carries that commit anyway (under load,
        or when the next write follows within the delay), else sent when the delay expires."""
        held = self._held
        prs = self.node.raft.prs.progress
        out: list[Message] = []
        for m in msgs:
            if m.type == MessageType.APP:
                if not m.entries:
                    pr = prs.get(m.to)
                    if pr is not None and pr.state == ProgressState.REPLICATE:
                        held[m.to] = m
                        continue
                held.pop(m.to, None)  # every append carries the leader's commit index
            elif m.type == MessageType.HEARTBEAT:
                h = held.get(m.to)
                if h is not None and m.commit >= h.commit:
                    del held[m.to]
            out.append(m)
        if out:
            self.transport.send(out)
        if held and self._held_timer is None:
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(COMMIT_NOTICE_DELAY, self._flush_held)

    def _flush_held(self) -> None:
        self._held_timer = None
        held, self._held = self._held, {}
        self._send_held(held.values())

    def release_commit_notice(self, peer: int) -> None:
        """Send ``peer`` its held commit notice now: it forwarded a write and waits to apply it itself
        (without this, a write through a follower would take ``COMMIT_NOTICE_DELAY`` longer)."""
        m = self._held.pop(peer, None)
        if m is not None:
            self._send_held([m])

    def _send_held(self, held: Iterable[Message]) -> None:
        r = self.node.raft
        # A notice from an older term (this member stepped down meanwhile) would only be refused.
        msgs = [m for m in held if r.state == StateType.LEADER and m.term == r.term]
        if msgs and not self._stopping:
            self.transport.send(msgs)

    def _term_vote_durable(self, rd: Ready) -> bool:
        hs = rd.hard_state
        if hs is None:
            return True
        cur = self.storage.hard_state
        return (hs.term, hs.vote) == (cur.term, cur.vote)

    def _on_soft_state(self, lead: int, role: StateType) -> None:
        if lead != self._lead:
            term = self.node.raft.term
            if lead:
                log.info("event=leader_elected term=%d leader=%x self=%x", term, lead, self.member_id)
            else:
                log.info("event=leader_lost term=%d self=%x", term, self.member_id)
            # Reads waiting on an old leader's answer will never get one.
            self._fail_reads(NotLeader(lead, self.member_id))
            LEADER_CHANGES.inc()
        if role != self._role:
            log.info("event=raft_role_changed role=%s term=%d", role.name, self.node.raft.term)
        self._lead, self._role = lead, role

    def _apply(self, e: Entry) -> None:
        if e.index <= self.applied:
            return
        result: state_pb2.CommandResult | None = None
        if e.type == EntryType.CONF_CHANGE:
            cc = ConfChange.decode(e.data)
            self.conf_state = self.node.apply_conf_change(cc)
            self._apply_member_change(cc)
            self.members_index = e.index
        elif e.index > self.state.applied_index:
            result = self.state.apply(e.index, e.data)
        self.applied = e.index
        pending = self._proposals.pop(e.index, None)
        if pending is not None:
            term, fut = pending
            if not fut.done():
                if term == e.term:
                    fut.set_result(result)
                else:
                    fut.set_exception(
                        ProposalDropped(f"entry {e.index} was replaced in a leader change; retry")
                    )

    def _apply_member_change(self, cc: ConfChange) -> None:
        self.registry.apply_change(cc)
        if cc.type == ConfChangeType.REMOVE_NODE:
            log.info("event=raft_member_removed member=%x", cc.node_id)
            if cc.node_id == self.member_id:
                log.warning("event=raft_self_removed detail='this coordinator is no longer a member'")
                self.removed.set()
        else:
            log.info(
                "event=raft_member_added member=%x role=%s voters=%s learners=%s",
                cc.node_id,
                "voter" if cc.type == ConfChangeType.ADD_NODE else "learner",
                ",".join(f"{v:x}" for v in self.conf_state.voters),
                ",".join(f"{v:x}" for v in self.conf_state.learners),
            )
        self._sync_peers()

    def _restore_snapshot(self, snap: Snapshot) -> None:
        reg, state = decode_snapshot(snap.data)
        self.registry = reg
        # The bootstrap snapshot carries no state: start from an empty mesh state.
        self.state = MeshState.from_snapshot(state) if state else MeshState()

    def _sync_peers(self) -> None:
        peers = {mid: m.raft_address for mid, m in self.registry.members.items() if mid != self.member_id}
        self.transport.set_peers(peers)

    async def _maybe_snapshot(self) -> None:
        """Every ``snapshot_entries`` applied entries: copy the state on the loop (cheap: the records are
        immutable, only the containers are copied), encode the copy in a worker thread while this loop goes
        on stepping and applying, and record it on a later turn. Recording and compacting run here, awaited
        by the loop, so they never overlap the loop's own storage writes."""
        task = self._snapshot_task
        if task is not None:
            if not task.done():
                return
            self._snapshot_task = None
            index, conf_state, data = task.result()
            if index <= self.snapshot_index:
                return  # a newer snapshot from the leader was installed meanwhile
            await self._record_snapshot(index, conf_state, data)
            return
        if self.applied - self.snapshot_index < self.opts.snapshot_entries:
            return
        index, conf_state, encode = self.applied, self.conf_state, self._snapshot_encoder()
        self._snapshot_task = asyncio.create_task(
            asyncio.to_thread(lambda: (index, conf_state, encode())), name="raft-snapshot-encode"
        )
        self._snapshot_task.add_done_callback(lambda _: self._wake.set())

    async def backup(self) -> tuple[int, int, bytes]:
        """(index, term, snapshot data) of the state applied here now: the same copy-then-encode as
        ``_maybe_snapshot``, handed to the caller instead of recorded (an online backup; the caller runs a
        read barrier first if it must include every write acknowledged before)."""
        index, term = self.applied, self.node.raft.term
        return index, term, await asyncio.to_thread(self._snapshot_encoder())

    def _snapshot_encoder(self) -> Callable[[], bytes]:
        """Snapshot data of the state applied now, to encode in another thread: the registry and the state
        are copied here, on the loop (cheap: containers only), so applying may go on meanwhile."""
        registry = Registry(dict(self.registry.members), set(self.registry.removed))
        view = snapshot_view(self.state)
        return lambda: encode_snapshot(registry, view.snapshot())

    async def _record_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> None:
        snap = await asyncio.to_thread(self.storage.create_snapshot, index, conf_state, data)
        self.snapshot_index = snap.index
        compact_to = snap.index - self.opts.catchup_entries
        if compact_to > self.storage.first_index():
            await asyncio.to_thread(self.storage.compact, compact_to)
            log.info("event=raft_log_compacted index=%d snapshot_index=%d", compact_to, snap.index)

    # -- client work -----------------------------------------------------------------------------------------

    async def propose(self, data: bytes, timeout: float) -> tuple[int, state_pb2.CommandResult | None]:  # noqa: ASYNC109 - a wait budget
        """Propose a NORMAL entry; returns (index, result) once applied. ``NotLeader``, ``ProposalDropped``,
        ``DeadlineExceeded``, ``Stopped``."""
        self._check_running()
        index, term = self.node.propose(data)
        return index, await self._wait_proposal(index, term, timeout)

    async def propose_conf_change(self, cc: ConfChange, timeout: float) -> int:  # noqa: ASYNC109 - a wait budget
        self._check_running()
        index, term = self.node.propose_conf_change(cc)
        await self._wait_proposal(index, term, timeout)
        return index

    async def _wait_proposal(self, index: int, term: int, timeout: float) -> state_pb2.CommandResult | None:  # noqa: ASYNC109 - a wait budget
        fut: asyncio.Future[state_pb2.CommandResult | None] = asyncio.get_running_loop().create_future()
        self._writes_overlapped.append(bool(self._proposals))
        self._proposals[index] = (term, fut)
        self._kick()
        try:
            async with asyncio.timeout(timeout):
                result = await fut
            PROPOSALS.labels("committed").inc()
            return result
        except TimeoutError:
            PROPOSALS.labels("timeout").inc()
            raise DeadlineExceeded(f"entry {index} was not applied within {timeout:.1f}s") from None
        except ProposalDropped:
            PROPOSALS.labels("dropped").inc()
            raise
        except RaftError:
            PROPOSALS.labels("failed").inc()
            raise
        finally:
            if self._proposals.get(index, (0, None))[1] is fut:
                del self._proposals[index]

    async def read_index(self, timeout: float) -> int:  # noqa: ASYNC109 - a wait budget
        """A linearizable read barrier: returns once this member has applied everything committed when the
        call started (confirmed by a quorum through the leader)."""
        self._check_running()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._read_batch.append(fut)
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                index = await fut
                await self.wait_applied(index, timeout)
                return index
        except TimeoutError:
            raise DeadlineExceeded(f"read index not confirmed within {timeout:.1f}s") from None

    def _start_read_batch(self) -> None:
        batch, self._read_batch = self._read_batch, []
        ctx = next(self._read_ctx).to_bytes(8, "big")
        try:
            self.node.read_index(ctx)
        except RaftError as exc:
            for fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._reads[ctx] = batch

    async def wait_applied(self, index: int, timeout: float) -> None:  # noqa: ASYNC109 - a wait budget
        if self.applied >= index:
            return
        self._check_running()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._applied_waiters, (index, next(self._waiter_seq), fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise DeadlineExceeded(f"index {index} not applied within {timeout:.1f}s") from None

    @property
    def applied_changed(self) -> asyncio.Event:
        """An event set once entries beyond the current ``applied`` are applied (or a snapshot installed).
        Take it *before* reading the state, then wait on it: one cheap waiter per config stream."""
        return self._applied_changed

    def _release_applied_waiters(self) -> None:
        if self.applied != self._notified_applied:
            self._notified_applied = self.applied
            event, self._applied_changed = self._applied_changed, asyncio.Event()
            event.set()
        w = self._applied_waiters
        while w and w[0][0] <= self.applied:
            _, _, fut = heapq.heappop(w)
            if not fut.done():
                fut.set_result(None)

    def _fail_reads(self, exc: Exception) -> None:
        reads, self._reads = self._reads, {}
        for futs in reads.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(exc)

    def _check_running(self) -> None:
        if self._stopping:
            raise Stopped(STOPPED)

    def _fail_all(self, exc: Exception) -> None:
        self._fail_reads(exc)
        waiters, self._applied_waiters = self._applied_waiters, []
        for _, _, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)
        for _, fut in self._proposals.values():
            if not fut.done():
                fut.set_exception(exc)
        self._proposals.clear()
        for rf in self._read_batch:
            if not rf.done():
                rf.set_exception(exc)
        self._read_batch.clear()

    def transfer_leadership(self, target: int) -> None:
        self.node.transfer_leadership(target)
        self._wake.set()

    # -- introspection ---------------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.node.is_leader

    @property
    def leader_id(self) -> int:
        return self.node.leader_id

    def status(self) -> DriverStatus:
        r = self.node.raft
        now = time.monotonic()
        peers: dict[int, PeerStatus] = {}
        for mid, pr in r.prs.progress.items():
            seen = self._last_contact.get(mid)
            peers[mid] = PeerStatus(
                member_id=mid,
                match=pr.match if r.state == StateType.LEADER else 0,
                recent_active=pr.recent_active,
                last_contact_age=None if seen is None else now - seen,
            )
        return DriverStatus(
            member_id=self.member_id,
            cluster_id=self.cluster_id,
            leader_id=r.lead,
            role=r.state,
            term=r.term,
            commit=r.raft_log.committed,
            applied=self.applied,
            snapshot_index=self.snapshot_index,
            conf_state=self.conf_state,
            members=dict(self.registry.members),
            peers=peers,
            votes_disabled=self._no_vote_before is not None,
        )

    def caught_up_learners(self, max_lag: int) -> list[int]:
        """Learners whose log is within ``max_lag`` entries of the leader's (leader only)."""
        r = self.node.raft
        if r.state != StateType.LEADER:
            return []
        last = r.raft_log.last_index()
        out = []
        for mid in self.conf_state.learners:
            pr = r.prs.progress.get(mid)
            if pr is not None and pr.match + max_lag >= last and pr.recent_active:
                out.append(mid)
        return sorted(out)

    def label(self) -> str:
        return member_label(self.member_id)
