"""``RawNode``: the driver's handle on the Raft core (etcd's ``raft.RawNode``).

The driver calls ``tick()`` at a fixed interval, ``step(message)`` for every message received from a peer, and
``propose`` / ``propose_conf_change`` / ``read_index`` / ``transfer_leadership`` for client work. Whenever
``has_ready()`` is true it calls ``ready()`` and handles the returned ``Ready`` **in this order**:

1. If ``rd.snapshot`` is set: store it (``LogStore.apply_snapshot``) and restore the state machine from it.
2. Persist ``rd.entries`` (``LogStore.append``, which truncates any conflicting suffix) and then
   ``rd.hard_state`` if set (``LogStore.set_hard_state``), durably (fsync) and preferably in one transaction.
   Nothing below may happen before this is durable: a vote or an acknowledgement sent before the state it
   promises is on disk can elect two leaders or lose a committed entry after a crash.
3. Send ``rd.messages`` (in any order; the transport may drop or reorder them). A MsgSnap's delivery outcome
   must be reported back with ``report_snapshot``; unreachable peers may be reported with
   ``report_unreachable``.
4. Apply ``rd.committed_entries`` to the state machine in order; for a CONF_CHANGE entry call
   ``apply_conf_change(ConfChange.decode(e.data))`` and remember the returned ``ConfState`` for snapshots.
5. Serve ``rd.read_states``: each is released only once the state machine has applied its index, counting the
   committed entries of this same ``Ready`` (so after step 4 they can be answered immediately).
6. Call ``advance(rd)``. Do not call ``ready()`` again before that; ``step``/``tick``/``propose`` are allowed
   in between.

Crash recovery: build a new ``RawNode`` on the same storage with ``Config(applied=<last index the state
machine durably applied>)`` (at least the snapshot index); the core reloads HardState, log and membership from
the storage and re-delivers committed entries above ``applied``. Anything of an un-advanced ``Ready`` that was
not persisted is lost, which is safe because none of its messages were sent.

Application snapshots: at any time the application may call ``LogStore.create_snapshot(applied_index,
conf_state, data)`` and then ``LogStore.compact(i)`` for some ``i <= applied_index``; the leader sends the
latest snapshot to followers whose missing entries were compacted away.

Requests that need a leader raise ``NotLeader(leader_id)`` on other nodes; ``ProposalDropped`` when the leader
refuses (transfer in progress, previous membership change unapplied). Pending reads and proposals are not
retried by the core across leader changes: the driver must put a deadline on every client request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tunnelmesh.coord.raft.core import Config, Raft
from tunnelmesh.coord.raft.errors import RaftError
from tunnelmesh.coord.raft.messages import (
    LOCAL_MESSAGES,
    NONE,
    RESPONSE_MESSAGES,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    SnapshotStatus,
    SoftState,
    StateType,
)
from tunnelmesh.coord.raft.progress import Progress
from tunnelmesh.coord.raft.storage_api import Storage


@dataclass(frozen=True, slots=True)
class Status:
    id: int
    hard_state: HardState
    soft_state: SoftState
    applied: int
    lead_transferee: int
    conf_state: ConfState
    progress: dict[int, str]


class RawNode:
    def __init__(self, config: Config, storage: Storage, rng: random.Random | None = None) -> None:
        self.raft = Raft(config, storage, rng if rng is not None else random.Random())
        self._prev_soft = self.raft.soft_state()
        self._prev_hard = self.raft.hard_state()

    # -- inputs ----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (as if the election timeout elapsed)."""
        self.raft.step(Message(MessageType.HUP, frm=self.raft.id))

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append ``data`` as a new entry; returns its ``(index, term)``.

        The proposal is committed iff an entry with that index *and* term is later applied; if a different
        term shows up at that index, the proposal was lost in a leader change and may be retried.
        """
        return self.propose_entries([Entry(0, 0, EntryType.NORMAL, data)])

    def propose_entries(self, entries: list[Entry]) -> tuple[int, int]:
        """Propose a batch at once (one log append, one broadcast); returns ``(last index, term)``."""
        r = self.raft
        r.step(Message(MessageType.PROP, frm=r.id, entries=tuple(entries)))
        return r.raft_log.last_index(), r.term

    def propose_conf_change(self, cc: ConfChange) -> tuple[int, int]:
        return self.propose_entries([Entry(0, 0, EntryType.CONF_CHANGE, cc.encode())])

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        return self.raft.apply_conf_change(cc)

    def step(self, m: Message) -> None:
        """Feed a message received from a peer."""
        if m.type in LOCAL_MESSAGES:
            raise RaftError(f"cannot step local message {m.type.name} received from the network")
        if m.type in RESPONSE_MESSAGES and m.frm not in self.raft.prs.progress and m.frm != NONE:
            return  # a response from a node that is no longer a member
        self.raft.step(m)

    def transfer_leadership(self, transferee: int) -> None:
        self.raft.step(Message(MessageType.TRANSFER_LEADER, frm=transferee))

    def read_index(self, ctx: bytes) -> None:
        """Request a linearizable read; a ``ReadState`` with the same ``ctx`` shows up in a later ``Ready``.

        ``ctx`` must be unique among pending reads (e.g. a request counter).
        """
        self.raft.step(Message(MessageType.READ_INDEX, frm=self.raft.id, context=ctx))

    def report_unreachable(self, node_id: int) -> None:
        self.raft.step(Message(MessageType.UNREACHABLE, frm=node_id))

    def report_snapshot(self, node_id: int, status: SnapshotStatus) -> None:
        self.raft.step(Message(MessageType.SNAP_STATUS, frm=node_id, reject=status == SnapshotStatus.FAILURE))

    # -- outputs ---------------------------------------------------------------------------------------------

    def _releasable_reads(self, applied_after: int) -> list[ReadState]:
        return [rs for rs in self.raft.read_states if rs.index <= applied_after]

    def has_ready(self) -> bool:
        r = self.raft
        r.flush()
        log = r.raft_log
        if r.msgs or log.unstable.entries or log.unstable.snapshot is not None:
            return True
        if log.has_next_committed_entries():
            return True
        ps, ph = self._prev_soft, self._prev_hard
        if r.lead != ps.lead or r.state != ps.raft_state:
            return True
        if r.term != ph.term or r.vote != ph.vote or log.committed != ph.commit:
            return True
        return bool(r.read_states) and any(rs.index <= log.applied for rs in r.read_states)

    def ready(self) -> Ready:
        r = self.raft
        r.flush()
        log = r.raft_log
        soft = r.soft_state()
        hard = r.hard_state()
        committed = log.next_committed_entries()
        snap = log.unstable.snapshot
        applied_after = committed[-1].index if committed else log.applied
        if snap is not None:
            applied_after = max(applied_after, snap.index)
        reads: tuple[ReadState, ...] = ()
        if r.read_states:
            released = self._releasable_reads(applied_after)
            if released:
                reads = tuple(released)
                r.read_states = [rs for rs in r.read_states if rs.index > applied_after]
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != self._prev_hard else None,
            read_states=reads,
            entries=tuple(log.unstable.entries),
            snapshot=snap,
            committed_entries=tuple(committed),
            messages=tuple(r.msgs),
            must_sync=hard.term != self._prev_hard.term
            or hard.vote != self._prev_hard.vote
            or bool(log.unstable.entries),
        )
        r.msgs = []
        self._prev_soft = soft
        self._prev_hard = hard
        return rd

    def advance(self, rd: Ready) -> None:
        log = self.raft.raft_log
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.index)
            if rd.snapshot.index > log.applied:
                log.applied = rd.snapshot.index
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)

    # -- introspection ---------------------------------------------------------------------------------------

    def status(self) -> Status:
        r = self.raft
        progress: dict[int, str] = {}
        if r.state == StateType.LEADER:
            progress = {i: repr(pr) for i, pr in r.prs}
        return Status(
            id=r.id,
            hard_state=r.hard_state(),
            soft_state=r.soft_state(),
            applied=r.raft_log.applied,
            lead_transferee=r.lead_transferee,
            conf_state=r.prs.conf_state(),
            progress=progress,
        )

    def progress(self, node_id: int) -> Progress | None:
        return self.raft.prs.progress.get(node_id)

    @property
    def is_leader(self) -> bool:
        return self.raft.state == StateType.LEADER

    @property
    def leader_id(self) -> int:
        return self.raft.lead
