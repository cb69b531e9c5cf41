"""Helpers for directed Raft tests: build ``Raft`` cores and pump messages between them synchronously.

``Network`` is etcd's test network: ``send`` delivers a message and every message it causes, breadth-first,
until the network is quiet; links can be cut, nodes isolated, and message types ignored. Entries stay unstable
(no driver persists them) unless a test persists them explicitly with ``persist``.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from tunnelmesh.coord.raft.core import Config, Raft
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import (
    ConfState,
    Entry,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

M = MessageType


def storage_with(
    peers: list[int], learners: tuple[int, ...] = (), ents: list[Entry] | None = None
) -> MemoryStorage:
    """A store whose snapshot at index 0 carries the membership (so the log proper starts at 1)."""
    s = MemoryStorage()
    s._snapshot = Snapshot(SnapshotMetadata(0, 0, ConfState(tuple(sorted(peers)), tuple(sorted(learners)))))
    if ents:
        s.append(ents)
    return s


def new_raft(
    node_id: int,
    peers: list[int],
    election: int = 10,
    heartbeat: int = 1,
    storage: MemoryStorage | None = None,
    seed: int = 0,
    **cfg: Any,
) -> Raft:
    st = storage if storage is not None else storage_with(peers)
    cfg.setdefault("check_quorum", False)
    cfg.setdefault("pre_vote", False)
    config = Config(id=node_id, election_tick=election, heartbeat_tick=heartbeat, **cfg)
    return Raft(config, st, random.Random(seed * 1000 + node_id))


def read_messages(r: Raft) -> list[Message]:
    r.flush()
    msgs, r.msgs = r.msgs, []
    return msgs


def persist(r: Raft) -> None:
    """Do what a driver does with the unstable part of a Ready (entries and hard state, not messages)."""
    st = r.raft_log.storage
    assert isinstance(st, MemoryStorage)
    ents = r.raft_log.unstable_entries()
    if r.raft_log.unstable.snapshot is not None:
        snap = r.raft_log.unstable.snapshot
        st.apply_snapshot(snap)
        r.raft_log.stable_snap_to(snap.index)
    if ents:
        last = ents[-1]
        st.append(list(ents))
        r.raft_log.stable_to(last.index, last.term)
    st.set_hard_state(r.hard_state())


def ents_with_terms(*terms: int, start: int = 1) -> list[Entry]:
    return [Entry(start + i, t) for i, t in enumerate(terms)]


def commit_noop_entry(r: Raft, s: MemoryStorage) -> None:
    """Make a freshly elected leader ``r`` commit its empty entry, as if every follower acknowledged it."""
    assert r.state.name == "LEADER"
    r._bcast_append()
    for m in read_messages(r):
        assert m.type == M.APP and len(m.entries) == 1 and not m.entries[0].data
        r.step(Message(M.APP_RESP, frm=m.to, to=r.id, term=r.term, index=m.entries[-1].index))
    read_messages(r)
    s.append(r.raft_log.unstable_entries())
    r.raft_log.applied_to(r.raft_log.committed)
    r.raft_log.stable_to(r.raft_log.last_index(), r.raft_log.last_term())


class Network:
    def __init__(self, *nodes: Raft | None, ids: list[int] | None = None, **cfg: Any) -> None:
        """``None`` in ``nodes`` makes a fresh default node; ids are 1..n."""
        n = len(nodes)
        peers = ids if ids is not None else list(range(1, n + 1))
        self.peers: dict[int, Raft] = {}
        self.storage: dict[int, MemoryStorage] = {}
        for node_id, r in zip(peers, nodes, strict=True):
            if r is None:
                st = storage_with(peers)
                r = new_raft(node_id, peers, storage=st, **cfg)
            self.peers[node_id] = r
            store = r.raft_log.storage
            assert isinstance(store, MemoryStorage)
            self.storage[node_id] = store
        self.dropped: set[tuple[int, int]] = set()
        self.ignored: set[MessageType] = set()
        self.delivered: list[Message] = []

    def cut(self, a: int, b: int) -> None:
        self.dropped.add((a, b))
        self.dropped.add((b, a))

    def isolate(self, node_id: int) -> None:
        for other in self.peers:
            if other != node_id:
                self.cut(node_id, other)

    def ignore(self, t: MessageType) -> None:
        self.ignored.add(t)

    def recover(self) -> None:
        self.dropped.clear()
        self.ignored.clear()

    def _filter(self, msgs: list[Message]) -> list[Message]:
        return [m for m in msgs if (m.frm, m.to) not in self.dropped and m.type not in self.ignored]

    def send(self, *msgs: Message) -> None:
        q = deque(msgs)
        while q:
            m = q.popleft()
            r = self.peers.get(m.to)
            if r is None:
                continue
            self.delivered.append(m)
            r.step(m)
            q.extend(self._filter(read_messages(r)))

    def hup(self, node_id: int) -> None:
        self.send(Message(M.HUP, frm=node_id, to=node_id))

    def propose(self, node_id: int, data: bytes = b"somedata") -> None:
        self.send(Message(M.PROP, frm=node_id, to=node_id, entries=(Entry(0, 0, data=data),)))

    def hard_states(self) -> dict[int, HardState]:
        return {i: r.hard_state() for i, r in self.peers.items()}
