"""The storage contract between the Raft core and whatever keeps the log on disk.

``Storage`` is what the core reads (etcd's ``raft.Storage``); ``LogStore`` adds the writes the *driver*
performs while handling a ``Ready``. ``MemoryStorage`` implements both for tests and the simulator; the
durable SQLite store implements the same protocol. Conventions (all indexes inclusive unless stated):

* The store keeps a *dummy* position just before its first entry: the last index covered by its snapshot (0
  for a fresh log). ``term(first_index() - 1)`` must answer with that snapshot's term.
* ``entries(lo, hi, max_size)`` returns ``[lo, hi)``, at most ``max_size`` bytes as counted by
  ``messages.entry_size`` but always at least one entry; it raises ``CompactedError`` when ``lo`` precedes the
  first index and ``UnavailableError`` when ``hi`` is past ``last_index() + 1``.
* ``term(i)`` raises ``CompactedError`` below the dummy index and ``UnavailableError`` past the last index.
* ``snapshot()`` returns the most recent snapshot (may raise ``SnapshotTemporarilyUnavailable``).
* Writes must be durable (fsynced) when the method returns; ``append`` and ``set_hard_state`` of one ``Ready``
  should be one transaction. ``append`` truncates any existing suffix that the new entries overwrite.
"""

from __future__ import annotations

from typing import Protocol

from tunnelmesh.coord.raft.messages import ConfState, Entry, HardState, Snapshot


class Storage(Protocol):
    """Read side used by the core."""

    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]: ...

    def term(self, i: int) -> int: ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


class LogStore(Storage, Protocol):
    """Write side used by the driver while it handles a ``Ready`` (and by the application to compact)."""

    def set_hard_state(self, hs: HardState) -> None: ...

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None: ...

    def apply_snapshot(self, snap: Snapshot) -> None: ...

    def create_snapshot(self, index: int, conf_state: ConfState | None, data: bytes) -> Snapshot: ...

    def compact(self, compact_index: int) -> None: ...
