"""An in-memory ``LogStore``: the reference implementation of the storage contract, used by tests and the
simulator.

Layout as in etcd: ``self._ents[0]`` is a dummy entry at the snapshot's index and term; real entries follow
it.
"""

from __future__ import annotations

from tunnelmesh.coord.raft.errors import (
    CompactedError,
    RaftError,
    SnapOutOfDateError,
    UnavailableError,
)
from tunnelmesh.coord.raft.messages import (
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
    entry_size,
)


def limit_size(ents: list[Entry], max_size: int | None) -> list[Entry]:
    """The longest prefix of ``ents`` within ``max_size`` bytes, but never fewer than one entry."""
    if max_size is None or len(ents) <= 1:
        return ents
    size = entry_size(ents[0])
    for i in range(1, len(ents)):
        size += entry_size(ents[i])
        if size > max_size:
            return ents[:i]
    return ents


class MemoryStorage:
    def __init__(self) -> None:
        self.hard_state = HardState()
        self._snapshot = Snapshot()
        self._ents: list[Entry] = [Entry(0, 0)]

    @classmethod
    def bootstrap(cls, voters: list[int] | tuple[int, ...], learners: tuple[int, ...] = ()) -> MemoryStorage:
        """A store for a founding member: a snapshot at index 1, term 1 that carries the initial membership.

        Every founding member must be bootstrapped identically; members added later start from an empty store
        and receive the membership through the leader's snapshot and log.
        """
        s = cls()
        conf = ConfState(voters=tuple(sorted(voters)), learners=tuple(sorted(learners)))
        s.apply_snapshot(Snapshot(SnapshotMetadata(index=1, term=1, conf_state=conf)))
        s.set_hard_state(HardState(term=1, vote=0, commit=1))
        return s

    # -- Storage (read side) ---------------------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self._snapshot.metadata.conf_state

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(f"entries [{lo}, {hi}) requested but the log is compacted up to {offset}")
        if hi > self.last_index() + 1:
            raise UnavailableError(
                f"entries [{lo}, {hi}) requested but the last index is {self.last_index()}"
            )
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def term(self, i: int) -> int:
        offset = self._ents[0].index
        if i < offset:
            raise CompactedError(f"term of {i} requested but the log is compacted up to {offset}")
        if i - offset >= len(self._ents):
            raise UnavailableError(f"term of {i} requested but the last index is {self.last_index()}")
        return self._ents[i - offset].term

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- LogStore (driver side) ------------------------------------------------------------------------------

    def set_hard_state(self, hs: HardState) -> None:
        self.hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        if snap.index <= self._snapshot.index:
            raise SnapOutOfDateError(
                f"snapshot at {snap.index} is not newer than the stored {self._snapshot.index}"
            )
        self._snapshot = snap
        self._ents = [Entry(snap.index, snap.term)]

    def create_snapshot(self, index: int, conf_state: ConfState | None, data: bytes) -> Snapshot:
        """Record the application's snapshot at ``index`` (<= the applied index); the log is left as it is."""
        if index <= self._snapshot.index:
            raise SnapOutOfDateError(
                f"snapshot at {index} is not newer than the stored {self._snapshot.index}"
            )
        if index > self.last_index():
            raise RaftError(f"snapshot at {index} is past the last index {self.last_index()}")
        offset = self._ents[0].index
        if index < offset:
            # Its term is gone with the compacted entries; a negative list index would invent one.
            raise CompactedError(f"snapshot at {index}: entries up to {offset} are already compacted")
        conf = conf_state if conf_state is not None else self._snapshot.metadata.conf_state
        meta = SnapshotMetadata(index=index, term=self._ents[index - offset].term, conf_state=conf)
        self._snapshot = Snapshot(meta, data)
        return self._snapshot

    def compact(self, compact_index: int) -> None:
        """Drop entries up to ``compact_index`` (which becomes the new dummy); the application must not
        compact past its applied index."""
        offset = self._ents[0].index
        if compact_index <= offset:
            raise CompactedError(f"cannot compact to {compact_index}: already compacted up to {offset}")
        if compact_index > self.last_index():
            raise RaftError(f"cannot compact to {compact_index}: past the last index {self.last_index()}")
        i = compact_index - offset
        dummy = Entry(self._ents[i].index, self._ents[i].term)
        self._ents = [dummy, *self._ents[i + 1 :]]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        if not entries:
            return
        first = self.first_index()
        last = entries[-1].index
        if last < first:
            return  # everything is already compacted away
        ents = list(entries)
        if first > ents[0].index:
            ents = ents[first - ents[0].index :]
        offset = ents[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise RaftError(f"missing log entry: last index {self.last_index()}, appended at {ents[0].index}")
        del self._ents[offset:]
        self._ents.extend(ents)
