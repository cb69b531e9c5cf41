"""What the leader knows about each follower, and flow control of the appends it sends them.

A follower's ``Progress`` is in one of three states (etcd's tracker):

* PROBE: the leader does not know where the follower's log matches; it sends one append at a time (then pauses
  until a response or a heartbeat response arrives) and backs ``next`` off on rejection.
* REPLICATE: the logs match up to ``match``; the leader streams appends optimistically (``next`` advances as
  soon as it sends), limited by ``Inflights``: at most ``max_inflight`` messages / ``max_inflight_bytes``
  unacknowledged.
* SNAPSHOT: the follower needs a snapshot; nothing else is sent until the snapshot is reported applied or
  failed.

``ProgressTracker`` holds all followers' progress plus the voter/learner sets and the votes of an election.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator

from tunnelmesh.coord.raft.errors import RaftError
from tunnelmesh.coord.raft.messages import ConfState
from tunnelmesh.coord.raft.quorum import MajorityConfig, VoteResult


class ProgressState(enum.Enum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """A sliding window of appends sent but not yet acknowledged: ``(last index, bytes)`` per message."""

    __slots__ = ("_bytes", "_q", "max_bytes", "size")

    def __init__(self, size: int, max_bytes: int = 0) -> None:
        if size <= 0:
            raise RaftError(f"inflight window must hold at least one message, got {size}")
        self.size = size
        self.max_bytes = max_bytes  # 0: no byte limit
        self._q: deque[tuple[int, int]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._q)

    @property
    def bytes(self) -> int:
        return self._bytes

    def add(self, index: int, nbytes: int) -> None:
        if self.full():
            raise RaftError("cannot add into a full inflight window")
        self._q.append((index, nbytes))
        self._bytes += nbytes

    def free_le(self, index: int) -> None:
        """Acknowledge every message whose last index is <= ``index``."""
        q = self._q
        while q and q[0][0] <= index:
            self._bytes -= q.popleft()[1]

    def free_first_one(self) -> None:
        if self._q:
            self._bytes -= self._q.popleft()[1]

    def full(self) -> bool:
        return len(self._q) >= self.size or (self.max_bytes > 0 and self._bytes >= self.max_bytes)

    def reset(self) -> None:
        self._q.clear()
        self._bytes = 0


class Progress:
    __slots__ = (
        "inflights",
        "is_learner",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "state",
    )

    def __init__(self, match: int, next_index: int, inflights: Inflights, is_learner: bool = False) -> None:
        self.match = match
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = False
        self.probe_sent = False
        self.inflights = inflights
        self.is_learner = is_learner

    def __repr__(self) -> str:
        s = f"{self.state.name} match={self.match} next={self.next}"
        if self.is_learner:
            s += " learner"
        if self.state == ProgressState.SNAPSHOT:
            s += f" pending_snapshot={self.pending_snapshot}"
        if self.probe_sent:
            s += " paused"
        if self.inflights:
            s += f" inflight={len(self.inflights)}"
        return s

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        """Back to probing; after a snapshot, resume right after it."""
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def sent_entries(self, last_index: int | None, nbytes: int) -> None:
        """Account for an append just sent (``last_index`` None when it carried no entries)."""
        if self.state == ProgressState.REPLICATE:
            if last_index is not None:
                self.next = last_index + 1
                self.inflights.add(last_index, nbytes)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True
        else:
            raise RaftError(f"sending append in unhandled progress state {self.state.name}")

    def maybe_update(self, n: int) -> bool:
        """A follower acknowledged index ``n``; False if the ack is stale."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        self.next = max(self.next, n + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A follower rejected an append at ``rejected``; back off ``next``. False if the rejection is
        stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True


class ProgressTracker:
    """Voters, learners, per-node progress and election votes."""

    __slots__ = ("learners", "max_inflight", "max_inflight_bytes", "progress", "voters", "votes")

    def __init__(self, max_inflight: int, max_inflight_bytes: int = 0) -> None:
        self.voters = MajorityConfig()
        self.learners: frozenset[int] = frozenset()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes

    def new_progress(self, match: int, next_index: int, is_learner: bool) -> Progress:
        return Progress(match, next_index, Inflights(self.max_inflight, self.max_inflight_bytes), is_learner)

    def conf_state(self) -> ConfState:
        return ConfState(voters=tuple(sorted(self.voters.voters)), learners=tuple(sorted(self.learners)))

    def is_singleton(self) -> bool:
        return len(self.voters) == 1

    def __iter__(self) -> Iterator[tuple[int, Progress]]:
        return iter(sorted(self.progress.items()))

    def committed(self) -> int:
        """The highest index replicated on a majority of voters."""
        prs = self.progress
        return self.voters.committed_index({v: prs[v].match for v in self.voters.voters if v in prs})

    def quorum_active(self) -> bool:
        """Check-quorum: did a majority of voters (the leader counts itself) talk to us recently?"""
        votes = {v: self.progress[v].recent_active for v in self.voters.voters if v in self.progress}
        return self.voters.vote_result(votes) == VoteResult.WON

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, node_id: int, granted: bool) -> None:
        self.votes.setdefault(node_id, granted)

    def tally_votes(self) -> tuple[int, int, VoteResult]:
        granted = sum(1 for v in self.voters.voters if self.votes.get(v) is True)
        rejected = sum(1 for v in self.voters.voters if self.votes.get(v) is False)
        return granted, rejected, self.voters.vote_result(self.votes)
