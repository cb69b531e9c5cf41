"""Config versions and the change feed that WatchConfig deltas are computed from."""

from __future__ import annotations

import pytest

from tunnelmesh.api.v1 import state_pb2
from tunnelmesh.coord.state import ChangeSet, MeshState, SnapshotError, ns_to_timestamp

from .builders import HOUR, T0, Driver, init_mesh, join_token, register


def mesh(nodes: int) -> Driver:
    d = Driver()
    d.ok("initialize_mesh", init_mesh())  # index 1
    d.ok("create_join_token", join_token(reusable=True, expires_at=T0 + 5 * HOUR))  # index 2
    for i in range(nodes):
        d.ok("register_node", register(i))  # indexes 3, 4, ...
    return d


def test_config_version_is_the_index_of_the_last_config_visible_change() -> None:
    d = mesh(2)
    assert d.state.config_version == 4
    d.ok("kv_put", state_pb2.KvPut(key=b"k"))
    d.ok("create_join_token", join_token("jt-2"))
    seen = state_pb2.NodeSeen(node_id="n-000000000000", last_seen=ns_to_timestamp(T0 + 1))
    d.ok("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[seen]))
    assert d.state.config_version == 4, "KV, tokens and last_seen alone do not change what nodes see"
    d.ok("rename_node", state_pb2.RenameNode(node_id="n-000000000000", new_name="db"))
    assert d.state.config_version == d.index


def test_changes_since_merges_upserts_and_removals() -> None:
    d = mesh(3)  # nodes at 3, 4, 5
    d.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000001"))  # 6
    d.ok("rename_node", state_pb2.RenameNode(node_id="n-000000000002", new_name="db"))  # 7
    changes = d.state.changes_since(4)
    freed = frozenset({"host1", "host2"})  # the removed node's name and the renamed node's old name
    assert changes == ChangeSet(
        4, 7, frozenset({"n-000000000002"}), frozenset({"n-000000000001"}), False, freed
    )
    assert d.state.changes_since(0) == ChangeSet(
        0, 7, frozenset({"n-000000000000", "n-000000000002"}), frozenset({"n-000000000001"}), True, freed
    )
    assert d.state.changes_since(7) == ChangeSet(7, 7)
    assert d.state.changes_since(7).empty  # type: ignore[union-attr]


def test_changes_since_a_version_older_than_the_feed_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunnelmesh.coord.state as state_module

    monkeypatch.setattr(state_module, "CHANGE_FEED_CAPACITY", 4)
    d = mesh(12)  # changes at 1, 3..14; trimmed in chunks
    assert d.state.changes_since(2) is None
    recent = d.state.changes_since(12)
    assert recent is not None and recent.upserted_node_ids == {"n-00000000000a", "n-00000000000b"}


def test_restored_state_keeps_the_version_and_answers_old_versions_with_none() -> None:
    d = mesh(3)
    restored = MeshState.from_snapshot(d.state.snapshot())
    assert restored.config_version == d.state.config_version == 5
    assert restored.changes_since(4) is None  # history before the snapshot is gone: full snapshot
    assert restored.changes_since(5) == ChangeSet(5, 5)
    d2 = Driver(restored)
    d2.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000000"))
    assert restored.changes_since(5) == ChangeSet(
        5, 6, removed_node_ids=frozenset({"n-000000000000"}), removed_names=frozenset({"host0"})
    )


def test_liveness_is_not_a_config_change() -> None:
    # Liveness rounds mark hundreds of nodes online at once: as config changes they resent every such peer to
    # every watcher (bench/control). The state still records it, for `tunnelmesh nodes list`.
    d = mesh(1)
    version = d.state.config_version
    for online in (True, False, True):
        seen = state_pb2.NodeSeen(node_id="n-000000000000", online=online, last_seen=ns_to_timestamp(T0 + 9))
        d.ok("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[seen]))
        node = d.state.get_node("n-000000000000")
        assert node is not None and node.online == online and node.last_seen == T0 + 9
        assert d.state.config_version == version and node.modified_index == version
    assert d.state.changes_since(version) == ChangeSet(version, version)


def test_memoized_change_sets_are_dropped_when_the_version_moves() -> None:
    d = mesh(2)
    assert d.state.changes_since(3) == ChangeSet(3, 4, frozenset({"n-000000000001"}))
    d.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000000"))
    assert d.state.changes_since(3) == ChangeSet(
        3, 5, frozenset({"n-000000000001"}), frozenset({"n-000000000000"}), removed_names=frozenset({"host0"})
    )


def test_snapshot_carries_the_config_version_even_when_the_last_change_was_a_removal() -> None:
    d = mesh(3)  # nodes at 3, 4, 5
    d.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000002"))  # 6: no node has modified_index 6
    d.ok("kv_put", state_pb2.KvPut(key=b"k"))  # 7: not config-visible
    data = d.state.snapshot()
    snap = state_pb2.StateSnapshot.FromString(data)
    assert snap.config_version == 6
    assert snap.SerializeToString(deterministic=True) == data, "field 11 is framed where protobuf puts it"
    restored = MeshState.from_snapshot(data)
    assert restored.config_version == 6
    assert restored.changes_since(6) == ChangeSet(6, 6)
    assert restored.changes_since(5) is None


@pytest.mark.parametrize("version", [3, 8])
def test_restore_refuses_a_config_version_outside_the_nodes_and_applied_index(version: int) -> None:
    d = mesh(2)  # nodes at 3, 4
    d.ok("kv_put", state_pb2.KvPut(key=b"k"))  # 5
    snap = state_pb2.StateSnapshot.FromString(d.state.snapshot())
    snap.config_version = version  # below node 4's modified_index, or beyond applied_index 5
    with pytest.raises(SnapshotError, match="config_version"):
        MeshState.from_snapshot(snap.SerializeToString())
