"""Disaster recovery: make one surviving coordinator the only member of its cluster (force-new-cluster).

When a majority of the voters is lost for good (a region gone, disks destroyed), the survivors can never
commit again: Raft needs a quorum of the configuration it has. ``force_new_cluster`` rewrites one survivor's
Raft store offline (the coordinator must be stopped: opening the store takes the data dir's lock) so that it
starts as the only voter of the same cluster (same cluster id, CA, join secret, nodes, tokens and KV data):

1. The state is rebuilt from the latest snapshot plus **every entry in the survivor's log**, committed or
   not, in order: NORMAL entries are applied to the mesh state, membership changes to the member registry.
   Taking the uncommitted tail too is what would happen had this member won an election (its log becomes the
   cluster's): it keeps every write this member holds. A write the lost members had acknowledged but never
   replicated here is gone: that is the price of a forced recovery, and why it is only for a majority that
   will not return.
2. A snapshot at index ``last + 1`` (term: the current term) with this member as the only voter replaces the
   log. Every other member id goes to the registry's removed list: a lost coordinator that comes back is
   ignored (its messages are dropped) and can only rejoin wiped, under a new id, as any removed member.

Afterwards the coordinator is started as usual: it elects itself within an election timeout, and new
coordinators join it with ``--seed``. Run this once: on a cluster that has grown again it would remove the
new members too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tunnelmesh.coord.raft.driver import Registry, decode_snapshot, encode_snapshot
from tunnelmesh.coord.raft.errors import RaftError
from tunnelmesh.coord.raft.messages import (
    ConfChange,
    ConfState,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)
from tunnelmesh.coord.raft.storage import SqliteStorage
from tunnelmesh.coord.raft.transport import member_label
from tunnelmesh.coord.state import MeshState

log = logging.getLogger(__name__)

_READ_CHUNK = 1024  # entries per read while replaying


class RecoveryError(RaftError):
    """The data dir cannot be turned into a single-member cluster (the message says why)."""


@dataclass(frozen=True, slots=True)
class Recovered:
    cluster_id: str
    member_id: int
    index: int  # the new snapshot's index
    term: int
    replayed: int  # log entries replayed on top of the old snapshot
    committed_before: int  # the commit index this member had seen
    removed: tuple[int, ...]  # member ids dropped from the configuration


def force_new_cluster(raft_dir: Path) -> Recovered:
    """Rewrite the Raft store in ``raft_dir`` (``<data-dir>/raft``) as described in the module docstring."""
    storage = SqliteStorage.open(raft_dir)
    try:
        return _rewrite(storage)
    finally:
        storage.close()


def _rewrite(storage: SqliteStorage) -> Recovered:
    ident = storage.identity
    if ident.cluster_id is None or ident.member_id is None:
        raise RecoveryError(f"{storage.data_dir}: the Raft store has no cluster/member identity")
    me = ident.member_id
    snap = storage.snapshot()
    if snap.is_empty():
        raise RecoveryError(
            f"{storage.data_dir}: this coordinator never received the cluster's state (no snapshot): "
            "recover from another member's data dir"
        )
    registry, state_bytes = decode_snapshot(snap.data)
    state = MeshState.from_snapshot(state_bytes) if state_bytes else MeshState()
    hs = storage.hard_state
    last = storage.last_index()
    replayed = 0
    lo = snap.index + 1
    while lo <= last:
        hi = min(last + 1, lo + _READ_CHUNK)
        for e in storage.entries(lo, hi):
            if e.type == EntryType.CONF_CHANGE:
                registry.apply_change(ConfChange.decode(e.data))
            elif e.index > state.applied_index:
                state.apply(e.index, e.data)
            replayed += 1
        lo = hi
    if me not in registry.members:
        raise RecoveryError(
            f"{storage.data_dir}: member {member_label(me)} is not in its cluster's configuration (it was "
            "removed, or never finished joining): recover from another member's data dir"
        )
    others = tuple(sorted(m for m in registry.members if m != me))
    new_registry = Registry({me: registry.members[me]}, registry.removed | set(others))
    index, term = last + 1, hs.term
    snapshot = Snapshot(
        SnapshotMetadata(index=index, term=term, conf_state=ConfState(voters=(me,))),
        encode_snapshot(new_registry, state.snapshot()),
    )
    storage.save(HardState(term=term, vote=hs.vote, commit=index), (), snapshot)
    log.warning(
        "event=raft_forced_new_cluster cluster=%s member=%x index=%d term=%d replayed=%d commit_before=%d "
        "removed=%s",
        ident.cluster_id,
        me,
        index,
        term,
        replayed,
        hs.commit,
        ",".join(member_label(m) for m in others) or "none",
    )
    return Recovered(ident.cluster_id, me, index, term, replayed, hs.commit, others)
