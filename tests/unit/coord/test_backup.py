"""Backup files and restoring a stopped coordinator's Raft store from one (coord/recovery.py), on real SQLite
stores. The end-to-end path (SaveSnapshot over the API, real processes) is in
tests/integration/test_coord_recovery.py."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.api.v1 import admin_pb2, state_pb2
from tunnelmesh.coord.raft.driver import Registry, decode_snapshot, encode_snapshot
from tunnelmesh.coord.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from tunnelmesh.coord.raft.storage import SqliteStorage
from tunnelmesh.coord.recovery import RecoveryError, read_backup, restore_backup, write_backup
from tunnelmesh.coord.state import MeshState, encode_command

A, B, C = 0xA1, 0xB2, 0xC3
CLUSTER = "c-test"


def _put(key: str, value: str) -> bytes:
    return encode_command(state_pb2.KvPut(key=key.encode(), value=value.encode()), proposed_at=1)


def _registry(*ids: int) -> Registry:
    return Registry({i: raft_pb2.Member(member_id=i, raft_address=f"10.0.0.{i & 0xF}:8444") for i in ids})


def _store(path: Path, member: int = A, cluster: str = CLUSTER) -> None:
    """A stopped member's store: a snapshot at index 2 (keys a, b), then entries 3-6 (keys c-f), term 3."""
    state = MeshState()
    state.apply(1, _put("a", "1"))
    state.apply(2, _put("b", "2"))
    storage = SqliteStorage.open(path, create=True, cluster_id=cluster, member_id=member)
    try:
        snap = Snapshot(
            SnapshotMetadata(index=2, term=2, conf_state=ConfState(voters=(A, B, C))),
            encode_snapshot(_registry(A, B, C), state.snapshot()),
        )
        entries = [Entry(i, 3, data=_put(k, str(i))) for i, k in zip(range(3, 7), "cdef", strict=True)]
        storage.save(HardState(term=3, vote=A, commit=6), entries, snap)
    finally:
        storage.close()


def _backup(index: int = 4, term: int = 2, cluster: str = CLUSTER) -> admin_pb2.ClusterBackup:
    """A backup taken at ``index``: keys a, b and "x" (a key the store's own log never had)."""
    state = MeshState()
    for i, (k, v) in enumerate([("a", "1"), ("b", "2"), ("x", "from-backup")], start=1):
        state.apply(i, _put(k, v))
    data = encode_snapshot(_registry(A, B, C), state.snapshot())
    info = admin_pb2.SnapshotInfo(
        cluster_id=cluster,
        index=index,
        term=term,
        taken_by="b2",
        taken_at=Timestamp(seconds=1),
        size=len(data),
    )
    return admin_pb2.ClusterBackup(info=info, data=data, sha256=hashlib.sha256(data).digest())


def _saved(path: Path, b: admin_pb2.ClusterBackup) -> Path:
    write_backup(path, b.info, b.data, b.sha256)
    return path


def test_a_backup_file_round_trips_and_is_private(tmp_path: Path) -> None:
    b = _backup()
    f = _saved(tmp_path / "mesh.backup", b)
    assert f.stat().st_mode & 0o777 == 0o600
    assert read_backup(f) == b
    assert [p.name for p in tmp_path.iterdir()] == ["mesh.backup"]  # no temporary file left


def test_a_stream_that_does_not_match_its_checksum_or_size_is_not_written(tmp_path: Path) -> None:
    b = _backup()
    with pytest.raises(RecoveryError, match="corrupted"):
        write_backup(tmp_path / "x", b.info, b.data[:-1] + b"?", b.sha256)
    with pytest.raises(RecoveryError, match="incomplete"):
        write_backup(tmp_path / "x", b.info, b.data[:-1], b.sha256)
    with pytest.raises(RecoveryError, match="no snapshot header"):
        write_backup(tmp_path / "x", admin_pb2.SnapshotInfo(), b.data, b.sha256)
    assert list(tmp_path.iterdir()) == []


def _flip_middle(raw: bytes) -> bytes:
    mid = len(raw) // 2
    return raw[:mid] + bytes([raw[mid] ^ 0xFF]) + raw[mid + 1 :]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"PK\x03\x04" + raw[4:], "not a TunnelMesh backup"),
        (lambda raw: raw[: len(raw) - 40], "truncated|incomplete|corrupted"),
        (_flip_middle, "corrupted"),
    ],
    ids=["other file", "truncated", "flipped byte"],
)
def test_a_damaged_backup_file_is_refused_with_the_reason(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    f = _saved(tmp_path / "mesh.backup", _backup())
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(RecoveryError, match=message):
        read_backup(f)


def test_restore_makes_the_member_the_only_voter_with_the_backups_state(tmp_path: Path) -> None:
    _store(tmp_path)
    r = restore_backup(tmp_path, _backup(index=4, term=2))
    assert (r.cluster_id, r.member_id, r.removed) == (CLUSTER, A, (B, C))
    assert r.index == 7 and r.term == 3  # past the store's last index (6) and the backup's (4); its term
    storage = SqliteStorage.open(tmp_path)
    try:
        snap = storage.snapshot()
        assert (snap.index, snap.term, snap.metadata.conf_state.voters) == (7, 3, (A,))
        assert storage.last_index() == 7 and storage.hard_state.commit == 7
        registry, state_bytes = decode_snapshot(snap.data)
        assert list(registry.members) == [A] and registry.removed == {B, C}
        state = MeshState.from_snapshot(state_bytes)
        kv = {k.decode(): e.value.decode() for k, e in state.kv_items()}
        assert kv == {"a": "1", "b": "2", "x": "from-backup"}  # the store's entries 3-6 are gone
    finally:
        storage.close()


def test_restore_refuses_another_clusters_data_dir_and_changes_nothing(tmp_path: Path) -> None:
    _store(tmp_path, cluster="c-other")
    with pytest.raises(RecoveryError, match="belongs to cluster c-other, the backup to c-test"):
        restore_backup(tmp_path, _backup())
    storage = SqliteStorage.open(tmp_path)
    try:
        assert (storage.snapshot().index, storage.last_index()) == (2, 6)
    finally:
        storage.close()


def test_restore_refuses_a_member_the_cluster_does_not_know(tmp_path: Path) -> None:
    _store(tmp_path, member=0xD4)
    with pytest.raises(RecoveryError, match="never finished joining"):
        restore_backup(tmp_path, _backup())
