"""The Raft state machine: roles, terms, elections, replication, membership, transfer and reads.

Theory of operation
===================

``Raft`` is a pure function of its inputs: ``step(message)`` and ``tick()`` change its state and append
outgoing messages to ``self.msgs``; nothing here performs I/O, reads a clock or sleeps. Randomness (election
timeouts) comes from the injected ``random.Random``. ``RawNode`` (rawnode.py) packages the effects into a
``Ready`` for the driver.

Every message goes through ``step``, which first applies the *term rules* common to all roles:

* a message from a higher term makes us a follower of that term (of its sender for APP/HEARTBEAT/SNAP), except
  a (pre-)vote arriving while we are within a leader lease (check-quorum; §6 "disruptive servers" of the
  thesis), and pre-vote traffic, which never changes our term;
* a message from a lower term is dropped (answered, when that helps a stale leader or pre-candidate learn the
  term);
* votes are granted at most once per term, to a candidate whose log is at least as up-to-date as ours
  (§5.4.1).

The rest is dispatched on the role through one of three step functions, the *transition table* of this module:

==============  ==========================================================================================
role            step function and what it handles
==============  ==========================================================================================
FOLLOWER        ``_step_follower``: APP/HEARTBEAT/SNAP from the leader, TIMEOUT_NOW, forwards READ_INDEX and
                TRANSFER_LEADER to the leader, rejects proposals with ``NotLeader``
PRE_CANDIDATE   ``_step_candidate``: counts PRE_VOTE_RESP; on a quorum becomes CANDIDATE (term + 1)
CANDIDATE       ``_step_candidate``: counts VOTE_RESP; on a quorum becomes LEADER; on a lost vote, FOLLOWER
LEADER          ``_step_leader``: proposals, APP_RESP/HEARTBEAT_RESP (progress + commit), check-quorum,
                snapshot status, leadership transfer, read index
==============  ==========================================================================================

and ``tick`` is ``_tick_election`` (followers and candidates: campaign after a randomized election timeout) or
``_tick_heartbeat`` (leader: heartbeats, check-quorum, abort a transfer that outlived an election timeout).

Commitment (§5.3, §5.4.2): the leader advances ``committed`` to the highest index a majority of voters has
acknowledged, and only if that entry is from its current term. Leaders count their own unpersisted entries;
that is safe because the driver persists a Ready's entries before sending its messages, so no follower can
acknowledge an entry the leader has not stored. Followers learn the commit index from APP and HEARTBEAT.

Replication uses per-follower ``Progress`` (probe / replicate / snapshot). In REPLICATE the leader pipelines:
it sends the next append without waiting for the previous one's ack, up to an inflight window of
``max_inflight_msgs`` messages (and ``max_inflight_bytes``), which is the flow control. Appends caused by
proposals and commit advances are deferred until the driver collects the next Ready (``flush``), so everything
proposed in between travels in one append per follower, each at most ``max_size_per_msg`` bytes /
``max_entries_per_msg`` entries. A follower whose missing entries were compacted away gets the latest
snapshot instead.

Membership changes are single-server (``ConfChange``): at most one unapplied change exists at a time
(``pending_conf_index``), they take effect when the application applies the committed entry and calls
``apply_conf_change``; learners receive the log but never vote or count towards a quorum. A leader removed
from the configuration steps down.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tunnelmesh.coord.raft.errors import (
    CompactedError,
    NotLeader,
    ProposalDropped,
    RaftError,
    SnapshotTemporarilyUnavailable,
    StorageError,
)
from tunnelmesh.coord.raft.log import RaftLog
from tunnelmesh.coord.raft.messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Snapshot,
    SoftState,
    StateType,
    entry_size,
    vote_response_type,
)
from tunnelmesh.coord.raft.progress import ProgressState, ProgressTracker
from tunnelmesh.coord.raft.quorum import MajorityConfig, VoteResult
from tunnelmesh.coord.raft.read_only import ReadOnly, ReadOnlyOption
from tunnelmesh.coord.raft.storage_api import Storage

M = MessageType

CAMPAIGN_PRE_ELECTION = b"CampaignPreElection"
CAMPAIGN_ELECTION = b"CampaignElection"
CAMPAIGN_TRANSFER = b"CampaignTransfer"
"""Campaign kinds; a TRANSFER campaign's vote requests carry this context and override the leader lease."""


@dataclass(frozen=True, slots=True)
class Config:
    """Tunables, named as etcd's ``raft.Config``. Times are in ticks; the driver decides how long a tick
    is."""

    id: int
    election_tick: int = 10
    heartbeat_tick: int = 1
    applied: int = 0
    """The last index the application had applied before a restart (entries above it are re-delivered)."""
    max_size_per_msg: int = 1 << 20
    max_entries_per_msg: int = 4096
    max_committed_size_per_ready: int | None = None
    max_inflight_msgs: int = 256
    max_inflight_bytes: int = 0
    check_quorum: bool = True
    pre_vote: bool = True
    read_only_option: ReadOnlyOption = ReadOnlyOption.SAFE

    def validate(self) -> None:
        if self.id <= NONE:
            raise RaftError(f"raft config: id must be a positive integer, got {self.id}")
        if self.heartbeat_tick <= 0:
            raise RaftError(f"raft config: heartbeat_tick must be > 0, got {self.heartbeat_tick}")
        if self.election_tick <= self.heartbeat_tick:
            raise RaftError(
                f"raft config: election_tick ({self.election_tick}) must be greater than heartbeat_tick "
                f"({self.heartbeat_tick}); 10x is usual"
            )
        if self.max_inflight_msgs <= 0:
            raise RaftError(f"raft config: max_inflight_msgs must be > 0, got {self.max_inflight_msgs}")
        if self.max_entries_per_msg <= 0:
            raise RaftError(f"raft config: max_entries_per_msg must be > 0, got {self.max_entries_per_msg}")
        if self.read_only_option == ReadOnlyOption.LEASE_BASED and not self.check_quorum:
            raise RaftError("raft config: read_only_option LEASE_BASED requires check_quorum")


class Raft:
    def __init__(self, config: Config, storage: Storage, rng: random.Random) -> None:
        config.validate()
        self.id = config.id
        self.rng = rng
        self.raft_log = RaftLog(storage, config.max_committed_size_per_ready)
        hs, cs = storage.initial_state()
        self.max_msg_size = config.max_size_per_msg
        self.max_msg_entries = config.max_entries_per_msg
        self.prs = ProgressTracker(config.max_inflight_msgs, config.max_inflight_bytes)
        self.election_timeout = config.election_tick
        self.heartbeat_timeout = config.heartbeat_tick
        self.check_quorum = config.check_quorum
        self.pre_vote = config.pre_vote
        self.read_only = ReadOnly(config.read_only_option)

        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.state = StateType.FOLLOWER
        self.is_learner = False
        self.msgs: list[Message] = []
        self._bcast_pending = False
        self.read_states: list[ReadState] = []
        self.lead_transferee = NONE
        self.pending_conf_index = 0
        self.pending_read_index_messages: list[Message] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_timeout
        self._step: Callable[[Message], None] = self._step_follower
        self._tick: Callable[[], None] = self._tick_election

        self._restore_conf_state(cs)
        if hs != HardState():
            self._load_hard_state(hs)
        if config.applied > 0:
            self.raft_log.applied_to(min(config.applied, self.raft_log.committed))
        self.become_follower(self.term, NONE)

    # -- state snapshots for the driver ----------------------------------------------------------------------

    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.state)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.raft_log.committed)

    def _load_hard_state(self, hs: HardState) -> None:
        log = self.raft_log
        if hs.commit < log.committed or hs.commit > log.last_index():
            raise RaftError(
                f"node {self.id:x}: persisted commit index {hs.commit} is out of range "
                f"[{log.committed}, {log.last_index()}]; the log store is corrupt or was truncated"
            )
        log.committed = hs.commit
        self.term = hs.term
        self.vote = hs.vote

    # -- sending ---------------------------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    # -- role transitions ------------------------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_election_timeout()
        self.lead_transferee = NONE
        self._bcast_pending = False
        self.prs.reset_votes()
        last = self.raft_log.last_index()
        prs = self.prs
        for node_id, pr in list(prs.progress.items()):
            npr = prs.new_progress(0, last + 1, pr.is_learner)
            if node_id == self.id:
                npr.match = last
                npr.recent_active = True
            prs.progress[node_id] = npr
        self.pending_conf_index = 0
        self.read_only = ReadOnly(self.read_only.option)
        self.pending_read_index_messages = []

    def _reset_randomized_election_timeout(self) -> None:
        self.randomized_election_timeout = self.election_timeout + self.rng.randrange(self.election_timeout)

    def become_follower(self, term: int, lead: int) -> None:
        self._step = self._step_follower
        self._reset(term)
        self._tick = self._tick_election
        self.lead = lead
        self.state = StateType.FOLLOWER

    def become_candidate(self) -> None:
        if self.state == StateType.LEADER:
            raise RaftError("invalid transition: leader -> candidate")
        self._step = self._step_candidate
        self._reset(self.term + 1)
        self._tick = self._tick_election
        self.vote = self.id
        self.state = StateType.CANDIDATE

    def become_pre_candidate(self) -> None:
        if self.state == StateType.LEADER:
            raise RaftError("invalid transition: leader -> pre-candidate")
        # A pre-candidate changes neither its term nor its vote (thesis §9.6).
        self._step = self._step_candidate
        self.prs.reset_votes()
        self._tick = self._tick_election
        self.lead = NONE
        self.state = StateType.PRE_CANDIDATE

    def become_leader(self) -> None:
        if self.state == StateType.FOLLOWER:
            raise RaftError("invalid transition: follower -> leader")
        self._step = self._step_leader
        self._reset(self.term)
        self._tick = self._tick_heartbeat
        self.lead = self.id
        self.state = StateType.LEADER
        self.prs.progress[self.id].become_replicate()
        # The empty entry of the new term commits everything before it (§5.4.2, §8). Membership changes wait
        # until it is applied, so a change never overlaps one the previous leader left uncommitted.
        self._append_entries([Entry(0, 0)])
        self.pending_conf_index = self.raft_log.last_index()

    # -- ticks -----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        self._tick()

    def _promotable(self) -> bool:
        pr = self.prs.progress.get(self.id)
        return pr is not None and not pr.is_learner and not self.raft_log.has_pending_snapshot()

    def _past_election_timeout(self) -> bool:
        return self.election_elapsed >= self.randomized_election_timeout

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self._promotable() and self._past_election_timeout():
            self.election_elapsed = 0
            self.step(Message(M.HUP, frm=self.id))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            if self.check_quorum:
                self.step(Message(M.CHECK_QUORUM, frm=self.id))
            # A transfer that did not finish within an election timeout is abandoned (thesis §3.10).
            if self.state == StateType.LEADER and self.lead_transferee != NONE:
                self.abort_leader_transfer()
        if self.state != StateType.LEADER:
            return
        if self.heartbeat_elapsed >= self.heartbeat_timeout:
            self.heartbeat_elapsed = 0
            self.step(Message(M.BEAT, frm=self.id))

    # -- step: term rules, votes, then the role's step function ----------------------------------------------

    def step(self, m: Message) -> None:
        if m.term == 0:
            pass  # local message (or a forwarded proposal / read index)
        elif m.term > self.term:
            if m.type in (M.VOTE, M.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.check_quorum and self.lead != NONE and self.election_elapsed < self.election_timeout
                )
                if not force and in_lease:
                    # We heard from a live leader within the minimum election timeout: ignore (thesis §4.2.3).
                    return
            if m.type == M.PRE_VOTE:
                pass  # never change our term in response to a pre-vote
            elif m.type == M.PRE_VOTE_RESP and not m.reject:
                pass  # we bump our term when the pre-vote wins
            elif m.type in (M.APP, M.HEARTBEAT, M.SNAP):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and m.type in (M.HEARTBEAT, M.APP):
                # A stale leader (e.g. healed from a partition) learns the new term from this and steps down;
                # otherwise, with check-quorum/pre-vote, it could never be disrupted back into following.
                self._send(Message(M.APP_RESP, to=m.frm, frm=self.id, term=self.term))
            elif m.type == M.PRE_VOTE:
                self._send(Message(M.PRE_VOTE_RESP, to=m.frm, frm=self.id, term=self.term, reject=True))
            return

        t = m.type
        if t == M.HUP:
            self._hup(CAMPAIGN_PRE_ELECTION if self.pre_vote else CAMPAIGN_ELECTION)
        elif t == M.VOTE or t == M.PRE_VOTE:
            self._handle_vote_request(m)
        else:
            self._step(m)

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (m.type == M.PRE_VOTE and m.term > self.term)
        )
        resp_type = vote_response_type(m.type)
        if can_vote and self.raft_log.is_up_to_date(m.index, m.log_term):
            # A granted pre-vote echoes the candidate's (future) term so the candidate counts it.
            self._send(Message(resp_type, to=m.frm, frm=self.id, term=m.term))
            if m.type == M.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp_type, to=m.frm, frm=self.id, term=self.term, reject=True))

    # -- elections -------------------------------------------------------------------------------------------

    def _hup(self, kind: bytes) -> None:
        if self.state == StateType.LEADER:
            return
        if not self._promotable():
            return
        log = self.raft_log
        if log.committed > log.applied:
            try:
                pending = log.slice(log.applied + 1, log.committed + 1)
            except StorageError:
                return
            if any(e.type == EntryType.CONF_CHANGE for e in pending):
                return  # cannot campaign while committed membership changes are unapplied
        self._campaign(kind)

    def _campaign(self, kind: bytes) -> None:
        if kind == CAMPAIGN_PRE_ELECTION:
            self.become_pre_candidate()
            vote_type = M.PRE_VOTE
            term = self.term + 1  # the term we would campaign for; our own term is unchanged
        else:
            self.become_candidate()
            vote_type = M.VOTE
            term = self.term
        if self._poll(self.id, True) == VoteResult.WON:
            # Single-voter cluster: we won on our own vote.
            if kind == CAMPAIGN_PRE_ELECTION:
                self._campaign(CAMPAIGN_ELECTION)
            else:
                self.become_leader()
            return
        last = self.raft_log.last_index()
        last_term = self.raft_log.last_term()
        ctx = CAMPAIGN_TRANSFER if kind == CAMPAIGN_TRANSFER else b""
        for node_id in sorted(self.prs.voters.voters):
            if node_id == self.id:
                continue
            self._send(
                Message(
                    vote_type, to=node_id, frm=self.id, term=term, index=last, log_term=last_term, context=ctx
                )
            )

    def _poll(self, node_id: int, granted: bool) -> VoteResult:
        self.prs.record_vote(node_id, granted)
        return self.prs.tally_votes()[2]

    # -- leader: replication ---------------------------------------------------------------------------------

    def _append_entries(self, ents: list[Entry] | tuple[Entry, ...]) -> None:
        log = self.raft_log
        li = log.last_index()
        term = self.term
        stamped = [Entry(li + 1 + i, term, e.type, e.data) for i, e in enumerate(ents)]
        li = log.append(stamped)
        self.prs.progress[self.id].maybe_update(li)
        self._maybe_commit()

    def _maybe_commit(self) -> bool:
        return self.raft_log.maybe_commit(self.prs.committed(), self.term)

    def _bcast_append(self) -> None:
        # Deferred to ``flush``: every proposal and commit advance until the driver collects the next Ready
        # then travels in one append per follower (batching), instead of one append each.
        self._bcast_pending = True

    def flush(self) -> None:
        """Send the appends ``_bcast_append`` deferred; ``RawNode`` calls it before collecting messages."""
        if not self._bcast_pending:
            return
        self._bcast_pending = False
        if self.state != StateType.LEADER:
            return
        for node_id in self.prs.progress:
            if node_id != self.id:
                self._send_append(node_id)

    def _send_append(self, to: int) -> None:
        self._maybe_send_append(to, True)

    def _maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        """Send the next batch of entries to ``to`` (or a snapshot if they are compacted away)."""
        pr = self.prs.progress[to]
        if pr.is_paused():
            return False
        log = self.raft_log
        prev_index = pr.next - 1
        try:
            prev_term = log.term(prev_index)
            ents = log.entries(pr.next, self.max_msg_size, self.max_msg_entries)
        except CompactedError:
            return self._send_snapshot(to)
        if not ents and not send_if_empty:
            return False
        nbytes = 0
        for e in ents:
            nbytes += entry_size(e)
        self._send(
            Message(
                M.APP,
                to=to,
                frm=self.id,
                term=self.term,
                index=prev_index,
                log_term=prev_term,
                entries=tuple(ents),
                commit=log.committed,
            )
        )
        pr.sent_entries(ents[-1].index if ents else None, nbytes)
        return True

    def _send_snapshot(self, to: int) -> bool:
        pr = self.prs.progress[to]
        if not pr.recent_active:
            return False  # don't ship a snapshot to a peer that may be down
        try:
            snap = self.raft_log.snapshot()
        except SnapshotTemporarilyUnavailable:
            return False
        if snap.is_empty():
            raise RaftError(f"node {self.id:x}: need a snapshot for {to:x} but the storage has none")
        pr.become_snapshot(snap.index)
        self._send(Message(M.SNAP, to=to, frm=self.id, term=self.term, snapshot=snap))
        return True

    def _send_heartbeat(self, to: int, ctx: bytes) -> None:
        # Never tell a follower to commit past what it is known to have (it may not have those entries).
        commit = min(self.prs.progress[to].match, self.raft_log.committed)
        self._send(Message(M.HEARTBEAT, to=to, frm=self.id, term=self.term, commit=commit, context=ctx))

    def _bcast_heartbeat(self, ctx: bytes | None = None) -> None:
        if ctx is None:
            ctx = self.read_only.last_pending_request_ctx()
        for node_id in self.prs.progress:
            if node_id != self.id:
                self._send_heartbeat(node_id, ctx)

    def _send_timeout_now(self, to: int) -> None:
        self._send(Message(M.TIMEOUT_NOW, to=to, frm=self.id, term=self.term))

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE

    # -- leader: reads ---------------------------------------------------------------------------------------

    def _committed_entry_in_current_term(self) -> bool:
        return self.raft_log.zero_term_on_compacted(self.raft_log.committed) == self.term

    def _response_to_read_index_req(self, req: Message, read_index: int) -> Message | None:
        if req.frm in (NONE, self.id):
            self.read_states.append(ReadState(read_index, req.context))
            return None
        return Message(
            M.READ_INDEX_RESP, to=req.frm, frm=self.id, term=self.term, index=read_index, context=req.context
        )

    def _send_read_index_response(self, m: Message) -> None:
        if self.read_only.option == ReadOnlyOption.SAFE:
            self.read_only.add_request(self.raft_log.committed, m)
            self.read_only.recv_ack(self.id, m.context)
            self._bcast_heartbeat(m.context)
        else:
            resp = self._response_to_read_index_req(m, self.raft_log.committed)
            if resp is not None:
                self._send(resp)

    def _release_pending_read_index_messages(self) -> None:
        if not self.pending_read_index_messages or not self._committed_entry_in_current_term():
            return
        pending, self.pending_read_index_messages = self.pending_read_index_messages, []
        for m in pending:
            self._send_read_index_response(m)

    # -- step functions (the role table) ---------------------------------------------------------------------

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == M.BEAT:
            self._bcast_heartbeat()
            return
        if t == M.CHECK_QUORUM:
            if not self.prs.quorum_active():
                self.become_follower(self.term, NONE)
                return
            for node_id, other in self.prs.progress.items():
                if node_id != self.id:
                    other.recent_active = False
            return
        if t == M.PROP:
            if not m.entries:
                raise RaftError(f"node {self.id:x}: empty proposal")
            if self.id not in self.prs.progress:
                raise ProposalDropped(f"node {self.id:x} was removed from the cluster; propose elsewhere")
            if self.lead_transferee != NONE:
                raise ProposalDropped(
                    f"leadership is being transferred from {self.id:x} to {self.lead_transferee:x}; "
                    "retry shortly"
                )
            first = self.raft_log.last_index() + 1
            for i, e in enumerate(m.entries):
                if e.type == EntryType.CONF_CHANGE:
                    if self.pending_conf_index > self.raft_log.applied:
                        raise ProposalDropped(
                            f"a membership change (index {self.pending_conf_index}) is still being applied; "
                            "propose the next one after it"
                        )
                    self.pending_conf_index = first + i
            self._append_entries(m.entries)
            self._bcast_append()
            return
        if t == M.READ_INDEX:
            if self.prs.is_singleton():
                resp = self._response_to_read_index_req(m, self.raft_log.committed)
                if resp is not None:
                    self._send(resp)
                return
            if not self._committed_entry_in_current_term():
                # Until our first entry commits we do not know the true commit index (thesis §6.4 step 1).
                self.pending_read_index_messages.append(m)
                return
            self._send_read_index_response(m)
            return

        pr = self.prs.progress.get(m.frm)
        if pr is None:
            return
        if t == M.APP_RESP:
            pr.recent_active = True
            if m.reject:
                next_probe = m.reject_hint
                if m.log_term > 0:
                    next_probe = self.raft_log.find_conflict_by_term(m.reject_hint, m.log_term)
                if pr.maybe_decr_to(m.index, next_probe):
                    if pr.state == ProgressState.REPLICATE:
                        pr.become_probe()
                    self._send_append(m.frm)
                return
            old_paused = pr.is_paused()
            if not pr.maybe_update(m.index):
                return
            if pr.state == ProgressState.PROBE:
                pr.become_replicate()
            elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                pr.become_probe()
                pr.become_replicate()
            elif pr.state == ProgressState.REPLICATE:
                pr.inflights.free_le(m.index)
            if self._maybe_commit():
                self._release_pending_read_index_messages()
                self._bcast_append()
            elif old_paused:
                self._send_append(m.frm)
            # Keep the pipeline full: send everything the window allows.
            while self._maybe_send_append(m.frm, False):
                pass
            if m.frm == self.lead_transferee and pr.match == self.raft_log.last_index():
                self._send_timeout_now(m.frm)
            return
        if t == M.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state == ProgressState.REPLICATE and pr.inflights.full():
                pr.inflights.free_first_one()
            if pr.match < self.raft_log.last_index():
                self._send_append(m.frm)
            if self.read_only.option != ReadOnlyOption.SAFE or not m.context:
                return
            acks = self.read_only.recv_ack(m.frm, m.context)
            if acks is None or self.prs.voters.vote_result(acks) != VoteResult.WON:
                return
            for rs in self.read_only.advance(m.context):
                resp = self._response_to_read_index_req(rs.req, rs.index)
                if resp is not None:
                    self._send(resp)
            return
        if t == M.SNAP_STATUS:
            if pr.state != ProgressState.SNAPSHOT:
                return
            if m.reject:
                pr.pending_snapshot = 0
            pr.become_probe()
            # Wait for a heartbeat response before probing again (the snapshot may still be in flight).
            pr.probe_sent = True
            return
        if t == M.UNREACHABLE:
            if pr.state == ProgressState.REPLICATE:
                pr.become_probe()
            return
        if t == M.TRANSFER_LEADER:
            if pr.is_learner:
                return
            transferee = m.frm
            if self.lead_transferee != NONE:
                if self.lead_transferee == transferee:
                    return
                self.abort_leader_transfer()
            if transferee == self.id:
                return
            # The transfer must finish within one election timeout, or it is aborted (see _tick_heartbeat).
            self.election_elapsed = 0
            self.lead_transferee = transferee
            if pr.match == self.raft_log.last_index():
                self._send_timeout_now(transferee)
            else:
                self._send_append(transferee)
            return

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        my_vote_resp = M.PRE_VOTE_RESP if self.state == StateType.PRE_CANDIDATE else M.VOTE_RESP
        if t == M.PROP:
            raise NotLeader(NONE, self.id)
        if t == M.APP:
            self.become_follower(m.term, m.frm)
            self._handle_append_entries(m)
        elif t == M.HEARTBEAT:
            self.become_follower(m.term, m.frm)
            self._handle_heartbeat(m)
        elif t == M.SNAP:
            self.become_follower(m.term, m.frm)
            self._handle_snapshot(m)
        elif t == my_vote_resp:
            result = self._poll(m.frm, not m.reject)
            if result == VoteResult.WON:
                if self.state == StateType.PRE_CANDIDATE:
                    self._campaign(CAMPAIGN_ELECTION)
                else:
                    self.become_leader()
                    self._bcast_append()
            elif result == VoteResult.LOST:
                self.become_follower(self.term, NONE)
        elif t == M.READ_INDEX and m.frm in (NONE, self.id):
            raise NotLeader(NONE, self.id)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == M.APP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append_entries(m)
        elif t == M.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif t == M.SNAP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif t == M.PROP:
            raise NotLeader(self.lead, self.id)
        elif t == M.TRANSFER_LEADER:
            if self.lead != NONE:
                self._send(Message(M.TRANSFER_LEADER, to=self.lead, frm=m.frm))
        elif t == M.TIMEOUT_NOW:
            # Leadership transfer never uses pre-vote: the old leader asked us to take over now.
            if self._promotable():
                self._hup(CAMPAIGN_TRANSFER)
        elif t == M.READ_INDEX:
            if self.lead == NONE:
                if m.frm in (NONE, self.id):
                    raise NotLeader(NONE, self.id)
                return
            self._send(
                Message(
                    M.READ_INDEX, to=self.lead, frm=self.id if m.frm == NONE else m.frm, context=m.context
                )
            )
        elif t == M.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))

    # -- follower handlers -----------------------------------------------------------------------------------

    def _handle_append_entries(self, m: Message) -> None:
        log = self.raft_log
        if m.index < log.committed:
            self._send(Message(M.APP_RESP, to=m.frm, frm=self.id, term=self.term, index=log.committed))
            return
        last_new = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(Message(M.APP_RESP, to=m.frm, frm=self.id, term=self.term, index=last_new))
            return
        # Reject, with a hint that lets the leader skip a whole conflicting term at once.
        hint_index = log.find_conflict_by_term(min(m.index, log.last_index()), m.log_term)
        hint_term = log.zero_term_on_compacted(hint_index)
        self._send(
            Message(
                M.APP_RESP,
                to=m.frm,
                frm=self.id,
                term=self.term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self.raft_log.commit_to(m.commit)
        self._send(Message(M.HEARTBEAT_RESP, to=m.frm, frm=self.id, term=self.term, context=m.context))

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        if snap is None:
            return
        idx = self.raft_log.last_index() if self._restore(snap) else self.raft_log.committed
        self._send(Message(M.APP_RESP, to=m.frm, frm=self.id, term=self.term, index=idx))

    def _restore(self, snap: Snapshot) -> bool:
        """Install a leader's snapshot; False if we already have everything it covers."""
        log = self.raft_log
        if snap.index <= log.committed:
            return False
        if self.state != StateType.FOLLOWER:
            raise RaftError(f"node {self.id:x}: restoring a snapshot as {self.state.name}")
        if log.match_term(snap.index, snap.term):
            # Our log already contains the snapshot's last entry: just fast-forward the commit index.
            log.commit_to(snap.index)
            return False
        log.restore(snap)
        self.prs = ProgressTracker(self.prs.max_inflight, self.prs.max_inflight_bytes)
        self._restore_conf_state(snap.metadata.conf_state)
        return True

    # -- membership ------------------------------------------------------------------------------------------

    def _restore_conf_state(self, cs: ConfState) -> None:
        last = self.raft_log.last_index()
        prs = self.prs
        prs.voters = MajorityConfig(cs.voters)
        prs.learners = frozenset(cs.learners)
        prs.progress = {}
        for node_id in (*cs.voters, *cs.learners):
            pr = prs.new_progress(0, last + 1, node_id in prs.learners)
            if node_id == self.id:
                pr.match = last
            prs.progress[node_id] = pr
        self._after_conf_switch()

    def _after_conf_switch(self) -> None:
        pr = self.prs.progress.get(self.id)
        self.is_learner = pr is not None and pr.is_learner

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed single-server change; returns the new membership (store it with snapshots)."""
        prs = self.prs
        nid = cc.node_id
        voters = set(prs.voters.voters)
        learners = set(prs.learners)
        last = self.raft_log.last_index()
        if cc.type == ConfChangeType.ADD_NODE:
            if nid not in voters:
                learners.discard(nid)
                voters.add(nid)
        elif cc.type == ConfChangeType.ADD_LEARNER:
            if nid not in learners:
                voters.discard(nid)
                learners.add(nid)
        elif cc.type == ConfChangeType.REMOVE_NODE:
            voters.discard(nid)
            learners.discard(nid)
        prs.voters = MajorityConfig(voters)
        prs.learners = frozenset(learners)
        for node_id in list(prs.progress):
            if node_id not in voters and node_id not in learners:
                del prs.progress[node_id]
        added: list[int] = []
        for node_id in (*voters, *learners):
            pr = prs.progress.get(node_id)
            if pr is None:
                added.append(node_id)
                pr = prs.new_progress(0, last + 1, node_id in learners)
                # A new member counts as active, or check-quorum could depose us before it ever answers.
                pr.recent_active = True
                if node_id == self.id:
                    pr.match = last
                prs.progress[node_id] = pr
            else:
                pr.is_learner = node_id in learners
        self._after_conf_switch()
        cs = prs.conf_state()

        if self.state != StateType.LEADER:
            return cs
        if self.id not in voters:
            # Removed (or demoted) leader: step down; the remaining voters elect a new leader.
            self.become_follower(self.term, NONE)
            return cs
        if not voters:
            return cs
        if self._maybe_commit():
            # The quorum may have shrunk: entries can commit now.
            self._bcast_append()
        else:
            for node_id in prs.progress:
                if node_id != self.id:
                    # Probe new members right away instead of waiting for the next heartbeat.
                    self._maybe_send_append(node_id, node_id in added)
        if self.lead_transferee != NONE and self.lead_transferee not in voters:
            self.abort_leader_transfer()
        return cs
