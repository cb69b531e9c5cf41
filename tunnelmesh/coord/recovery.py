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

Backups: ``AdminService.SaveSnapshot`` streams the replicated state of a running cluster (after a read
barrier); ``write_backup`` / ``read_backup`` keep it in a checksummed file, and ``restore_backup`` does what
force-new-cluster does, with the backup's state instead of the store's own (``tunnelmesh cluster snapshot
save|inspect|restore``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from tunnelmesh.api.v1 import admin_pb2
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
BACKUP_MAGIC = b"TMBACKUP1\n"


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
    me, cluster_id = _identity(storage)
    if storage.snapshot().is_empty():
        raise RecoveryError(
            f"{storage.data_dir}: this coordinator never received the cluster's state (no snapshot): "
            "recover from another member's data dir"
        )
    registry, state, replayed = _replay(storage)
    if me not in registry.members:
        raise RecoveryError(
            f"{storage.data_dir}: member {member_label(me)} is not in its cluster's configuration (it was "
            "removed, or never finished joining): recover from another member's data dir"
        )
    hs = storage.hard_state
    last = storage.last_index()
    others = tuple(sorted(m for m in registry.members if m != me))
    index, term = last + 1, hs.term
    _install_sole_voter(
        storage,
        index,
        term,
        Registry({me: registry.members[me]}, registry.removed | set(others)),
        state.snapshot(),
    )
    log.warning(
        "event=raft_forced_new_cluster cluster=%s member=%x index=%d term=%d replayed=%d commit_before=%d "
        "removed=%s",
        cluster_id,
        me,
        index,
        term,
        replayed,
        hs.commit,
        ",".join(member_label(m) for m in others) or "none",
    )
    return Recovered(cluster_id, me, index, term, replayed, hs.commit, others)


# -- backups ------------------------------------------------------------------------------------------------


def write_backup(path: Path, info: admin_pb2.SnapshotInfo, data: bytes, sha256: bytes) -> None:
    """Write a backup file atomically (a temporary file in the same directory, then rename), readable only by
    its owner: it holds token hashes and every KV value. Raises RecoveryError if ``sha256`` does not match
    ``data`` or ``info.size`` (a stream cut short or corrupted on the way), writing nothing."""
    _verify(info, data, sha256, f"snapshot from {info.taken_by or 'the coordinator'}")
    body = BACKUP_MAGIC + admin_pb2.ClusterBackup(info=info, data=data, sha256=sha256).SerializeToString()
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_backup(path: Path) -> admin_pb2.ClusterBackup:
    """A backup file, checked (magic, decodable, size and SHA-256 of its data); else RecoveryError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecoveryError(f"{path}: cannot read: {exc.strerror}") from None
    if not raw.startswith(BACKUP_MAGIC):
        raise RecoveryError(
            f"{path}: not a TunnelMesh backup (written by `tunnelmesh cluster snapshot save`)"
        )
    try:
        backup = admin_pb2.ClusterBackup.FromString(raw[len(BACKUP_MAGIC) :])
    except DecodeError:
        raise RecoveryError(f"{path}: truncated or corrupted backup (does not decode)") from None
    _verify(backup.info, backup.data, backup.sha256, str(path))
    try:
        decode_snapshot(backup.data)
    except RaftError as exc:
        raise RecoveryError(f"{path}: {exc}") from None
    return backup


def _verify(info: admin_pb2.SnapshotInfo, data: bytes, sha256: bytes, what: str) -> None:
    if not info.cluster_id:
        raise RecoveryError(f"{what}: no snapshot header (cluster id)")
    if len(data) != info.size:
        raise RecoveryError(f"{what}: {len(data)} bytes of data, the header says {info.size}: incomplete")
    if hashlib.sha256(data).digest() != sha256:
        raise RecoveryError(f"{what}: SHA-256 of the data does not match: corrupted")


def restore_backup(raft_dir: Path, backup: admin_pb2.ClusterBackup) -> Recovered:
    """Rewrite the Raft store in ``raft_dir`` (a stopped coordinator of the backup's cluster) into the only
    voter of a cluster whose state is the backup's: what the store held beyond it is dropped, and so is every
    other member (as with force-new-cluster). The new snapshot's index is past both the backup's and the
    store's last index, so Raft indexes (and the nodes' config versions) never go backwards."""
    storage = SqliteStorage.open(raft_dir)
    try:
        me, cluster_id = _identity(storage)
        if cluster_id != backup.info.cluster_id:
            raise RecoveryError(
                f"{storage.data_dir}: this coordinator belongs to cluster {cluster_id}, the backup to "
                f"{backup.info.cluster_id}: restore it into a data dir of its own cluster"
            )
        saved, state_bytes = decode_snapshot(backup.data)
        local, _, _ = _replay(storage, with_state=False)  # its own member record and removed ids
        if me in saved.removed or me in local.removed:
            raise RecoveryError(
                f"{storage.data_dir}: member {member_label(me)} was removed from the cluster: restore into "
                "another member's data dir"
            )
        record = saved.members.get(me) or local.members.get(me)
        if record is None:
            raise RecoveryError(
                f"{storage.data_dir}: member {member_label(me)} never finished joining the cluster: restore "
                "into another member's data dir"
            )
        others = tuple(sorted((set(saved.members) | set(local.members)) - {me}))
        hs = storage.hard_state
        index = max(storage.last_index(), backup.info.index) + 1
        term = max(hs.term, backup.info.term)
        registry = Registry({me: record}, saved.removed | local.removed | set(others))
        _install_sole_voter(storage, index, term, registry, state_bytes)
    finally:
        storage.close()
    log.warning(
        "event=raft_restored_from_backup cluster=%s member=%x index=%d term=%d backup_index=%d removed=%s",
        cluster_id,
        me,
        index,
        term,
        backup.info.index,
        ",".join(member_label(m) for m in others) or "none",
    )
    return Recovered(cluster_id, me, index, term, 0, hs.commit, others)


def _identity(storage: SqliteStorage) -> tuple[int, str]:
    ident = storage.identity
    if ident.cluster_id is None or ident.member_id is None:
        raise RecoveryError(f"{storage.data_dir}: the Raft store has no cluster/member identity")
    return ident.member_id, ident.cluster_id


def _replay(storage: SqliteStorage, *, with_state: bool = True) -> tuple[Registry, MeshState, int]:
    """The member registry and mesh state after the snapshot plus every entry of the log, committed or not
    (see the module docstring), and how many entries that replayed. ``with_state`` False: the registry only
    (the mesh state stays empty)."""
    snap = storage.snapshot()
    registry, state_bytes = decode_snapshot(snap.data)
    state = MeshState.from_snapshot(state_bytes) if state_bytes and with_state else MeshState()
    last = storage.last_index()
    replayed = 0
    lo = snap.index + 1
    while lo <= last:
        hi = min(last + 1, lo + _READ_CHUNK)
        for e in storage.entries(lo, hi):
            if e.type == EntryType.CONF_CHANGE:
                registry.apply_change(ConfChange.decode(e.data))
            elif with_state and e.index > state.applied_index:
                state.apply(e.index, e.data)
            replayed += 1
        lo = hi
    return registry, state, replayed


def _install_sole_voter(
    storage: SqliteStorage, index: int, term: int, registry: Registry, state: bytes
) -> None:
    """Replace the log with a snapshot at ``index`` whose only voter is this member (``registry`` holds just
    its record). A vote cast in an older term does not carry over to a newer one."""
    (me,) = registry.members
    hs = storage.hard_state
    snapshot = Snapshot(
        SnapshotMetadata(index=index, term=term, conf_state=ConfState(voters=(me,))),
        encode_snapshot(registry, state),
    )
    vote = hs.vote if term == hs.term else 0
    storage.save(HardState(term=term, vote=vote, commit=index), (), snapshot)
